"""The documentation travels with the repository (issue 20 item 5): a clone from a public host has everything the
README and docs/ point at. Fast, no Ray, no model:

1. every relative markdown link or image in README.md and docs/**/*.md names a file or folder that exists in the
   repository (web links and links to an anchor of the same page aside; an anchor is cut off a path);
2. no source, documentation or configuration file points outside the repository into the sibling folder of shared
   project notes (which a clone does not have);
3. every citation "docs/methods.md §N" (also "§4, §10", "§5-7", "§1/§5", and "methods.md §N" inside docs/) names a
   section that docs/methods.md has as a heading "## §N. ...".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
# Not part of the project's own files: environments, results, VCS and build output.
SKIP_DIRS = {".git", ".venv", "venv", "forgetray-results", "__pycache__", ".pytest_cache", "build", "dist",
             "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg"}
TEXT_NAMES = {"Makefile"}
OUTSIDE = "../" + "shared"  # spelt in two parts, so that this file does not match itself

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+§(\d+)\b", re.MULTILINE)
# "docs/methods.md §4", "... §4, §10", "... §5-7", "... §1/§5", "... §8's"; also "methods.md §N" (docs/ itself)
_CITATION = re.compile(r"(?<![\w.])(?:docs/)?methods\.md(?:'s)?\s+§\s*(\d+)"
                       r"((?:\s*[-–]\s*§?\s*\d+|\s*(?:,|/|and|or)\s*§\s*\d+)*)")
_MORE = re.compile(r"([-–]|,|/|and|or)\s*§?\s*(\d+)")


def project_files() -> list[Path]:
    """The repository's own text files of the kinds that may point somewhere, without environments and results."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                found.append(path)
    return sorted(found)


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def link_targets(text: str) -> list[str]:
    """The targets of a markdown page's inline links, images and reference definitions, outside code."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    return _INLINE_LINK.findall(prose) + _REFERENCE.findall(prose)


def broken_links(page: Path, text: str) -> list[str]:
    """The relative link targets of `page` that name nothing in the repository."""
    broken = []
    for target in link_targets(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):  # http(s):, mailto:, anchors
            continue
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            broken.append(target)
    return broken


def methods_sections(text: str) -> set[int]:
    return {int(n) for n in _HEADING.findall(text)}


def cited_sections(text: str) -> list[int]:
    """Every section number a text cites of docs/methods.md (ranges expanded)."""
    cited = []
    for match in _CITATION.finditer(text):
        last = int(match.group(1))
        cited.append(last)
        for joint, number in _MORE.findall(match.group(2)):
            number = int(number)
            cited += list(range(last + 1, number + 1)) if joint in "-–" else [number]
            last = number
    return cited


def unknown_citations(text: str, sections: set[int]) -> list[int]:
    return [n for n in cited_sections(text) if n not in sections]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = markdown_pages()
    assert (ROOT / "docs" / "methods.md") in pages and (ROOT / "docs" / "design.md") in pages
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert {"docs/methods.md", "docs/design.md"} <= set(link_targets(readme))
    checked, broken = 0, {}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        checked += len(link_targets(text))
        if bad := broken_links(page, text):
            broken[str(page.relative_to(ROOT))] = bad
    assert checked >= 5, "the link scan found almost no links: is the pattern broken?"
    assert not broken, f"links to files the repository does not have: {broken}"


def test_no_file_points_outside_the_repository_into_shared_notes():
    files = project_files()
    assert ROOT / "README.md" in files and Path(__file__).resolve() in files and ROOT / "Makefile" in files
    offending = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if OUTSIDE in line:
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "a clone has no " + OUTSIDE + "; point at docs/ instead:\n" + "\n".join(offending)


def test_every_methods_citation_names_a_section_of_docs_methods():
    sections = methods_sections(METHODS.read_text(encoding="utf-8"))
    assert sections == set(range(1, 11)), f"docs/methods.md should have sections §1-§10, has {sorted(sections)}"
    cited, unknown = 0, {}
    for path in project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cited += len(cited_sections(text))
        if bad := unknown_citations(text, sections):
            unknown[str(path.relative_to(ROOT))] = bad
    assert cited > 20, "the citation scan found almost no citations: is the pattern broken?"
    assert not unknown, f"citations of sections docs/methods.md does not have: {unknown}"


def test_the_checks_catch_hand_made_mistakes(tmp_path):
    """Each check fails on a planted mistake (the scans above would otherwise pass vacuously on a bad pattern)."""
    page = ROOT / "docs" / "example.md"  # not written: only its folder matters for resolving
    assert broken_links(page, "[m](methods.md#4) [d](design.md) [w](https://example.org/x.md) [a](#top)") == []
    assert broken_links(page, "[gone](no_such_file.md) ![img](quickstart/missing.png)") == [
        "no_such_file.md", "quickstart/missing.png"]
    assert broken_links(ROOT / "README.md", "[up](../../etc/passwd)") == ["../../etc/passwd"]  # outside the repo
    assert broken_links(page, "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n") == []
    sections = set(range(1, 11))
    cite = "docs/methods" + ".md"  # spelt in two parts, so that the repository scan does not read these as citations
    assert cited_sections(f"{cite} §4, §10; {cite} §5-7 and ({cite} §1/§5); {cite} §8's controls") == [
        4, 10, 5, 6, 7, 1, 5, 8]
    assert unknown_citations(f"as {cite} §4 says", sections) == []
    assert unknown_citations(f"as {cite} §11 says, and {cite} §9-12", sections) == [11, 11, 12]
    assert unknown_citations(f"{cite[len('docs/'):]} §0", sections) == [0]
    planted = tmp_path / "notes.md"
    planted.write_text(f"see [{OUTSIDE}/docs/METHODS.md]({OUTSIDE}/docs/METHODS.md)\n")
    assert OUTSIDE in planted.read_text()
    assert broken_links(planted, planted.read_text()) == [f"{OUTSIDE}/docs/METHODS.md"]
