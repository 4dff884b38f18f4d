"""Markdown decision records: sections, required sections by knowledge type, parsing of
MADR, adr-tools and Nygard files, and writing them back."""

from aeterna_common.markdown.records import (
    FRONT_MATTER_ORDER,
    ParsedRecord,
    ParseError,
    RecordBatch,
    RecordStatus,
    Relation,
    RelationKind,
    parse_record,
    parse_records,
    record_id,
    render_record,
)
from aeterna_common.markdown.sections import (
    REQUIRED_SECTIONS,
    SECTION_SYNONYMS,
    Section,
    canonical_section,
    missing_sections,
    sections,
)

__all__ = [
    "FRONT_MATTER_ORDER",
    "REQUIRED_SECTIONS",
    "SECTION_SYNONYMS",
    "ParseError",
    "ParsedRecord",
    "RecordBatch",
    "RecordStatus",
    "Relation",
    "RelationKind",
    "Section",
    "canonical_section",
    "missing_sections",
    "parse_record",
    "parse_records",
    "record_id",
    "render_record",
    "sections",
]
