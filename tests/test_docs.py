"""The code in the documentation cannot rot, and the site stands on its own.

Longer examples are included from `examples/` files (run by tests/test_examples.py);
every other block runs as written in tests/test_docs_snippets.py. Here, statically:
the blocks compile, and every call they make on pybus names, or on a dispatcher
`dp`, names attributes and keywords that exist (also in code a block defines but
does not run). And: README.md has no relative links (they break on the package
index), and the site draws its mermaid diagrams with the bundled script, loading
nothing from another host.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pybus
from pybus import Dispatcher
from tests.docs_site import built_site

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def fragments() -> Iterator[tuple[str, str]]:
    for page in PAGES:
        for number, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            code = match.group(1)
            if "--8<--" not in code:
                yield f"{page.relative_to(ROOT)}#{number}", code


FRAGMENTS = dict(fragments())


def test_the_fragments_are_found() -> None:
    assert len(FRAGMENTS) >= 10  # the regular expression still matches the pages


def namespace(tree: ast.Module) -> dict[str, Any]:
    """pybus's public names, plus what the fragment imports from pybus."""
    names: dict[str, Any] = {name: getattr(pybus, name) for name in pybus.__all__}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pybus"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def resolve(node: ast.expr, names: dict[str, Any], dp: Dispatcher) -> Any:
    """The object a call's function names: a pybus name, or an attribute chain on `dp`."""
    if isinstance(node, ast.Name):
        if node.id == "dp":
            return dp
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = resolve(node.value, names, dp)
        if owner is None:
            return None
        assert hasattr(owner, node.attr), f"{ast.unparse(node)}: {owner!r} has no attribute {node.attr!r}"
        return getattr(owner, node.attr)
    return None


@pytest.mark.parametrize("where", sorted(FRAGMENTS))
def test_fragment_compiles_and_calls_what_exists(where: str) -> None:
    code = FRAGMENTS[where]
    compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    tree = ast.parse(code)
    names = namespace(tree)
    dp = Dispatcher()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node, names, dp)  # every attribute of `dp` (or a pybus name) exists
        if not isinstance(node, ast.Call):
            continue
        target = resolve(node.func, names, dp)
        if target is None or not callable(target):
            continue
        keywords = {keyword.arg: None for keyword in node.keywords if keyword.arg is not None}
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        try:
            signature.bind_partial(**keywords)
        except TypeError as exc:
            pytest.fail(f"{where}: {ast.unparse(node)} does not fit {target!r}{signature}: {exc}")


# -- README.md on the package index -------------------------------------------------------

# [text](target) and [text]: target, <a href=...> and <img src=...>.
LINK = re.compile(
    r"\]\((?P<inline>[^)\s]+)[^)]*\)|^\[[^\]]+\]:\s*(?P<reference>\S+)|(?:href|src)=\"(?P<html>[^\"]+)\"",
    re.M,
)


def test_readme_has_no_relative_links() -> None:
    """The package index shows README.md away from the repository, where a relative link
    (`docs/testing.md`, `#install`) leads nowhere: link to a site, or write the path as code."""
    readme = (ROOT / "README.md").read_text()
    targets = [next(group for group in match.groups() if group) for match in LINK.finditer(readme)]
    assert targets, "the pattern no longer finds README.md's links"
    relative = [target for target in targets if not re.match(r"https?://", target)]
    assert not relative, f"README.md links to {relative}: make them absolute, or write the path as code"


def test_the_link_pattern_finds_relative_links() -> None:
    found = [
        next(group for group in match.groups() if group)
        for match in LINK.finditer('see [a](docs/a.md), [b](#b "t")\n[c]: ../c.md\n<img src="x.png">')
    ]
    assert found == ["docs/a.md", "#b", "../c.md", "x.png"]


# -- mermaid without a network ---------------------------------------------------------------

SCRIPTS = ROOT / "docs" / "javascripts"


def bundled_version() -> str:
    found = re.search(r'\{version:"(\d+\.\d+\.\d+)"\}', (SCRIPTS / "mermaid.min.js").read_text())
    assert found, "docs/javascripts/mermaid.min.js does not say its version"
    return found.group(1)


def test_the_bundled_mermaid_is_the_one_its_readme_describes() -> None:
    script = (SCRIPTS / "mermaid.min.js").read_bytes()
    assert b'globalThis["mermaid"]' in script  # a classic script that defines the global the theme uses
    assert (SCRIPTS / "mermaid.LICENSE").read_text().startswith("The MIT License")
    notes = (SCRIPTS / "README.md").read_text()
    assert f"**version {bundled_version()}**" in notes
    assert f"`{hashlib.sha256(script).hexdigest()}`" in notes


def pages(site: Path) -> dict[str, str]:
    return {str(page.relative_to(site)): page.read_text() for page in site.rglob("*.html")}


def test_the_site_loads_no_script_or_stylesheet_from_another_host() -> None:
    loaded = re.compile(r"<(?:script|link)\b[^>]*?(?:src|href)=\"((?:https?:)?//[^\"]*)\"")
    for name, html in pages(built_site()).items():
        assert not loaded.findall(html), f"{name} loads {loaded.findall(html)}"


def test_pages_with_diagrams_load_the_bundled_mermaid() -> None:
    site = built_site()
    assert (site / "javascripts" / "mermaid.min.js").is_file()
    diagrams = {name: html for name, html in pages(site).items() if '<pre class="mermaid">' in html}
    assert diagrams, "no page has a mermaid diagram any more (docs/cli.md had one)"
    for name, html in diagrams.items():
        # A plain script tag (not async, not deferred, not a module): it runs before the
        # page has loaded, which is when the theme looks for diagrams.
        assert re.search(r'<script src="(\.\./)*javascripts/mermaid\.min\.js"></script>', html), name


def test_the_theme_fetches_mermaid_only_when_none_is_loaded() -> None:
    """Material's own script downloads mermaid from a CDN only when the page has no global
    `mermaid`; if a new version of the theme always downloaded it, the site would need a
    network again. Its version must be the major one the bundled copy has."""
    (bundle,) = (built_site() / "assets" / "javascripts").glob("bundle.*.min.js")
    code = bundle.read_text()
    urls = list(re.finditer(r"https://[^\"']*mermaid@(\d+)[^\"']*", code))
    assert urls, "the theme no longer names a mermaid download: check how it draws diagrams now"
    for url in urls:
        before = code[max(0, url.start() - 120) : url.start()]
        assert 'typeof mermaid=="undefined"' in before, f"the theme fetches {url.group(0)} unconditionally"
        assert url.group(1) == bundled_version().split(".")[0], (
            f"the theme asks for mermaid@{url.group(1)}, the bundled copy is {bundled_version()}: "
            "update it (docs/javascripts/README.md)"
        )
