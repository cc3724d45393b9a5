"""The package layers, checked on the source: the model file is plain PyTorch, the library never
imports the launchers or the analysis, and DeepSpeed is imported in one library module."""

import ast
import subprocess
import sys
import tokenize
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
    """scaling.model: torch, the standard library, and its own torch-free config module."""
    extra = imported(REPO / "scaling" / "model.py") - set(sys.stdlib_module_names) - {"torch"}
    assert extra <= {"scaling"}, f"scaling/model.py imports {sorted(extra)}"
    project = {node.module for node in ast.walk(ast.parse((REPO / "scaling" / "model.py")
                                                          .read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scaling")}
    assert project <= {"scaling.vitconfig"}, project
    config = imported(REPO / "scaling" / "vitconfig.py") - set(sys.stdlib_module_names)
    assert not config, f"scaling/vitconfig.py imports {sorted(config)}"


def test_the_analysis_reads_results_without_torch():
    """Model shapes and compute come from torch-free modules (scaling.vitconfig, scaling.flops):
    the analysis starts without importing torch (seconds on a laptop)."""
    code = ("import sys, analysis.load.runs, analysis.fit.compute, analysis.report.build, analysis.report.summary_json; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_neither_launchers_nor_analysis(path):
    assert not imported(path) & {"launchers", "analysis"}


def test_deepspeed_is_imported_by_one_library_module():
    users = [p.relative_to(REPO).as_posix() for p in LIBRARY if "deepspeed" in imported(p)]
    assert users == ["scaling/engine.py"]


def test_the_checks_see_a_function_level_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from launchers.presets import demo\n    import analysis.fit.law\n")
    assert imported(probe) == {"launchers", "analysis"}


# -- the project's own imports: no cycles, no private names, lazy only with a reason -----------

PACKAGES = ("scaling", "launchers", "analysis")


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every module under the packages (a package is its
    __init__.py)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, local: bool = False):
    """(import node, inside a function?) of a module, leaving out `if TYPE_CHECKING:` blocks
    (they never run)."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_only(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
        yield from _imports(node, local or isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def project_imports(name: str, path: Path, known: dict[str, Path]):
    """(imported project module, name imported from it or None, line, end line, in a function?)
    of every import statement in module `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node, local in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in known
                       else (base, a.name) for a in node.names]
        for target, attr in targets:
            while target and target not in known:  # `import a.b.c` of a name, not a module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, attr, node.lineno, node.end_lineno, local


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, function-local imports included."""
    known = modules(root, packages)
    return {name: {t for t, *_ in project_imports(name, path, known)}
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_project_modules():
    assert cycles(import_graph(REPO)) == []


def test_the_cycle_check_fails_on_a_constructed_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")  # local, relative
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("")
    assert cycles(import_graph(tmp_path, ("pkg",))) == []


# The analysis' rooms, each reading only the ones before it: load <- fit <- report; the
# benchmarks (and the old loader kept as their oracle) only from outside the rooms.
ROOMS = ("analysis.load", "analysis.fit", "analysis.report")


def room_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a room imports a later room or the benchmarks."""
    def room(module: str) -> int | None:
        for i, prefix in enumerate((*ROOMS, "analysis.bench")):
            if module == prefix or module.startswith(prefix + "."):
                return i
        return None
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if room(a) is not None and room(a) < len(ROOMS) and room(b) is not None
                  and room(b) > room(a))


def test_the_analysis_rooms_import_only_earlier_rooms():
    assert room_violations(import_graph(REPO)) == []
    graph = {"analysis.load.runs": {"analysis.fit.noise"}, "analysis.fit.law": set(),
             "analysis.report.build": {"analysis.bench.load", "analysis.load.runs"}}
    assert room_violations(graph) == [("analysis.load.runs", "analysis.fit.noise"),
                                      ("analysis.report.build", "analysis.bench.load")]


def test_the_analysis_public_names_are_exported_by_the_rooms():
    from analysis.fit import fit_saturating_power_law
    from analysis.load import load_results
    from analysis.report import analyse
    assert callable(fit_saturating_power_law) and callable(load_results) and callable(analyse)


def private_imports(root: Path, packages=PACKAGES) -> set[tuple[str, str, str]]:
    """(importer, module, name) of every `from module import _name` between project modules."""
    known = modules(root, packages)
    return {(name, target, attr) for name, path in known.items()
            for target, attr, *_ in project_imports(name, path, known)
            if attr and attr.startswith("_") and not attr.startswith("__")}


def test_no_module_imports_another_modules_private_name():
    found = private_imports(REPO)
    assert found == set(), "make the name public, or move it"


def _comment_lines(path: Path) -> set[int]:
    with path.open() as f:
        return {tok.start[0] for tok in tokenize.generate_tokens(f.readline)
                if tok.type == tokenize.COMMENT}


def unexplained_local_imports(root: Path, packages=PACKAGES) -> list[str]:
    """`file:line` of each function-local import of a project module with no comment on its
    lines or the line above its block of imports (which should say why it is late: start-up
    cost, say)."""
    known, found = modules(root, packages), []
    for name, path in known.items():
        spans = {(line, end) for _, _, line, end, local in project_imports(name, path, known)
                 if local}
        comments = _comment_lines(path) if spans else set()
        ends = {end: line for line, end in spans}
        for line, end in spans:
            first = line
            while first - 1 in ends:  # the block of late imports this one is part of
                first = ends[first - 1]
            if not comments & {first - 1, *range(line, end + 1)}:
                found.append(f"{path.relative_to(root)}:{line}")
    return sorted(found)


def test_a_function_local_project_import_says_why_it_is_late():
    assert unexplained_local_imports(REPO) == []


def test_the_import_rules_see_private_names_and_unexplained_late_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_x = 1\n")
    (pkg / "b.py").write_text("from pkg.a import _x\n\n\ndef f():\n    from pkg import a\n\n\n"
                              "def g():\n    # late: start-up cost\n    import pkg.a\n"
                              "    from pkg import a\n\n    from pkg import a\n")
    assert private_imports(tmp_path, ("pkg",)) == {("pkg.b", "pkg.a", "_x")}
    assert unexplained_local_imports(tmp_path, ("pkg",)) == ["pkg/b.py:13", "pkg/b.py:5"]
