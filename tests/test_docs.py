"""The documentation stays usable: the README is a short front door, every relative link in README.md and docs/
reaches a file (and a heading, for #anchors), and the generated flag page matches the config dataclasses."""

from __future__ import annotations

import glob
import os
import re

from bert_ft.docs import FLAGS_PAGE, flags_page

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 250  # issue 24: the front door; other issues add one line or row each, not sections

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")  # [text](target); text may wrap onto the next line
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def doc_files(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]


def anchors(path: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (word characters, spaces and hyphens kept), spaces to
    hyphens, a repeated id suffixed -1, -2, ... Headings inside code blocks are not headings."""
    with open(path, encoding="utf-8") as handle:
        text = FENCE.sub("", handle.read())
    found: dict[str, int] = {}
    for _, title in HEADING.findall(text):
        title = LINK.sub(r"\1", title)  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        found[slug] = found.get(slug, -1) + 1
        if found[slug]:
            found[f"{slug}-{found[slug]}"] = 0
    return set(found)


def broken_links(paths: list[str]) -> list[str]:
    """'file: [text](target): why' for every relative link that does not resolve (web links are not followed)."""
    problems = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = FENCE.sub("", handle.read())
        for label, target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, ROOT)}: [{' '.join(label.split())}]({target})"
            if not os.path.exists(linked):
                problems.append(f"{where}: no file {os.path.relpath(linked, ROOT)}")
            elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
                problems.append(f"{where}: no heading with the id #{anchor} in {os.path.relpath(linked, ROOT)}")
    return problems


def test_readme_is_a_short_front_door():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        count = len(handle.read().splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines; move details to a page under docs/"


def test_every_relative_link_resolves():
    assert broken_links(doc_files()) == []


def test_every_docs_page_is_in_the_index():
    with open(os.path.join(ROOT, "docs", "README.md"), encoding="utf-8") as handle:
        linked = {target.partition("#")[0] for _, target in LINK.findall(handle.read())}
    pages = {os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))} - {"README.md"}
    assert pages - linked == set(), "add these pages to docs/README.md"


def test_the_link_check_finds_missing_files_and_headings(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Your own data\n\n```\n## not a heading\n```\n",
                                               encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/page.md#your-own-data) [top](#intro) [web](https://example.com/x.md)\n"
                      "# Intro\n[gone](docs/nothing.md) [bad anchor](docs/page.md#not-a-heading)\n"
                      "```\n[in code](docs/nothing.md)\n```\n", encoding="utf-8")
    found = broken_links([str(readme)])
    assert len(found) == 2, found
    assert "no file" in found[0] and "docs/nothing.md" in found[0]
    assert "no heading with the id #not-a-heading" in found[1]


def test_heading_ids_follow_github():
    assert anchors(os.path.join(ROOT, "docs", "benchmarks.md")) >= {
        "conll-2003-towards-088-the-crf-head-5-epochs", "speed-against-the-hugging-face-trainer-recipe"}


def test_flag_page_matches_the_dataclasses():
    with open(os.path.join(ROOT, FLAGS_PAGE), encoding="utf-8") as handle:
        assert handle.read() == flags_page(), "regenerate with: python -m bert_ft.docs"
