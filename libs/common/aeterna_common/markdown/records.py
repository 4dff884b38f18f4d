"""Decision-record files as teams keep them: parsing MADR, adr-tools and Nygard files and
writing them back.

What a file may say, and where (front matter wins over the body when both say it):

- **title**: front matter ``title``, else the first level-1 heading without adr-tools'
  numbering (``# 1. Record architecture decisions``).
- **status**: front matter ``status`` (MADR 3/4), a ``Status`` section (Nygard, adr-tools) or a
  ``Status: …`` line under the title (MADR 2's ``* Status: accepted``); otherwise DRAFT.
  ``Superseded by [ADR-5](0005-x.md)`` is SUPERSEDED with a SUPERSEDED_BY relation to the
  link's file.
- **date**: front matter ``date`` or a ``Date: 2024-03-04`` line under the title (adr-tools).
- **tags**: front matter ``tags`` (a list or a comma-separated string) or a ``Tags:`` line under
  the title.
- **relations**: ``Supersedes [..](file.md)`` / ``Superseded by [..](file.md)`` paragraphs with
  a link to a file, anywhere (adr-tools writes them into the Status section), and front matter
  ``supersedes`` / ``superseded_by`` lists, whose items are record ids or ``.md`` file names.

The record id is the file's path without its extension (``adr/0010-luxon-dates``), never a
front matter ``id``: two files are two records even when their front matter repeats an id, and
:func:`parse_records` reports such repeats.

:func:`render_record` writes a record back as the body it was read from below a normalised
front matter (:data:`FRONT_MATTER_ORDER`), which holds what the file's front matter held plus
whatever the body alone would read differently. So ``parse(render(r)) == r``, and a file whose
front matter is already normalised is written back byte for byte.
"""

from __future__ import annotations

import datetime as dt
import enum
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from markdown_it.token import Token

from aeterna_common.markdown.front_matter import dump_front_matter, read_front_matter
from aeterna_common.markdown.sections import canonical_section, inline_text, parser

__all__ = [
    "FRONT_MATTER_ORDER",
    "ParseError",
    "ParsedRecord",
    "RecordBatch",
    "RecordStatus",
    "Relation",
    "RelationKind",
    "parse_record",
    "parse_records",
    "record_id",
    "render_record",
]


class RecordStatus(enum.StrEnum):
    """Lifecycle status of a record (DOMAIN.md, Knowledge); values match the proto enum names."""

    DRAFT = "DRAFT"
    PROPOSED = "PROPOSED"
    ACCEPTED = "ACCEPTED"
    DEPRECATED = "DEPRECATED"
    SUPERSEDED = "SUPERSEDED"
    REJECTED = "REJECTED"


class RelationKind(enum.StrEnum):
    """The relation kinds a decision-record file can state."""

    SUPERSEDES = "SUPERSEDES"
    SUPERSEDED_BY = "SUPERSEDED_BY"


# Words that open a status statement → status. The MADR 3/4 template lists "proposed |
# rejected | accepted | deprecated | … | superseded by"; adr-tools writes "Accepted",
# "Proposed", "Superseded by"; the others are common spellings of the same states.
_STATUS_WORDS: Mapping[str, RecordStatus] = {
    "draft": RecordStatus.DRAFT,
    "proposed": RecordStatus.PROPOSED,
    "accepted": RecordStatus.ACCEPTED,
    "approved": RecordStatus.ACCEPTED,
    "adopted": RecordStatus.ACCEPTED,
    "rejected": RecordStatus.REJECTED,
    "declined": RecordStatus.REJECTED,
    "deprecated": RecordStatus.DEPRECATED,
    "superseded": RecordStatus.SUPERSEDED,
}

FRONT_MATTER_ORDER = ("title", "status", "date", "tags", "supersedes", "superseded_by")
"""Normalised front matter: these keys first in this order, then any other keys in the order
the file had them."""

_RELATION_KEYS = {
    "supersedes": RelationKind.SUPERSEDES,
    "superseded_by": RelationKind.SUPERSEDED_BY,
}
_EXTENSIONS = (".md", ".markdown")
_H1_NUMBERING = re.compile(r"^\d+\.\s+")
_KEY_LINE = re.compile(r"^\s*(status|date|tags)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_RELATION_LINE = re.compile(r"^\s*(supersedes|superseded\s+by)\b\s*:?", re.IGNORECASE)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class Relation:
    """A relation a record states to another record.

    Attributes:
        kind: SUPERSEDES or SUPERSEDED_BY.
        target: The other record's id (its path without extension, as :func:`record_id`).
    """

    kind: RelationKind
    target: str


@dataclass(frozen=True, slots=True)
class ParsedRecord:
    """One decision-record file, read.

    Attributes:
        id: Path-like id from the file path, e.g. ``adr/0010-luxon-dates``.
        title: One line.
        status: From the file, DRAFT when it states none.
        date: ``YYYY-MM-DD`` when the file gives an ISO date, else the text given, or None.
        summary: The first paragraph of the context (else the decision, else the first
            paragraph), as one line of plain text; empty when there is no paragraph.
        tags: In file order, without duplicates.
        relations: SUPERSEDES / SUPERSEDED_BY relations by target id, without duplicates.
        body: The Markdown after the front matter, exactly as in the file.
        metadata: Front matter keys other than :data:`FRONT_MATTER_ORDER`, in file order
            (MADR's ``deciders``, a front matter ``id``, ...).
        front_matter_keys: Which of :data:`FRONT_MATTER_ORDER` the front matter held.
        front_matter_id: The front matter's ``id`` as text, None when it has none.
        warnings: What reading had to forgive (not compared: they describe the reading).
    """

    id: str
    title: str
    status: RecordStatus
    date: str | None
    summary: str
    tags: tuple[str, ...]
    relations: tuple[Relation, ...]
    body: str
    metadata: dict[str, Any] = field(default_factory=dict)
    front_matter_keys: tuple[str, ...] = ()
    front_matter_id: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class ParseError:
    """A file that is not a decision record.

    Attributes:
        path: The path given to :func:`parse_record`.
        reason: Why, in words, e.g. ``"empty file"``.
    """

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """A directory's files, read.

    Attributes:
        records: Parsed records in the order given.
        errors: Files that did not parse, in the order given.
        duplicate_ids: Front matter id → ids of the records (two or more) whose front matter
            repeats it; each is still its own record.
    """

    records: tuple[ParsedRecord, ...]
    errors: tuple[ParseError, ...]
    duplicate_ids: dict[str, tuple[str, ...]]


@dataclass(slots=True)
class _BodyFacts:
    """What the Markdown body alone says."""

    title: str | None = None
    status: RecordStatus | None = None
    date: str | None = None
    tags: tuple[str, ...] | None = None
    relations: list[Relation] = field(default_factory=list)
    summaries: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def record_id(path: str) -> str:
    """The record id of a file: its path without the Markdown extension, ``/``-separated.

    Args:
        path: The file's path relative to the directory being imported, e.g.
            ``adr/0010-luxon-dates.md`` (Windows separators too).

    Returns:
        ``adr/0010-luxon-dates`` for that example.
    """
    normal = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
    for extension in _EXTENSIONS:
        if normal.lower().endswith(extension):
            return normal[: -len(extension)]
    return normal


def parse_record(path: str, text: str | bytes) -> ParsedRecord | ParseError:
    """Read one decision-record file.

    Args:
        path: The file's path relative to the imported directory; it gives the record id and
            resolves relative links.
        text: The file's content; bytes must be UTF-8 (a BOM is allowed).

    Returns:
        The record, or a :class:`ParseError` for bytes that are not UTF-8, binary content (a NUL
        character), an empty file or one with no title at all. Unreadable front matter is not an
        error: it is read leniently and noted in ``warnings``.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            return ParseError(path, f"not UTF-8 text: undecodable byte at offset {error.start}")
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        return ParseError(path, "binary content: the file contains NUL characters")
    if not text.strip():
        return ParseError(path, "empty file")
    identifier = record_id(path)
    if not identifier or identifier == ".":
        return ParseError(path, "no file name to take the record id from")

    front = read_front_matter(text)
    meta = dict(front.metadata)
    facts = _read_body(path, front.body)
    warnings = [*front.warnings, *facts.warnings]

    title = _scalar(meta.pop("title", None)) or facts.title
    if not title:
        return ParseError(path, "no title: neither a front matter title nor a level-1 heading")

    status = facts.status
    relations = list(facts.relations)
    fm_status = _scalar(meta.pop("status", None))
    if fm_status:
        stated, stated_relations = _status_statement(path, fm_status)
        relations.extend(stated_relations)
        if stated is None:
            warnings.append(f"status {fm_status!r} is not a known status")
        else:
            status = stated
    for key, kind in _RELATION_KEYS.items():
        for target in _as_list(meta.pop(key, None)):
            relations.append(Relation(kind, _target_id(path, target)))

    raw_date = meta.pop("date", None)
    date = _date_text(raw_date) if raw_date is not None else facts.date
    raw_tags = meta.pop("tags", None)
    tags = _unique(_as_list(raw_tags)) if raw_tags is not None else (facts.tags or ())
    summary = (
        facts.summaries.get("context")
        or facts.summaries.get("decision")
        or facts.summaries.get("", "")
    )
    fm_id = meta.get("id")
    return ParsedRecord(
        id=identifier,
        title=title,
        status=status or RecordStatus.DRAFT,
        date=date,
        summary=summary,
        tags=tags,
        relations=tuple(dict.fromkeys(relations)),
        body=front.body,
        metadata=meta,
        front_matter_keys=tuple(key for key in FRONT_MATTER_ORDER if key in front.metadata),
        front_matter_id=None if fm_id is None else str(fm_id),
        warnings=tuple(warnings),
    )


def parse_records(files: Iterable[tuple[str, str | bytes]]) -> RecordBatch:
    """Read a directory's files and find front matter ids that several files repeat.

    Args:
        files: ``(path, content)`` pairs, paths relative to the directory.

    Returns:
        The records, the errors and the repeated front matter ids.
    """
    records: list[ParsedRecord] = []
    errors: list[ParseError] = []
    by_fm_id: dict[str, list[str]] = {}
    for path, text in files:
        parsed = parse_record(path, text)
        if isinstance(parsed, ParseError):
            errors.append(parsed)
            continue
        records.append(parsed)
        if parsed.front_matter_id is not None:
            by_fm_id.setdefault(parsed.front_matter_id, []).append(parsed.id)
    duplicates = {key: tuple(ids) for key, ids in by_fm_id.items() if len(ids) > 1}
    return RecordBatch(tuple(records), tuple(errors), duplicates)


def render_record(record: ParsedRecord) -> str:
    """Write a record back in the format it was read from.

    The body is written as it is; above it a front matter in :data:`FRONT_MATTER_ORDER` holds
    the keys the file's front matter held (``record.front_matter_keys``), any value the body
    alone would read differently (a status changed since the import, a relation the body does
    not state), and ``record.metadata``. With nothing to hold there is no front matter, so a
    Nygard or adr-tools file stays as it was.

    Args:
        record: A record from :func:`parse_record`, possibly changed with
            :func:`dataclasses.replace`.

    Returns:
        The file's text.
    """
    facts = _read_body(record.id + ".md", record.body)
    keys = set(record.front_matter_keys)
    out: dict[str, Any] = {}
    if "title" in keys or record.title != facts.title:
        out["title"] = record.title
    body_status = facts.status or RecordStatus.DRAFT
    if "status" in keys or record.status != body_status:
        out["status"] = record.status.value.lower()
    if record.date is not None and ("date" in keys or record.date != facts.date):
        out["date"] = _date_value(record.date)
    if "tags" in keys or record.tags != (facts.tags or ()):
        out["tags"] = list(record.tags)
    for key, kind in _RELATION_KEYS.items():
        extra = [r.target for r in record.relations if r.kind is kind and r not in facts.relations]
        if key in keys or extra:
            out[key] = extra
    for key, value in record.metadata.items():
        out.setdefault(key, value)
    return dump_front_matter(out) + record.body


def _read_body(path: str, body: str) -> _BodyFacts:
    facts = _BodyFacts()
    tokens = parser().parse(body)
    section = ""  # canonical name of the innermost section, "other" when it has none
    heading_level = 0
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            heading_level = int(token.tag[1])
            continue
        if token.type != "inline":
            continue
        previous = tokens[index - 1].type if index else ""
        if previous == "heading_open":
            title = inline_text(token).replace("\n", " ").strip()
            if heading_level == 1:
                # Text under the title, before any section, is the preamble ("").
                if facts.title is None:
                    facts.title = _H1_NUMBERING.sub("", title)
                section = ""
            else:
                section = canonical_section(title) or "other"
            continue
        if previous != "paragraph_open":
            continue
        _read_paragraph(path, token, section, facts)
    return facts


def _read_paragraph(path: str, token: Token, section: str, facts: _BodyFacts) -> None:
    text = inline_text(token)
    source = token.content
    if _RELATION_LINE.match(text):
        status, relations = _status_statement(path, source)
        # Prose that starts "Supersedes ..." states a relation only with a link, or as status.
        if relations or section == "status":
            facts.relations.extend(relations)
            if status is RecordStatus.SUPERSEDED:
                facts.status = status
            return
    key_line = False
    # "Status: accepted" / "Date: ..." lines: adr-tools and MADR 2 put them under the title.
    for line in source.splitlines() if section in ("", "status") else ():
        match = _KEY_LINE.match(line)
        if match is None:
            continue
        key_line = True
        key, value = match.group(1).lower(), match.group(2)
        if key == "status":
            _take_status(path, value, facts)
        elif key == "date" and facts.date is None:
            facts.date = _date_text(value)
        elif key == "tags" and facts.tags is None:
            facts.tags = _unique(_as_list(value))
    if key_line:
        return
    if section == "status":
        if facts.status is None:
            _take_status(path, source, facts)
        return
    summary = " ".join(text.split())
    if summary:
        facts.summaries.setdefault(section, summary)
        facts.summaries.setdefault("", summary)


def _take_status(path: str, source: str, facts: _BodyFacts) -> None:
    status, relations = _status_statement(path, source)
    facts.relations.extend(relations)
    if status is None:
        facts.warnings.append(f"status {' '.join(source.split())!r} is not a known status")
    elif facts.status is None or status is RecordStatus.SUPERSEDED:
        # The first status stated wins, except that "Superseded by" ends any other.
        facts.status = status


def _status_statement(path: str, source: str) -> tuple[RecordStatus | None, list[Relation]]:
    """Read ``Accepted`` or ``Superseded by [ADR-5](0005-x.md)`` (inline Markdown)."""
    inline = parser().parseInline(source.strip())
    token = inline[0] if inline else None
    text = inline_text(token) if token is not None else ""
    hrefs = [
        str(child.attrGet("href"))
        for child in (token.children or () if token is not None else ())
        if child.type == "link_open" and child.attrGet("href")
    ]
    relation = _RELATION_LINE.match(text)
    if relation is not None:
        kind = (
            RelationKind.SUPERSEDES
            if relation.group(1).lower() == "supersedes"
            else RelationKind.SUPERSEDED_BY
        )
        targets = [_target_id(path, href) for href in hrefs if _is_file_link(href)]
        status = RecordStatus.SUPERSEDED if kind is RelationKind.SUPERSEDED_BY else None
        return status, [Relation(kind, target) for target in targets]
    words = re.findall(r"[a-z]+", text.lower())
    return (_STATUS_WORDS.get(words[0]) if words else None), []


def _is_file_link(href: str) -> bool:
    parts = urlsplit(href)
    return not parts.scheme and not parts.netloc and bool(parts.path)


def _target_id(path: str, target: str) -> str:
    """A link or front matter value → record id: ``.md`` files resolve against the file's
    directory, anything else is an id already."""
    link = unquote(urlsplit(target.strip()).path)
    if not link.lower().endswith(_EXTENSIONS):
        return link.strip("/")
    base = posixpath.dirname(record_id(path))
    return record_id(posixpath.join(base, link))


def _scalar(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _date_text(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    text = _scalar(value)
    if text is None:
        return None
    match = _ISO_DATE.fullmatch(text)
    return match.group(0) if match else text


def _date_value(text: str) -> dt.date | str:
    """An ISO date as a YAML date (written unquoted), other text as it is."""
    try:
        return dt.date.fromisoformat(text) if _ISO_DATE.fullmatch(text) else text
    except ValueError:
        return text


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [text for item in value if (text := _scalar(item))]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))
