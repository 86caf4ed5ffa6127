"""The arrows between the rooms point one way (docs/design.md): a test reads every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "privgrad"

# room -> rooms it must never import (directly or through a function-level import)
FORBIDDEN = {
    "privatize": ("privgrad.engine", "privgrad.layers", "privgrad.sampling",
                  "privgrad.privacy_engine", "privgrad.training_hooks", "privgrad.accounting"),
    "engine": ("privgrad.privacy_engine", "privgrad.training_hooks", "privgrad.sampling",
               "privgrad.accounting", "privgrad.validation"),
    "layers": ("privgrad.engine", "privgrad.privatize", "privgrad.privacy_engine",
               "privgrad.sampling"),
    "sampling": ("privgrad.engine", "privgrad.privatize", "privgrad.layers",
                 "privgrad.privacy_engine"),
    "auditing": ("privgrad.privacy_engine", "privgrad.training_hooks"),
    # correlated-noise strategies: pure maths on tensors, wired in by the engine
    "mechanisms": ("privgrad.engine", "privgrad.layers", "privgrad.sampling", "privgrad.privatize",
                   "privgrad.privacy_engine", "privgrad.training_hooks", "privgrad.validation",
                   "privgrad.distributed"),
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize("room", list(FORBIDDEN))
def test_a_room_imports_nothing_above_or_beside_it(room):
    bad = {}
    for path in sorted((SRC / room).glob("*.py")):
        hits = [m for m in imports(path) if any(m == f or m.startswith(f + ".")
                                                 or (f.startswith(m + ".") and m != "privgrad")
                                                 for f in FORBIDDEN[room])]
        if hits:
            bad[path.name] = sorted(hits)
    assert not bad, f"{room}/ imports what it must not: {bad}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these (docs/design.md: modules stay readable in one sitting): {long}"
