"""Knowledge → memory pointers (issue 9, DOMAIN.md "Sync").

Each ACCEPTED knowledge item of a tenant is mirrored by one pointer memory in the mapped
layer (PROJECT→PROJECT … COMPANY→COMPANY, scope from the item's org unit) whose content is
``[TYPE] [STATUS] path`` and the item's one-line summary. A reconcile cycle compares the
items (read over knowledge's gRPC API) with the pointers sync recorded (``sync_pointers``)
and writes the difference through memory's gRPC API, both as this service's principal
(``service:sync``; Cedar rules ``knowledge-sync-list`` and ``memory-sync-pointers``).

Every difference is a conflict in ``sync_conflicts``. Knowledge is the source of truth, so
each kind has a clear automatic rule, applied for the kinds listed in
:attr:`~aeterna_sync.settings.SyncSettings.auto_resolve` (all by default):

* MISSING_POINTER (accepted item, no pointer): the pointer is written (REWRITE_POINTER);
* HASH_MISMATCH (the item's content hash changed): the pointer is rewritten;
* LAYER_MISMATCH (the pointer sits in another layer): it is deleted and written again;
* DUPLICATE_POINTER (two or more pointers for one item): one is kept (the one matching the
  item), the rest are deleted (DELETE_POINTER);
* STATUS_CHANGE (the item is no longer ACCEPTED): the pointer is deleted;
* ORPHANED_POINTER (the item is gone): the pointer is deleted.

A kind not resolved automatically is left open for :meth:`PointerSync.resolve` (the
``ResolveSyncConflict`` RPC); the cycle leaves that item's pointers as they are and does not
report the same state again (``sync_conflicts.fingerprint``).

A cycle walks the items in name order and records its checkpoint (the last item done) in
``sync_cycles`` after each item it wrote for (and every :data:`CHECKPOINT_EVERY` items).
One cycle per tenant runs at a time across replicas, under
the lease ``sync-pointers:{tenant}`` (:mod:`aeterna_common.leases`, renewed while the cycle
runs); every row written is fenced by it. A replica killed mid-cycle leaves the cycle
RUNNING with its checkpoint; the next holder of the lease resumes that cycle after it. A
create carries a ``request_id`` derived from the item id and its content hash, so the item in
flight when a replica died gets memory's first answer back and never a second pointer.

Memory calls are retried in the cycle with exponential backoff on transient codes (tenacity);
an item still failing is recorded in ``sync_failed_items``, skipped until its next attempt
(``base · 2^(attempts-1)`` seconds, capped), and deleted by the scheduled job after the
retention (30 days by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
from aeterna_common.errors import Aborted, FailedPrecondition, NotFound
from aeterna_common.telemetry import client_interceptors
from google.protobuf import field_mask_pb2, struct_pb2
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from aeterna_sync.settings import SyncSettings

log = structlog.get_logger("aeterna.sync.pointers")

CALL_TIMEOUT_S = 10.0
"""Deadline in seconds of one call to knowledge or memory."""

CHECKPOINT_EVERY = 100
"""Items examined between two checkpoints of a cycle that writes nothing."""

LEASE_POLL_S = 0.2
"""Seconds between attempts at a tenant's lease while waiting for it."""

RESOLVE_WAIT_S = 15.0
"""Seconds a resolution by a call waits for a running cycle of the tenant to end."""

POINTER_TAG = "knowledge-pointer"
"""Tag of every pointer memory."""

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Codes retried within a cycle (https://grpc.github.io/grpc/core/md_doc_statuscodes.html:
the call may succeed if repeated)."""

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


def lease_name(tenant_id: str) -> str:
    """The lease of a tenant's pointer cycles: ``sync-pointers:{tenant}``."""
    return f"sync-pointers:{tenant_id}"


def conflict_kinds(names: str) -> frozenset[int]:
    """Conflict kinds from a comma-separated list of names (``HASH_MISMATCH`` or
    ``CONFLICT_KIND_HASH_MISMATCH``).

    Raises:
        ValueError: An unknown name.
    """
    out = set()
    for raw in names.split(","):
        name = raw.strip().upper()
        if name:
            out.add(res.ConflictKind.Value(f"CONFLICT_KIND_{name.removeprefix('CONFLICT_KIND_')}"))
    return frozenset(out)


def retry_delay_s(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before a failed item's next attempt: ``base_s · 2^(attempts-1)``, at most
    ``max_s`` (exponential backoff)."""
    return float(min(max_s, base_s * 2 ** min(max(attempts - 1, 0), 32)))


@dataclass(frozen=True)
class Recorded:
    """A pointer as sync recorded it (one ``sync_pointers`` row)."""

    knowledge_item: str
    memory: str
    content_hash: str
    layer: int


@dataclass
class Cycle:
    """One cycle (one ``sync_cycles`` row), updated as it goes."""

    tenant_id: str
    id: uuid.UUID
    state: int
    start_time: datetime
    end_time: datetime | None = None
    items_examined: int = 0
    conflicts_found: int = 0
    failed_items: int = 0
    checkpoint: str = ""
    resumes: int = 0
    auto: frozenset[int] = frozenset()
    """The kinds this cycle resolves automatically."""

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


@dataclass
class Change:
    """What one resolved conflict changes in sync's records (applied with the conflict row)."""

    forget: list[str] = field(default_factory=list)
    add: Recorded | None = None


def pointer_content(item: kres.KnowledgeItem) -> str:
    """``[TYPE] [STATUS] path`` and the item's one-line summary (its first line; the title
    when it has no summary)."""
    kind = kres.KnowledgeType.Name(item.type).removeprefix("KNOWLEDGE_TYPE_")
    status = kres.KnowledgeStatus.Name(item.status).removeprefix("KNOWLEDGE_STATUS_")
    lines = (item.summary or item.title).strip().splitlines()
    return f"[{kind}] [{status}] {item.path}\n{lines[0] if lines else item.title}"


def pointer_request_id(item: kres.KnowledgeItem, replaces: str = "") -> str:
    """The create's ``request_id``: the item's id and content hash (≤ 128 ASCII characters),
    so the same revision never gets two pointers; a pointer written in place of another
    (``replaces``, a memory name) adds the start of that memory's id, so memory does not
    answer with the pointer just deleted, and a retried move still gets one answer."""
    item_id = item.name.rsplit("/", 1)[-1]
    suffix = f":{replaces.rsplit('/', 1)[-1][:8]}" if replaces else ""
    return f"sync-ptr:{item_id}:{item.content_hash}"[: 128 - len(suffix)] + suffix


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


def fingerprint(kind: int, item: kres.KnowledgeItem | None, memories: Sequence[str]) -> str:
    """The state a conflict was found in: its kind, the item's hash, status and layer, and the
    pointers involved. The same state is not reported twice while its conflict is open or
    was settled by a call."""
    state = f"{item.content_hash}:{item.status}:{item.layer}" if item is not None else "gone"
    return f"{kind}:{state}:{','.join(sorted(memories))}"[:400]


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in TRANSIENT


class PointerSync:
    """Reconciles a tenant's pointer memories with its accepted knowledge items.

    Args:
        db: Pool of the application role (sync's tables under RLS).
        knowledge_target: ``host:port`` of knowledge (or the sidecar/edge routing to it).
        memory_target: ``host:port`` of memory (or the sidecar/edge routing to it).
        credentials: This service's own token (principal ``service:sync``).
        settings: Lease time to live, retries, retention and the kinds resolved
            automatically.

    Raises:
        ValueError: ``settings.auto_resolve`` names an unknown conflict kind.
    """

    def __init__(
        self,
        db: Database,
        knowledge_target: str,
        memory_target: str,
        credentials: ServiceCredentials,
        settings: SyncSettings,
    ) -> None:
        self.db = db
        self.credentials = credentials
        self.settings = settings
        self.auto = conflict_kinds(settings.auto_resolve)
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

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        """One call as ``service:sync``, retried with exponential backoff on transient
        codes (``settings.item_attempts`` attempts)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.1),
            stop=stop_after_attempt(self.settings.item_attempts),
            reraise=True,
        ):
            with attempt:
                return await method(
                    request, metadata=await self.credentials.metadata(), timeout=CALL_TIMEOUT_S
                )
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _items(self, tenant_id: str) -> list[kres.KnowledgeItem]:
        """Every knowledge item of the tenant (all statuses), in name order."""
        out: list[kres.KnowledgeItem] = []
        token = ""
        while True:
            page = await self._call(
                self.knowledge.ListKnowledgeItems,
                ksvc.ListKnowledgeItemsRequest(
                    parent=f"tenants/{tenant_id}", page_size=500, page_token=token
                ),
            )
            out.extend(page.knowledge_items)
            token = page.next_page_token
            if not token:
                return sorted(out, key=lambda i: i.name)

    async def _create(self, item: kres.KnowledgeItem, replaces: str = "") -> str:
        """Write the item's pointer (in place of ``replaces``, when given); a retry returns
        the first pointer (same request_id)."""
        tenant = item.name.split("/")[1]
        pb = await self._call(
            self.memory.CreateMemory,
            msvc.CreateMemoryRequest(
                parent=f"tenants/{tenant}",
                memory=pointer_memory(item),
                request_id=pointer_request_id(item, replaces),
            ),
        )
        return str(pb.name)

    async def _rewrite(self, memory: str, item: kres.KnowledgeItem) -> None:
        pb = pointer_memory(item)
        pb.name = memory
        await self._call(
            self.memory.UpdateMemory,
            msvc.UpdateMemoryRequest(
                memory=pb, update_mask=field_mask_pb2.FieldMask(paths=["content", "metadata"])
            ),
        )

    async def _delete(self, memory: str) -> None:
        """Delete a pointer memory (already gone counts as deleted)."""
        try:
            await self._call(self.memory.DeleteMemory, msvc.DeleteMemoryRequest(name=memory))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    # -- the cycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _leased(self, tenant_id: str, wait_s: float = 0.0) -> Any:
        """Hold the tenant's lease (renewed in the background) for the block.

        Args:
            tenant_id: The tenant.
            wait_s: Seconds to keep trying while another replica holds it.

        Raises:
            Aborted: Another replica holds it (reason ``SYNC_CYCLE_RUNNING``).
        """
        keeper = leases.LeaseKeeper(
            self.db.pool, lease_name(tenant_id), ttl_s=self.settings.jobs_lease_ttl_s,
            owner=self.owner,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not await keeper.try_acquire():
            if loop.time() >= deadline:
                raise Aborted(
                    "another sync cycle of this tenant is running; try again later",
                    reason="SYNC_CYCLE_RUNNING",
                )
            await asyncio.sleep(LEASE_POLL_S)
        keeping = asyncio.create_task(keeper.run(), name=f"lease:{keeper.name}")
        try:
            yield keeper
        except leases.LeaseLostError as exc:
            raise Aborted(
                "the sync cycle lost its lease; the next cycle resumes from its checkpoint",
                reason="SYNC_CYCLE_INTERRUPTED",
            ) from exc
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            await keeper.release()

    async def reconcile(self, tenant_id: str, reason: str = "call") -> Cycle:
        """Run one full cycle for ``tenant_id`` under its lease, or finish the cycle a dead
        replica left RUNNING, from its checkpoint.

        Args:
            tenant_id: The tenant.
            reason: Why the cycle runs (``call``, ``event``, ``schedule``), recorded.

        Returns:
            The finished cycle: SUCCEEDED, or FAILED when knowledge could not be listed.
            Items whose pointer could not be written are counted in ``failed_items`` and
            retried by a later cycle after their backoff.

        Raises:
            Aborted: Another replica runs the tenant's cycle now (``SYNC_CYCLE_RUNNING``), or
                the lease was lost mid-cycle (``SYNC_CYCLE_INTERRUPTED``; the cycle stays
                RUNNING with its checkpoint).
        """
        async with self._leased(tenant_id) as keeper:
            cycle = await self._open(tenant_id, reason, keeper)
            cycle.auto = self.auto
            try:
                items = await self._items(tenant_id)
                await self._apply(cycle, keeper, items)
                cycle.state = res.SYNC_CYCLE_STATE_SUCCEEDED
            except grpc.aio.AioRpcError as exc:
                log.warning("sync.cycle_failed", tenant=tenant_id, code=exc.code().name)
                cycle.state = res.SYNC_CYCLE_STATE_FAILED
            await self._save(cycle, keeper, end=True)
            return cycle

    async def _open(self, tenant_id: str, reason: str, keeper: leases.LeaseKeeper) -> Cycle:
        """The RUNNING cycle a dead holder left (resumed), else a new one."""
        async with self.db.transaction(tenant_id) as conn:
            await leases.check(conn, keeper.current())
            row = await conn.fetchrow(
                "UPDATE sync_cycles SET resumes = resumes + 1 WHERE id = ("
                "SELECT id FROM sync_cycles WHERE state = $1 ORDER BY start_time DESC LIMIT 1) "
                "RETURNING id, start_time, items_examined, conflicts_found, failed_items, "
                "checkpoint, resumes",
                res.SYNC_CYCLE_STATE_RUNNING,
            )
            if row is not None:
                log.info("sync.cycle_resumed", tenant=tenant_id, cycle=str(row["id"]))
                return Cycle(
                    tenant_id,
                    row["id"],
                    res.SYNC_CYCLE_STATE_RUNNING,
                    row["start_time"],
                    items_examined=row["items_examined"],
                    conflicts_found=row["conflicts_found"],
                    failed_items=row["failed_items"],
                    checkpoint=row["checkpoint"],
                    resumes=row["resumes"],
                )
            cycle_id = uuid.uuid4()
            start = await conn.fetchval(
                "INSERT INTO sync_cycles (tenant_id, id, state, reason) VALUES ($1, $2, $3, $4) "
                "RETURNING start_time",
                tenant_id,
                cycle_id,
                res.SYNC_CYCLE_STATE_RUNNING,
                reason[:40],
            )
        return Cycle(tenant_id, cycle_id, res.SYNC_CYCLE_STATE_RUNNING, start)

    async def _save(self, cycle: Cycle, keeper: leases.LeaseKeeper, *, end: bool = False) -> None:
        """Record the cycle's progress (its checkpoint), fenced; ``end`` closes it."""
        async with self.db.transaction(cycle.tenant_id) as conn:
            await leases.check(conn, keeper.current())
            ended = await conn.fetchval(
                "UPDATE sync_cycles SET state = $2, items_examined = $3, conflicts_found = $4, "
                "failed_items = $5, checkpoint = $6, "
                "end_time = CASE WHEN $7::boolean THEN clock_timestamp() END "
                "WHERE id = $1 RETURNING end_time",
                cycle.id,
                cycle.state,
                cycle.items_examined,
                cycle.conflicts_found,
                cycle.failed_items,
                cycle.checkpoint,
                end,
            )
        if end:
            cycle.end_time = ended

    async def _apply(
        self, cycle: Cycle, keeper: leases.LeaseKeeper, items: Sequence[kres.KnowledgeItem]
    ) -> None:
        """Compare and write the difference one item at a time, checkpointing after each."""
        tenant_id = cycle.tenant_id
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            rows = await conn.fetch(
                "SELECT knowledge_item, memory, content_hash, layer FROM sync_pointers "
                "ORDER BY knowledge_item, updated_at DESC, memory"
            )
            waiting = {
                r["knowledge_item"]
                for r in await conn.fetch(
                    "SELECT knowledge_item FROM sync_failed_items "
                    "WHERE next_attempt_at > clock_timestamp()"
                )
            }
            failed = {
                r["knowledge_item"]
                for r in await conn.fetch("SELECT knowledge_item FROM sync_failed_items")
            }
            settled = {
                (r["knowledge_item"], r["fingerprint"])
                for r in await conn.fetch(
                    "SELECT knowledge_item, fingerprint FROM sync_conflicts "
                    "WHERE fingerprint <> '' AND (resolution = 0 OR resolved_by <> '')"
                )
            }
        recorded: dict[str, list[Recorded]] = {}
        for r in rows:
            recorded.setdefault(r["knowledge_item"], []).append(Recorded(**dict(r)))
        names = {item.name for item in items}
        for item in items:
            if cycle.checkpoint and item.name <= cycle.checkpoint:
                continue  # done before this cycle was resumed
            before = (cycle.conflicts_found, cycle.failed_items)
            if item.name in waiting:
                cycle.failed_items += 1  # its backoff has not elapsed
            else:
                try:
                    await self._item(cycle, keeper, item, recorded.get(item.name, []), settled)
                    if item.name in failed:
                        await self._succeeded(cycle, keeper, item.name)
                except grpc.aio.AioRpcError as exc:
                    await self._failed(cycle, keeper, item.name, exc)
            cycle.items_examined += 1
            cycle.checkpoint = item.name
            # After every write, else every CHECKPOINT_EVERY items: items examined again
            # after a resume are no-ops, so a quiet tenant costs no write per item.
            changed = before != (cycle.conflicts_found, cycle.failed_items)
            if changed or cycle.items_examined % CHECKPOINT_EVERY == 0:
                await self._save(cycle, keeper)
        for name, haves in recorded.items():
            if name in names:
                continue
            memories = [h.memory for h in haves]
            try:
                await self._conflict(
                    cycle, keeper, res.CONFLICT_KIND_ORPHANED_POINTER, name, None, memories,
                    "the knowledge item no longer exists", settled,
                    self._deleting(memories),
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                await self._failed(cycle, keeper, name, exc)

    def _deleting(self, memories: Sequence[str]) -> Callable[[], Awaitable[Change]]:
        async def run() -> Change:
            for memory in memories:
                await self._delete(memory)
            return Change(forget=list(memories))

        return run

    async def _item(
        self,
        cycle: Cycle,
        keeper: leases.LeaseKeeper,
        item: kres.KnowledgeItem,
        haves: list[Recorded],
        settled: set[tuple[str, str]],
    ) -> None:
        """Resolve (or leave open) the conflicts of one item."""
        layer = LAYERS.get(item.layer)
        if item.status != kres.KNOWLEDGE_STATUS_ACCEPTED or layer is None:
            if haves:
                memories = [h.memory for h in haves]
                status = kres.KnowledgeStatus.Name(item.status)
                await self._conflict(
                    cycle, keeper, res.CONFLICT_KIND_STATUS_CHANGE, item.name, item, memories,
                    f"the item is {status}, no longer ACCEPTED", settled,
                    self._deleting(memories),
                )  # fmt: skip
            return
        if not haves:

            async def create() -> Change:
                memory = await self._create(item)
                return Change(add=Recorded(item.name, memory, item.content_hash, layer))

            await self._conflict(
                cycle, keeper, res.CONFLICT_KIND_MISSING_POINTER, item.name, item, [],
                "an accepted item had no pointer", settled, create,
            )  # fmt: skip
            return
        if len(haves) > 1:
            # Keep the pointer that already matches the item (else the newest recorded).
            keep = next(
                (h for h in haves if h.layer == layer and h.content_hash == item.content_hash),
                haves[0],
            )
            extra = [h.memory for h in haves if h is not keep]
            done = await self._conflict(
                cycle, keeper, res.CONFLICT_KIND_DUPLICATE_POINTER, item.name, item,
                [keep.memory, *extra],
                f"{len(haves)} pointers for one item; {keep.memory} is kept", settled,
                self._deleting(extra),
            )  # fmt: skip
            if not done:
                return
            haves = [keep]
        have = haves[0]
        if have.layer != layer:

            async def move() -> Change:
                await self._delete(have.memory)
                memory = await self._create(item, replaces=have.memory)
                return Change(
                    forget=[have.memory], add=Recorded(item.name, memory, item.content_hash, layer)
                )

            await self._conflict(
                cycle, keeper, res.CONFLICT_KIND_LAYER_MISMATCH, item.name, item, [have.memory],
                f"the pointer is in layer {have.layer}, the item maps to {layer}", settled, move,
            )  # fmt: skip
        elif have.content_hash != item.content_hash:

            async def rewrite() -> Change:
                await self._rewrite(have.memory, item)
                return Change(add=Recorded(item.name, have.memory, item.content_hash, layer))

            await self._conflict(
                cycle, keeper, res.CONFLICT_KIND_HASH_MISMATCH, item.name, item, [have.memory],
                f"pointer hash {have.content_hash[:12]}, item hash {item.content_hash[:12]}",
                settled, rewrite,
            )  # fmt: skip

    async def _conflict(
        self,
        cycle: Cycle,
        keeper: leases.LeaseKeeper,
        kind: int,
        item_name: str,
        item: kres.KnowledgeItem | None,
        memories: Sequence[str],
        detail: str,
        settled: set[tuple[str, str]],
        resolve: Callable[[], Awaitable[Change]],
    ) -> bool:
        """Resolve a conflict automatically (its writes, then the records and the resolved
        conflict in one fenced transaction), or record it open when its kind is not resolved
        automatically.

        Returns:
            Whether it was resolved.
        """
        mark = fingerprint(kind, item, memories)
        if kind not in cycle.auto:
            if (item_name, mark) not in settled:
                settled.add((item_name, mark))
                cycle.conflicts_found += 1
                async with self.db.transaction(cycle.tenant_id) as conn:
                    await leases.check(conn, keeper.current())
                    await _insert_conflict(
                        conn, cycle.tenant_id, kind, item_name, memories, detail, 0, mark
                    )
            return False
        change = await resolve()
        cycle.conflicts_found += 1
        async with self.db.transaction(cycle.tenant_id) as conn:
            await leases.check(conn, keeper.current())
            await _apply_change(conn, cycle.tenant_id, change)
            involved = [*memories, *([change.add.memory] if change.add else [])]
            await _insert_conflict(
                conn,
                cycle.tenant_id,
                kind,
                item_name,
                list(dict.fromkeys(involved)),
                detail,
                _RESOLUTION[kind],
                mark,
            )
        return True

    async def _failed(
        self, cycle: Cycle, keeper: leases.LeaseKeeper, item_name: str, exc: grpc.aio.AioRpcError
    ) -> None:
        """Record a failed item and when it is tried again (exponential backoff)."""
        cycle.failed_items += 1
        log.warning(
            "sync.pointer_failed", item=item_name, code=exc.code().name, cycle=str(cycle.id)
        )
        error = f"{exc.code().name}: {exc.details() or ''}"[:2000]
        async with self.db.transaction(cycle.tenant_id) as conn:
            await leases.check(conn, keeper.current())
            attempts = await conn.fetchval(
                "INSERT INTO sync_failed_items (tenant_id, knowledge_item, attempts, last_error, "
                "next_attempt_at) VALUES ($1, $2, 1, $3, clock_timestamp()) "
                "ON CONFLICT (tenant_id, knowledge_item) DO UPDATE SET "
                "attempts = sync_failed_items.attempts + 1, last_error = EXCLUDED.last_error, "
                "last_failed_at = clock_timestamp() RETURNING attempts",
                cycle.tenant_id,
                item_name,
                error,
            )
            await conn.execute(
                "UPDATE sync_failed_items SET next_attempt_at = clock_timestamp() + "
                "make_interval(secs => $2) WHERE knowledge_item = $1",
                item_name,
                retry_delay_s(
                    attempts, self.settings.failed_retry_base_s, self.settings.failed_retry_max_s
                ),
            )

    async def _succeeded(self, cycle: Cycle, keeper: leases.LeaseKeeper, item_name: str) -> None:
        async with self.db.transaction(cycle.tenant_id) as conn:
            await leases.check(conn, keeper.current())
            await conn.execute("DELETE FROM sync_failed_items WHERE knowledge_item = $1", item_name)

    async def purge_failed(self, tenant_id: str) -> int:
        """Delete the tenant's failed items older than the retention
        (``settings.failed_retention_days``, 30 by default, issue 9).

        Returns:
            How many were deleted.
        """
        async with self.db.transaction(tenant_id) as conn:
            status = await conn.execute(
                "DELETE FROM sync_failed_items WHERE first_failed_at < clock_timestamp() - "
                "make_interval(secs => $1)",
                self.settings.failed_retention_days * 86_400.0,
            )
        return int(status.split()[-1])

    # -- resolution by a call ------------------------------------------------------------

    async def resolve(
        self, tenant_id: str, conflict_id: uuid.UUID, resolution: int, actor: str
    ) -> asyncpg.Record:
        """Resolve an open conflict as a call asks, under the tenant's lease.

        REWRITE_POINTER makes the item's pointers match the item again (every rule applied
        at once); DELETE_POINTER deletes the conflict's pointer memories; IGNORE leaves them
        as they are. The conflict's state is not reported again either way.

        Args:
            tenant_id: The tenant (already authorized).
            conflict_id: The conflict's id.
            resolution: A ``ConflictResolution`` other than UNSPECIFIED.
            actor: Who resolves it (recorded in ``resolved_by``).

        Returns:
            The conflict row after the call (the same row when it was already resolved
            with this resolution).

        Raises:
            NotFound: No such conflict in the tenant.
            FailedPrecondition: It was resolved otherwise (``CONFLICT_ALREADY_RESOLVED``), or
                REWRITE_POINTER for an item that is no longer ACCEPTED or no longer exists
                (``KNOWLEDGE_ITEM_NOT_ACCEPTED``).
            Aborted: A cycle of the tenant kept running for :data:`RESOLVE_WAIT_S`
                (``SYNC_CYCLE_RUNNING``).
        """
        row = await self._conflict_row(tenant_id, conflict_id)
        if row["resolution"] != 0:
            return _already(row, resolution)
        async with self._leased(tenant_id, RESOLVE_WAIT_S) as keeper:
            row = await self._conflict_row(tenant_id, conflict_id)
            if row["resolution"] != 0:
                return _already(row, resolution)
            change = Change()
            if resolution == res.CONFLICT_RESOLUTION_DELETE_POINTER:
                change = await self._deleting(list(row["pointer_memories"]))()
            elif resolution == res.CONFLICT_RESOLUTION_REWRITE_POINTER:
                await self._rewrite_item(tenant_id, keeper, row["knowledge_item"])
            async with self.db.transaction(tenant_id) as conn:
                await leases.check(conn, keeper.current())
                await _apply_change(conn, tenant_id, change)
                out = await conn.fetchrow(
                    "UPDATE sync_conflicts SET resolution = $2, resolved_at = clock_timestamp(), "
                    "resolved_by = $3 WHERE id = $1 RETURNING *",
                    conflict_id,
                    resolution,
                    actor[:300],
                )
            if out is None:  # deleted meanwhile (conflicts are never deleted today)
                raise NotFound(f"sync conflict {conflict_id} no longer exists")
            return out

    async def _conflict_row(self, tenant_id: str, conflict_id: uuid.UUID) -> asyncpg.Record:
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            row = await conn.fetchrow("SELECT * FROM sync_conflicts WHERE id = $1", conflict_id)
        if row is None:
            raise NotFound(
                f"tenants/{tenant_id}/syncConflicts/{conflict_id} does not exist",
                reason="SYNC_CONFLICT_NOT_FOUND",
            )
        return row

    async def _rewrite_item(
        self, tenant_id: str, keeper: leases.LeaseKeeper, item_name: str
    ) -> None:
        """Apply every automatic rule to one accepted item now (its own cycle)."""
        item = next((i for i in await self._items(tenant_id) if i.name == item_name), None)
        if (
            item is None
            or item.status != kres.KNOWLEDGE_STATUS_ACCEPTED
            or item.layer not in LAYERS
        ):
            raise FailedPrecondition(
                f"{item_name or 'the item'} is not an ACCEPTED knowledge item: resolve with "
                "DELETE_POINTER or IGNORE",
                reason="KNOWLEDGE_ITEM_NOT_ACCEPTED",
            )
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            rows = await conn.fetch(
                "SELECT knowledge_item, memory, content_hash, layer FROM sync_pointers "
                "WHERE knowledge_item = $1 ORDER BY updated_at DESC, memory",
                item_name,
            )
        cycle = Cycle(tenant_id, uuid.uuid4(), res.SYNC_CYCLE_STATE_RUNNING, datetime.now(UTC))
        cycle.auto = frozenset(_RESOLUTION)
        await self._item(cycle, keeper, item, [Recorded(**dict(r)) for r in rows], set())


_RESOLUTION: dict[int, int] = {
    res.CONFLICT_KIND_MISSING_POINTER: res.CONFLICT_RESOLUTION_REWRITE_POINTER,
    res.CONFLICT_KIND_HASH_MISMATCH: res.CONFLICT_RESOLUTION_REWRITE_POINTER,
    res.CONFLICT_KIND_LAYER_MISMATCH: res.CONFLICT_RESOLUTION_REWRITE_POINTER,
    res.CONFLICT_KIND_DUPLICATE_POINTER: res.CONFLICT_RESOLUTION_DELETE_POINTER,
    res.CONFLICT_KIND_STATUS_CHANGE: res.CONFLICT_RESOLUTION_DELETE_POINTER,
    res.CONFLICT_KIND_ORPHANED_POINTER: res.CONFLICT_RESOLUTION_DELETE_POINTER,
}
"""The automatic resolution of each kind (knowledge wins)."""


def _already(row: asyncpg.Record, resolution: int) -> asyncpg.Record:
    """An already resolved conflict: the same resolution again is a no-op."""
    if row["resolution"] == resolution:
        return row
    name = res.ConflictResolution.Name(row["resolution"])
    raise FailedPrecondition(
        f"the conflict was already resolved as {name}", reason="CONFLICT_ALREADY_RESOLVED"
    )


async def _apply_change(conn: asyncpg.Connection, tenant_id: str, change: Change) -> None:
    if change.forget:
        await conn.execute(
            "DELETE FROM sync_pointers WHERE memory = ANY($1::text[])", change.forget
        )
    if change.add is not None:
        p = change.add
        await conn.execute(
            "INSERT INTO sync_pointers (tenant_id, knowledge_item, memory, content_hash, layer) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, knowledge_item, memory) "
            "DO UPDATE SET content_hash = EXCLUDED.content_hash, layer = EXCLUDED.layer, "
            "updated_at = clock_timestamp()",
            tenant_id,
            p.knowledge_item,
            p.memory,
            p.content_hash,
            p.layer,
        )


async def _insert_conflict(
    conn: asyncpg.Connection,
    tenant_id: str,
    kind: int,
    item_name: str,
    memories: Sequence[str],
    detail: str,
    resolution: int,
    mark: str,
) -> None:
    await conn.execute(
        "INSERT INTO sync_conflicts (tenant_id, id, kind, knowledge_item, pointer_memories, "
        "detail, resolution, resolved_at, fingerprint) VALUES ($1, $2, $3, $4, $5, $6, "
        "$7::smallint, CASE WHEN $7::smallint > 0 THEN clock_timestamp() END, $8)",
        tenant_id,
        uuid.uuid4(),
        kind,
        item_name,
        list(memories),
        detail[:2000],
        resolution,
        mark,
    )
