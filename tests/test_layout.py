"""The package's layout: no module imports another that imports it back, not even inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    modules = {}
    for path in (ROOT / "hmlstm").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at the top or inside a function
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_no_import_circles():
    graph = _imports()
    circles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not circles, sorted({" -> ".join(c) for c in circles})[:10]


def test_each_command_is_a_module_of_its_own_behind_a_thin_entry_point():
    from hmlstm.cli import build_parser

    commands = build_parser().commands
    for name in commands:
        module = ROOT / "hmlstm" / "cli" / f"{name}.py"
        assert module.is_file() and f"def cmd_{name}(args)" in module.read_text(), name
    assert len((ROOT / "hmlstm" / "cli" / "__init__.py").read_text().splitlines()) < 150
