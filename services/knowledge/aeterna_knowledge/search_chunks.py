"""Retrieval chunks of a knowledge item: one per Markdown section, so that a long document is
found by its best section and answered with that section's heading.

An item's text is cut at every heading (:func:`aeterna_common.markdown.sections`: CommonMark
headings, none inside fenced code or front matter). A chunk is the text under one heading up
to the next heading of any level, so chunks do not overlap; the text before the first
heading, with the title and the summary, is chunk 0 (heading ``""``). Sections with no text
of their own (a heading directly followed by a subheading) make no chunk. A section longer
than :data:`MAX_CHUNK_CHARS` is split at paragraph breaks into chunks that keep its heading,
and an item never has more than :data:`MAX_CHUNKS` chunks: the remaining text goes into the
last one.

Every chunk is indexed with the item's title and its own heading in front of its body
(:func:`chunk_text`): a section's words alone ("We use Luxon.") rarely say what it is about.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

from aeterna_common.markdown import sections
from aeterna_common.markdown.front_matter import front_matter_lines

CHUNKER_VERSION = 1
"""Part of :func:`source_hash`: a change of the cutting rules re-embeds every item once."""

MAX_CHUNKS = 32
"""Most chunks per item. Point ids of ordinals up to this bound are deleted when an item
shrinks (:func:`chunk_point_id`), so it bounds that work too."""

MAX_CHUNK_CHARS = 1500
"""Longest chunk body in characters before it is split at paragraph breaks: about 350
tokens of English, past the 256 word pieces all-MiniLM-L6-v2 reads (the model card), so a
dense vector still covers most of each chunk."""

SNIPPET_CHARS = 240
"""Length of the snippet a search hit shows from its best chunk, in characters."""

_SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One retrieval unit of an item.

    Attributes:
        ordinal: 0-based position in the item (0: the title, summary and text before the
            first heading).
        heading: The section's heading as plain text; ``""`` for chunk 0.
        body: The section's own Markdown, without its heading and subsections.
    """

    ordinal: int
    heading: str
    body: str


def source_hash(title: str, summary: str, content: str) -> str:
    """Lower-case hex SHA-256 of what an item's chunks are cut from (with
    :data:`CHUNKER_VERSION`): equal hashes mean equal chunks, so stored vectors are reused."""
    raw = "\x00".join((str(CHUNKER_VERSION), title, summary, content))
    return hashlib.sha256(raw.encode()).hexdigest()


def chunk_point_id(item_id: str | uuid.UUID, ordinal: int) -> str:
    """The vector index point id of chunk ``ordinal`` of an item: a UUIDv5 under the item's
    id, identical in every replica (RFC 4122, section 4.3)."""
    return str(uuid.uuid5(uuid.UUID(str(item_id)), str(ordinal)))


def _split(body: str) -> list[str]:
    """``body`` in pieces of at most :data:`MAX_CHUNK_CHARS`, cut at paragraph breaks (a
    single longer paragraph is cut at that length)."""
    if len(body) <= MAX_CHUNK_CHARS:
        return [body]
    pieces: list[str] = []
    current = ""
    for paragraph in _BLANK_LINES.split(body):
        while len(paragraph) > MAX_CHUNK_CHARS:
            if current:
                pieces.append(current)
                current = ""
            pieces.append(paragraph[:MAX_CHUNK_CHARS])
            paragraph = paragraph[MAX_CHUNK_CHARS:]
        if current and len(current) + 2 + len(paragraph) > MAX_CHUNK_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        pieces.append(current)
    return pieces


def chunk_item(title: str, summary: str, content: str) -> list[Chunk]:
    """Cut an item into chunks (see the module docstring).

    Args:
        title: The item's title.
        summary: Its summary (may be empty).
        content: Its Markdown content (front matter allowed).

    Returns:
        1 to :data:`MAX_CHUNKS` chunks in document order, ordinals 0, 1, ...; chunk 0 always
        exists (it carries at least the title).
    """
    lines = content.splitlines()
    found = sections(content)
    first = found[0].start_line if found else len(lines)
    preamble = "\n".join(lines[front_matter_lines(lines) : first]).strip()
    parts: list[tuple[str, str]] = [("", "\n\n".join(p for p in (summary.strip(), preamble) if p))]
    for index, section in enumerate(found):
        end = found[index + 1].start_line if index + 1 < len(found) else len(lines)
        own = lines[section.start_line + 1 : end]
        if own and _SETEXT_UNDERLINE.match(own[0]):
            own = own[1:]
        body = "\n".join(own).strip()
        if body:
            parts.extend((section.title, piece) for piece in _split(body))
    if len(parts) > MAX_CHUNKS:
        heading = parts[MAX_CHUNKS - 1][0]
        rest = "\n\n".join(body for _, body in parts[MAX_CHUNKS - 1 :])
        parts = [*parts[: MAX_CHUNKS - 1], (heading, rest)]
    return [Chunk(i, heading, body) for i, (heading, body) in enumerate(parts)]


def chunk_text(title: str, chunk: Chunk) -> str:
    """The text a chunk is embedded and BM25-encoded from: the item's title, the chunk's
    heading and its body."""
    head = f"{title}\n{chunk.heading}" if chunk.heading else title
    return f"{head}\n{chunk.body}" if chunk.body else head


def snippet(body: str, limit: int = SNIPPET_CHARS) -> str:
    """The start of a chunk's body on one line, cut at a word boundary within ``limit``
    characters (with ``…`` when cut)."""
    flat = " ".join(body.split())
    if len(flat) <= limit:
        return flat
    cut = flat[:limit].rsplit(" ", 1)[0]
    return cut + "…"
