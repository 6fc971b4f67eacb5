"""The package's layers (the kernel split, issue 16): no import circle among axfs's
modules, and none of the kernel's parts imports the kernel or the FUSE adapter
(the adapters, axfs/fs for FUSE and axfs/http for HTTP, sit on top and are checked by
their own owners)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "axfs"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module outside the adapters -> the axfs modules it imports (TYPE_CHECKING too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name.startswith(("axfs.fs", "axfs.http")):
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("axfs"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("axfs")}
        graph[name] = found - {name}
    return graph


def test_no_import_circle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(" -> ".join([*path[path.index(name):], name]))
        if name in done or name not in graph:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_kernels_parts_import_neither_the_kernel_nor_the_adapter() -> None:
    graph = imports()
    offenders = {name: sorted(d for d in deps if d == "axfs.kernel" or d.startswith("axfs.fs"))
                 for name, deps in graph.items() if name != "axfs.kernel"}
    assert {k: v for k, v in offenders.items() if v} == {}
