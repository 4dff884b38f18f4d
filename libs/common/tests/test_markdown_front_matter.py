"""YAML front matter: strict reading, the lenient fallback, the normalised writing."""

from __future__ import annotations

import datetime as dt

from aeterna_common.markdown.front_matter import dump_front_matter, read_front_matter


def test_strict_yaml_keeps_types_order_and_the_exact_body() -> None:
    text = "---\ntitle: T\ndate: 2024-01-31\ntags: [a, b]\n---\n\n# T\r\n\nBody.\n"
    front = read_front_matter(text)
    assert front.metadata == {"title": "T", "date": dt.date(2024, 1, 31), "tags": ["a", "b"]}
    assert list(front.metadata) == ["title", "date", "tags"]
    assert front.body == "\n# T\r\n\nBody.\n"
    assert (front.present, front.lines, front.warnings) == (True, 5, ())


def test_without_a_closed_block_there_is_no_front_matter() -> None:
    for text in ("# T\n", "---\ntitle: T\n# T\n", "\n---\ntitle: T\n---\n"):
        front = read_front_matter(text)
        assert (front.metadata, front.body, front.present) == ({}, text, False)


def test_yaml_document_end_marker_closes_the_block() -> None:
    front = read_front_matter("---\ntitle: T\n...\nBody\n")
    assert (front.metadata, front.body) == ({"title": "T"}, "Body\n")


def test_rejected_yaml_is_read_line_by_line() -> None:
    block = (
        "---\n"
        "# a comment\n"
        "title: ADR 7: split the monolith\n"
        "status: 'accepted'\n"
        "deciders:\n"
        "  - Ana\n"
        '  - "Bo: lead"\n'
        "tags: [a, 'b']\n"
        "not a key line\n"
        "---\n"
        "Body\n"
    )
    front = read_front_matter(block)
    assert front.metadata == {
        "title": "ADR 7: split the monolith",
        "status": "accepted",
        "deciders": ["Ana", "Bo: lead"],
        "tags": ["a", "b"],
    }
    assert front.body == "Body\n"
    assert front.warnings == ("front matter is not valid YAML at line 3; read line by line",)


def test_yaml_that_is_not_a_mapping_is_read_line_by_line() -> None:
    front = read_front_matter("---\n- just\n- a list\n---\nBody\n")
    assert front.metadata == {}
    assert front.warnings == ("front matter is not a YAML mapping; read line by line",)


def test_dump_keeps_key_order_and_reads_back_strictly() -> None:
    metadata = {"title": "ADR 4: use Luxon", "status": "accepted", "deciders": ["Zoë"]}
    dumped = dump_front_matter(metadata)
    assert dumped == ("---\ntitle: 'ADR 4: use Luxon'\nstatus: accepted\ndeciders:\n- Zoë\n---\n")
    front = read_front_matter(dumped + "Body\n")
    assert (front.metadata, front.warnings) == (metadata, ())
    assert dump_front_matter({}) == ""
