"""The README is a front door (at most 200 lines) and the documentation's relative links resolve: every
``[text](target)`` in README.md, docs/*.md and the axolotl plugin's README names a file or folder of the
repository, and a ``#anchor`` on a Markdown target names one of its headings (GitHub's anchors)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "balora_plugins" / "axolotl" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def links(text: str) -> list[str]:
    """The targets of the Markdown links and images in ``text``, outside code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    return [a or b for a, b in LINK.findall(text)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown text: lower case, punctuation dropped, spaces as ``-``."""
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def broken_links(page: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file is missing (or outside ``root``), or whose anchor is no heading
    of it."""
    bad = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not the repository's
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or root not in [file, *file.parents]:
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            bad.append(f"{target} (no heading #{anchor} in {file.relative_to(root)})")
    return bad


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to a docs/ page and link it"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    """A checker that finds nothing cannot fail: it must see a missing file, a wrong anchor and skip URLs."""
    (tmp_path / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#real-heading) [url](https://example.org/x) `[code](nope.md)` ![img](b.md)\n"
        "[gone](missing.md) [bad anchor](b.md#nothing)\n```\n[fenced](nope.md)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "missing.md (no such file)",
        "b.md#nothing (no heading #nothing in b.md)",
    ]


def test_the_pages_have_links_to_check():
    assert len(PAGES) >= 10 and sum(len(links(p.read_text(encoding="utf-8"))) for p in PAGES) > 50


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)
