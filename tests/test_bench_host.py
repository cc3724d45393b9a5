"""The host-cost benchmark (scaling/bench/host.py) at toy size through its CLI: every stage row,
the totals and the cores table add up (figures, not timings, are checked); bad flags exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scaling.bench import host
from scaling.flops import training_flops
from scaling.model import vit_config


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[str, list[dict]]:
    """One toy run of the CLI: (stdout, rows)."""
    out = tmp_path_factory.mktemp("host") / "host.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "scaling.bench.host", "--images", "6", "--batch-size", "4",
         "--rounds", "1", "--image-size", "32", "--width", "64", "--height", "48",
         "--models", "Ti/16,B/16", "--peak-tflops", "100", "--mfu", "0.4",
         "--cores-per-gpu", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_stage_rows_cover_both_paths(toy):
    _, rows = toy
    stages = {r["stage"]: r for r in rows if r["kind"] == "host_stage"}
    assert set(stages) == {*host.WORKERS, *host.DEVICE, "device_ops_cpu", "decode_crop_check"}
    for r in stages.values():
        assert r["path"] == "uint8" and r["images"] == 6 and r["image_size"] == 32
        assert r["cpu_ms_per_image"] >= 0 and r["wall_ms_per_image"] > 0
        assert r["pinned"] is False  # torch without CUDA cannot pin: the stand-in copy ran


def test_cores_table_is_rate_times_host_time(toy):
    stdout, rows = toy
    stages = {r["stage"]: r["cpu_ms_per_image"] for r in rows if r["kind"] == "host_stage"}
    cores = {r["model"]: r for r in rows if r["kind"] == "host_cores"}
    assert list(cores) == ["Ti/16", "B/16"]
    for name, r in cores.items():
        rate = 0.4 * 100e12 / training_flops(vit_config(name, image_size=32), 1)
        assert r["images_per_s_per_gpu"] == pytest.approx(rate, abs=0.05)
        for way, names in (("workers", host.WORKERS), ("device", host.DEVICE)):
            ms = r[f"host_ms_per_image_{way}"]
            assert ms == pytest.approx(sum(stages[s] for s in names), abs=1e-3)
            # the row's ms is rounded (4 decimals): relative, as the rate scales it up
            assert r[f"cores_per_gpu_{way}"] == pytest.approx(rate * ms / 1e3, rel=1e-3,
                                                              abs=0.01)
        assert r["cores_per_gpu_available"] == 8
        assert f"| {name} | {r['images_per_s_per_gpu']:,.0f} |" in stdout
    assert "host total, workers decode" in stdout and "host total, device decode" in stdout


@pytest.mark.parametrize("flags", [["--models", "Ti/16,X/99"], ["--mfu", "0"],
                                   ["--images", "0"], ["--quality", "101"]])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(flags, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    with pytest.raises(SystemExit) as e:
        host.main([*flags, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m scaling.bench.host: error:")
    assert not out.exists()
