"""Knowledge → memory pointers end to end: real memory, governance, knowledge and two sync
replicas behind the gateway Envoy.

* An accepted ADR becomes a pointer memory found by memory search, with no call to sync (the
  replicas follow knowledge's events); a deprecated item loses it; a retried cycle writes
  nothing twice; only tenant admins run, read or resolve cycles and conflicts.
* Pointer sync over every conflict kind: each state is produced (through knowledge, or in
  sync's own records as a crash or an outside write would leave them) and the cycle's
  resolution is checked in memory and in sync's records.
* A failed item is counted, backed off and retried until it is written.
* A sync replica SIGKILLed mid-cycle leaves its checkpoint; the other replica finishes that
  same cycle under the tenant's fenced lease, with no duplicate pointer.
* Memory refuses ``service:sync`` what its Cedar rules do not admit.
* A conflict kind not resolved automatically stays open until ``ResolveSyncConflict``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
import pytest_asyncio
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
from aeterna_common.auth import ServiceCredentials
from aeterna_common.db import Database
from aeterna_common.errors import Aborted
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.pytest_plugin import while_aborted
from aeterna_devstack.stack import SYNC_DATABASE, DevStack, throwaway_stack
from aeterna_sync.pointers import PointerSync
from aeterna_sync.settings import SyncSettings

TENANT = "ptr"
PARENT = f"tenants/{TENANT}"
WAIT_S = 90.0
ADR = "# Luxon for dates\n\n## Context\nc\n\n## Decision\nd\n\n## Consequences\nq\n"
TEAM = layer_pb2.MEMORY_LAYER_TEAM
ORG = layer_pb2.MEMORY_LAYER_ORG


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-pointers-",
        replicas=1,
        governance_replicas=1,
        knowledge_replicas=1,
        sync_replicas=2,
        # A short lease (a killed replica's cycle is taken over within seconds) and a
        # scheduled reconcile every few seconds.
        env={
            "AETERNA_SYNC_JOBS_LEASE_TTL_S": "4",
            "AETERNA_SYNC_RECONCILE_INTERVAL_S": "6",
            "AETERNA_SYNC_EVENT_DEBOUNCE_S": "0.2",
        },
    ) as s:
        yield s


@pytest_asyncio.fixture
async def syncdb(stack: DevStack) -> AsyncIterator[asyncpg.Connection]:
    """Sync's database as its superuser (below row-level security)."""
    assert stack.superuser_url is not None
    url = urlsplit(stack.superuser_url)
    conn = await asyncpg.connect(urlunsplit(url._replace(path=f"/{SYNC_DATABASE}")))
    yield conn
    await conn.close()


def _md(stack: DevStack, user: str, roles: tuple[str, ...] = ()) -> Any:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


def _admin(stack: DevStack) -> Any:
    return _md(stack, "root", ("TENANT_ADMIN",))


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
        try:
            await orgs.CreateOrgUnit(
                osvc.CreateOrgUnitRequest(
                    parent=PARENT,
                    org_unit_id=unit,
                    org_unit=gres.OrgUnit(
                        kind=kind,
                        display_name=unit,
                        parent=f"{PARENT}/orgUnits/{parent}" if parent else "",
                    ),
                ),
                metadata=md,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise


async def _listed(memories: Any, md: Any, layer: int, scope: layer_pb2.Scope) -> list[mres.Memory]:
    """The tenant's pointer memories in one layer and scope (not deleted)."""
    listed = await memories.ListMemories(
        msvc.ListMemoriesRequest(
            parent=PARENT, layer=layer, scope=scope, tags=["knowledge-pointer"], page_size=500
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
            parent=PARENT,
            knowledge_item=kres.KnowledgeItem(
                type=kres.KNOWLEDGE_TYPE_ADR,
                layer=layer,  # type: ignore[arg-type]
                org_unit=f"{PARENT}/orgUnits/{unit}",
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


async def _trigger(sync: Any, md: Any) -> sres.SyncCycle:
    """TriggerSync, again while another cycle holds the tenant's lease (ABORTED)."""
    return await while_aborted(
        lambda: sync.TriggerSync(ssvc.TriggerSyncRequest(parent=PARENT), metadata=md), WAIT_S
    )


async def _conflicts(sync: Any, md: Any, item: str = "") -> list[sres.SyncConflict]:
    listed = await sync.ListSyncConflicts(
        ssvc.ListSyncConflictsRequest(parent=PARENT, show_resolved=True, page_size=1000),
        metadata=md,
    )
    return [c for c in listed.sync_conflicts if not item or c.knowledge_item == item]


async def _until(check: Any, what: str) -> Any:
    """Poll ``check()`` until it returns a truthy value (deadline :data:`WAIT_S`)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                got = await check()
                if got:
                    return got
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def _rows(db: asyncpg.Connection, item: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT memory, content_hash, layer FROM sync_pointers WHERE tenant_id = $1 "
        "AND knowledge_item = $2 ORDER BY memory",
        TENANT,
        item,
    )


async def test_admins_only_and_an_accepted_item_gets_its_pointer_without_a_call(
    stack: DevStack,
) -> None:
    """Runs first (module order): refusals before any lookup; then an accepted item's
    pointer appears with no call to sync (knowledge's event), its MISSING_POINTER resolved."""
    admin = _admin(stack)
    dev = _md(stack, "dev")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        await _units(ch, admin)
        unknown = f"{PARENT}/syncConflicts/{uuid.uuid4()}"
        for call in (
            sync.TriggerSync(ssvc.TriggerSyncRequest(parent=PARENT), metadata=dev),
            sync.ListSyncConflicts(ssvc.ListSyncConflictsRequest(parent=PARENT), metadata=dev),
            sync.GetSyncStatus(ssvc.GetSyncStatusRequest(name=f"{PARENT}/syncStatus"), metadata=dev),
            # Permission before existence: an unknown conflict is refused, not NOT_FOUND.
            sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(
                    name=unknown, resolution=sres.CONFLICT_RESOLUTION_IGNORE
                ),
                metadata=dev,
            ),
        ):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(
                    name=unknown, resolution=sres.CONFLICT_RESOLUTION_IGNORE
                ),
                metadata=admin,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(name=unknown), metadata=admin
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        item = await _accepted_adr(ksvc_grpc.KnowledgeServiceStub(ch), admin, "adr/0000-first")

        async def pointed() -> bool:
            found = await _conflicts(sync, admin, item.name)
            return [(c.kind, c.resolution) for c in found] == [
                (sres.CONFLICT_KIND_MISSING_POINTER, sres.CONFLICT_RESOLUTION_REWRITE_POINTER)
            ]

        await _until(pointed, "the pointer of an accepted item, without a call")
        status = await sync.GetSyncStatus(
            ssvc.GetSyncStatusRequest(name=f"{PARENT}/syncStatus"), metadata=admin
        )
        assert status.pointer_count == 1 and status.failed_item_count == 0
        assert status.HasField("last_cycle_end_time")
        pointers = await _listed(
            msvc_grpc.MemoryServiceStub(ch), admin, TEAM, layer_pb2.Scope(team_id="payments")
        )
        assert [p.metadata["knowledge_item"] for p in pointers] == [item.name]


async def test_accepted_adr_becomes_a_pointer_and_loses_it_when_deprecated(
    stack: DevStack,
) -> None:
    """MISSING_POINTER and STATUS_CHANGE through knowledge itself; search finds the
    pointer; a retried cycle writes no second pointer; the CLI runs and lists."""
    admin = _admin(stack)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        memories = msvc_grpc.MemoryServiceStub(ch)
        eng = layer_pb2.Scope(org_id="eng")
        item = await _accepted_adr(
            knowledge, admin, "adr/0001-luxon", kres.KNOWLEDGE_LAYER_ORG, "eng"
        )
        pointers = await _until(lambda: _listed(memories, admin, ORG, eng), "the ORG pointer")
        assert len(pointers) == 1
        pointer = pointers[0]
        assert pointer.content == (
            "[ADR] [ACCEPTED] adr/0001-luxon\nUse Luxon for every date and time computation"
        )
        assert pointer.metadata["knowledge_item"] == item.name
        assert pointer.metadata["content_hash"] == item.content_hash

        async def found() -> bool:
            got = await memories.SearchMemories(
                msvc.SearchMemoriesRequest(
                    parent=PARENT, query="which library for dates", scope=eng, layers=[ORG]
                ),
                metadata=admin,
            )
            return pointer.name in {r.memory.name for r in got.results}

        await _until(found, "memory search to find the pointer")

        # A retried cycle finds nothing to do and writes no second pointer.
        again = await _trigger(sync, admin)
        assert again.state == sres.SYNC_CYCLE_STATE_SUCCEEDED and again.conflicts_found == 0
        assert [p.name for p in await _listed(memories, admin, ORG, eng)] == [pointer.name]

        await knowledge.DeprecateKnowledgeItem(
            ksvc.DeprecateKnowledgeItemRequest(name=item.name, reason="moved to Temporal"),
            metadata=admin,
        )

        async def gone() -> bool:
            return await _listed(memories, admin, ORG, eng) == []

        await _until(gone, "the deprecated item's pointer to be deleted")
        kinds = [(c.kind, c.resolution) for c in await _conflicts(sync, admin, item.name)]
        assert kinds == [
            (sres.CONFLICT_KIND_MISSING_POINTER, sres.CONFLICT_RESOLUTION_REWRITE_POINTER),
            (sres.CONFLICT_KIND_STATUS_CHANGE, sres.CONFLICT_RESOLUTION_DELETE_POINTER),
        ]
        open_only = await sync.ListSyncConflicts(
            ssvc.ListSyncConflictsRequest(parent=PARENT), metadata=admin
        )
        assert list(open_only.sync_conflicts) == []

    # The CLI runs a cycle and lists the conflicts.
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    who = ["--tenant", TENANT, "--user", "root", "--roles", "TENANT_ADMIN"]
    for args, check in (
        (["trigger"], lambda got: got["state"] == "SYNC_CYCLE_STATE_SUCCEEDED"),
        (
            ["conflicts", "--resolved"],
            lambda got: sum(c["knowledgeItem"] == item.name for c in got["syncConflicts"]) == 2,
        ),
    ):
        for _ in range(20):  # another replica's scheduled cycle may hold the tenant (ABORTED)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aeterna_cli.main", "sync", *args, *who,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(WAIT_S):
                out, err = await proc.communicate()
            if proc.returncode == 0 or b"ABORTED" not in err:
                break
            await asyncio.sleep(0.5)
        assert proc.returncode == 0, err
        assert check(json.loads(out)), out


async def test_pointer_sync_over_every_conflict_kind(
    stack: DevStack, syncdb: asyncpg.Connection
) -> None:
    """HASH_MISMATCH, LAYER_MISMATCH, DUPLICATE_POINTER and ORPHANED_POINTER, each from the
    state a crash or an outside write leaves in sync's records, each resolved by the next
    cycle as its rule says (MISSING_POINTER and STATUS_CHANGE: the tests above)."""
    admin = _admin(stack)
    payments = layer_pb2.Scope(team_id="payments")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        memories = msvc_grpc.MemoryServiceStub(ch)
        item = await _accepted_adr(ksvc_grpc.KnowledgeServiceStub(ch), admin, "adr/0002-kinds")
        rows = await _until(lambda: _rows(syncdb, item.name), "the item's pointer")
        first = rows[0]["memory"]

        async def settled(kind: int) -> list[sres.SyncConflict]:
            return [c for c in await _conflicts(sync, admin, item.name) if c.kind == kind]

        # HASH_MISMATCH: the recorded hash is stale; the same pointer is rewritten.
        await syncdb.execute(
            "UPDATE sync_pointers SET content_hash = 'stale' WHERE knowledge_item = $1", item.name
        )
        await _trigger(sync, admin)
        hashed = await _until(lambda: settled(sres.CONFLICT_KIND_HASH_MISMATCH), "HASH_MISMATCH")
        assert hashed[0].resolution == sres.CONFLICT_RESOLUTION_REWRITE_POINTER
        assert list(hashed[0].pointer_memories) == [first]
        assert [(r["memory"], r["content_hash"]) for r in await _rows(syncdb, item.name)] == [
            (first, item.content_hash)
        ]

        # LAYER_MISMATCH: recorded in another layer; deleted and written again.
        await syncdb.execute(
            "UPDATE sync_pointers SET layer = $2 WHERE knowledge_item = $1",
            item.name,
            layer_pb2.MEMORY_LAYER_PROJECT,
        )
        await _trigger(sync, admin)
        moved = await _until(lambda: settled(sres.CONFLICT_KIND_LAYER_MISMATCH), "LAYER_MISMATCH")
        assert moved[0].resolution == sres.CONFLICT_RESOLUTION_REWRITE_POINTER
        rows = await _rows(syncdb, item.name)
        assert len(rows) == 1 and rows[0]["memory"] != first and rows[0]["layer"] == TEAM
        second = rows[0]["memory"]
        mine = [p.name for p in await _listed(memories, admin, TEAM, payments)]
        assert second in mine and first not in mine

        # DUPLICATE_POINTER: a second pointer recorded for the item (as a create replayed
        # after memory forgot its request_id would leave); the matching one is kept.
        extra = await memories.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=PARENT,
                memory=mres.Memory(
                    layer=TEAM, scope=payments, content="[ADR] [ACCEPTED] adr/0002-kinds",
                    tags=["knowledge-pointer"],
                ),
            ),
            metadata=admin,
        )  # fmt: skip
        await syncdb.execute(
            "INSERT INTO sync_pointers (tenant_id, knowledge_item, memory, content_hash, layer, "
            "updated_at) VALUES ($1, $2, $3, 'older', $4, now() - interval '1 hour')",
            TENANT,
            item.name,
            extra.name,
            TEAM,
        )
        await _trigger(sync, admin)
        dup = await _until(
            lambda: settled(sres.CONFLICT_KIND_DUPLICATE_POINTER), "DUPLICATE_POINTER"
        )
        assert dup[0].resolution == sres.CONFLICT_RESOLUTION_DELETE_POINTER
        assert set(dup[0].pointer_memories) == {second, extra.name}
        assert [r["memory"] for r in await _rows(syncdb, item.name)] == [second]
        mine = [p.name for p in await _listed(memories, admin, TEAM, payments)]
        assert second in mine and extra.name not in mine

        # ORPHANED_POINTER: a recorded pointer whose item does not exist; deleted.
        orphan = await memories.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=PARENT,
                memory=mres.Memory(
                    layer=TEAM, scope=payments, content="[ADR] [ACCEPTED] adr/gone",
                    tags=["knowledge-pointer"],
                ),
            ),
            metadata=admin,
        )  # fmt: skip
        gone_item = f"{PARENT}/knowledgeItems/{uuid.uuid4()}"
        await syncdb.execute(
            "INSERT INTO sync_pointers (tenant_id, knowledge_item, memory, content_hash, layer) "
            "VALUES ($1, $2, $3, 'h', $4)",
            TENANT,
            gone_item,
            orphan.name,
            TEAM,
        )
        await _trigger(sync, admin)
        orphaned = await _until(lambda: _conflicts(sync, admin, gone_item), "ORPHANED_POINTER")
        assert [(c.kind, c.resolution, list(c.pointer_memories)) for c in orphaned] == [
            (
                sres.CONFLICT_KIND_ORPHANED_POINTER,
                sres.CONFLICT_RESOLUTION_DELETE_POINTER,
                [orphan.name],
            )
        ]
        assert await _rows(syncdb, gone_item) == []
        assert orphan.name not in [p.name for p in await _listed(memories, admin, TEAM, payments)]


async def test_memory_refuses_the_sync_principal_what_its_rules_do_not_admit(
    stack: DevStack,
) -> None:
    """``service:sync`` acting in the tenant may not read a user's memory, search, list, or
    write at the USER layer: PERMISSION_DENIED before any lookup, and nothing written."""
    dev = _md(stack, "dev")
    svc_md = _service(stack, "sync")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        memories = msvc_grpc.MemoryServiceStub(ch)
        own = await memories.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=PARENT,
                memory=mres.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="dev"),
                    content="my own note",
                ),
            ),
            metadata=dev,
        )
        for call in (
            memories.GetMemory(msvc.GetMemoryRequest(name=own.name), metadata=svc_md),
            memories.GetMemory(
                msvc.GetMemoryRequest(name=f"{PARENT}/memories/{uuid.uuid4()}"), metadata=svc_md
            ),
            memories.SearchMemories(
                msvc.SearchMemoriesRequest(
                    parent=PARENT, query="note", scope=layer_pb2.Scope(user_id="dev"),
                    layers=[layer_pb2.MEMORY_LAYER_USER],
                ),
                metadata=svc_md,
            ),
            memories.ListMemories(
                msvc.ListMemoriesRequest(
                    parent=PARENT, layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="dev"),
                ),
                metadata=svc_md,
            ),
            memories.CreateMemory(
                msvc.CreateMemoryRequest(
                    parent=PARENT,
                    memory=mres.Memory(
                        layer=layer_pb2.MEMORY_LAYER_USER, scope=layer_pb2.Scope(user_id="dev"),
                        content="written by sync",
                    ),
                ),
                metadata=svc_md,
            ),
        ):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
        listed = await memories.ListMemories(
            msvc.ListMemoriesRequest(
                parent=PARENT,
                layer=layer_pb2.MEMORY_LAYER_USER,
                scope=layer_pb2.Scope(user_id="dev"),
            ),
            metadata=dev,
        )
        assert [m.content for m in listed.memories] == ["my own note"]


async def test_a_failed_item_is_visible_backed_off_and_retried(
    stack: DevStack, syncdb: asyncpg.Connection, tmp_path: Path
) -> None:
    """A cycle whose memory does not answer (a pointer sync of the same database calling a
    closed port for memory) records the item as failed after its retries; GetSyncStatus
    counts it; once its backoff elapsed the replicas' next cycle writes it and clears it."""
    admin = _admin(stack)
    token = tmp_path / "sync-token"
    token.write_text(DevAuth(stack.root / "auth").issue_service_token("sync"))
    db = Database(stack.sync_list[0].env["AETERNA_DATABASE_URL"], min_size=1, max_size=2)
    await db.open()
    broken = PointerSync(
        db,
        stack.endpoint,
        "127.0.0.1:9",
        ServiceCredentials(token),
        SyncSettings(item_attempts=2, failed_retry_base_s=2.0),
    )
    item = await syncdb.fetchval(
        "SELECT knowledge_item FROM sync_pointers WHERE tenant_id = $1 "
        "ORDER BY knowledge_item LIMIT 1",
        TENANT,
    )
    stale = "UPDATE sync_pointers SET content_hash = 'stale' WHERE knowledge_item = $1"

    async def failed_once() -> Any:
        await syncdb.execute(stale, item)  # again, if a replica's cycle fixed it first
        try:
            cycle = await broken.reconcile(TENANT)
        except Aborted:
            return None
        return cycle if cycle.failed_items else None

    try:
        await _until(failed_once, "a cycle with a failed item")
    finally:
        await broken.close()
        await db.close()
    row = await syncdb.fetchrow(
        "SELECT attempts, last_error, next_attempt_at > now() AS waiting "
        "FROM sync_failed_items WHERE knowledge_item = $1",
        item,
    )
    assert row["attempts"] == 1 and row["last_error"].startswith("UNAVAILABLE")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        status = await sync.GetSyncStatus(
            ssvc.GetSyncStatusRequest(name=f"{PARENT}/syncStatus"), metadata=admin
        )
        assert status.failed_item_count == 1

        async def retried() -> bool:
            await _trigger(sync, admin)
            status = await sync.GetSyncStatus(
                ssvc.GetSyncStatusRequest(name=f"{PARENT}/syncStatus"), metadata=admin
            )
            hashes = [r["content_hash"] for r in await _rows(syncdb, item)]
            return status.failed_item_count == 0 and "stale" not in hashes

        await _until(retried, "the failed item to be retried and cleared")


def _holder(stack: DevStack, owner: str) -> int | None:
    """The sync replica whose process holds a lease (owner ``host:pid:random``)."""
    pid = int(owner.split(":")[1])
    for i, replica in enumerate(stack.sync_list):
        if replica.proc is not None and replica.proc.pid == pid:
            return i
    return None


async def test_a_replica_killed_mid_cycle_leaves_a_checkpoint_the_other_finishes(
    stack: DevStack, syncdb: asyncpg.Connection
) -> None:
    """Every recorded hash made stale, so a cycle rewrites every pointer; the replica running
    it is SIGKILLed once its checkpoint moved; the other replica resumes the same cycle after
    the lease expires (no call) and every pointer ends current, none duplicated."""
    admin = _admin(stack)
    count = 16
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        memories = msvc_grpc.MemoryServiceStub(ch)
        await asyncio.gather(
            *(_accepted_adr(knowledge, admin, f"adr/k-{n:02d}") for n in range(count))
        )

        async def recorded() -> int:
            return int(
                await syncdb.fetchval(
                    "SELECT count(*) FROM sync_pointers WHERE tenant_id = $1", TENANT
                )
            )

        total = await _until(
            lambda: _ge(recorded(), count + 2), "every item's pointer"
        )  # the 2 earlier TEAM items are still accepted
        await syncdb.execute(
            "UPDATE sync_pointers SET content_hash = 'stale' WHERE tenant_id = $1", TENANT
        )
        trigger = asyncio.create_task(_trigger(sync, admin))

        async def running() -> asyncpg.Record | None:
            return await syncdb.fetchrow(
                "SELECT c.id, c.checkpoint, l.owner FROM sync_cycles c JOIN leases l "
                "ON l.name = 'sync-pointers:' || c.tenant_id WHERE c.tenant_id = $1 "
                "AND c.state = $2 AND c.checkpoint <> '' AND l.expires_at > now()",
                TENANT,
                sres.SYNC_CYCLE_STATE_RUNNING,
            )

        cycle = await _until(running, "a cycle with a checkpoint")
        victim = _holder(stack, cycle["owner"])
        assert victim is not None
        await asyncio.to_thread(stack.kill_replica, victim, signal.SIGKILL, service="sync")
        trigger.cancel()  # its replica may be the one killed (UNAVAILABLE) or the other
        await asyncio.gather(trigger, return_exceptions=True)

        async def finished() -> asyncpg.Record | None:
            return await syncdb.fetchrow(
                "SELECT state, resumes, items_examined FROM sync_cycles WHERE id = $1 "
                "AND state <> $2",
                cycle["id"],
                sres.SYNC_CYCLE_STATE_RUNNING,
            )

        done = await _until(finished, "the other replica to finish the cycle")
        assert done["state"] == sres.SYNC_CYCLE_STATE_SUCCEEDED and done["resumes"] >= 1
        stale = await syncdb.fetchval(
            "SELECT count(*) FROM sync_pointers WHERE tenant_id = $1 AND content_hash = 'stale'",
            TENANT,
        )
        assert stale == 0
        assert await recorded() == total
        pointed = await _listed(memories, admin, TEAM, layer_pb2.Scope(team_id="payments"))
        items = [p.metadata["knowledge_item"] for p in pointed]
        assert len(items) == len(set(items)) == total
    replica = stack.sync_list[victim]
    await asyncio.to_thread(stack.start_replica, replica)
    await asyncio.to_thread(stack.wait_healthy, replica)


async def _ge(value: Any, least: int) -> int | None:
    got = int(await value)
    return got if got >= least else None


async def test_a_kind_left_open_waits_for_resolve_sync_conflict(stack: DevStack) -> None:
    """Runs last (it restarts the sync replicas): with STATUS_CHANGE not resolved
    automatically, a deprecated item keeps its pointer and an open conflict; the call
    resolves it (tenant admins only; the same resolution again is a no-op, another one is
    FAILED_PRECONDITION) and the next cycle does not report it again. The CLI resolves too."""
    auto = "HASH_MISMATCH,ORPHANED_POINTER,MISSING_POINTER,DUPLICATE_POINTER,LAYER_MISMATCH"
    for replica in stack.sync_list:
        await asyncio.to_thread(
            stack.kill_replica, stack.sync_list.index(replica), signal.SIGTERM, service="sync"
        )
        await asyncio.to_thread(
            stack.start_replica, replica, {**replica.env, "AETERNA_SYNC_AUTO_RESOLVE": auto}
        )
        await asyncio.to_thread(stack.wait_healthy, replica)
    admin = _admin(stack)
    dev = _md(stack, "dev")
    eng = layer_pb2.Scope(org_id="eng")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        memories = msvc_grpc.MemoryServiceStub(ch)
        items = [
            await _accepted_adr(knowledge, admin, f"adr/03{n}-open", kres.KNOWLEDGE_LAYER_ORG, "eng")
            for n in range(2)
        ]  # fmt: skip
        await _until(
            lambda: _ge(_count(_listed(memories, admin, ORG, eng)), 2), "both ORG pointers"
        )
        for item in items:
            await knowledge.DeprecateKnowledgeItem(
                ksvc.DeprecateKnowledgeItemRequest(name=item.name, reason="replaced"),
                metadata=admin,
            )

        async def opened() -> list[sres.SyncConflict]:
            listed = await sync.ListSyncConflicts(
                ssvc.ListSyncConflictsRequest(parent=PARENT), metadata=admin
            )
            return list(listed.sync_conflicts) if len(listed.sync_conflicts) == 2 else []

        conflicts = await _until(opened, "two open STATUS_CHANGE conflicts")
        assert {c.kind for c in conflicts} == {sres.CONFLICT_KIND_STATUS_CHANGE}
        assert len(await _listed(memories, admin, ORG, eng)) == 2  # left as they are
        first, second = conflicts

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(
                    name=first.name, resolution=sres.CONFLICT_RESOLUTION_DELETE_POINTER
                ),
                metadata=dev,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        resolved = await sync.ResolveSyncConflict(
            ssvc.ResolveSyncConflictRequest(
                name=first.name, resolution=sres.CONFLICT_RESOLUTION_DELETE_POINTER
            ),
            metadata=admin,
        )
        assert resolved.resolution == sres.CONFLICT_RESOLUTION_DELETE_POINTER
        assert resolved.HasField("resolve_time")
        remaining = await _listed(memories, admin, ORG, eng)
        assert [p.name for p in remaining] == list(second.pointer_memories)
        again = await sync.ResolveSyncConflict(
            ssvc.ResolveSyncConflictRequest(
                name=first.name, resolution=sres.CONFLICT_RESOLUTION_DELETE_POINTER
            ),
            metadata=admin,
        )
        assert again == resolved
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(
                    name=first.name, resolution=sres.CONFLICT_RESOLUTION_IGNORE
                ),
                metadata=admin,
            )
        assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as rewrite:
            await sync.ResolveSyncConflict(
                ssvc.ResolveSyncConflictRequest(
                    name=second.name, resolution=sres.CONFLICT_RESOLUTION_REWRITE_POINTER
                ),
                metadata=admin,
            )
        assert rewrite.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # The CLI ignores the second one: the pointer stays, and no cycle reports it again.
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    who = ["--tenant", TENANT, "--user", "root", "--roles", "TENANT_ADMIN"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aeterna_cli.main", "sync", "conflicts", "resolve",
        second.name.rsplit("/", 1)[-1], "--resolution", "ignore", *who,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["resolution"] == "CONFLICT_RESOLUTION_IGNORE"
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        sync = ssvc_grpc.SyncServiceStub(ch)
        await _trigger(sync, admin)
        listed = await sync.ListSyncConflicts(
            ssvc.ListSyncConflictsRequest(parent=PARENT), metadata=admin
        )
        assert list(listed.sync_conflicts) == []
        pointers = await _listed(msvc_grpc.MemoryServiceStub(ch), admin, ORG, eng)
        assert [p.name for p in pointers] == list(second.pointer_memories)


async def _count(listing: Any) -> int:
    return len(await listing)
