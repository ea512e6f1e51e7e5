"""The package's layout rule, read off its source: which package may import which, no import
cycles, no module over 600 lines, no private JAX outside ``_core/_compat.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "optstate"
MAX_LINES = 600

# Modules of ``quantization`` that form the quantized-array type the lower layers may use.
QUANTIZED_TYPE = {"formats", "grids", "codecs", "codebooks", "array", "randomness"}

# Which rooms each room may import from (its own room always allowed).
ALLOWED = {
    "_core": set(),
    "schedules": {"_core"},
    # A masked weight decay is ``masked(add_decayed_weights(...), mask)``, as in Optax, so its
    # state equals Optax's; wrappers themselves need no transform.
    "transforms": {"_core", "schedules", "wrappers"},
    "wrappers": {"_core", "schedules"},
    "aliases": {"_core", "transforms", "wrappers", "schedules"},
    "quantized-type": {"_core"},
    "quantization": {"_core", "quantized-type"},
    "staleness": {"_core", "quantized-type"},
    "sharding": {"_core", "quantized-type"},
    "checkpoint": {"_core", "quantized-type"},
    "memory": {"_core", "quantized-type", "quantization"},
    # The planner builds a whole train step: optimizers in every state format, ZeRO shardings
    # and the compiled step's memory, so it sits above all of them (below cli only).
    "planning": {"_core", "quantized-type", "quantization", "aliases", "wrappers", "sharding",
                 "memory", "transforms", "schedules"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _room(module: str) -> str | None:
    """The room of a module; ``None`` for the rooms that may import anything."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in ("cli", "tasks", "__main__"):
        return None
    if parts[0] == "quantization" and len(parts) > 1 and parts[1] in QUANTIZED_TYPE:
        return "quantized-type"
    if parts[0] == "inspect":
        return "memory"
    return parts[0]


def _imports(module: str) -> set[str]:
    """The optstate modules ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] == "optstate" and n in MODULES}
    out.discard(module)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layering_rule(module):
    room = _room(module)
    if room is None:
        return
    for target in GRAPH[module]:
        other = _room(target)
        assert other == room or other in ALLOWED[room], (
            f"{module} ({room}) imports {target} ({other}); {room} may import only "
            f"{sorted(ALLOWED[room] | {room})}")


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small_and_use_no_private_jax(module):
    text = MODULES[module].read_text()
    assert text.count("\n") <= MAX_LINES, f"{module} has {text.count(chr(10))} lines"
    if not module.endswith("_core._compat"):
        assert "jax._src" not in text, f"{module} uses jax._src (only _core/_compat.py may)"
