"""The house's shape: the package's modules import each other without a cycle (api.py is the one
door, and no room imports it back), and importing the package stays cheap."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastvideo_offload"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """The package's modules that `name` imports, at module level or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the modules, package `__init__`s left out (a submodule importing its package's
    siblings through it is not a cycle of rooms), or None."""
    packages = {name for name in graph if any(other.startswith(name + ".") for other in graph)}
    edges = {name: deps - packages for name, deps in graph.items() if name not in packages}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fastvideo_offload.api" in graph and "fastvideo_offload.offloader" in graph["fastvideo_offload.api"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    graph = import_graph()
    graph["fastvideo_offload.pipeline"].add("fastvideo_offload.api")  # what pipeline.py did before the door
    assert _cycle(graph) is not None


def test_no_room_imports_the_door_back():
    graph = import_graph()
    importers = sorted(n for n, deps in graph.items() if "fastvideo_offload.api" in deps)
    # The package's face re-exports it; the integrations and tools sit in front of it, as users do.
    rooms_in_front = ("fastvideo_offload", "fastvideo_offload.loading", "fastvideo_offload.integrations.",
                      "fastvideo_offload.bench.")
    assert [n for n in importers if not (n in rooms_in_front or n.startswith(rooms_in_front[2:]))] == []


def test_importing_the_package_does_not_import_the_compiler():
    """torch.compile's machinery (torch._dynamo, about 1-2 s and 150 MB) comes only with the first
    compile: importing the package and offloading a model need none of it."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import fastvideo_offload as fo\n"
        "from torch import nn\n"
        "new = sorted(set(sys.modules) - before)\n"
        "print('after import:', [m for m in new if m.startswith(('torch._dynamo', 'torch._inductor', 'diffusers', "
        "'transformers', 'fastvideo.'))])\n"
        "m = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))\n"
        "h = fo.enable(m, device='cpu', blocks=['1'])\n"
        "x = torch.randn(2, 4)\n"
        "[b(x) for b in m[1]]\n"
        "h.disable()\n"
        "print('after a forward:', 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["after import: []", "after a forward: False"], out.stdout
