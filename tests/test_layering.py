"""The package's shape: imports point down the layer table, with no cycle; import is lazy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from rvhub.constants import LAYERS

ROOT = Path(__file__).resolve().parents[1] / "rvhub"


def _module_name(path: Path) -> str:
    parts = ["rvhub", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The rvhub modules a ``from X import a, b`` names (``a`` may itself be a module)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("rvhub"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph() -> dict[str, set[str]]:
    """Every import of every module (function-level and TYPE_CHECKING ones included)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                edges.update(_resolve(name, path.name == "__init__.py", node, known))
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("rvhub"))
        graph[name] = {e for e in edges if e != name}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = "__init__" if len(parts) == 1 else parts[1]
    assert key in LAYERS, f"{module} is in no layer of rvhub.constants.LAYERS"
    return LAYERS[key]


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{m} (L{layer_of(m)}) imports {t} (L{layer_of(t)})"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layer_test_sees_function_level_imports(tmp_path):
    # The graph must hold imports inside functions: ops.live imports io.gpu only when needed.
    assert "rvhub.io.gpu" in import_graph()["rvhub.ops.live"]


def _imported_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    return {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}


def test_import_rvhub_and_the_cli_do_not_import_torch():
    for code in ("import rvhub", "import rvhub.cli", "import rvhub.check"):
        mods = _imported_modules(code)
        assert "torch" not in mods, code
        assert not any(m.startswith("huggingface_hub") for m in mods), code


def test_public_names_resolve_lazily():
    import rvhub

    for name in rvhub.__all__:
        assert getattr(rvhub, name) is not None, name
    assert rvhub.load_vector.__module__ == "rvhub.vector"
