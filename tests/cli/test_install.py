"""What a user installs: ``privgrad --version``, the declared dependencies, and one honest
install line everywhere (privgrad has no release on PyPI yet)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib

import privgrad
from privgrad import cli
from privgrad._install import install_hint

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "privgrad"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Extras for developing privgrad, not for using it: what the package imports can't live only here.
DEV_EXTRAS = {"test", "docs", "bench"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"privgrad {PYPROJECT['version']}" == f"privgrad {privgrad.__version__}"


def _imports_outside_import_guards(tree: ast.AST) -> set[str]:
    """Top-level names of absolute imports, except those under ``try: ... except ImportError``."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_every_package_privgrad_imports_is_declared_for_users():
    """Each third-party module the source imports (even inside a function) comes from a core
    dependency or a user-facing extra; scipy once came only through the test extra."""
    extras = PYPROJECT["optional-dependencies"]
    declared = {_name(r) for r in PYPROJECT["dependencies"]}
    declared |= {_name(r) for extra, reqs in extras.items() if extra not in DEV_EXTRAS for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted(SRC.rglob("*.py")):
        for module in _imports_outside_import_guards(ast.parse(path.read_text())):
            if module in sys.stdlib_module_names or module in ("privgrad", "__future__"):
                continue
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & declared:
                missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in dependencies or a user extra: {missing}"


def test_the_tensorboard_extra_serves_the_logger_and_ci_installs_it():
    extras = PYPROJECT["optional-dependencies"]
    assert [_name(r) for r in extras["tensorboard"]] == ["tensorboard"]
    assert "tensorboard" in re.search(r"privgrad\[([^\]]*)\]", " ".join(extras["test"])).group(1).split(",")


#: Files that still say ``pip install 'privgrad[...]'`` and belong to other work in progress;
#: remove each entry when its owner switches it to ``install_hint`` / the clone phrasing.
PENDING = {
    "src/privgrad/privacy_engine.py",
    "src/privgrad/privatize/secure.py",
    "src/privgrad/auditing/builtin.py",
    "src/privgrad/integrations/__init__.py",
    "examples/plot_privacy_utility.py",
    "mkdocs.yml",
    "docs/reliability.md",
    "docs/models.md",
    "docs/migration.md",
}
#: ``pip install privgrad``, ``pip install 'privgrad[hf]'``: a package index install, which fails.
INDEX_INSTALL = re.compile(r"pip install (-\S+ )*['\"]?privgrad\b")


def _user_facing_files():
    yield ROOT / "README.md"
    yield ROOT / "mkdocs.yml"
    for folder, pattern in (("docs", "*.md"), ("src", "*.py"), ("examples", "*.py"), ("benchmarks", "*.py")):
        yield from sorted((ROOT / folder).rglob(pattern))


def test_no_doc_or_message_installs_privgrad_from_the_package_index():
    found = {str(p.relative_to(ROOT)) for p in _user_facing_files() if INDEX_INSTALL.search(p.read_text())}
    assert not found - PENDING, f"use install_hint(extra) or 'pip install -e \".[extra]\"' from a clone: {found - PENDING}"
    assert not PENDING - found, f"these no longer need to be pending; remove them: {PENDING - found}"


def test_the_install_hint_installs_an_extra_from_a_clone():
    assert install_hint("hf") == 'pip install -e ".[hf]" in a clone of privgrad (it has no release on PyPI yet)'
    for extra in ("hf", "lightning", "plot", "demo", "tensorboard", "secure"):
        assert extra in PYPROJECT["optional-dependencies"]
