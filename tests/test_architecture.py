"""The layout's rules (docs/ARCHITECTURE.md): imports run downhill only, no import circles."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "essence"
# Top to bottom: a room may import any room after it in this list, never one before it.
ORDER = ["cli", "experiments", "train", "eval", "teacher", "config", "loss", "models", "data", "floor"]


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2:
        return "cli" if parts[1] in ("cli", "__main__") else "floor"
    return parts[1]


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("essence"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("essence.")}
        graph[name] = deps
    return graph


def test_imports_run_downhill():
    upward = []
    for module, deps in _imports().items():
        for dep in deps:
            a, b = _room(module), _room(dep)
            if a == b:
                continue
            if ORDER.index(b) < ORDER.index(a):
                upward.append(f"{module} imports {dep}")
    assert not upward, upward


def test_no_import_circles():
    graph = _imports()
    state: dict[str, int] = {}
    found = []

    def visit(module, stack):
        state[module] = 1
        for dep in graph.get(module, ()):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                found.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not found, found


def test_every_folder_says_what_enters_and_leaves():
    for init in SRC.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) <= 6, f"{init} needs a short docstring"
