"""regfx's modules import downward only: no import cycle, function-level imports and imports
for annotations (``if TYPE_CHECKING:``) included."""

import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "regfx"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("regfx"):
                targets += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                            else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name.startswith("regfx")]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_the_scan_sees_the_imports() -> None:
    edges = _imports()
    assert "regfx.trace" in edges["regfx.state"]
    assert "regfx.state" in edges["regfx.transforms.penalty"]


def test_no_import_cycles() -> None:
    graph = nx.DiGraph([(a, b) for a, targets in _imports().items() for b in targets])
    assert list(nx.simple_cycles(graph)) == []
