"""Chunking by Markdown section and the order of hits (relevance first, precedence among
near-equals), without servers."""

from __future__ import annotations

from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_knowledge.search import Hit, order_hits
from aeterna_knowledge.search_chunks import (
    MAX_CHUNK_CHARS,
    MAX_CHUNKS,
    chunk_item,
    chunk_point_id,
    source_hash,
)


def test_chunks_follow_sections_not_code_fences() -> None:
    content = (
        "---\ntitle: x\n---\nIntro line.\n\n# Use Luxon\n\n## Context\nThree parsers.\n\n"
        "## Decision\nLuxon.\n\n```md\n## Not a heading\n```\n\n"
        "Options\n-------\nMoment, Luxon.\n\n## Empty\n### Sub\nText.\n"
    )
    chunks = chunk_item("Use Luxon", "Dates, one way.", content)
    assert [(c.ordinal, c.heading) for c in chunks] == [
        (0, ""),
        (1, "Context"),
        (2, "Decision"),
        (3, "Options"),
        (4, "Sub"),
    ]
    assert chunks[0].body == "Dates, one way.\n\nIntro line."
    assert "## Not a heading" in chunks[2].body
    assert chunks[3].body == "Moment, Luxon."


def test_long_sections_split_and_chunks_are_capped() -> None:
    paragraph = "word " * 200
    long = chunk_item("T", "", "## Big\n" + "\n\n".join([paragraph] * 6))
    assert len(long) > 2
    assert all(c.heading == "Big" and len(c.body) <= MAX_CHUNK_CHARS for c in long[1:])
    many = chunk_item("T", "", "".join(f"## S{i}\nbody {i}\n\n" for i in range(50)))
    assert len(many) == MAX_CHUNKS
    assert "body 49" in many[-1].body


def test_point_ids_and_hashes_are_stable() -> None:
    item = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert chunk_point_id(item, 3) == chunk_point_id(item.upper(), 3)
    assert chunk_point_id(item, 3) != chunk_point_id(item, 4)
    assert source_hash("a", "b", "c") != source_hash("a", "bc", "")


def _hit(path: str, score: float, layer: int, role: int = res.VARIANT_ROLE_CANONICAL) -> Hit:
    item = res.KnowledgeItem(path=path, layer=layer, variant_role=role)
    item.update_time.FromSeconds(1_700_000_000)
    return Hit(item=item, score=score, section="", snippet="")


def test_precedence_decides_only_among_near_equals() -> None:
    hits = [
        _hit("team", 0.90, res.KNOWLEDGE_LAYER_TEAM),
        _hit("company", 0.89, res.KNOWLEDGE_LAYER_COMPANY),
        _hit("company-exception", 0.89, res.KNOWLEDGE_LAYER_COMPANY, res.VARIANT_ROLE_EXCEPTION),
        _hit("project", 0.99, res.KNOWLEDGE_LAYER_PROJECT),
        _hit("org-weak", 0.40, res.KNOWLEDGE_LAYER_ORG),
    ]
    ordered = [h.item.path for h in order_hits(hits, near_tie=0.02)]
    # The project's hit is clearly more relevant; the next three are near-equals, ordered by
    # layer authority then variant role; the weak org hit stays last.
    assert ordered == ["project", "company", "company-exception", "team", "org-weak"]
    assert [h.item.path for h in order_hits(hits, near_tie=0.0)][:2] == ["project", "team"]
