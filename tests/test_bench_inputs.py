"""Bad `python -m scaling.bench` (and `python -m launchers.bench_overhead`) inputs fail before
any benchmark runs: exit 2, one stderr line naming the flag, nothing written. Through the real
CLI in a subprocess (torch import only)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.bench import env as bench_env

MICRO = ["--image-size", "16", "--num-classes", "10", "--batch-size", "2", "--steps", "1",
         "--warmup", "0", "--rounds", "1"]


OVERHEAD = "launchers.bench_overhead"


def bench_cli(args, cwd=None, module="scaling.bench"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def assert_rejected(proc, *named, prog="scaling.bench"):
    """Exit 2, exactly one stderr line naming each of `named`, and no benchmark output."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"python -m {prog}: error: ")
    for text in named:
        assert text in lines[0], lines[0]
    assert proc.stdout == ""  # no row printed, no "rows appended"
    return lines[0]


@pytest.mark.parametrize("sizes,expected", [
    (",", "--sizes ',' names no model"),
    (" , ,", "--sizes ' , ,' names no model"),
    ("mu/4,,m2/4", "--sizes 'mu/4,,m2/4' has an empty entry"),
    ("mu/4,", "--sizes 'mu/4,' has an empty entry"),
    ("mu/4,m2/4,mu/4", "--sizes names mu/4 more than once"),
    ("mu/4,X/16", "--sizes: unknown ViT name 'X'"),
    ("", "--sizes is required"),
])
def test_bad_sizes_fail_naming_sizes_and_write_nothing(tmp_path, sizes, expected):
    out = tmp_path / "bench.jsonl"
    proc = bench_cli(["--sizes", sizes, *MICRO, "--out", out])
    assert_rejected(proc, expected)
    assert not out.exists()


def test_zero_memory_mode_checks_sizes_too(tmp_path):
    out = tmp_path / "rows.jsonl"
    assert_rejected(bench_cli(["--zero-memory", "--sizes", ",", "--out", out]),
                    "--sizes ',' names no")
    assert not out.exists()


def test_the_overhead_mode_moved_with_a_pointer():
    assert_rejected(bench_cli(["--overhead"]), "python -m launchers.bench_overhead")


def test_overhead_takes_one_size_and_sane_train_args(tmp_path):
    out = tmp_path / "overhead.jsonl"
    for sizes in ("mu/4,m2/4", ","):
        assert_rejected(bench_cli(["--sizes", sizes, "--out", out], module=OVERHEAD),
                        "runs one model", repr(sizes), prog=OVERHEAD)
    assert_rejected(bench_cli(["--train-args", '--log-every "5', "--out", out], module=OVERHEAD),
                    "No closing quotation", prog=OVERHEAD)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_rejected(bench_cli(["--work-dir", afile, "--out", out], module=OVERHEAD),
                    f"--work-dir {afile} exists and is not a directory", prog=OVERHEAD)
    assert not out.exists() and afile.read_text() == "x"


@pytest.mark.parametrize("mode", [[], ["--zero-memory"], ["overhead"]])
def test_out_a_directory_is_rejected_before_any_work(tmp_path, mode):
    work = tmp_path / "work"
    if mode == ["overhead"]:
        proc = bench_cli(["--work-dir", work, "--out", tmp_path], module=OVERHEAD)
        assert_rejected(proc, f"--out {tmp_path} is a directory", prog=OVERHEAD)
    else:
        proc = bench_cli([*mode, "--sizes", "mu/4", *MICRO, "--out", tmp_path])
        assert_rejected(proc, f"--out {tmp_path} is a directory")
    assert sorted(tmp_path.iterdir()) == []  # no work dir, no data, no rows


def test_out_under_a_file_is_rejected(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for out in (afile / "bench.jsonl", afile / "deeper" / "bench.jsonl"):
        assert_rejected(bench_cli(["--sizes", "mu/4", *MICRO, "--out", out]),
                        f"--out {out} cannot be created: {afile} is not a directory")
    assert afile.read_text() == "keep"


def _unwritable_dir(tmp_path) -> Path:
    """A directory this process cannot create files in: a read-only tmp dir for a normal user;
    for root (whom permission bits do not stop), sysfs, which refuses new files to anyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / "vit-scaling-probe").write_text("")
    except OSError:
        return folder
    (folder / "vit-scaling-probe").unlink()
    pytest.skip("no directory here refuses root's writes")


def test_out_in_an_unwritable_dir_is_rejected(tmp_path):
    folder = _unwritable_dir(tmp_path)
    with pytest.raises(OSError):  # really unwritable, not just assumed so
        (folder / "bench.jsonl").write_text("")
    for out in (folder / "bench.jsonl", folder / "sub" / "bench.jsonl"):
        assert_rejected(bench_cli(["--sizes", "mu/4", *MICRO, "--out", out]),
                        f"--out {out} cannot be written (")


def test_the_default_out_is_checked_too(tmp_path):
    """Without --out rows go to results/bench/... under the working dir; that is checked too."""
    (tmp_path / "results").write_text("not a folder")
    line = assert_rejected(bench_cli(["--sizes", "mu/4", *MICRO], cwd=tmp_path),
                           "the default --out results/bench/local/bench.jsonl cannot be created")
    assert "results is not a directory" in line


def test_check_out_leaves_nothing_behind(tmp_path):
    new = tmp_path / "a" / "b" / "bench.jsonl"
    assert bench_env.check_out(new) == new
    assert sorted(tmp_path.iterdir()) == []  # the folders it made to probe are gone
    old = tmp_path / "old.jsonl"
    old.write_text('{"model": "mu/4"}\n')
    bench_env.check_out(old)
    assert old.read_text() == '{"model": "mu/4"}\n' and sorted(tmp_path.iterdir()) == [old]
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"^--out .*/d is a directory"):
        bench_env.check_out(tmp_path / "d")
