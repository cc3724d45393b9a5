"""One run over 2 SLURM nodes x 2 tasks equals the same run on 1 node x 4 tasks.

The 2-node cluster is launchers/local_slurm_multi.sh: the controller and two slurmd, each in its
own network and UTS namespace on a bridge of this host, so the ranks on node vsn2 reach rank 0
on vsn1 over a real (virtual) network, by the name and address SLURM gives them. The fixture
starts it when it does not answer (root needed) and stops it again if it started it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from launchers.runs import read_job
from launchers.sweep import main
from scaling.results import TIMING_KEYS, read_final, read_metrics
from tests.test_slurm_sweep import alive, finished, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launchers" / "local_slurm_multi.sh"
MULTI_CONF = "/etc/slurm-multi/slurm.conf"
# 4 ranks of the micro ViT, every rank reading its slice of one global batch order
GRID = ["--preset", "demo", "--sizes", "mu", "--budget-kind", "steps", "--budgets", "30",
        "--gpus", "4", "--cluster", "slurm", "--time", "20", "--set", "log_every=5",
        "--set", "data_order=global"]
TIMEOUT_S = 420
STRIP = TIMING_KEYS


def nodes_up() -> list[str]:
    """The multi-node cluster's nodes that are idle / mixed / allocated."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, timeout=15, check=False,
                             env=dict(os.environ, SLURM_CONF=MULTI_CONF)).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [n for n, s in (line.split() for line in out.splitlines() if line.strip())
            if s.rstrip("*~#$@+-^!%").startswith(("idle", "mix", "alloc"))]


@pytest.fixture(scope="module")
def two_nodes():
    """SLURM_CONF pointing at the running 2-node cluster for the module's tests."""
    started = False
    if len(nodes_up()) < 2:
        if os.geteuid() != 0:
            pytest.skip("the 2-node cluster is not running and we are not root to start it "
                        "(sudo bash launchers/local_slurm_multi.sh)")
        run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                             timeout=600, check=False)
        if run.returncode != 0 or len(nodes_up()) < 2:
            pytest.fail(f"local_slurm_multi.sh could not start 2 nodes (exit {run.returncode}):"
                        f"\n{run.stdout}\n{run.stderr}")
        started = True
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", MULTI_CONF)
        yield nodes_up()
    if started:
        subprocess.run(["bash", str(SCRIPT), "--stop"], capture_output=True, timeout=120,
                       check=False)


@pytest.fixture(scope="module")
def runs(two_nodes, digits_data, tmp_path_factory):
    """The same run swept as 2 nodes x 2 tasks and as 1 node x 4 tasks; both waited for."""
    root = tmp_path_factory.mktemp("multinode")
    for name, per_node in (("two_nodes", "2"), ("one_node", "4")):
        assert main([*GRID, "--gpus-per-node", per_node, "--name", name,
                     "--data", digits_data, "--results", str(root)]) == 0
    (two,) = (root / "two_nodes").glob("mu4_*")
    (one,) = (root / "one_node").glob("mu4_*")
    try:
        wait_for(lambda: finished([two, one]) and not alive([two, one]), "both runs",
                 TIMEOUT_S)
        yield two, one
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", *alive([two, one])], check=False, timeout=30)


def log_hosts(run: Path) -> dict[int, str]:
    """rank -> the host its SLURM task ran on (from the header TrainJob writes per attempt)."""
    hosts = {}
    for rank in range(4):
        header = (run / "logs" / f"rank{rank}.log").read_text().splitlines()[0].split()
        hosts[rank] = header[header.index("host") + 1]
    return hosts


def test_two_nodes_rendezvous_from_slurm_variables(runs, two_nodes):
    two, one = runs
    assert sorted(two_nodes) == ["vsn1", "vsn2"]
    job = read_job(two)
    assert job["attempts"][0]["nodes"] == "vsn[1-2]" and job["attempts"][0]["exit"] == 0
    hosts = log_hosts(two)
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts  # 2 tasks on each node
    assert {hosts[0], hosts[2]} == {"vsn1", "vsn2"}
    assert len(set(log_hosts(one).values())) == 1  # the reference: all 4 tasks on one node
    assert read_job(one)["attempts"][0]["nodes"] in ("vsn1", "vsn2")


def test_two_nodes_give_the_result_of_one_node(runs):
    two, one = runs
    a, b = read_final(two), read_final(one)
    assert a["status"] == b["status"] == "ok" and a["world_size"] == b["world_size"] == 4
    assert a["steps"] == b["steps"] == 30
    for key in ("final_top1", "final_top5", "best_top1", "final_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    rows_a = [{k: v for k, v in r.items() if k not in STRIP} for r in read_metrics(two)]
    rows_b = [{k: v for k, v in r.items() if k not in STRIP} for r in read_metrics(one)]
    assert [(r["kind"], r["step"]) for r in rows_a] == [(r["kind"], r["step"]) for r in rows_b]
    losses = [(ra["loss"], rb["loss"]) for ra, rb in zip(rows_a, rows_b) if "loss" in ra]
    assert len(losses) >= 6
    assert [x for x, _ in losses] == pytest.approx([y for _, y in losses], rel=1e-5)


def test_master_is_the_first_host_as_slurm_expands_the_list(two_nodes):
    from scaling import dist

    assert dist.master_host("vsn[1-2]") == "vsn1"
    assert dist.master_host("gpu[003-005,9],cpu1") == dist.first_host("gpu[003-005,9]")
    # a list of two bracketed parts: SLURM expands it, the fallback parse alone could not
    two_parts = "rack[1-2]-n[3-4]"
    assert dist.master_host(two_parts) == "rack1-n3" != dist.first_host(two_parts)
    info = dist.dist_info({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "vsn[1-2]",
                           "SLURM_JOB_ID": "7"})
    assert (info.rank, info.world_size, info.local_rank, info.node_rank, info.master_addr) == \
        (3, 4, 1, 1, "vsn1")
