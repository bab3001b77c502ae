"""The docs a newcomer reads: a short README (what it is, the two set-up commands, the common uses)
whose links, and those of the docs/ pages, all lead somewhere in the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _relative_links(page: Path) -> list[str]:
    return [m for m in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", m)]


def test_readme_is_short_and_keeps_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250, "README.md grew past 250 lines: move the detail to a docs/ page"
    assert "pip install torch==2.13.0 && pip install . && dp360rt demo --out demo_out" in text
    assert 'pip install ".[test,serve]" && python -m pytest -q -n 2 --dist loadfile tests' in text


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = [f"{p.relative_to(ROOT)} -> {link}" for p in pages for link in _relative_links(p)
              if not (p.parent / link).exists()]
    assert not broken, f"links to nothing: {broken}"


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [gone](nowhere.md) and [web](https://example.org) and [here](#top)")
    assert _relative_links(page) == ["nowhere.md"]
