"""The demo preset's downstream set: built once like its built-in data (cached), given to every
run as --fewshot with 1/5/10 shots and 3 draws, at the demo's 8 px, and named in run ids by its
name rather than where the cache lies."""

from launchers.cli import SweepOptions
from launchers.defaults import with_builtin_fewshot
from launchers.grid import GridOptions, build_grid
from launchers.presets import get_preset
from scaling.data import load_dataset_info


def _with_fewshot(monkeypatch, cache, data=None):
    monkeypatch.setenv("VIT_SCALING_DATA", str(cache))
    return with_builtin_fewshot(SweepOptions(data=data), get_preset("demo"))


def test_demo_runs_probe_a_cached_mirrored_digits_set_at_8px(tmp_path, monkeypatch, digits_data):
    preset = _with_fewshot(monkeypatch, tmp_path / "a")
    (folder,) = preset.train["fewshot"].split(",")
    info = load_dataset_info(folder)
    assert info.root.name == "digits-mirror" and info.source == "digits-mirror"
    assert info.image_size == 8
    assert info.image_size == load_dataset_info(digits_data).image_size  # no resize needed
    assert (preset.train["fewshot_shots"], preset.train["fewshot_seeds"]) == ("1,5,10", 3)
    stamp = (info.root / "dataset.json").stat().st_mtime_ns
    again = _with_fewshot(monkeypatch, tmp_path / "a")  # reused, not rebuilt
    assert again.train["fewshot"] == folder
    assert (info.root / "dataset.json").stat().st_mtime_ns == stamp

    digits = load_dataset_info(digits_data)
    opts = GridOptions(sizes=("mu", "m2"), budgets=(3e9,))
    specs = build_grid(preset, opts, digits, tmp_path / "res")
    assert all(s.cfg.fewshot == folder and s.cfg.fewshot_shots == "1,5,10" for s in specs)
    moved = build_grid(_with_fewshot(monkeypatch, tmp_path / "b"), opts, digits,
                       tmp_path / "res")
    assert [s.run_id for s in moved] == [s.run_id for s in specs]  # the cache's place: no
    plain = build_grid(get_preset("demo"), opts, digits, tmp_path / "res")
    assert not {s.run_id for s in plain} & {s.run_id for s in specs}  # probes: other runs


def test_given_data_or_own_fewshot_gets_no_builtin_downstream_set(tmp_path, monkeypatch):
    assert "fewshot" not in _with_fewshot(monkeypatch, tmp_path, data="/x").train
    own = get_preset("demo")
    own = own.replace(train={**own.train, "fewshot": "/y/mine"})
    monkeypatch.setenv("VIT_SCALING_DATA", str(tmp_path))
    assert with_builtin_fewshot(SweepOptions(), own).train["fewshot"] == "/y/mine"
    assert not list(tmp_path.iterdir())  # nothing built
