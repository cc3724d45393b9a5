"""The package layers, checked on the source: the model file is plain PyTorch, the library never
imports the launchers or the analysis, and DeepSpeed is imported in one library module."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Top-level package names of every import in a file, inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


LIBRARY = sorted((REPO / "scaling").rglob("*.py"))


def test_the_model_imports_only_torch_and_the_standard_library():
    extra = imported(REPO / "scaling" / "model.py") - set(sys.stdlib_module_names) - {"torch"}
    assert not extra, f"scaling/model.py imports {sorted(extra)}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_neither_launchers_nor_analysis(path):
    assert not imported(path) & {"launchers", "analysis"}


def test_deepspeed_is_imported_by_one_library_module():
    users = [p.relative_to(REPO).as_posix() for p in LIBRARY if "deepspeed" in imported(p)]
    assert users == ["scaling/engine.py"]


def test_the_checks_see_a_function_level_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from launchers.presets import demo\n    import analysis.fit\n")
    assert imported(probe) == {"launchers", "analysis"}
