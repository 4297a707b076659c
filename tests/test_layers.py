"""The layout is the architecture: check the import rules by parsing every module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "kernels", "storage", "pixelface", "benchmarks")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules(pkg: str):
    for p in sorted((ROOT / pkg).rglob("*.py")):
        yield ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), p


def _top(name: str) -> str:
    return name.split(".")[0]


def test_kernels_are_pure():
    forbidden = {"prefect", "zarr", "pyarrow", "storage", "tasks", "flows", "pixelface", "dask", "distributed"}
    for mod, path in _modules("kernels"):
        bad = {i for i in _imports(path) if _top(i) in forbidden}
        assert not bad, f"{mod} imports {sorted(bad)}: kernels/ stays pure numerics"


def test_storage_does_not_import_prefect_or_upper_layers():
    for mod, path in _modules("storage"):
        bad = {i for i in _imports(path) if _top(i) in {"prefect", "tasks", "flows"}}
        assert not bad, f"{mod} imports {sorted(bad)}"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for pkg in PACKAGES:
        if (ROOT / pkg).is_dir():
            for mod, path in _modules(pkg):
                graph[mod] = {i for i in _imports(path) if _top(i) in PACKAGES}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for dep in graph.get(m, ()):  # 'a.b.c' may name a module or a symbol in module 'a.b'
            for cand in (dep, dep.rsplit(".", 1)[0]):
                if cand in graph and cand not in seen:
                    seen.add(cand)
                    todo.append(cand)
    return seen


def test_pipeline_never_imports_ground_truth_reader():
    graph = _graph()
    assert "storage.groundtruth_reader" in graph
    for mod in graph:
        if _top(mod) in {"flows", "tasks"}:
            reach = _reachable(graph, mod)
            assert "storage.groundtruth_reader" not in reach, f"{mod} reaches the ground-truth reader"
