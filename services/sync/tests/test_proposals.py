"""Memory → knowledge proposals (:mod:`aeterna_sync.proposals`): which memories qualify, the
draft each becomes (type rule, layer and unit, required sections, redaction), the keys that
make a revision's proposal exactly once, and the Cedar rules that let the sync principal read
unit memories and create and propose drafts there, and nothing more (evaluated by the shared
:class:`~aeterna_common.authz.Authorizer`, no server needed). The flow against real memory,
knowledge and sync replicas is ``tests/test_e2e_proposals.py``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.type.v1 import layer_pb2
from aeterna_common.auth import SERVICE_ROLE
from aeterna_common.authz import Authorizer, Resource, UnitKind
from aeterna_common.context import Principal
from aeterna_common.markdown import missing_sections
from aeterna_common.promotion import score
from aeterna_sync.pointers import POINTER_TAG
from aeterna_sync.proposals import (
    draft,
    eligible,
    item_path,
    knowledge_type,
    memory_score,
    request_ids,
)
from google.protobuf import struct_pb2

SYNC = Principal(tenant_id="", user_id="service:sync", roles=frozenset({SERVICE_ROLE}))
OTHER = Principal(tenant_id="", user_id="service:memory", roles=frozenset({SERVICE_ROLE}))
MEMORY = "aeterna.memory.v1.MemoryService"
KNOWLEDGE = "aeterna.knowledge.v1.KnowledgeService"
NAME = "tenants/t/memories/0b9d2f4e-3c1a-4e7b-9a55-6f3e2d1c0b9a"
TEXT = (
    "Retry Stripe webhooks with an idempotency key. Ask ops@acme.io or call "
    "+1 415 555 0100 when the queue backs up."
)


def _memory(**fields: Any) -> mres.Memory:
    metadata = fields.pop("metadata", {})
    base: dict[str, Any] = {
        "name": NAME,
        "layer": layer_pb2.MEMORY_LAYER_TEAM,
        "scope": layer_pb2.Scope(team_id="payments"),
        "content": TEXT,
        "importance": 1.0,
        "revision": 3,
        "tags": ["webhooks", "Payments"],
    }
    base.update(fields)
    m = mres.Memory(**base)
    s = struct_pb2.Struct()
    s.update(metadata)
    m.metadata.CopyFrom(s)
    return m


def test_a_pattern_draft_has_the_sections_its_type_requires_and_no_contact_details() -> None:
    item = draft(_memory(), 0.91)
    assert item.type == kres.KNOWLEDGE_TYPE_PATTERN
    assert missing_sections("PATTERN", item.content) == []
    for text in (item.title, item.summary, item.content):
        assert "ops@acme.io" not in text and "555 0100" not in text
    assert "[email redacted]" in item.content and "[phone redacted]" in item.content
    assert item.title == "Pattern: Retry Stripe webhooks with an idempotency key."
    assert item.summary == "Retry Stripe webhooks with an idempotency key."
    assert item.metadata["original_memory"] == NAME
    assert item.metadata["original_revision"] == 3
    assert item.metadata["promotion_score"] == 0.91
    # Only tags knowledge accepts ([a-z0-9._:-]), plus the marker of drafts from memories.
    assert list(item.tags) == ["from-memory", "webhooks"]


@pytest.mark.parametrize(
    ("layer", "scope", "k_layer", "unit"),
    [
        (
            layer_pb2.MEMORY_LAYER_PROJECT,
            layer_pb2.Scope(project_id="checkout"),
            kres.KNOWLEDGE_LAYER_PROJECT,
            "checkout",
        ),
        (
            layer_pb2.MEMORY_LAYER_TEAM,
            layer_pb2.Scope(team_id="payments"),
            kres.KNOWLEDGE_LAYER_TEAM,
            "payments",
        ),
        (
            layer_pb2.MEMORY_LAYER_ORG,
            layer_pb2.Scope(org_id="eng"),
            kres.KNOWLEDGE_LAYER_ORG,
            "eng",
        ),
    ],
)
def test_the_draft_sits_at_the_matching_layer_and_unit(
    layer: int, scope: layer_pb2.Scope, k_layer: int, unit: str
) -> None:
    item = draft(_memory(layer=layer, scope=scope), 0.9)
    assert item.layer == k_layer
    assert item.org_unit == f"tenants/t/orgUnits/{unit}"


def test_a_lesson_from_a_failure_is_a_hindsight() -> None:
    by_tag = _memory(tags=["Incident"])
    by_signature = _memory(metadata={"error_signature": "stripe-timeout"})
    for memory in (by_tag, by_signature):
        assert knowledge_type(memory) == kres.KNOWLEDGE_TYPE_HINDSIGHT
        item = draft(memory, 0.9)
        assert item.type == kres.KNOWLEDGE_TYPE_HINDSIGHT
        assert "## Problem" in item.content and "## Resolution" in item.content
        assert missing_sections("HINDSIGHT", item.content) == []
    assert knowledge_type(_memory()) == kres.KNOWLEDGE_TYPE_PATTERN


def test_never_sensitive_private_pointer_deleted_or_other_layers() -> None:
    assert eligible(_memory())
    deleted = _memory()
    deleted.delete_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    for memory in (
        _memory(metadata={"sensitive": True}),
        _memory(metadata={"private": "yes"}),
        _memory(tags=[POINTER_TAG]),
        deleted,
        _memory(layer=layer_pb2.MEMORY_LAYER_USER, scope=layer_pb2.Scope(user_id="dev")),
        _memory(layer=layer_pb2.MEMORY_LAYER_COMPANY, scope=layer_pb2.Scope(company_id="acme")),
        # A TEAM memory without its team names no unit to propose at.
        _memory(scope=layer_pb2.Scope()),
    ):
        assert not eligible(memory)
    # "false" is not a mark.
    assert eligible(_memory(metadata={"private": "false"}))


def test_the_score_is_domain_formula_over_memory_api_values() -> None:
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    memory = _memory(importance=0.7, access_count=4)
    memory.last_access_time.FromDatetime(now - timedelta(hours=12))
    # 0.6·0.7 + 0.3·min(4/10, 1) + 0.1·(1 − 0.5 day) = 0.42 + 0.12 + 0.05
    assert memory_score(memory, now) == pytest.approx(0.59)
    assert memory_score(memory, now) == pytest.approx(score(0.7, 4, now - timedelta(hours=12), now))
    never = _memory(importance=1.0, access_count=30)
    never.ClearField("last_access_time")
    assert memory_score(never, now) == pytest.approx(0.9)


def test_keys_are_one_per_memory_revision() -> None:
    first, second = _memory(), _memory(content="edited, same revision")
    assert request_ids(first) == request_ids(second)
    assert item_path(first) == item_path(second)
    bumped = _memory(revision=4)
    assert request_ids(bumped)[0] != request_ids(first)[0]
    assert item_path(bumped) != item_path(first)
    create, propose = request_ids(first)
    assert create != propose
    assert all(len(k) <= 128 and k.isascii() for k in (create, propose))
    # Same memory revision and score: the same draft, so knowledge's request hash holds.
    assert draft(first, 0.9) == draft(_memory(), 0.9)


UNITS = [
    Resource.unit("t", UnitKind.PROJECT, "checkout"),
    Resource.unit("t", UnitKind.TEAM, "payments"),
    Resource.unit("t", UnitKind.ORGANIZATION, "eng"),
]


async def test_only_the_sync_principal_creates_and_proposes_drafts_below_the_company() -> None:
    authz = Authorizer(None, trust_token_roles=True)
    company = Resource.unit("t", UnitKind.COMPANY, "acme")
    for rpc in ("CreateKnowledgeItem", "ProposeKnowledgeItem"):
        assert await authz.decide(SYNC, f"{KNOWLEDGE}/{rpc}", UNITS) == [True] * 3
        assert await authz.decide(OTHER, f"{KNOWLEDGE}/{rpc}", UNITS) == [False] * 3
        assert not await authz.allowed(SYNC, f"{KNOWLEDGE}/{rpc}", company)
        assert not await authz.allowed(SYNC, f"{KNOWLEDGE}/{rpc}", Resource.tenant_data("t"))
    # Reviews and edits stay with people.
    for rpc in (
        "AcceptKnowledgeItem",
        "RejectKnowledgeItem",
        "UpdateKnowledgeItem",
        "DeleteKnowledgeItem",
        "DeprecateKnowledgeItem",
    ):
        assert await authz.decide(SYNC, f"{KNOWLEDGE}/{rpc}", [*UNITS, company]) == [False] * 4


async def test_only_the_sync_principal_reads_unit_memories_and_never_a_users() -> None:
    authz = Authorizer(None, trust_token_roles=True)
    for rpc in ("GetMemory", "ListMemories"):
        assert await authz.decide(SYNC, f"{MEMORY}/{rpc}", UNITS) == [True] * 3
        assert await authz.decide(OTHER, f"{MEMORY}/{rpc}", UNITS) == [False] * 3
        # The coarse check of a read in the tenant (memory then checks each memory).
        assert await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.tenant("t"))
        assert not await authz.allowed(OTHER, f"{MEMORY}/{rpc}", Resource.tenant("t"))
        assert not await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.user_space("t", "dev"))
        assert not await authz.allowed(
            SYNC, f"{MEMORY}/{rpc}", Resource.unit("t", UnitKind.COMPANY, "acme")
        )
        assert not await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.tenant_data("t"))
    for rpc in ("SearchMemories", "ListMemoryRevisions", "RecordMemoryFeedback"):
        assert await authz.decide(SYNC, f"{MEMORY}/{rpc}", UNITS) == [False] * 3
