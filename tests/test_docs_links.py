"""Links in README.md and docs/*.md, and the docs/ references in the package's comments and help texts,
name files that exist and headings (anchors) those files have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
SOURCE_REF = re.compile(r"\bdocs/([a-z0-9_-]+\.md)(#[a-z0-9_-]+)?")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.M | re.S)  # no headings inside code
    found = {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"></a>', text))


def broken(target: str, page: Path) -> str | None:
    """Why a relative link from page is broken, or None (web links are not followed)."""
    if re.match(r"[a-z]+:", target):
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: {dest.name} has no heading #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page: Path):
    problems = [why for t in LINK.findall(page.read_text()) if (why := broken(t, page))]
    assert not problems, problems


def test_docs_references_in_the_package_resolve():
    refs = [(f, m) for f in sorted((ROOT / "src").rglob("*.py")) for m in SOURCE_REF.finditer(f.read_text())]
    assert refs, "the package names no docs/ page"
    problems = [f"{f.relative_to(ROOT)}: {m.group(0)}: {why}" for f, m in refs
                if (why := broken(m.group(1) + (m.group(2) or ""), ROOT / "docs" / "index"))]
    assert not problems, problems


def test_slug_follows_github():
    assert slug("CPI-FT: seesaw") == "cpi-ft-seesaw"
    assert (slug("Dry runs, resumable merges, deterministic outputs")
            == "dry-runs-resumable-merges-deterministic-outputs")
    assert slug("breadcrumbs, breadcrumbs TIES") == "breadcrumbs-breadcrumbs-ties"
