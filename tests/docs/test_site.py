"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages,
cross-references to objects the site does not document and docstrings that do not parse all
fail), every page in docs/ is in its navigation, and what it shows is rendered: no raw Sphinx
roles, the public names, working cross-references, and wide tables that wrap."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

# A Sphinx role (``:func:`x```, ``:py:meth:`~x```): mkdocstrings renders it as it is. Write a
# cross-reference, [`name`][privgrad.dotted.path], to an object the API reference documents, and a
# code span, ``name``, to anything else.
ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):`")
ROLE_IN_HTML = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj):")


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == set(_nav_pages(config["nav"]))


def test_no_sphinx_roles_in_the_sources():
    """Fails fast, without a build: mkdocstrings would print the role as it is."""
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if ROLE.search(line)]
    assert not found, ("Sphinx roles in docstrings; write [`name`][privgrad.path] for an object "
                       "the API reference documents, ``name`` otherwise:\n" + "\n".join(found))


def _exports() -> dict[str, str]:
    tree = ast.parse((SRC / "privgrad" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["_EXPORTS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("privgrad/__init__.py has no _EXPORTS")


def test_public_names_are_visible_to_static_tools():
    """griffe (mkdocstrings) reads privgrad's lazy exports from ``__all__`` written out and from the
    TYPE_CHECKING imports; both must list exactly ``_EXPORTS``, from the same modules."""
    import privgrad

    exports = _exports()
    assert privgrad.__all__ == sorted(exports) + ["__version__"]
    tree = ast.parse((SRC / "privgrad" / "__init__.py").read_text())
    checked = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, "re-export as `import X as X`"
                    checked[alias.name] = imp.module
    assert checked == exports


def test_the_api_reference_uses_public_names():
    """An object exported by ``privgrad`` is documented as ``privgrad.Name``."""
    exports = _exports()
    targets = re.findall(r"^::: +(\S+)", (ROOT / "docs" / "api.md").read_text(), re.M)
    private = [t for t in targets
               if t.rsplit(".", 1)[-1] in exports and t != f"privgrad.{t.rsplit('.', 1)[-1]}"
               and t.startswith(exports[t.rsplit(".", 1)[-1]] + ".")]
    assert not private, f"document these as privgrad.<name>: {private}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_site_builds_strict(site):
    api = (site / "api" / "index.html").read_text()
    assert "make_private_with_epsilon" in api and "BudgetStop" in api  # docstrings rendered
    assert (site / "migration" / "index.html").exists()


def test_no_page_shows_a_raw_sphinx_role(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    raw = {str(p.relative_to(site)): sorted(set(ROLE_IN_HTML.findall(p.read_text()))) for p in pages
           if ROLE_IN_HTML.search(p.read_text())}
    assert not raw, f"raw Sphinx roles in the built site: {raw}"


def test_the_api_page_shows_public_names_and_cross_references(site):
    api = (site / "api" / "index.html").read_text()
    assert re.search(r'<h\d[^>]*id="privgrad\.PrivacyEngine"', api), "heading of privgrad.PrivacyEngine"
    assert 'id="privgrad.privacy_engine.PrivacyEngine"' not in api
    for name in ("PLDAccountant", "get_noise_multiplier", "validate", "LayerRule"):
        assert f'id="privgrad.{name}"' in api, name
    # methods of the engine that live in a base class are still shown on it
    assert 'id="privgrad.PrivacyEngine.state_dict"' in api
    # a cross-reference written in a docstring became a link to its anchor on the page
    links = re.findall(r'<a [^>]*href="#(privgrad\.[^"]+)"[^>]*><code>', api)
    assert "privgrad.PrivacyEngine.make_private" in links
    anchors = set(re.findall(r'id="(privgrad\.[^"]+)"', api))
    assert set(links) <= anchors, f"links without an anchor: {set(links) - anchors}"


def test_the_migration_page_wraps_its_wide_table(site):
    """The readthedocs theme keeps table cells on one line; the privgrad column of the Opacus table
    fell off a 1200 px screen. docs/css/extra.css wraps them."""
    page = (site / "migration" / "index.html").read_text()
    assert re.search(r'<link [^>]*href="\.\./css/extra\.css"', page)
    assert "<table>" in page and "<th>privgrad</th>" in page
    css = (site / "css" / "extra.css").read_text()
    assert re.search(r"\.wy-table-responsive table td[^{]*\{[^}]*white-space:\s*normal", css)
