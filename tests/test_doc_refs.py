"""Every reference in our sources resolves inside the repository.

Comments and docstrings cite the official code's bugs by tag (``B1`` … ``B18``, defined in
``docs/official-code.md``), our design contracts by section (``docs/design.md "Layers"``) and
other documents by file name. A reader must find each of them here, not in notes that never
shipped: this test fails on a bug tag the doc does not define, a file citing tags without naming
the doc, a ``docs/…`` path or quoted section that does not exist, a ``*.md`` name with no such
file in the repository, and on ``§`` section numbers (sections are cited by heading).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("sundae_lib", "nodes", "trainer", "benchmarks", "tests")
BUG_DOC = "docs/official-code.md"

TAG = re.compile(r"\bB(\d{1,2})\b")
DOC_REF = re.compile(r'(?<![\w/<>.-])(docs/[\w./-]+\.md)(?:\s*"([^"]+)")?')
MD_NAME = re.compile(r"(?<![\w<>-])([\w.-]+\.md)\b")
DEFINED_TAG = re.compile(r"^\|\s*B(\d{1,2})\s*\|", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def source_files(repo: Path) -> list[Path]:
    files = [repo / "__init__.py"] if (repo / "__init__.py").exists() else []
    for folder in SCANNED:
        files += sorted(p for p in (repo / folder).rglob("*") if p.suffix in (".py", ".sh"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def repo_file_names(repo: Path) -> set[str]:
    skip = {".git", ".venv", "node_modules", "__pycache__"}
    return {p.name for p in repo.rglob("*.md") if not skip & set(p.relative_to(repo).parts)}


def _section(raw: str) -> str:
    """A quoted section name as written in a comment, possibly wrapped over comment lines."""
    return re.sub(r"\s*\n\s*#?\s*", " ", raw).strip()


def reference_problems(repo: Path) -> list[str]:
    bug_doc = repo / BUG_DOC
    defined = set(DEFINED_TAG.findall(bug_doc.read_text(encoding="utf-8"))) if bug_doc.exists() else set()
    names = repo_file_names(repo)
    problems = []
    for path in source_files(repo):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(repo)
        tags = {m.group(1) for m in TAG.finditer(text)}
        for tag in sorted(tags - defined, key=int):
            problems.append(f"{where}: bug tag B{tag} is not defined in {BUG_DOC}")
        if tags and BUG_DOC not in text:
            problems.append(f"{where}: cites bug tags {sorted(f'B{t}' for t in tags)} without naming {BUG_DOC}")
        for m in DOC_REF.finditer(text):
            doc = repo / m.group(1)
            if not doc.is_file():
                problems.append(f"{where}: {m.group(1)} does not exist")
            elif m.group(2):
                section = _section(m.group(2))
                headings = {h.strip() for h in HEADING.findall(doc.read_text(encoding="utf-8"))}
                if section not in headings:
                    problems.append(f"{where}: {m.group(1)} has no section {section!r}")
        for m in MD_NAME.finditer(text):
            if m.group(1) not in names:
                problems.append(f"{where}: {m.group(1)} is not a file in the repository")
        for lineno, line in enumerate(text.splitlines(), 1):
            if "§" in line:
                problems.append(f"{where}:{lineno}: '§' section number; cite the section by its heading")
    return problems


def test_every_reference_in_the_sources_resolves():
    assert reference_problems(REPO) == []


def test_official_code_doc_defines_every_tag_once():
    text = (REPO / BUG_DOC).read_text(encoding="utf-8")
    tags = [int(t) for t in DEFINED_TAG.findall(text)]
    assert tags == list(range(1, 19))


def test_the_check_finds_broken_references(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "official-code.md").write_text("| B1 | a | b |\n", encoding="utf-8")
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## Layers\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("# r\n", encoding="utf-8")
    for folder in SCANNED:
        (tmp_path / folder).mkdir()
    (tmp_path / "sundae_lib" / "good.py").write_text(
        '"""Bug B1 (docs/official-code.md); docs/design.md "Layers"; see README.md."""\n'
        '# wrapped: docs/design.md "Lay\n# ers" is not a section, but this one is:\n'
        '# docs/design.md "Design"\n',
        encoding="utf-8",
    )
    (tmp_path / "nodes" / "bad.py").write_text(
        "# bug B7 of the official code; DESIGN.md §3; docs/missing.md; docs/design.md \"Nodes\"\n",
        encoding="utf-8",
    )
    (tmp_path / "trainer" / "tags.py").write_text("# B1 without the doc\n", encoding="utf-8")
    got = reference_problems(tmp_path)
    assert sorted(got) == sorted([
        "nodes/bad.py: bug tag B7 is not defined in docs/official-code.md",
        "nodes/bad.py: cites bug tags ['B7'] without naming docs/official-code.md",
        "nodes/bad.py: docs/missing.md does not exist",
        "nodes/bad.py: docs/design.md has no section 'Nodes'",
        "nodes/bad.py: DESIGN.md is not a file in the repository",
        "nodes/bad.py: missing.md is not a file in the repository",
        "nodes/bad.py:1: '§' section number; cite the section by its heading",
        "sundae_lib/good.py: docs/design.md has no section 'Lay ers'",
        "trainer/tags.py: cites bug tags ['B1'] without naming docs/official-code.md",
    ])
