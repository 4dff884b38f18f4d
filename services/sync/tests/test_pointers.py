"""Pointer memories (:mod:`aeterna_sync.pointers`) and the Cedar rules that let the sync
service principal list knowledge and write pointers, and nothing more (evaluated by the
shared :class:`~aeterna_common.authz.Authorizer`, no server needed); cycles resumed from
their checkpoint, one per tenant under its lease, failed items and their retention, and the
refusals of ResolveSyncConflict, on the test server's real PostgreSQL (knowledge and memory
with every conflict kind: ``tests/test_e2e_pointers.py``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.type.v1 import layer_pb2
from aeterna_common import leases
from aeterna_common.auth import SERVICE_ROLE, ServiceCredentials
from aeterna_common.authz import Authorizer, Resource, UnitKind
from aeterna_common.context import Principal
from aeterna_common.errors import Aborted
from aeterna_sync.pointer_jobs import changes_items, tenant_of
from aeterna_sync.pointers import (
    PointerSync,
    conflict_kinds,
    fingerprint,
    lease_name,
    pointer_content,
    pointer_memory,
    pointer_request_id,
    retry_delay_s,
)
from aeterna_sync.settings import SyncSettings
from pydantic import ValidationError
from sync_testkit import SyncEnv, who

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
    moved = pointer_request_id(_item(), "tenants/t/memories/0699d06e-9bd6-4d62-a86f-6f9e50d1350f")
    assert moved == f"{first}:0699d06e" and moved == pointer_request_id(
        _item(), "tenants/t/memories/0699d06e-9bd6-4d62-a86f-6f9e50d1350f"
    )
    assert len(pointer_request_id(_item(content_hash="f" * 200), "m/12345678")) == 128


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


# -- cycles, leases, failed items (real PostgreSQL; knowledge and memory unreachable) ------


@pytest.fixture
async def unreachable(sync_env: SyncEnv, tmp_path: Path) -> PointerSync:
    """Pointer sync of the test server's database whose knowledge and memory do not
    answer (nothing listens on the port): every call fails UNAVAILABLE, once. Made in the
    tests' event loop, to which its gRPC channels are bound (outside a running loop
    grpc.aio looks up the thread's loop, which an earlier ``asyncio.run`` may have unset)."""
    token = tmp_path / "token"
    token.write_text("not-a-token")
    return PointerSync(
        sync_env.app.deps.db,
        "127.0.0.1:9",
        "127.0.0.1:9",
        ServiceCredentials(token),
        SyncSettings(item_attempts=1, failed_retention_days=30),
    )


async def test_a_cycle_a_dead_holder_left_running_is_resumed_from_its_checkpoint(
    sync_env: SyncEnv, unreachable: PointerSync
) -> None:
    tenant = sync_env.tenant()
    db = sync_env.app.deps.db
    left = uuid.uuid4()
    async with db.transaction(tenant) as conn:
        await conn.execute(
            "INSERT INTO sync_cycles (tenant_id, id, state, checkpoint, items_examined) "
            "VALUES ($1, $2, 2, 'tenants/x/knowledgeItems/b', 7)",
            tenant,
            left,
        )
    cycle = await unreachable.reconcile(tenant, reason="schedule")
    # The same cycle, resumed once; knowledge could not be listed, so it ends FAILED with
    # its progress kept, and the lease is free again.
    assert (cycle.id, cycle.resumes, cycle.items_examined) == (left, 1, 7)
    assert cycle.state == res.SYNC_CYCLE_STATE_FAILED and cycle.end_time is not None
    assert cycle.checkpoint == "tenants/x/knowledgeItems/b"
    again = await unreachable.reconcile(tenant)
    assert again.id != left and again.resumes == 0
    status = await sync_env.stub.GetSyncStatus(
        svc.GetSyncStatusRequest(name=f"tenants/{tenant}/syncStatus"), metadata=who(tenant, "root")
    )
    assert not status.running_cycle and status.HasField("last_cycle_end_time")
    await unreachable.close()


async def test_one_cycle_per_tenant_a_held_lease_refuses_another(
    sync_env: SyncEnv, unreachable: PointerSync
) -> None:
    tenant = sync_env.tenant()
    db = sync_env.app.deps.db
    held = await leases.acquire(db.pool, lease_name(tenant), "other-replica", 30.0)
    assert held is not None
    with pytest.raises(Aborted) as busy:
        await unreachable.reconcile(tenant)
    assert busy.value.reason == "SYNC_CYCLE_RUNNING"
    async with db.transaction(tenant, readonly=True) as conn:
        assert await conn.fetchval("SELECT count(*) FROM sync_cycles") == 0
    await leases.release(db.pool, held)
    await unreachable.close()


async def test_failed_items_are_visible_and_deleted_after_the_retention(
    sync_env: SyncEnv, unreachable: PointerSync
) -> None:
    tenant = sync_env.tenant()
    db = sync_env.app.deps.db
    async with db.transaction(tenant) as conn:
        for item, age_days in (("old", 31), ("recent", 1)):
            await conn.execute(
                "INSERT INTO sync_failed_items (tenant_id, knowledge_item, attempts, "
                "first_failed_at, next_attempt_at) VALUES ($1, $2, 3, "
                "now() - make_interval(days => $3), now())",
                tenant,
                f"tenants/{tenant}/knowledgeItems/{item}",
                age_days,
            )
    name = f"tenants/{tenant}/syncStatus"
    root = who(tenant, "root")
    status = await sync_env.stub.GetSyncStatus(svc.GetSyncStatusRequest(name=name), metadata=root)
    assert status.failed_item_count == 2
    assert await unreachable.purge_failed(tenant) == 1
    status = await sync_env.stub.GetSyncStatus(svc.GetSyncStatusRequest(name=name), metadata=root)
    assert status.failed_item_count == 1
    await unreachable.close()


def test_failed_item_backoff_doubles_up_to_its_cap() -> None:
    assert [retry_delay_s(n, 30.0, 3600.0) for n in (1, 2, 3, 4, 8, 100)] == [
        30.0,
        60.0,
        120.0,
        240.0,
        3600.0,
        3600.0,
    ]


def test_conflict_kinds_and_the_auto_resolve_setting() -> None:
    assert conflict_kinds("HASH_MISMATCH, conflict_kind_duplicate_pointer,") == {
        res.CONFLICT_KIND_HASH_MISMATCH,
        res.CONFLICT_KIND_DUPLICATE_POINTER,
    }
    assert conflict_kinds(SyncSettings().auto_resolve) == set(range(1, 7))
    assert conflict_kinds("") == frozenset()
    with pytest.raises(ValidationError):
        SyncSettings(auto_resolve="HASH_MISMATCH,NOT_A_KIND")


def test_fingerprint_names_the_state_a_conflict_was_found_in() -> None:
    kind = res.CONFLICT_KIND_STATUS_CHANGE
    deprecated = _item(status=kres.KNOWLEDGE_STATUS_DEPRECATED)
    same = fingerprint(kind, deprecated, ["m2", "m1"])
    assert same == fingerprint(kind, deprecated, ["m1", "m2"])
    assert same != fingerprint(kind, _item(status=kres.KNOWLEDGE_STATUS_SUPERSEDED), ["m1", "m2"])
    assert same != fingerprint(kind, deprecated, ["m1"])
    assert same != fingerprint(res.CONFLICT_KIND_HASH_MISMATCH, deprecated, ["m1", "m2"])


def test_only_item_changes_on_tenant_streams_start_a_cycle() -> None:
    assert tenant_of("events:acme") == "acme"
    assert tenant_of("events:acme:dead") is None and tenant_of("other") is None
    for kind in ("knowledge.created", "knowledge.status_changed", "knowledge.promoted"):
        assert changes_items(kind)
    for kind in ("knowledge.usage.reported", "knowledge.anomaly.detected", "memory.created"):
        assert not changes_items(kind)


async def test_resolving_a_conflict_is_authorized_before_anything_else(sync_env: SyncEnv) -> None:
    tenant = sync_env.tenant()
    name = f"tenants/{tenant}/syncConflicts/{uuid.uuid4()}"
    ignore = res.CONFLICT_RESOLUTION_IGNORE
    cases = [
        # Not an admin: refused before the name's id or the resolution is looked at.
        (who(tenant, "dev"), name, ignore, grpc.StatusCode.PERMISSION_DENIED),
        (who(tenant, "dev"), f"tenants/{tenant}/syncConflicts/x", 0, grpc.StatusCode.PERMISSION_DENIED),
        (who("other", "root"), name, ignore, grpc.StatusCode.PERMISSION_DENIED),
        (who(tenant, "root"), f"tenants/{tenant}/syncConflicts/x", ignore, grpc.StatusCode.INVALID_ARGUMENT),
        (who(tenant, "root"), name, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (who(tenant, "root"), name, 9, grpc.StatusCode.INVALID_ARGUMENT),
        (who(tenant, "root"), "syncConflicts/x", ignore, grpc.StatusCode.INVALID_ARGUMENT),
        # This server has no knowledge or memory to call.
        (who(tenant, "root"), name, ignore, grpc.StatusCode.FAILED_PRECONDITION),
    ]  # fmt: skip
    for md, conflict, resolution, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sync_env.stub.ResolveSyncConflict(
                svc.ResolveSyncConflictRequest(name=conflict, resolution=resolution),  # type: ignore[arg-type]
                metadata=md,
            )
        assert refused.value.code() == code, (conflict, resolution)
