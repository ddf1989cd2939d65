"""The prose of README.md and docs/*.md stays true: every relative link and anchor resolves, every docs page
is listed in docs/index.md, every test the guarantees name exists. (The code blocks: test_docs_blocks.py.)"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from test_docs_blocks import DOCS, FENCE, ROOT, doc_files, rel

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<a\s+href=\"([^\"]+)\"")


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of ``path`` outside fenced code blocks."""
    in_fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            in_fence = None if in_fence and match.group(2).startswith(in_fence) else in_fence or match.group(2)
        elif not in_fence:
            yield number, line


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file, and explicit ``<a id=...>`` ones."""
    found, seen = set(), {}
    for _, line in prose_lines(path):
        found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        out += [(number, m.group(1) or m.group(2)) for m in LINK.finditer(line)]
    return out


def test_every_relative_link_resolves():
    problems = []
    for path in doc_files():
        for number, target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: no heading or anchor #{anchor} in {resolved.name}")
    assert not problems, "\n".join(problems)


def test_the_docs_index_lists_every_page():
    if not DOCS.is_dir():
        pytest.skip("no docs/ here (the sdist ships the README alone)")
    listed = {(DOCS / target.partition("#")[0]).resolve() for _, target in links(DOCS / "index.md")}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" and p.resolve() not in listed]
    assert not missing, f"docs/index.md does not list {missing}"


def test_every_guarantee_names_tests_that_exist():
    if not (DOCS / "guarantees.md").is_file():
        pytest.skip("no docs/ here (the sdist ships the README alone)")
    text = (DOCS / "guarantees.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", text))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    assert len(named) >= 15
    assert named <= defined, f"docs/guarantees.md names tests that do not exist: {sorted(named - defined)}"
