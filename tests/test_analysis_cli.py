"""analysis/plot_scaling.py end to end (a real subprocess), and the ViT paper Table 6 figure."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from analysis import plot_scaling
from analysis.load.cache import META_KEY, RACY_S
from analysis.report import paper
from analysis.report.build import analyse
from analysis.synthetic import (
    SIZES,
    write_bench,
    write_isoflop_results,
    write_run,
    write_synthetic_results,
)

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("error_vs_flops", "scaling_law_fit", "optimal_model_size", "throughput_mfu",
           "vit_paper_table6")


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "analysis/plot_scaling.py", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_cli_writes_every_figure_and_summary(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_isoflop_results(results, sweep="synth", seeds=(0, 1))  # sizes x budgets x seeds
    write_bench(results)
    (results / "synth" / "broken").mkdir()
    (results / "synth" / "broken" / "config.json").write_text("{")
    proc = _cli("--results", results, "--out", out, "--formats", "png,svg", "--n-boot", "30")
    assert proc.returncode == 0, proc.stderr
    for name in FIGURES:
        for fmt in ("png", "svg"):
            path = out / f"{name}.{fmt}"
            assert path.stat().st_size > 10_000, path
        with Image.open(out / f"{name}.png") as im:
            assert round(im.info["dpi"][0]) == 300
    for table in ("evals.csv", "evals.parquet", "runs.csv", "summary.json"):
        assert (out / table).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    for section in ("## Per model size", "## Measurement noise", "## Frontier points",
                    "## Scaling-law fit", "## Extrapolation check",
                    "## Compute-optimal model size (IsoFLOP profiles)",
                    "## Reference: ViT paper Table 6", "## Runs", "Skipped files: 1"):
        assert section in summary
    assert "synth/broken/config.json" in summary and "synth/broken/config.json" in proc.stderr
    assert "| H/14 |" in summary and "Mean |relative error|" in summary


def test_cli_fails_clearly_on_empty_results(tmp_path):
    proc = _cli("--results", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert "no runs under" in proc.stderr and str(tmp_path) in proc.stderr
    assert not (tmp_path / "out" / "summary.md").exists()


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        plot_scaling.parse_args(["--formats", "png,gif"])
    assert exc.value.code == 2 and "gif" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_scaling.parse_args(["--x", "tokens"])


def test_few_runs_and_no_bench_give_notes_not_crashes(tmp_path):
    write_synthetic_results(tmp_path, n_evals=2, sizes=[("mu/4", 20_000, 1e6),
                                                        ("m2/4", 80_000, 4e6)])
    write_run(tmp_path / "synth" / "live", "m2/4", None, 4e6, [], status="running")
    stale = tmp_path / "out" / "scaling_law_fit.png"  # from an earlier, larger run
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    report = analyse(tmp_path, tmp_path / "out", metric="top1", x="images", n_boot=10)
    assert not stale.exists()
    names = {p.name for p in report.figures}
    # no run has a FLOPs budget: no IsoFLOP profile, so no optimal-size figure (said why)
    assert names == {"top1_vs_images.png", "vit_paper_table6.png"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "No fit: only" in summary and "throughput/MFU figure skipped" in summary
    assert "optimal-size figure skipped: no finished run with a FLOPs budget" in summary
    assert "| 2 | 1 | 0 | 0 |" in summary  # ok, running, failed, diverged


def test_paper_figure_has_18_points_and_fits_the_6_vit_rows():
    table = paper.load_table6()
    assert len(table) == 18
    assert table["family"].value_counts().to_dict() == {"ResNet": 7, "ViT": 6, "Hybrid": 5}
    fits = {c: paper.fit_table6(table, c, n_boot=20) for c in paper.PANELS}
    for res in fits.values():
        assert res["n"] == 6 and all(n.startswith("ViT-") for n in res["names"])
        assert res["fit"]["n"] == 6
    fig = paper.table6_figure(table, fits)
    for ax in fig.axes:
        points = sum(len(c.get_offsets()) for c in ax.collections)
        assert points == 18, ax.get_title()
    # the fitted law passes close to the ViT points it was fitted to (ImageNet panel)
    vit = table[table["family"] == "ViT"]
    pred = 100 * (1 - paper.F.predict(fits["imagenet"]["fit"], vit["exaflops"]))
    assert abs(pred - vit["imagenet"]).max() < 0.5
    assert (paper.TABLE6.read_text().splitlines()[0].startswith("# Dosovitskiy et al."))


@pytest.mark.parametrize("column", ["exaflops", "imagenet"])
def test_table6_missing_column_is_named(tmp_path, column):
    table = paper.load_table6()
    path = tmp_path / "t6.csv"
    table.drop(columns=[column, "family", "average5"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=column):
        paper.load_table6(path)


def _finetune_tree(results: Path) -> None:
    """A sweep of pre-training runs and its fine-tune folder (launchers/finetune_runs.py)."""
    write_synthetic_results(results, n_evals=4)
    pre = next((results / "synth").iterdir())
    model, params, macs = SIZES[0]
    write_run(results / "synth-finetune" / "ft0", model, params, macs, [], status="running",
              config={"init_from": str(pre), "data": "/data/stripes"})


def test_unknown_sweep_is_one_line_naming_the_sweeps_exit_2(tmp_path):
    """N36: --sweep nope exited 1 after reading everything; now exit 2 before any work, one
    line listing the sweeps there are (the fine-tune folder is no sweep)."""
    results, out = tmp_path / "results", tmp_path / "out"
    _finetune_tree(results)
    proc = _cli("--results", results, "--out", out, "--sweep", "nope")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--sweep nope: no such sweep" in proc.stderr and "the sweeps there: synth " in (
        proc.stderr) and "synth-finetune" not in proc.stderr
    assert not out.exists()  # nothing written, not even the cache


def test_a_fine_tune_folder_as_sweep_names_the_sweep_and_metric_to_use(tmp_path):
    """N36b: --sweep synth-finetune said "not found" although the folder exists; now it says
    that fine-tunes are read through the pre-training sweep's transfer rows, and how."""
    results, out = tmp_path / "results", tmp_path / "out"
    _finetune_tree(results)
    proc = _cli("--results", results, "--out", out, "--sweep", "synth,synth-finetune")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "synth-finetune holds fine-tune runs" in proc.stderr
    assert "use --sweep synth --metric finetune:stripes" in proc.stderr
    assert not out.exists()


def _settle(root: Path) -> None:
    """Wait until every file is older than the metrics cache's racy window (entries stored)."""
    newest = max(p.stat().st_ctime for p in root.rglob("*") if p.is_file())
    time.sleep(max(0.0, newest + RACY_S + 0.05 - time.time()))


def test_cache_files_of_the_wrong_shape_are_misses_and_rewritten(tmp_path):
    """N37c: a fits-cache file holding valid JSON of another shape, N37d: a metrics cache whose
    entries have the wrong keys or types, gave KeyError/AttributeError on every later plot until
    deleted. Now each is a miss: refitted or parsed again, and rewritten."""
    results, out, cache = tmp_path / "results", tmp_path / "out", tmp_path / "cache"
    write_synthetic_results(results, n_evals=6)
    _settle(results)
    args = ("--results", results, "--out", out, "--cache-dir", cache, "--n-boot", "10",
            "--formats", "png")
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    fit = json.loads((out / "summary.json").read_text())["fit"]
    fits = sorted((cache / "fits").glob("*.json"))
    shapes = [{}, [1, 2], {"fit": None}, "text", {"key": "x", "digest": "y", "value": {}}]
    for i, path in enumerate(fits):  # N37c: valid JSON, not a stored fit
        path.write_text(json.dumps(shapes[i % len(shapes)]))
    parquet = next(cache.glob("metrics-*.parquet"))
    table = pq.read_table(parquet)
    meta = json.loads(table.schema.metadata[META_KEY])
    n_files = len(meta["files"])
    assert n_files == 5
    for entry, (key, bad) in zip(meta["files"], [("key", None), ("skips", 5), ("max_flops", "x"),
                                                 ("start", -1), ("path", ["a"])]):
        entry[key] = bad  # N37d: valid Parquet and JSON, entries of the wrong shape
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta)}), parquet)
    second = _cli(*args)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr
    assert f"0 files reused, {n_files} parsed" in second.stdout
    assert json.loads((out / "summary.json").read_text())["fit"] == fit  # refitted the same
    for path in fits:  # rewritten as stored fits
        assert set(json.loads(path.read_text())) == {"key", "digest", "value"}, path
    third = _cli(*args)
    assert third.returncode == 0 and f"{n_files} files reused, 0 parsed" in third.stdout
    pq.write_table(table.replace_schema_metadata({META_KEY: b"[1, 2]"}), parquet)
    assert f"0 files reused, {n_files} parsed" in _cli(*args).stdout  # metadata of no shape
