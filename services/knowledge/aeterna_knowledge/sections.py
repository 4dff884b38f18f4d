"""The required sections of an item's Markdown, by type (DOMAIN.md, Knowledge).

The one place the service asks which required sections are missing; the tolerant parser
(case, numbering, MADR synonyms, headings in fenced code ignored) is
``aeterna_common.markdown.missing_sections``, which replaces the minimal reading below.
"""

from __future__ import annotations

import re

REQUIRED: dict[str, tuple[str, ...]] = {
    "ADR": ("context", "decision", "consequences"),
    "POLICY": ("scope", "rules"),
    "PATTERN": ("problem", "solution"),
    "SPEC": ("version",),
    "HINDSIGHT": (),
}
"""Required sections by type (DOMAIN.md, Knowledge)."""

_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?:[\d.]+\s+)?(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def missing_sections(item_type: str, markdown: str) -> list[str]:
    """The canonical names of the required sections of ``item_type`` that ``markdown`` lacks.

    Args:
        item_type: ``ADR``, ``POLICY``, ``PATTERN``, ``SPEC`` or ``HINDSIGHT``.
        markdown: The item's content.

    Returns:
        Missing section names in the order of :data:`REQUIRED`; empty when complete.
    """
    headings: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m:
            headings.add(m.group(1).strip().lower())
    return [s for s in REQUIRED[item_type] if s not in headings]
