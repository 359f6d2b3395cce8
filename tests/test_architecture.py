"""The package's shape, checked from its sources: imports run one way (no cycle, module-level or inside a
function), no source file over 600 lines, and no code outside the strategies (runtime/strategies/)
and their registry (planner/strategies.py) compares a strategy's name."""
import ast
from pathlib import Path

import networkx as nx

from hsplit.planner.strategies import NAMES

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in ROOT.rglob("*.py") if not ({"tests", "bench", "notebooks", ".venv", "build"}
                                                         & set(p.relative_to(ROOT).parts)))


def module_name(path: Path) -> str:
    parts = ["hsplit", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every hsplit module imported anywhere in the file (`from a.b import c` counts a.b, and a.b.c when
    that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("hsplit")}


def test_sources_are_found():
    names = {module_name(p) for p in SOURCES}
    assert {"hsplit.cli", "hsplit.planner.milp", "hsplit.runtime.train.loop", "hsplit.runtime.strategies.hafl",
            "hsplit.runtime.distributed.server"} <= names


def test_the_package_has_no_import_cycle():
    modules = {module_name(p): p for p in SOURCES}
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for m in imports(path):
            if m in modules and m != name and not name.startswith(m + "."):   # a package's own __init__
                graph.add_edge(name, m)
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_the_planner_never_imports_the_runtime():
    for path in SOURCES:
        if module_name(path).startswith("hsplit.planner"):
            assert not [m for m in imports(path) if m.startswith("hsplit.runtime")], path


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def _name_comparisons(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            found += [f"{path.name}:{node.lineno}: {v!r}" for v in consts if v in NAMES or v.startswith("hafl")]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):          # name lists (x in SUPPORTED)
            consts = [c.value for c in node.elts if isinstance(c, ast.Constant)]
            hits = [v for v in consts if v in NAMES]
            if len(hits) >= 2:
                found.append(f"{path.name}:{node.lineno}: a list of strategy names {hits}")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "startswith":
            consts = [c.value for c in node.args if isinstance(c, ast.Constant)]
            found += [f"{path.name}:{node.lineno}: startswith({v!r})" for v in consts if v == "hafl"]
    return found


def test_only_the_strategies_and_their_registry_compare_strategy_names():
    allowed = ("hsplit.runtime.strategies", "hsplit.planner.strategies")
    found = [hit for p in SOURCES if not module_name(p).startswith(allowed) for hit in _name_comparisons(p)]
    assert found == []


def test_the_name_check_finds_a_comparison(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('def f(plan):\n    if plan.strategy == "centralized":\n        return ("hetlora", "flexlora")\n')
    assert len(_name_comparisons(f)) == 2


def test_every_registered_strategy_has_one_runtime_class():
    from hsplit.runtime.strategies import CLASSES
    assert list(CLASSES) == list(NAMES)


def test_every_python_package_is_listed_for_a_regular_install():
    """pyproject.toml lists packages by hand (the repo root is the package): a sub-package left out would be
    missing from a wheel (pip install without -e) although the editable install finds it."""
    import tomllib
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"hsplit." + ".".join(p.parent.relative_to(root).parts) for top in ("planner", "runtime")
             for p in (root / top).rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
