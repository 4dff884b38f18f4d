"""Knowledge → memory pointers (issue 9, DOMAIN.md "Sync").

Each ACCEPTED knowledge item of a tenant is mirrored by one pointer memory in the mapped
layer (PROJECT→PROJECT … COMPANY→COMPANY, scope from the item's org unit) whose content is
``[TYPE] [STATUS] path`` and the item's one-line summary. A reconcile cycle compares the
items (read over knowledge's gRPC API) with the pointers sync recorded (``sync_pointers``)
and writes the difference through memory's gRPC API, both as this service's principal
(``service:sync``; Cedar rules ``knowledge-sync-list`` and ``memory-sync-pointers``).

Every difference is recorded as a conflict in ``sync_conflicts`` and resolved at once, since
knowledge is the source of truth for each kind handled here:

* MISSING_POINTER (accepted item, no pointer): the pointer is written (REWRITE_POINTER);
* HASH_MISMATCH (the item's content hash changed): the pointer is rewritten;
* LAYER_MISMATCH (the pointer sits in another layer): it is deleted and written again;
* STATUS_CHANGE (the item is no longer ACCEPTED): the pointer is deleted (DELETE_POINTER);
* ORPHANED_POINTER (the item is gone): the pointer is deleted.

A create carries a ``request_id`` derived from the item id and its content hash, so a cycle
retried after a crash (between memory's write and sync's row) gets memory's first answer
back and never writes a second pointer. One cycle per tenant runs at a time across replicas,
under the lease ``sync-pointers:{tenant}`` (:mod:`aeterna_common.leases`); each row written
is fenced by that lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import grpc
import structlog
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_common import leases
from aeterna_common.auth import ServiceCredentials
from aeterna_common.db import Database
from aeterna_common.errors import Aborted
from aeterna_common.telemetry import client_interceptors
from google.protobuf import field_mask_pb2, struct_pb2

log = structlog.get_logger("aeterna.sync.pointers")

CALL_TIMEOUT_S = 10.0
"""Deadline in seconds of one call to knowledge or memory."""

POINTER_TAG = "knowledge-pointer"
"""Tag of every pointer memory."""

LAYERS: dict[int, int] = {
    kres.KNOWLEDGE_LAYER_PROJECT: layer_pb2.MEMORY_LAYER_PROJECT,
    kres.KNOWLEDGE_LAYER_TEAM: layer_pb2.MEMORY_LAYER_TEAM,
    kres.KNOWLEDGE_LAYER_ORG: layer_pb2.MEMORY_LAYER_ORG,
    kres.KNOWLEDGE_LAYER_COMPANY: layer_pb2.MEMORY_LAYER_COMPANY,
}
"""Knowledge layer → memory layer of its pointers (issue 9)."""

SCOPE_FIELD: dict[int, str] = {
    layer_pb2.MEMORY_LAYER_PROJECT: "project_id",
    layer_pb2.MEMORY_LAYER_TEAM: "team_id",
    layer_pb2.MEMORY_LAYER_ORG: "org_id",
    layer_pb2.MEMORY_LAYER_COMPANY: "company_id",
}
"""Memory layer → the scope field naming its unit."""


@dataclass(frozen=True)
class Recorded:
    """A pointer as sync recorded it (one ``sync_pointers`` row)."""

    knowledge_item: str
    memory: str
    content_hash: str
    layer: int


@dataclass
class Cycle:
    """The outcome of one cycle (one ``sync_cycles`` row)."""

    tenant_id: str
    id: uuid.UUID
    state: int
    start_time: datetime
    end_time: datetime | None = None
    items_examined: int = 0
    conflicts_found: int = 0
    failed_items: int = 0

    def to_pb(self) -> res.SyncCycle:
        """As the proto's ``SyncCycle``."""
        pb = res.SyncCycle(
            name=f"tenants/{self.tenant_id}/syncCycles/{self.id}",
            state=self.state,  # type: ignore[arg-type]
            items_examined=self.items_examined,
            conflicts_found=self.conflicts_found,
        )
        pb.start_time.FromDatetime(self.start_time)
        if self.end_time is not None:
            pb.end_time.FromDatetime(self.end_time)
        return pb


def pointer_content(item: kres.KnowledgeItem) -> str:
    """``[TYPE] [STATUS] path`` and the item's one-line summary (its first line; the title
    when it has no summary)."""
    kind = kres.KnowledgeType.Name(item.type).removeprefix("KNOWLEDGE_TYPE_")
    status = kres.KnowledgeStatus.Name(item.status).removeprefix("KNOWLEDGE_STATUS_")
    lines = (item.summary or item.title).strip().splitlines()
    return f"[{kind}] [{status}] {item.path}\n{lines[0] if lines else item.title}"


def pointer_request_id(item: kres.KnowledgeItem) -> str:
    """The create's ``request_id``: the item's id and content hash (≤ 128 ASCII characters),
    so the same revision never gets two pointers."""
    item_id = item.name.rsplit("/", 1)[-1]
    return f"sync-ptr:{item_id}:{item.content_hash}"[:128]


def pointer_memory(item: kres.KnowledgeItem) -> mres.Memory:
    """The pointer memory of an accepted item (layer, scope, content, metadata, tag)."""
    layer = LAYERS[item.layer]
    unit = item.org_unit.rsplit("/", 1)[-1]
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "knowledge_item": item.name,
            "content_hash": item.content_hash,
            "knowledge_type": kres.KnowledgeType.Name(item.type),
        }
    )
    memory = mres.Memory(
        layer=layer,  # type: ignore[arg-type]
        content=pointer_content(item),
        metadata=metadata,
        tags=[POINTER_TAG],
    )
    setattr(memory.scope, SCOPE_FIELD[layer], unit)
    return memory


class PointerSync:
    """Reconciles a tenant's pointer memories with its accepted knowledge items.

    Args:
        db: Pool of the application role (sync's tables under RLS).
        knowledge_target: ``host:port`` of knowledge (or the sidecar/edge routing to it).
        memory_target: ``host:port`` of memory (or the sidecar/edge routing to it).
        credentials: This service's own token (principal ``service:sync``).
        lease_ttl_s: Time to live of the tenant's cycle lease in seconds.
    """

    def __init__(
        self,
        db: Database,
        knowledge_target: str,
        memory_target: str,
        credentials: ServiceCredentials,
        lease_ttl_s: float,
    ) -> None:
        self.db = db
        self.credentials = credentials
        self.lease_ttl_s = lease_ttl_s
        self.owner = leases.new_owner_id()
        self._kchannel = grpc.aio.insecure_channel(
            knowledge_target, interceptors=client_interceptors()
        )
        self._mchannel = (
            self._kchannel
            if memory_target == knowledge_target
            else grpc.aio.insecure_channel(memory_target, interceptors=client_interceptors())
        )
        self.knowledge = ksvc_grpc.KnowledgeServiceStub(self._kchannel)
        self.memory = msvc_grpc.MemoryServiceStub(self._mchannel)

    async def close(self) -> None:
        """Close the channels."""
        await self._kchannel.close()
        if self._mchannel is not self._kchannel:
            await self._mchannel.close()

    async def _items(self, tenant_id: str) -> list[kres.KnowledgeItem]:
        """Every knowledge item of the tenant (all statuses), page by page."""
        out: list[kres.KnowledgeItem] = []
        token = ""
        while True:
            page = await self.knowledge.ListKnowledgeItems(
                ksvc.ListKnowledgeItemsRequest(
                    parent=f"tenants/{tenant_id}", page_size=500, page_token=token
                ),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
            out.extend(page.knowledge_items)
            token = page.next_page_token
            if not token:
                return out

    async def reconcile(self, tenant_id: str) -> Cycle:
        """Run one full cycle for ``tenant_id`` under its lease.

        Returns:
            The finished cycle (SUCCEEDED, or FAILED when knowledge could not be listed; items
            whose pointer could not be written are counted in ``failed_items`` and tried
            again by the next cycle).

        Raises:
            Aborted: Another replica runs the tenant's cycle now (reason
                ``SYNC_CYCLE_RUNNING``).
        """
        lease = await leases.acquire(
            self.db.pool, f"sync-pointers:{tenant_id}", self.owner, self.lease_ttl_s
        )
        if lease is None:
            raise Aborted(
                "another sync cycle of this tenant is running; try again later",
                reason="SYNC_CYCLE_RUNNING",
            )
        try:
            cycle_id = uuid.uuid4()
            async with self.db.transaction(tenant_id) as conn:
                start = await conn.fetchval(
                    "INSERT INTO sync_cycles (tenant_id, id, state) VALUES ($1, $2, $3) "
                    "RETURNING start_time",
                    tenant_id,
                    cycle_id,
                    res.SYNC_CYCLE_STATE_RUNNING,
                )
            cycle = Cycle(tenant_id, cycle_id, res.SYNC_CYCLE_STATE_RUNNING, start)
            try:
                items = await self._items(tenant_id)
                await self._apply(cycle, lease, items)
                cycle.state = res.SYNC_CYCLE_STATE_SUCCEEDED
            except grpc.aio.AioRpcError as exc:
                log.warning("sync.cycle_failed", tenant=tenant_id, code=exc.code().name)
                cycle.state = res.SYNC_CYCLE_STATE_FAILED
            async with self.db.transaction(tenant_id) as conn:
                cycle.end_time = await conn.fetchval(
                    "UPDATE sync_cycles SET state = $2, end_time = clock_timestamp(), "
                    "items_examined = $3, conflicts_found = $4, failed_items = $5 "
                    "WHERE id = $1 RETURNING end_time",
                    cycle.id,
                    cycle.state,
                    cycle.items_examined,
                    cycle.conflicts_found,
                    cycle.failed_items,
                )
            return cycle
        finally:
            await leases.release(self.db.pool, lease)

    async def _apply(
        self, cycle: Cycle, lease: leases.Lease, items: Sequence[kres.KnowledgeItem]
    ) -> None:
        """Compare and write the difference, one item at a time."""
        tenant_id = cycle.tenant_id
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            rows = await conn.fetch(
                "SELECT knowledge_item, memory, content_hash, layer FROM sync_pointers"
            )
        recorded = {r["knowledge_item"]: Recorded(**dict(r)) for r in rows}
        seen: set[str] = set()
        for item in items:
            cycle.items_examined += 1
            seen.add(item.name)
            have = recorded.get(item.name)
            try:
                await self._item(cycle, lease, item, have)
            except grpc.aio.AioRpcError as exc:
                cycle.failed_items += 1
                log.warning(
                    "sync.pointer_failed", item=item.name, code=exc.code().name, cycle=str(cycle.id)
                )
        for name, have in recorded.items():
            if name in seen:
                continue
            try:
                await self._delete(have)
            except grpc.aio.AioRpcError:
                cycle.failed_items += 1
                continue
            await self._record(
                cycle,
                lease,
                res.CONFLICT_KIND_ORPHANED_POINTER,
                have,
                res.CONFLICT_RESOLUTION_DELETE_POINTER,
                "the knowledge item no longer exists",
                forget=True,
            )

    async def _item(
        self,
        cycle: Cycle,
        lease: leases.Lease,
        item: kres.KnowledgeItem,
        have: Recorded | None,
    ) -> None:
        accepted = item.status == kres.KNOWLEDGE_STATUS_ACCEPTED
        if not accepted:
            if have is not None:
                await self._delete(have)
                status = kres.KnowledgeStatus.Name(item.status)
                await self._record(
                    cycle,
                    lease,
                    res.CONFLICT_KIND_STATUS_CHANGE,
                    have,
                    res.CONFLICT_RESOLUTION_DELETE_POINTER,
                    f"the item is {status}, no longer ACCEPTED",
                    forget=True,
                )
            return
        layer = LAYERS.get(item.layer)
        if layer is None:
            return
        if have is None:
            memory = await self._create(item)
            now = Recorded(item.name, memory, item.content_hash, layer)
            await self._record(
                cycle,
                lease,
                res.CONFLICT_KIND_MISSING_POINTER,
                now,
                res.CONFLICT_RESOLUTION_REWRITE_POINTER,
                "an accepted item had no pointer",
            )
        elif have.layer != layer:
            await self._delete(have)
            memory = await self._create(item)
            now = Recorded(item.name, memory, item.content_hash, layer)
            await self._record(
                cycle,
                lease,
                res.CONFLICT_KIND_LAYER_MISMATCH,
                now,
                res.CONFLICT_RESOLUTION_REWRITE_POINTER,
                f"the pointer was in layer {have.layer}, the item maps to {layer}",
                old=have.memory,
            )
        elif have.content_hash != item.content_hash:
            pb = pointer_memory(item)
            pb.name = have.memory
            await self.memory.UpdateMemory(
                msvc.UpdateMemoryRequest(
                    memory=pb, update_mask=field_mask_pb2.FieldMask(paths=["content", "metadata"])
                ),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
            now = Recorded(item.name, have.memory, item.content_hash, layer)
            await self._record(
                cycle,
                lease,
                res.CONFLICT_KIND_HASH_MISMATCH,
                now,
                res.CONFLICT_RESOLUTION_REWRITE_POINTER,
                f"pointer hash {have.content_hash[:12]}, item hash {item.content_hash[:12]}",
            )

    async def _create(self, item: kres.KnowledgeItem) -> str:
        """Write the item's pointer; a retry returns the first pointer (same request_id)."""
        tenant = item.name.split("/")[1]
        pb = await self.memory.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=f"tenants/{tenant}",
                memory=pointer_memory(item),
                request_id=pointer_request_id(item),
            ),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return str(pb.name)

    async def _delete(self, have: Recorded) -> None:
        """Delete a pointer memory (already gone counts as deleted)."""
        try:
            await self.memory.DeleteMemory(
                msvc.DeleteMemoryRequest(name=have.memory),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def _record(
        self,
        cycle: Cycle,
        lease: leases.Lease,
        kind: int,
        pointer: Recorded,
        resolution: int,
        detail: str,
        *,
        forget: bool = False,
        old: str = "",
    ) -> None:
        """Record the pointer's new state and the resolved conflict, fenced by the lease."""
        cycle.conflicts_found += 1
        async with self.db.transaction(cycle.tenant_id) as conn:
            await leases.check(conn, lease)
            if forget:
                await conn.execute(
                    "DELETE FROM sync_pointers WHERE knowledge_item = $1", pointer.knowledge_item
                )
            else:
                await conn.execute(
                    "INSERT INTO sync_pointers (tenant_id, knowledge_item, memory, content_hash, "
                    "layer) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, knowledge_item) "
                    "DO UPDATE SET memory = EXCLUDED.memory, "
                    "content_hash = EXCLUDED.content_hash, layer = EXCLUDED.layer, "
                    "updated_at = clock_timestamp()",
                    cycle.tenant_id,
                    pointer.knowledge_item,
                    pointer.memory,
                    pointer.content_hash,
                    pointer.layer,
                )
            await _insert_conflict(conn, cycle.tenant_id, kind, pointer, resolution, detail, old)


async def _insert_conflict(
    conn: asyncpg.Connection,
    tenant_id: str,
    kind: int,
    pointer: Recorded,
    resolution: int,
    detail: str,
    old: str,
) -> None:
    memories = [m for m in (old, pointer.memory) if m]
    await conn.execute(
        "INSERT INTO sync_conflicts (tenant_id, id, kind, knowledge_item, pointer_memories, "
        "detail, resolution, resolved_at) VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())",
        tenant_id,
        uuid.uuid4(),
        kind,
        pointer.knowledge_item,
        memories,
        detail[:2000],
        resolution,
    )
