"""Shared fixtures: the local SLURM cluster, built-in data; and the strict-skip rule of CI.

With VIT_SCALING_STRICT=1 (CI sets it, see .ci/run) a skip of any test marked `slurm`,
`multiproc` or `mount` is reported as a failure: those tests must run in CI, never silently vanish.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaling.data.writer import Encoding, Source, write_dataset

REPO = Path(__file__).resolve().parents[1]
STRICT = os.environ.get("VIT_SCALING_STRICT") == "1"
STRICT_MARKERS = ("slurm", "multiproc", "mount")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under VIT_SCALING_STRICT=1, a skipped slurm/multiproc test fails instead."""
    outcome = yield
    report = outcome.get_result()
    marked = [m for m in STRICT_MARKERS if item.get_closest_marker(m)]
    if STRICT and marked and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"VIT_SCALING_STRICT=1: a test marked {marked} must not skip "
                           f"(skip reason: {reason})")


def sinfo_node_states() -> list[str]:
    """Node states that `sinfo` reports, or [] when SLURM is absent or does not answer."""
    if shutil.which("sinfo") is None:
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True,
                             check=False, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []


def _usable(states: list[str]) -> bool:
    return any(s.rstrip("*~#$@+-^!%").startswith(("idle", "mix", "alloc")) for s in states)


@pytest.fixture(scope="session")
def slurm() -> dict:
    """A running SLURM cluster: the one here, or a one-node one started by local_slurm.sh
    (as root); skips otherwise (a failure under VIT_SCALING_STRICT=1)."""
    if not _usable(sinfo_node_states()):
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster answers `sinfo` and we are not root to start one "
                        "(sudo bash launchers/local_slurm.sh)")
        run = subprocess.run(["bash", str(REPO / "launchers" / "local_slurm.sh")],
                             capture_output=True, text=True, timeout=900, check=False)
        if run.returncode != 0 or not _usable(sinfo_node_states()):
            pytest.fail(f"launchers/local_slurm.sh could not start SLURM (exit "
                        f"{run.returncode}):\n{run.stdout}\n{run.stderr}")
    return {"states": sinfo_node_states()}


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> str:
    """The built-in digits shards (8x8 images, 10 classes), made once per session."""
    from scaling.data import make_builtin_shards

    return str(make_builtin_shards("digits", tmp_path_factory.mktemp("data") / "digits").root)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def load_item(item):
    """Test source items: ('png', seed) -> a real PNG, ('bad', bytes) -> stored as is."""
    kind, value = item
    data = _png(value) if kind == "png" else value
    return ("jpg" if kind == "bad" else "png", data, (8, 8)), 1


@pytest.fixture
def corrupt_dir(tmp_path):
    """One val shard of 10 samples, two of them corrupt: a truncated JPEG and garbage bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(buf, format="JPEG")
    items = [("png", i) for i in range(10)]
    items[3] = ("bad", buf.getvalue()[:200])
    items[7] = ("bad", b"\xff\xd8 garbage, not an image")
    source = Source("test", tuple("abc"), {"train": items, "val": items}, load_item, 8)
    write_dataset(source, tmp_path, enc=Encoding(), shard_size=10, args={})
    return tmp_path


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "320k") as root, unmounted afterwards; a
    real file system that really fills up or is really read-only. Skips when not root (a
    failure under VIT_SCALING_STRICT=1 for tests marked `mount`)."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        opts = ",".join((f"size={size}", *options))
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (root needed): {run.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def train_env(faults: str | None = None) -> dict:
    """The environment of a `python -m scaling.train` test subprocess: one thread, unbuffered,
    no launcher or SLURM variables inherited from the test's own environment, and the given
    fault injection (VIT_SCALING_FAULTS, scaling.run.faults_from_env) or none."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_JOB_ID", "VIT_SCALING_FAULTS"):
        env.pop(k, None)
    if faults:
        env["VIT_SCALING_FAULTS"] = faults
    return env


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """A directory served on http://127.0.0.1:PORT/ for the test, stopped afterwards."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    served = tmp_path / "www"
    served.mkdir()
    handler = functools.partial(_Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
