"""The README's links: mkdocs checks the docs/ pages (make test), but the README lies outside them, so check it here."""

from __future__ import annotations

import re

from clitools import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub and MkDocs give the headings of a page (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # a `# comment` in a code block is no heading
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).strip().replace(" ", "-") for h in headings}


def test_every_relative_link_of_the_readme_reaches_a_file_and_its_heading() -> None:
    readme = (REPO / "README.md").read_text()
    targets = [t for t in LINK.findall(readme) if not t.startswith(("http://", "https://"))]
    assert any(t.startswith("docs/") for t in targets)
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = REPO / path
        if not file.is_file() or (anchor and anchor not in heading_anchors(file.read_text())):
            broken.append(target)
    assert broken == [], f"README.md links to missing files or headings: {broken}"
