"""Sections of a Markdown document and the required sections of each knowledge type.

Sections come from the CommonMark token stream of ``markdown-it-py``, so ATX (``## Title``) and
setext (``Title`` over ``===`` or ``---``) headings count and a ``#`` line inside a fenced or
indented code block does not. A leading YAML front matter block is skipped (its ``---`` lines
would otherwise read as a thematic break and a setext heading).

Headings are matched tolerantly: :func:`canonical_section` lower-cases, drops numbering such as
``1.``, ``2)`` or ``3.1``, drops punctuation and looks the rest up in :data:`SECTION_SYNONYMS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from markdown_it import MarkdownIt
from markdown_it.token import Token

from aeterna_common.markdown.front_matter import front_matter_lines, read_front_matter

__all__ = [
    "REQUIRED_SECTIONS",
    "SECTION_SYNONYMS",
    "Section",
    "canonical_section",
    "inline_text",
    "missing_sections",
    "parser",
    "sections",
]

SECTION_SYNONYMS: Mapping[str, str] = MappingProxyType(
    {
        # Nygard, "Documenting Architecture Decisions" (2011), and the adr-tools template
        # (npryce/adr-tools src/template.md): Status, Context, Decision, Consequences.
        "status": "status",
        "context": "context",
        "decision": "decision",
        "consequences": "consequences",
        "consequence": "consequences",
        # MADR 3.0 / 4.0 template (adr/madr template/adr-template.md): "Context and Problem
        # Statement", "Decision Outcome" with a "Consequences" subsection, and "Pros and Cons
        # of the Options"; MADR 2.x had "Positive/Negative Consequences".
        "context and problem statement": "context",
        "decision outcome": "decision",
        "positive consequences": "consequences",
        "negative consequences": "consequences",
        "pros and cons of the options": "consequences",
        # Common names outside those templates, for the other knowledge types.
        "background": "context",
        "problem": "problem",
        "solution": "solution",
        "approach": "solution",
        "scope": "scope",
        "rules": "rules",
        "rule": "rules",
        "policy": "rules",
        "version": "version",
    }
)
"""Normalised heading (see :func:`canonical_section`) → canonical section name.

Only whole headings match: MADR's "Decision Drivers" is not a decision section.
"""

REQUIRED_SECTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "ADR": ("context", "decision", "consequences"),
        "POLICY": ("scope", "rules"),
        "PATTERN": ("problem", "solution"),
        "SPEC": ("version",),
        "HINDSIGHT": (),
    }
)
"""Knowledge type → canonical sections it must have, in order (DOMAIN.md, Knowledge)."""

# "1.", "2)", "3.1", "3.1.", "(4)" before the words of a heading.
_NUMBERING = re.compile(r"^\(?\d+(?:\.\d+)*[.)]?\s+")
_NOT_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True, slots=True)
class Section:
    """One heading and the text under it.

    Attributes:
        level: Heading level, 1 (``#`` or setext ``===``) to 6.
        title: The heading's text with inline markup rendered as plain text.
        canonical: The canonical section name (:data:`SECTION_SYNONYMS`), or None.
        body: Source Markdown under the heading up to the next heading of the same or a higher
            level (so subsections are included), without surrounding blank lines.
        start_line: 0-based line of the heading in the document given.
        end_line: 0-based line after the section's last line (exclusive), the same convention
            as markdown-it's ``Token.map``.
    """

    level: int
    title: str
    canonical: str | None
    body: str
    start_line: int
    end_line: int


_PARSER = MarkdownIt("commonmark")


def parser() -> MarkdownIt:
    """The shared CommonMark parser (markdown-it-py ``commonmark`` preset).

    Returns:
        A parser; ``parse``/``parseInline`` do not mutate it, so sharing it is safe.
    """
    return _PARSER


def canonical_section(heading: str) -> str | None:
    """The canonical section name a heading stands for.

    Args:
        heading: A heading's plain text, e.g. ``"2) Decision Outcome"``.

    Returns:
        ``"decision"`` for that example; None when the heading is not in
        :data:`SECTION_SYNONYMS` after lower-casing, dropping numbering and punctuation.
    """
    text = _NUMBERING.sub("", heading.strip().lower())
    words = _NOT_WORD.sub(" ", text).split()
    return SECTION_SYNONYMS.get(" ".join(words))


def inline_text(token: Token) -> str:
    """Plain text of an ``inline`` token: text, code spans and line breaks, markup dropped.

    Args:
        token: An ``inline`` token from markdown-it.

    Returns:
        The text, with soft and hard breaks as a line feed.
    """
    parts: list[str] = []
    for child in token.children or ():
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
    return "".join(parts)


def sections(markdown: str) -> list[Section]:
    """The headings of a Markdown document with the text under each.

    Args:
        markdown: The document; a leading YAML front matter block is skipped and line numbers
            still count from the document's first line.

    Returns:
        Sections in document order. Headings inside fenced or indented code and inside front
        matter are not sections; headings inside block quotes and list items are.
    """
    lines = markdown.splitlines()
    skipped = front_matter_lines(lines)
    tokens = _PARSER.parse("\n".join(lines[skipped:]))
    found: list[tuple[int, str, int, int]] = []  # level, title, heading start, heading end
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.map is not None:
            title = inline_text(tokens[index + 1]).replace("\n", " ").strip()
            found.append((int(token.tag[1]), title, token.map[0], token.map[1]))
    result: list[Section] = []
    body_lines = lines[skipped:]
    for position, (level, title, start, heading_end) in enumerate(found):
        end = len(body_lines)
        for other_level, _, other_start, _ in found[position + 1 :]:
            if other_level <= level:
                end = other_start
                break
        body = "\n".join(body_lines[heading_end:end]).strip("\n")
        result.append(
            Section(
                level=level,
                title=title,
                canonical=canonical_section(title),
                body=body,
                start_line=start + skipped,
                end_line=end + skipped,
            )
        )
    return result


def missing_sections(item_type: str, markdown: str) -> list[str]:
    """The required sections of a knowledge type that a document lacks.

    A SPEC's ``version`` may also be a ``version`` key of the front matter.

    Args:
        item_type: ``"ADR"``, ``"POLICY"``, ``"PATTERN"``, ``"SPEC"`` or ``"HINDSIGHT"``.
        markdown: The document, front matter allowed.

    Returns:
        Canonical names missing, in the order of :data:`REQUIRED_SECTIONS` (empty when none).

    Raises:
        ValueError: ``item_type`` is not one of the five types.
    """
    try:
        required = REQUIRED_SECTIONS[item_type]
    except KeyError:
        raise ValueError(f"unknown knowledge type {item_type!r}") from None
    present = {section.canonical for section in sections(markdown)}
    if "version" in required and "version" not in present and _front_matter_has_version(markdown):
        present.add("version")
    return [name for name in required if name not in present]


def _front_matter_has_version(markdown: str) -> bool:
    value = read_front_matter(markdown).metadata.get("version")
    return value is not None and str(value).strip() != ""
