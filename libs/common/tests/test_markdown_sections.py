"""Sections of Markdown documents and the required sections of each knowledge type."""

from __future__ import annotations

from pathlib import Path

import pytest
from aeterna_common.markdown import canonical_section, missing_sections, sections

RECORDS = Path(__file__).parent / "markdown_records" / "adr"


def _read(name: str) -> str:
    return (RECORDS / name).read_text(encoding="utf-8")


def test_atx_sections_carry_level_title_body_and_line_range() -> None:
    text = _read("0002-use-postgres.md")
    found = sections(text)
    assert [(s.level, s.title) for s in found] == [
        (1, "Use PostgreSQL for durable state"),
        (2, "Status"),
        (2, "Context"),
        (2, "Decision"),
        (2, "Consequences"),
    ]
    context = found[2]
    assert context.canonical == "context"
    assert context.body == (
        "Services need transactions, row-level security and a mature operator story.\n"
        "Several teams already run it."
    )
    lines = text.splitlines()
    assert lines[context.start_line] == "## Context"
    assert lines[context.end_line] == "## Decision"
    # The H1 spans the whole document: its subsections are part of it.
    assert found[0].end_line == len(lines)


def test_headings_in_fenced_and_indented_code_are_not_sections() -> None:
    text = _read("0005-fenced-headings.md")
    found = sections(text)
    assert [(s.level, s.title) for s in found] == [
        (1, "Release notes format"),
        (2, "Context"),
        (2, "Decision"),
    ]
    assert "# Decision\n\n## Consequences" in found[1].body
    assert missing_sections("ADR", text) == ["consequences"]


def test_front_matter_is_skipped_and_line_numbers_count_from_the_file_start() -> None:
    text = _read("0003-keep-decisions-in-madr.md")
    found = sections(text)
    assert found[0].title == "Keep decisions in MADR"
    assert text.splitlines()[found[0].start_line] == "# Keep decisions in MADR"
    # Without skipping, "deciders:\n- platform team\n---" would be a setext heading.
    assert all(s.title != "- platform team" for s in found)


@pytest.mark.parametrize(
    ("heading", "canonical"),
    [
        ("Context", "context"),
        ("CONTEXT", "context"),
        ("1. Context", "context"),
        ("2) Decision", "decision"),
        ("3.1 Consequences:", "consequences"),
        ("(4) Status", "status"),
        ("Context and Problem Statement", "context"),
        ("Decision Outcome", "decision"),
        ("Positive Consequences", "consequences"),
        ("Pros and Cons of the Options", "consequences"),
        ("Background", "context"),
        ("Problem", "problem"),
        ("Solution", "solution"),
        ("Approach", "solution"),
        ("Scope", "scope"),
        ("Rules", "rules"),
        ("Policy", "rules"),
        ("Version", "version"),
        ("Decision Drivers", None),
        ("Considered Options", None),
        ("Contextual notes", None),
    ],
)
def test_headings_are_matched_tolerantly_but_whole(heading: str, canonical: str | None) -> None:
    assert canonical_section(heading) == canonical


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("0001-record-architecture-decisions.md", []),  # adr-tools
        ("0002-use-postgres.md", []),  # Nygard
        ("0003-keep-decisions-in-madr.md", []),  # MADR 3, consequences under the outcome
        ("0004-luxon-dates.md", []),  # numbered synonyms
    ],
)
def test_example_adrs_have_their_required_sections(name: str, missing: list[str]) -> None:
    assert missing_sections("ADR", _read(name)) == missing


@pytest.mark.parametrize(
    ("item_type", "markdown", "missing"),
    [
        ("ADR", "# T\n\nNo sections.\n", ["context", "decision", "consequences"]),
        ("ADR", "# T\n## Decision\nx\n", ["context", "consequences"]),
        ("POLICY", "# T\n## Rules\nx\n", ["scope"]),
        ("POLICY", "# T\n## 1. Scope\nx\n## 2. Policy\ny\n", []),
        ("PATTERN", "# T\n## Problem\nx\n", ["solution"]),
        ("PATTERN", "# T\n## Approach\nx\n## Problem\ny\n", []),
        ("SPEC", "# T\n## Body\nx\n", ["version"]),
        ("SPEC", "# T\n## Version\n2.1\n", []),
        ("SPEC", "---\nversion: 2.1\n---\n# T\n", []),
        ("SPEC", "---\nversion: ''\n---\n# T\n", ["version"]),
        ("HINDSIGHT", "", []),
    ],
)
def test_missing_sections_by_type(item_type: str, markdown: str, missing: list[str]) -> None:
    assert missing_sections(item_type, markdown) == missing


@pytest.mark.parametrize("item_type", ["adr", "RFC", ""])
def test_unknown_type_is_a_value_error(item_type: str) -> None:
    with pytest.raises(ValueError, match="unknown knowledge type"):
        missing_sections(item_type, "# T\n")
