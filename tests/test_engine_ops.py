"""DeepSpeed's CPU shared-memory op: not compiled for a single rank (it has no peer), and its
one-time compile is kept out of a run's device-hours."""

import json
import os
import subprocess
import sys

from scaling import results
from scaling.data import make_builtin_shards


def test_single_rank_run_compiles_no_op_and_charges_no_build(tmp_path):
    data = make_builtin_shards("digits", tmp_path / "digits").root
    cache = tmp_path / "torch_extensions"  # empty: any JIT build would land here
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "scaling.train", "--model", "mu/4",
                          "--image-size", "8", "--batch-size", "32", "--num-workers", "0",
                          "--data", str(data), "--out", str(out), "--steps", "10",
                          "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "shm_comm" not in run.stderr + run.stdout
    assert not cache.exists() or not any(cache.rglob("*.so"))
    final = json.loads((out / results.FINAL_FILE).read_text())
    assert final["op_build_s"] == 0.0
    assert final["device_hours"] == final["wall_hours"]
