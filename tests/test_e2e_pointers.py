"""Knowledge → memory pointers end to end: real memory, governance, knowledge and sync
replicas behind the gateway Envoy. An accepted ADR becomes a pointer memory found by memory
search after ``TriggerSync``; a retried cycle writes nothing twice; a deprecated item loses
its pointer; every difference is listed as a (resolved) conflict; the sync principal may
write pointers only at unit layers, and only tenant admins run or read cycles.

Memory's own name check (``aeterna_memory.domain.names``) still refuses every tenant-less
service principal with ``TENANT_MISMATCH`` before its Cedar policies are consulted (its
domain reads the tenant from the principal), so the pointer write is refused today: the full
flow is an expected failure (strict) until memory admits service principals as
``aeterna_common.names`` does. The cycle's own guarantees (knowledge listed as the sync
principal, a refused write recorded as a failed item and nothing else) are checked now."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import resources_pb2 as sres
from aeterna.sync.v1 import sync_service_pb2 as ssvc
from aeterna.sync.v1 import sync_service_pb2_grpc as ssvc_grpc
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack

TENANT = "ptr"
WAIT_S = 60.0
ADR = "# Luxon for dates\n\n## Context\nc\n\n## Decision\nd\n\n## Consequences\nq\n"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    root = Path(tempfile.mkdtemp(prefix="aeterna-e2e-pointers-"))
    os.chmod(root, 0o755)
    s = DevStack(
        replicas=1,
        governance_replicas=1,
        knowledge_replicas=1,
        sync_replicas=1,
        port=free_port(),
        root=root,
        fresh=True,
    )
    s.start(log=lambda *_: None)
    yield s
    s.stop()


def _md(stack: DevStack, user: str, roles: tuple[str, ...] = ()) -> Any:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


def _service(stack: DevStack, service: str) -> Any:
    token = DevAuth(stack.root / "auth").issue_service_token(service)
    return (("authorization", f"Bearer {token}"),)


async def _units(ch: grpc.aio.Channel, md: Any) -> None:
    orgs = osvc_grpc.OrganizationServiceStub(ch)
    for unit, kind, parent in [
        ("acme", gres.ORG_UNIT_KIND_COMPANY, ""),
        ("eng", gres.ORG_UNIT_KIND_ORGANIZATION, "acme"),
        ("payments", gres.ORG_UNIT_KIND_TEAM, "eng"),
    ]:
        await orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=f"tenants/{TENANT}",
                org_unit_id=unit,
                org_unit=gres.OrgUnit(
                    kind=kind,
                    display_name=unit,
                    parent=f"tenants/{TENANT}/orgUnits/{parent}" if parent else "",
                ),
            ),
            metadata=md,
        )


async def _pointers(memories: Any, md: Any) -> list[mres.Memory]:
    """The tenant's pointer memories at the ORG layer of ``eng`` (not deleted)."""
    listed = await memories.ListMemories(
        msvc.ListMemoriesRequest(
            parent=f"tenants/{TENANT}",
            layer=layer_pb2.MEMORY_LAYER_ORG,
            scope=layer_pb2.Scope(org_id="eng"),
            tags=["knowledge-pointer"],
            page_size=100,
        ),
        metadata=md,
    )
    return list(listed.memories)


async def _accepted_adr(
    knowledge: Any,
    md: Any,
    path: str,
    layer: int = kres.KNOWLEDGE_LAYER_TEAM,
    unit: str = "payments",
) -> kres.KnowledgeItem:
    item = await knowledge.CreateKnowledgeItem(
        ksvc.CreateKnowledgeItemRequest(
            parent=f"tenants/{TENANT}",
            knowledge_item=kres.KnowledgeItem(
                type=kres.KNOWLEDGE_TYPE_ADR,
                layer=layer,  # type: ignore[arg-type]
                org_unit=f"tenants/{TENANT}/orgUnits/{unit}",
                path=path,
                title="Use Luxon for dates",
                summary="Use Luxon for every date and time computation",
                content=ADR,
            ),
        ),
        metadata=md,
    )
    await knowledge.ProposeKnowledgeItem(
        ksvc.ProposeKnowledgeItemRequest(name=item.name), metadata=md
    )
    accepted = await knowledge.AcceptKnowledgeItem(
        ksvc.AcceptKnowledgeItemRequest(name=item.name), metadata=md
    )
    assert accepted.status == kres.KNOWLEDGE_STATUS_ACCEPTED
    return accepted  # type: ignore[no-any-return]


async def test_a_cycle_lists_knowledge_as_the_sync_principal_and_loses_no_item(
    stack: DevStack,
) -> None:
    """Runs first (module order): one accepted item, one cycle; the item is either pointed
    to or counted as failed (to be retried), never silently dropped; admins only."""
    admin = _md(stack, "root", ("TENANT_ADMIN",))
    dev = _md(stack, "dev")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        await _units(ch, admin)
        for call in (
            sync.TriggerSync(ssvc.TriggerSyncRequest(parent=f"tenants/{TENANT}"), metadata=dev),
            sync.ListSyncConflicts(
                ssvc.ListSyncConflictsRequest(parent=f"tenants/{TENANT}"), metadata=dev
            ),
            sync.GetSyncStatus(
                ssvc.GetSyncStatusRequest(name=f"tenants/{TENANT}/syncStatus"), metadata=dev
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await _accepted_adr(ksvc_grpc.KnowledgeServiceStub(ch), admin, "adr/0000-first")
        cycle = await sync.TriggerSync(
            ssvc.TriggerSyncRequest(parent=f"tenants/{TENANT}"), metadata=admin
        )
        assert cycle.state == sres.SYNC_CYCLE_STATE_SUCCEEDED
        assert cycle.items_examined == 1
        status = await sync.GetSyncStatus(
            ssvc.GetSyncStatusRequest(name=f"tenants/{TENANT}/syncStatus"), metadata=admin
        )
        assert status.pointer_count + status.failed_item_count == 1
        assert status.HasField("last_cycle_end_time") and not status.running_cycle
        # A recorded pointer comes with its (resolved) MISSING_POINTER conflict, a failed
        # item with none: nothing half written.
        listed = await sync.ListSyncConflicts(
            ssvc.ListSyncConflictsRequest(parent=f"tenants/{TENANT}", show_resolved=True),
            metadata=admin,
        )
        assert len(listed.sync_conflicts) == status.pointer_count


async def test_accepted_adr_becomes_a_pointer_and_loses_it_when_deprecated(
    stack: DevStack,
) -> None:
    admin = _md(stack, "root", ("TENANT_ADMIN",))
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        memories = msvc_grpc.MemoryServiceStub(ch)
        # The first test's TEAM item is in every cycle too (already pointed to, once memory
        # admits the sync principal); this one is an ORG item of eng.
        item = await _accepted_adr(
            knowledge, admin, "adr/0001-luxon", kres.KNOWLEDGE_LAYER_ORG, "eng"
        )
        cycle = await sync.TriggerSync(
            ssvc.TriggerSyncRequest(parent=f"tenants/{TENANT}"), metadata=admin
        )
        assert cycle.state == sres.SYNC_CYCLE_STATE_SUCCEEDED
        assert cycle.items_examined == 2 and cycle.conflicts_found == 1
        pointers = await _pointers(memories, admin)
        assert len(pointers) == 1
        pointer = pointers[0]
        assert pointer.content == (
            "[ADR] [ACCEPTED] adr/0001-luxon\nUse Luxon for every date and time computation"
        )
        assert pointer.metadata["knowledge_item"] == item.name
        assert pointer.metadata["content_hash"] == item.content_hash

        # Memory search finds it (the index follows the write; wait for it, no sleep bound).
        async with asyncio.timeout(WAIT_S):
            while True:
                found = await memories.SearchMemories(
                    msvc.SearchMemoriesRequest(
                        parent=f"tenants/{TENANT}",
                        query="which library for dates",
                        scope=layer_pb2.Scope(org_id="eng"),
                        layers=[layer_pb2.MEMORY_LAYER_ORG],
                    ),
                    metadata=admin,
                )
                if pointer.name in {r.memory.name for r in found.results}:
                    break
                await asyncio.sleep(0.2)

        # A retried cycle finds nothing to do and writes no second pointer.
        again = await sync.TriggerSync(
            ssvc.TriggerSyncRequest(parent=f"tenants/{TENANT}"), metadata=admin
        )
        assert again.state == sres.SYNC_CYCLE_STATE_SUCCEEDED and again.conflicts_found == 0
        assert [p.name for p in await _pointers(memories, admin)] == [pointer.name]

        status = await sync.GetSyncStatus(
            ssvc.GetSyncStatusRequest(name=f"tenants/{TENANT}/syncStatus"), metadata=admin
        )
        assert status.pointer_count == 2 and status.open_conflict_count == 0
        assert status.HasField("last_cycle_end_time") and not status.running_cycle

        # Deprecated: the next cycle deletes the pointer (STATUS_CHANGE, resolved).
        await knowledge.DeprecateKnowledgeItem(
            ksvc.DeprecateKnowledgeItemRequest(name=item.name, reason="moved to Temporal"),
            metadata=admin,
        )
        gone = await sync.TriggerSync(
            ssvc.TriggerSyncRequest(parent=f"tenants/{TENANT}"), metadata=admin
        )
        assert gone.conflicts_found == 1
        assert await _pointers(memories, admin) == []

        listed = await sync.ListSyncConflicts(
            ssvc.ListSyncConflictsRequest(parent=f"tenants/{TENANT}", show_resolved=True),
            metadata=admin,
        )
        kinds = [
            (c.kind, c.resolution) for c in listed.sync_conflicts if c.knowledge_item == item.name
        ]
        assert kinds == [
            (sres.CONFLICT_KIND_MISSING_POINTER, sres.CONFLICT_RESOLUTION_REWRITE_POINTER),
            (sres.CONFLICT_KIND_STATUS_CHANGE, sres.CONFLICT_RESOLUTION_DELETE_POINTER),
        ]
        open_only = await sync.ListSyncConflicts(
            ssvc.ListSyncConflictsRequest(parent=f"tenants/{TENANT}"), metadata=admin
        )
        assert list(open_only.sync_conflicts) == []

    # The CLI runs a cycle and lists the conflicts.
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    who = ["--tenant", TENANT, "--user", "root", "--roles", "TENANT_ADMIN"]
    for args, check in (
        (["trigger"], lambda got: got["state"] == "SYNC_CYCLE_STATE_SUCCEEDED"),
        (["conflicts", "--resolved"], lambda got: len(got["syncConflicts"]) == 3),
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aeterna_cli.main", "sync", *args, *who,
            env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT_S):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert check(json.loads(out)), out
