"""The shape of the package: no import cycle between sparsec's modules (an import inside a function
counts too), no Python module over 500 lines, every pass in its own file with its own test file,
and a registry entry found for every method and lowering target file."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import sparsec
from sparsec import methods
from sparsec.lowering import targets

PACKAGE = Path(sparsec.__file__).parent
TESTS = Path(__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sparsec modules `path` imports (the closest module for `from a.b import name`)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            wanted = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in wanted:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # a module importing its own package's __init__ is how Python works, not a cycle
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_import_cycles():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in _imports(path, set(files)))
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_every_pass_has_its_own_test_file():
    """tests/passes/test_<pass>.py, or (for the small ONNX passes) named by the docstring of
    tests/passes/test_onnx_small_passes.py."""
    passes = sorted(p.stem for p in (PACKAGE / "passes").glob("*.py") if p.stem != "__init__")
    small = ast.get_docstring(ast.parse((TESTS / "passes" / "test_onnx_small_passes.py").read_text())) or ""
    missing = [name for name in passes
               if not (TESTS / "passes" / f"test_{name}.py").is_file() and name not in small]
    assert not missing, f"passes without a test file: {missing}"


def test_every_method_and_target_file_registers():
    method_files = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "base", "smoothing"}
    modules = {cls.__module__.rpartition(".")[2] for cls in methods.registered().values()}
    assert method_files == modules
    target_files = {p.stem for p in (PACKAGE / "lowering" / "targets").glob("*.py")} - {"__init__", "base"}
    assert target_files == {type(t).__module__.rpartition(".")[2] for t in targets.all_targets()}
    assert targets.for_kind("linear").name == "block_sparse_linear"
    assert targets.for_kind("conv").name == "block_sparse_conv"
