"""Examples that cannot drift: every ```python block of README.md and docs/*.md runs, the
pages link only to things that exist, and the site lists every page.

Blocks of one page run in order in one namespace (a page reads like a session), in a temporary
folder. A block that only shows a signature is preceded by ``<!-- skip: reason -->``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<skip><!-- skip: (?P<why>[^>]*)-->\n)?```python\n(?P<code>.*?)^```",
                   re.S | re.M)
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)]*)?\)")


def blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(m.group("code"), m.group("why")) for m in FENCE.finditer(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for i, (code, why) in enumerate(blocks(page)):
        if why is not None:
            assert why.strip(), f"{page.name} block {i}: a skip needs its reason"
            continue
        exec(compile(code, f"{page.name} (python block {i})", "exec"), scope)  # noqa: S102
        ran += 1
    assert ran, f"{page.name}: every block is skipped"


def test_the_readme_is_a_five_minute_read():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10_500, len(text.encode())
    quick = text.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert len([line for line in quick.splitlines() if line.strip()]) == 2  # what CI runs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_files_that_exist(page):
    for m in LINK.finditer(page.read_text()):
        target = m.group("target")
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_site_lists_every_page_and_only_pages_that_exist():
    text = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", text, re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == pages, (sorted(pages - listed), sorted(listed - pages))


def test_the_command_line_page_covers_every_command_and_option():
    """docs/cli.md says what `--help` says: every command and every option is on the page."""
    import argparse

    from normsurgeon import cli

    text = (ROOT / "docs" / "cli.md").read_text()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert f"## `{name}`" in text, name
        for action in p._actions:
            longest = max(action.option_strings, key=len, default=None)
            if longest and longest != "--help":
                assert longest in text, (name, longest)
