"""Decision-record files: parsing MADR, adr-tools and Nygard styles, writing them back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from aeterna_common.markdown import (
    ParsedRecord,
    ParseError,
    RecordStatus,
    Relation,
    RelationKind,
    parse_record,
    parse_records,
    record_id,
    render_record,
)

RECORDS = Path(__file__).parent / "markdown_records"
FILES = sorted(p.relative_to(RECORDS).as_posix() for p in RECORDS.rglob("*.md"))
READABLE = [name for name in FILES if (RECORDS / name).stat().st_size > 0]


def _parse(name: str) -> ParsedRecord:
    parsed = parse_record(name, (RECORDS / name).read_bytes())
    assert isinstance(parsed, ParsedRecord), parsed
    return parsed


def test_adr_tools_numbered_record() -> None:
    record = _parse("adr/0001-record-architecture-decisions.md")
    assert record.id == "adr/0001-record-architecture-decisions"
    assert record.title == "Record architecture decisions"
    assert record.status is RecordStatus.SUPERSEDED
    assert record.date == "2024-03-04"
    assert record.relations == (
        Relation(RelationKind.SUPERSEDED_BY, "adr/0003-keep-decisions-in-madr"),
    )
    assert record.summary == "We need to record the architectural decisions made on this project."
    assert record.front_matter_keys == ()


def test_nygard_record() -> None:
    record = _parse("adr/0002-use-postgres.md")
    assert record.title == "Use PostgreSQL for durable state"
    assert record.status is RecordStatus.ACCEPTED
    assert record.date is None
    assert record.relations == ()
    # One line, from the context's first paragraph.
    assert record.summary == (
        "Services need transactions, row-level security and a mature operator story. "
        "Several teams already run it."
    )


def test_madr_record_with_front_matter() -> None:
    record = _parse("adr/0003-keep-decisions-in-madr.md")
    assert record.title == "Keep decisions in MADR"
    assert record.status is RecordStatus.ACCEPTED
    assert record.date == "2024-05-20"
    assert record.tags == ("process", "documentation")
    assert record.metadata == {"deciders": ["platform team"]}
    assert record.relations == (
        Relation(RelationKind.SUPERSEDES, "adr/0001-record-architecture-decisions"),
    )
    assert record.summary.startswith("Plain Nygard records lack the options")
    assert record.warnings == ()


def test_front_matter_that_strict_yaml_rejects_is_read_line_by_line() -> None:
    record = _parse("adr/0004-luxon-dates.md")
    assert record.title == "ADR 4: use Luxon for dates"
    assert record.status is RecordStatus.PROPOSED
    assert record.date == "2024-06-01"
    assert record.tags == ("frontend", "dates")
    assert record.summary.startswith("Moment.js is in maintenance mode")
    assert record.warnings == ("front matter is not valid YAML at line 2; read line by line",)


def test_headings_in_fenced_code_do_not_make_a_status_or_sections() -> None:
    record = _parse("adr/0005-fenced-headings.md")
    assert record.title == "Release notes format"
    assert record.status is RecordStatus.DRAFT
    assert record.summary.startswith("Release notes are generated")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b" \n\n\t\n", "empty file"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8 text: undecodable byte at offset 0"),
        (b"# Title\x00\x00", "binary content: the file contains NUL characters"),
        (b"Just a note, no heading.\n", "no title"),
        (b"---\nstatus: accepted\n---\n## Context\nx\n", "no title"),
    ],
)
def test_malformed_files_are_parse_errors_with_a_reason(content: bytes, reason: str) -> None:
    parsed = parse_record("adr/0099-broken.md", content)
    assert isinstance(parsed, ParseError)
    assert parsed.path == "adr/0099-broken.md"
    assert parsed.reason.startswith(reason)


def test_the_empty_example_file_is_a_parse_error() -> None:
    assert parse_record("adr/0006-empty.md", (RECORDS / "adr/0006-empty.md").read_bytes()) == (
        ParseError("adr/0006-empty.md", "empty file")
    )


@pytest.mark.parametrize(
    ("status_text", "status", "relations"),
    [
        ("Accepted", RecordStatus.ACCEPTED, ()),
        ("proposed", RecordStatus.PROPOSED, ()),
        ("Rejected", RecordStatus.REJECTED, ()),
        ("Deprecated", RecordStatus.DEPRECATED, ()),
        ("Draft", RecordStatus.DRAFT, ()),
        ("Something else", RecordStatus.DRAFT, ()),
        (
            "Superseded by [ADR-0005](0005-x.md)",
            RecordStatus.SUPERSEDED,
            (Relation(RelationKind.SUPERSEDED_BY, "adr/0005-x"),),
        ),
        (
            "Accepted\n\nSupersedes [2. Old](../old/0002-old.md#status)",
            RecordStatus.ACCEPTED,
            (Relation(RelationKind.SUPERSEDES, "old/0002-old"),),
        ),
        # adr-tools rewrites "Accepted" only when it supersedes; a stale one loses.
        (
            "Accepted\n\nSuperseded by [7. New](0007-new.md)",
            RecordStatus.SUPERSEDED,
            (Relation(RelationKind.SUPERSEDED_BY, "adr/0007-new"),),
        ),
        # Links that are not files of the folder are not relations.
        ("Superseded by [RFC](https://example.com/rfc.md)", RecordStatus.SUPERSEDED, ()),
    ],
)
def test_status_section(
    status_text: str, status: RecordStatus, relations: tuple[Relation, ...]
) -> None:
    text = f"# T\n\n## Status\n\n{status_text}\n\n## Context\n\nC.\n"
    record = parse_record("adr/0010-t.md", text)
    assert isinstance(record, ParsedRecord)
    assert record.status is status
    assert record.relations == relations


def test_madr2_status_and_date_lines_and_front_matter_precedence() -> None:
    madr2 = (
        "# Use X\n\n* Status: accepted\n* Date: 2019-01-02\n* Tags: a, b, a\n\n## Context\n\nC.\n"
    )
    record = parse_record("0001-use-x.md", madr2)
    assert isinstance(record, ParsedRecord)
    assert (record.status, record.date, record.tags) == (
        RecordStatus.ACCEPTED,
        "2019-01-02",
        ("a", "b"),
    )
    assert record.summary == "C."

    overridden = parse_record("0001-use-x.md", "---\nstatus: rejected\n---\n" + madr2)
    assert isinstance(overridden, ParsedRecord)
    assert overridden.status is RecordStatus.REJECTED


def test_front_matter_relations_by_link_or_id() -> None:
    text = (
        "---\n"
        "title: New\n"
        "status: superseded by [ADR-9](0009-newer.md)\n"
        "supersedes:\n- 0001-first.md\n- team/adr/0002-second\n"
        "---\n"
        "# New\n"
    )
    record = parse_record("adr/0003-new.md", text)
    assert isinstance(record, ParsedRecord)
    assert record.status is RecordStatus.SUPERSEDED
    assert record.relations == (
        Relation(RelationKind.SUPERSEDED_BY, "adr/0009-newer"),
        Relation(RelationKind.SUPERSEDES, "adr/0001-first"),
        Relation(RelationKind.SUPERSEDES, "team/adr/0002-second"),
    )


@pytest.mark.parametrize(
    ("path", "identifier"),
    [
        ("adr/0010-luxon-dates.md", "adr/0010-luxon-dates"),
        ("./adr/0010-luxon-dates.markdown", "adr/0010-luxon-dates"),
        ("adr\\0010-luxon-dates.MD", "adr/0010-luxon-dates"),
        ("0001-x.md", "0001-x"),
    ],
)
def test_record_id_is_the_path_without_extension(path: str, identifier: str) -> None:
    assert record_id(path) == identifier


def test_two_files_repeating_a_front_matter_id_stay_two_records() -> None:
    text = "---\nid: ADR-0001\ntitle: {title}\n---\n# {title}\n"
    batch = parse_records(
        [
            ("adr/0001-a.md", text.format(title="A")),
            ("adr/0002-b.md", text.format(title="B")),
            ("adr/0003-c.md", "---\nid: ADR-0003\n---\n# C\n"),
            ("adr/0004-broken.md", b"\xff\xfe\x00"),
        ]
    )
    assert [(r.id, r.title, r.front_matter_id) for r in batch.records] == [
        ("adr/0001-a", "A", "ADR-0001"),
        ("adr/0002-b", "B", "ADR-0001"),
        ("adr/0003-c", "C", "ADR-0003"),
    ]
    assert batch.duplicate_ids == {"ADR-0001": ("adr/0001-a", "adr/0002-b")}
    assert [e.path for e in batch.errors] == ["adr/0004-broken.md"]


@pytest.mark.parametrize("name", READABLE)
def test_parse_render_parse_is_identical(name: str) -> None:
    record = _parse(name)
    rendered = render_record(record)
    again = parse_record(name, rendered)
    assert again == record
    assert render_record(again) == rendered


@pytest.mark.parametrize(
    "name",
    [
        "adr/0001-record-architecture-decisions.md",  # adr-tools, no front matter
        "adr/0002-use-postgres.md",  # Nygard, no front matter
        "adr/0003-keep-decisions-in-madr.md",  # MADR, front matter in normalised form
        "adr/0005-fenced-headings.md",  # setext headings, fenced code
    ],
)
def test_files_in_normalised_form_render_byte_for_byte(name: str) -> None:
    assert render_record(_parse(name)) == (RECORDS / name).read_text(encoding="utf-8")


def test_unnormalised_front_matter_is_rewritten_in_key_order_as_strict_yaml() -> None:
    rendered = render_record(_parse("adr/0004-luxon-dates.md"))
    assert rendered.startswith(
        "---\n"
        "title: 'ADR 4: use Luxon for dates'\n"
        "status: proposed\n"
        "date: 2024-06-01\n"
        "tags:\n- frontend\n- dates\n"
        "---\n# Use Luxon for dates\n"
    )
    again = parse_record("adr/0004-luxon-dates.md", rendered)
    assert isinstance(again, ParsedRecord)
    assert again.warnings == ()


def test_changes_the_body_does_not_state_go_to_front_matter() -> None:
    nygard = _parse("adr/0002-use-postgres.md")
    changed = dataclasses.replace(
        nygard,
        status=RecordStatus.SUPERSEDED,
        relations=(Relation(RelationKind.SUPERSEDED_BY, "adr/0009-use-cockroach"),),
        tags=("storage",),
    )
    rendered = render_record(changed)
    assert rendered == (
        "---\n"
        "status: superseded\n"
        "tags:\n- storage\n"
        "superseded_by:\n- adr/0009-use-cockroach\n"
        "---\n" + nygard.body
    )
    again = parse_record("adr/0002-use-postgres.md", rendered)
    assert isinstance(again, ParsedRecord)
    assert again.front_matter_keys == ("status", "tags", "superseded_by")
    assert dataclasses.replace(again, front_matter_keys=()) == changed
    assert render_record(again) == rendered


def test_an_unknown_status_is_draft_with_a_warning() -> None:
    record = parse_record("adr/0011-t.md", "# T\n\n## Status\n\nUnder discussion\n")
    assert isinstance(record, ParsedRecord)
    assert record.status is RecordStatus.DRAFT
    assert record.warnings == ("status 'Under discussion' is not a known status",)


def test_key_lines_and_relations_in_prose_are_not_read_as_such() -> None:
    text = (
        "# T\n\n## Context\n\nStatus: of the old system unknown.\n"
        "Date: to be fixed.\n\nSupersedes nothing; it is new.\n"
    )
    record = parse_record("adr/0012-t.md", text)
    assert isinstance(record, ParsedRecord)
    assert (record.status, record.date, record.relations) == (RecordStatus.DRAFT, None, ())
    assert record.summary == "Status: of the old system unknown. Date: to be fixed."
