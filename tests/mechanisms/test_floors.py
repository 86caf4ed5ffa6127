"""privgrad.mechanisms stands on its own: it imports no engine, layers, sampling or training
room (the AST of every module, as tests/test_floors.py does for the other rooms), and importing
it loads none of them, nor dp_accounting or scipy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "privgrad" / "mechanisms"
ROOMS = ("privgrad.engine", "privgrad.layers", "privgrad.sampling", "privgrad.privatize",
         "privgrad.privacy_engine", "privgrad.training_hooks", "privgrad.validation",
         "privgrad.distributed", "privgrad.integrations", "scipy", "dp_accounting")
FORBIDDEN = ROOMS + ("numpy",)  # in the source; torch itself loads numpy at run time


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_module_imports_a_forbidden_room():
    bad = {p.name: sorted(m for m in imports(p) if any(m == f or m.startswith(f + ".")
                                                         for f in FORBIDDEN))
           for p in sorted(SRC.glob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}


def test_importing_loads_none_of_them():
    code = ("import sys, privgrad.mechanisms\n"
            f"print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') "
            f"for f in {ROOMS!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == []


def test_modules_stay_short():
    assert {p.name: n for p in SRC.glob("*.py") if (n := len(p.read_text().splitlines())) > 400} == {}
