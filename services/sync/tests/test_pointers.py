"""Pointer memories (:mod:`aeterna_sync.pointers`) and the Cedar rules that let the sync
service principal list knowledge and write pointers, and nothing more (evaluated by the
shared :class:`~aeterna_common.authz.Authorizer`, no server needed)."""

from __future__ import annotations

import pytest
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.type.v1 import layer_pb2
from aeterna_common.auth import SERVICE_ROLE
from aeterna_common.authz import Authorizer, Resource, UnitKind
from aeterna_common.context import Principal
from aeterna_sync.pointers import pointer_content, pointer_memory, pointer_request_id

SYNC = Principal(tenant_id="", user_id="service:sync", roles=frozenset({SERVICE_ROLE}))
OTHER = Principal(tenant_id="", user_id="service:memory", roles=frozenset({SERVICE_ROLE}))
MEMORY = "aeterna.memory.v1.MemoryService"
KNOWLEDGE = "aeterna.knowledge.v1.KnowledgeService"


def _item(**fields: object) -> kres.KnowledgeItem:
    base: dict[str, object] = {
        "name": "tenants/t/knowledgeItems/5f0c6a56-8a51-4d4f-9d59-1b1f1c7e2a10",
        "type": kres.KNOWLEDGE_TYPE_ADR,
        "status": kres.KNOWLEDGE_STATUS_ACCEPTED,
        "layer": kres.KNOWLEDGE_LAYER_TEAM,
        "org_unit": "tenants/t/orgUnits/payments",
        "path": "adr/0001-luxon",
        "title": "Use Luxon",
        "summary": "Use Luxon for dates\nmore detail",
        "content_hash": "ab" * 32,
    }
    base.update(fields)
    return kres.KnowledgeItem(**base)  # type: ignore[arg-type]


def test_pointer_content_is_type_status_path_and_one_line_summary() -> None:
    assert pointer_content(_item()) == "[ADR] [ACCEPTED] adr/0001-luxon\nUse Luxon for dates"
    assert pointer_content(_item(summary="")) == "[ADR] [ACCEPTED] adr/0001-luxon\nUse Luxon"


@pytest.mark.parametrize(
    ("layer", "memory_layer", "scope_field"),
    [
        (kres.KNOWLEDGE_LAYER_PROJECT, layer_pb2.MEMORY_LAYER_PROJECT, "project_id"),
        (kres.KNOWLEDGE_LAYER_TEAM, layer_pb2.MEMORY_LAYER_TEAM, "team_id"),
        (kres.KNOWLEDGE_LAYER_ORG, layer_pb2.MEMORY_LAYER_ORG, "org_id"),
        (kres.KNOWLEDGE_LAYER_COMPANY, layer_pb2.MEMORY_LAYER_COMPANY, "company_id"),
    ],
)
def test_pointer_layer_and_scope_follow_the_item(
    layer: int, memory_layer: int, scope_field: str
) -> None:
    memory = pointer_memory(_item(layer=layer))
    assert memory.layer == memory_layer
    assert getattr(memory.scope, scope_field) == "payments"
    assert memory.metadata["knowledge_item"] == _item().name
    assert memory.metadata["content_hash"] == "ab" * 32


def test_request_id_is_stable_per_revision_and_fits_memory_limit() -> None:
    first = pointer_request_id(_item())
    assert first == pointer_request_id(_item(title="renamed, same hash"))
    assert first != pointer_request_id(_item(content_hash="cd" * 32))
    assert len(first) <= 128 and first.isascii()


async def test_only_the_sync_principal_writes_pointers_and_only_at_unit_layers() -> None:
    authz = Authorizer(None, trust_token_roles=True)
    units = [
        Resource.unit("t", UnitKind.PROJECT, "checkout"),
        Resource.unit("t", UnitKind.TEAM, "payments"),
        Resource.unit("t", UnitKind.ORGANIZATION, "eng"),
        Resource.unit("t", UnitKind.COMPANY, "acme"),
    ]
    for rpc in ("CreateMemory", "UpdateMemory", "DeleteMemory"):
        assert await authz.decide(SYNC, f"{MEMORY}/{rpc}", units) == [True] * 4
        assert await authz.decide(OTHER, f"{MEMORY}/{rpc}", units) == [False] * 4
        # Never a user's own memories, nor every memory of the tenant.
        assert not await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.user_space("t", "dev"))
        assert not await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.tenant_data("t"))
        # The coarse check of a call by name (memory then checks the memory's layer).
        by_name = rpc != "CreateMemory"
        assert await authz.allowed(SYNC, f"{MEMORY}/{rpc}", Resource.tenant("t")) == by_name
        assert not await authz.allowed(OTHER, f"{MEMORY}/{rpc}", Resource.tenant("t"))
    # No searches, no batch writes (reads of unit memories for proposals:
    # test_proposals.py).
    for rpc in ("SearchMemories", "BatchCreateMemories"):
        assert await authz.decide(SYNC, f"{MEMORY}/{rpc}", units) == [False] * 4


async def test_only_the_sync_principal_lists_knowledge_and_only_lists() -> None:
    authz = Authorizer(None, trust_token_roles=True)
    data = Resource.tenant_data("t")
    assert await authz.allowed(SYNC, f"{KNOWLEDGE}/ListKnowledgeItems", data)
    assert not await authz.allowed(OTHER, f"{KNOWLEDGE}/ListKnowledgeItems", data)
    for rpc in ("GetKnowledgeItem", "SearchKnowledge", "ListKnowledgeRevisions"):
        assert not await authz.allowed(SYNC, f"{KNOWLEDGE}/{rpc}", data)
