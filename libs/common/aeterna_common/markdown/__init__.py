"""Markdown decision records: sections, required sections by knowledge type, parsing of
MADR, adr-tools and Nygard files, and writing them back."""

from aeterna_common.markdown.sections import (
    REQUIRED_SECTIONS,
    SECTION_SYNONYMS,
    Section,
    canonical_section,
    missing_sections,
    sections,
)

__all__ = [
    "REQUIRED_SECTIONS",
    "SECTION_SYNONYMS",
    "Section",
    "canonical_section",
    "missing_sections",
    "sections",
]
