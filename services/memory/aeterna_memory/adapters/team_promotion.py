"""Promotions of memories approved in governance: USER→TEAM, PROJECT→TEAM, TEAM→ORG and
ORG→COMPANY (DOMAIN.md, Memory: Promotion: they need an approval; issue 7, Approvals).

1. **Ask** (:meth:`TeamPromotions.ask_due`, run by the promotion job under the lease
   ``memory:lifecycle:promote`` after the automatic promotions). A USER, PROJECT, TEAM or
   ORG memory that is live, neither ``sensitive`` nor ``private``, whose promotion score
   reaches the threshold (the rules of the automatic promotions) and whose revision was not
   asked for yet gets one approval request in governance: type MEMORY_PROMOTION, target the
   memory, at the target unit in the tenant's authorization snapshot, which memory caches
   for its decisions (:func:`~aeterna_memory.domain.promotion.approval_targets`: the TEAM
   named by a USER memory's metadata ``team_id``, else the memory's unit's parent: a
   PROJECT's TEAM, a TEAM's ORGANIZATION, an ORGANIZATION's COMPANY), payload ``memory``,
   ``revision``, ``target_layer`` and ``content_sha256`` of the redacted copy, request id
   ``promote-{memory}-{revision}`` (governance answers a repeated id with the request
   opened first). The request is then recorded in ``memory_promotions`` (migration 0009;
   0010 adds the target layer), one row per memory revision, which keeps that revision from
   being asked again; a job that dies between the two asks again and gets the same request.
   A memory without a target (its unit is not in the tree or has no parent of the target
   kind; a USER memory without a metadata ``team_id`` naming a TEAM unit) is skipped and
   logged per tenant until it has one. A later revision (an update, a feedback) is a new
   candidate.
2. **Settle on events** (:meth:`TeamPromotions.handle`: the consumer group :data:`GROUP`,
   on one replica at a time under the lease :data:`CONSUME_LEASE`). A final event of a
   request recorded as pending (``governance.approval_request.approved``, ``rejected``,
   ``expired``, ``cancelled``) is only a hint: the request is read from governance, whose
   answer decides (:meth:`TeamPromotions.settle`). APPROVED creates the copy at the target
   unit through the domain's write path (embedded and indexed like any memory; the approval
   by the target unit's approvers is its permission, so no caller's is checked), redacted
   as the automatic copies and recorded in its metadata (``original_memory``,
   ``original_revision``, ``promotion_score``, ``approval_request``), with the request id
   ``promote-approved-{request}``; an existing copy of the request (looked up first) is
   never made twice, also past the idempotency keys' lifetime. A memory that changed
   (another revision, or content that no longer hashes to what was approved), was deleted,
   expired or archived meanwhile is not promoted: the record says why (state ``skipped``)
   and so does a log line. Any other final state marks the record and creates nothing.
3. **Reconcile** (:meth:`TeamPromotions.reconcile`, a periodic job under the lease
   :data:`RECONCILE_LEASE`): pending records, least recently checked first, in bounded
   batches, are checked against ``GetApprovalRequest``, in case events were lost (a
   request decided between asking and recording, a dead-lettered event, a Redis that lost
   its streams).

Every outcome is recorded once: a record leaves ``pending`` by a conditional update, and the
copy's request id makes a concurrent settlement (event and reconciler) create one copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import structlog
from aeterna_common import leases
from aeterna_common.authz import Snapshot
from aeterna_common.context import TENANT_PATTERN
from aeterna_common.db import Database
from aeterna_common.events import Event

from aeterna_memory.adapters.lifecycle import BATCH, lifecycle_principal, promotable
from aeterna_memory.adapters.postgres import _COLUMNS, content_hash, row_to_memory
from aeterna_memory.domain.model import (
    REACHING_IDENTIFIER,
    UNIT_LAYERS,
    Layer,
    Memory,
    NewMemory,
)
from aeterna_memory.domain.promotion import (
    APPROVED,
    DEFAULT_THRESHOLD,
    USER_TEAM_KEY,
    Approval,
    PromotionRequest,
    approval_key,
    approval_targets,
    approved_copy,
    promotion_score,
)
from aeterna_memory.ports import PromotionApprovals

log = structlog.get_logger("aeterna.memory.promotion")

GROUP = "memory-promotions"
"""Consumer group of the approval events on every tenant's stream."""

CONSUME_LEASE = "memory:promotions:consume"
"""Lease of the one replica that consumes :data:`GROUP`."""

RECONCILE_LEASE = "memory:promotions:reconcile"
"""Lease of the one replica that reconciles pending records."""

METHOD = "lifecycle:promote-approved"
"""Idempotency method of the copies made on approval."""

FINAL_EVENTS = frozenset(
    f"governance.approval_request.{s}" for s in ("approved", "rejected", "expired", "cancelled")
)
"""Governance's events of a request reaching a final state."""

PENDING, PROMOTED, SKIPPED = "pending", "promoted", "skipped"
CLOSED_STATES = {"REJECTED": "rejected", "EXPIRED": "expired", "CANCELLED": "cancelled"}
"""Governance's final states other than APPROVED → the record's state."""

STOP_TENANT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Codes of a refused ask that would refuse the tenant's next asks too (governance down,
this service not allowed): the tenant's batch ends. Others (the unit was deleted, ...)
concern one memory, which is skipped."""

_KEYS = {
    source: f"m.metadata->>'{USER_TEAM_KEY}'"
    if source is Layer.USER
    else f"m.{UNIT_LAYERS[source][1]}"
    for source in APPROVED
}
"""SQL of each source layer's :func:`~aeterna_memory.domain.promotion.approval_key`."""

_KEY = "CASE m.layer " + " ".join(f"WHEN {int(s)} THEN {k}" for s, k in _KEYS.items()) + " END"

_SOURCE_LAYERS = [int(source) for source in APPROVED]

_UNASKED = (
    "NOT EXISTS (SELECT 1 FROM memory_promotions p WHERE p.tenant_id = m.tenant_id "
    "AND p.memory_id = m.id AND p.revision = m.revision)"
)


class TeamPromotions:
    """Asks governance to approve USER→TEAM, PROJECT→TEAM, TEAM→ORG and ORG→COMPANY
    promotions and applies its decisions (see
    the module docstring).

    Args:
        db: Pool of the application role (tenant-bound transactions, leases).
        indexer: Pool of the indexer role (finds candidates and pending records across
            tenants).
        approvals: Governance's approval requests.
        snapshot: The tenant's authorization snapshot (the org tree): the authorizer's
            cache, ``DirectoryCache.get``.
        create: The domain's create use case without a permission check
            (``MemoryDomain.create_unchecked``).
        threshold: Promotion score from which a memory is asked for (0.8, DOMAIN.md).
        batch: Most requests opened per run of :meth:`ask_due`.
        reconcile_batch: Most pending records checked per run of :meth:`reconcile`.
    """

    def __init__(
        self,
        db: Database,
        indexer: Database,
        approvals: PromotionApprovals,
        snapshot: Callable[[str], Awaitable[Snapshot]],
        create: Callable[..., Awaitable[tuple[list[Memory], int]]],
        *,
        threshold: float = DEFAULT_THRESHOLD,
        batch: int = BATCH,
        reconcile_batch: int = 100,
    ) -> None:
        if batch < 1 or reconcile_batch < 1:
            raise ValueError("batch and reconcile_batch must be positive")
        self.db = db
        self.indexer = indexer
        self.approvals = approvals
        self.snapshot = snapshot
        self.create = create
        self.threshold = threshold
        self.batch = batch
        self.reconcile_batch = reconcile_batch
        self._unplaced: dict[str, dict[str, int]] = {}
        """Per tenant, the memories without a target last logged (logged again on change)."""

    # ---- 1. ask --------------------------------------------------------------------------

    async def ask_due(self, lease: leases.Lease | None = None) -> int:
        """Open an approval request for each due memory of an approved promotion's source
        layer (at most :attr:`batch`).

        A tenant whose asks fail (governance unreachable, its snapshot unavailable) is
        logged and left for the next run; the other tenants go on.

        Args:
            lease: The promotion job's lease; each record is written fenced by it. ``None``
                runs unfenced (tests and one-off operator runs).

        Returns:
            How many requests were opened (or found opened) and recorded.

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            tenants = [
                r["tenant_id"]
                for r in await conn.fetch(
                    "SELECT DISTINCT m.tenant_id FROM memories m WHERE m.layer = ANY($1::int[]) "
                    f"AND {promotable('$2')} AND {_UNASKED} ORDER BY 1",
                    _SOURCE_LAYERS,
                    self.threshold,
                )
            ]
        asked = 0
        for tenant in tenants:
            if asked >= self.batch:
                break
            try:
                asked += await self._ask(tenant, self.batch - asked, lease)
            except leases.LeaseLostError:
                raise
            except Exception:
                log.exception("promotion.ask_failed", tenant=tenant)
        if asked:
            log.info("promotion.asked", requests=asked)
        return asked

    async def _ask(self, tenant: str, limit: int, lease: leases.Lease | None) -> int:
        targets = approval_targets(await self.snapshot(tenant))
        # Per source layer, the keys with a target: only their memories are candidates, so
        # memories without a target never fill a batch.
        placed = " OR ".join(
            f"(m.layer = {int(source)} AND {_KEYS[source]} = ANY(${i}::text[]))"
            for i, source in enumerate(APPROVED, start=4)
        )
        keys = [list(targets[source]) for source in APPROVED]
        size = f"${4 + len(APPROVED)}"

        async def read(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[Any]]:
            due = (
                f"m.tenant_id = $1 AND m.layer = ANY($2::int[]) AND {promotable('$3')} "
                f"AND {_UNASKED}"
            )
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM memories m WHERE {due} AND ({placed}) "
                f"ORDER BY m.updated_at, m.id LIMIT {size}",
                tenant,
                _SOURCE_LAYERS,
                self.threshold,
                *keys,
                limit,
            )
            unplaced = await conn.fetch(
                f"SELECT m.layer, {_KEY} AS key, count(*) AS n FROM memories m WHERE {due} "
                f"AND NOT coalesce({placed}, false) GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
                tenant,
                _SOURCE_LAYERS,
                self.threshold,
                *keys,
            )
            return list(rows), list(unplaced)

        rows, unplaced = await self.db.run(tenant, read, readonly=True)
        missing = {f"{Layer(r['layer']).name}:{r['key'] or ''}": r["n"] for r in unplaced}
        if missing and missing != self._unplaced.get(tenant):
            log.info(
                "promotion.no_target",
                tenant=tenant,
                memories=missing,
                detail="no target unit in the org tree (a USER memory needs a metadata "
                "team_id naming a team): not asked",
            )
        self._unplaced[tenant] = missing
        now = datetime.now(UTC)
        asked = 0
        for row in rows:
            memory = row_to_memory(row)
            key = approval_key(memory) or ""
            target_unit = targets[memory.layer][key]
            score = round(promotion_score(memory, now), 6)
            copy = approved_copy(memory, score, target_unit)
            if copy is None or score < self.threshold - 1e-9:
                continue
            request = PromotionRequest(
                tenant_id=tenant,
                memory_id=memory.id,
                revision=memory.revision,
                source_layer=memory.layer,
                source_id=memory.scope.get(REACHING_IDENTIFIER[memory.layer]) or "",
                target_layer=copy.layer,
                target_unit=target_unit,
                score=score,
                content_sha256=content_hash(copy.content),
            )
            try:
                approval = await self.approvals.ask(request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in STOP_TENANT:
                    raise
                log.warning(
                    "promotion.ask_refused",
                    tenant=tenant,
                    memory=request.memory,
                    code=exc.code().name,
                    details=exc.details(),
                )
                continue
            await self._record(request, approval.name, lease)
            asked += 1
            if approval.state != "PENDING":
                # Asked before and decided since (a job that died before recording).
                await self.settle(tenant, approval, lease)
        return asked

    async def _record(
        self, request: PromotionRequest, approval: str, lease: leases.Lease | None
    ) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            if lease is not None:
                await leases.check(conn, lease)
            await conn.execute(
                "INSERT INTO memory_promotions (tenant_id, memory_id, revision, "
                "approval_request, target_layer, target_unit, promotion_score, content_sha256) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                request.tenant_id,
                uuid.UUID(request.memory_id),
                request.revision,
                approval,
                request.target_layer.name,
                request.target_unit,
                request.score,
                request.content_sha256,
            )

        await self.db.run(request.tenant_id, work)

    # ---- 2. settle -----------------------------------------------------------------------

    async def handle(self, event: Event) -> None:
        """The consumer's handler: settle the request of a final approval event when memory
        recorded it as pending; every other event is ignored. Idempotent by state (a
        settled record is left alone), so redeliveries are harmless.

        Raises:
            grpc.aio.AioRpcError: Governance could not be read (the entry is delivered
                again, up to the attempt limit; the reconciler settles it in any case).
        """
        if event.service != "governance" or event.type not in FINAL_EVENTS:
            return
        if not TENANT_PATTERN.match(event.tenant) or not event.resource.startswith(
            f"tenants/{event.tenant}/approvalRequests/"
        ):
            return
        record = await self._pending(event.tenant, event.resource)
        if record is None:
            return
        await self.settle(event.tenant, await self.approvals.get(event.resource))

    async def handle_batch(self, events: Sequence[Event]) -> None:
        """:meth:`handle` for each of one read's events in turn: the consumer then
        acknowledges the read with one ``XACK`` (nearly every event of a tenant's stream is
        ignored here, and the serving process paid an acknowledgement and a span for each).

        Raises:
            grpc.aio.AioRpcError: As :meth:`handle` (the consumer then goes one by one).
        """
        for event in events:
            await self.handle(event)

    async def settle(
        self, tenant: str, approval: Approval, lease: leases.Lease | None = None
    ) -> str | None:
        """Apply governance's state of ``approval`` to its pending record.

        Args:
            tenant: The tenant.
            approval: The request as governance answered it.
            lease: A job's lease fencing the record's update; ``None`` for the consumer
                (whose lease only keeps a second replica from consuming).

        Returns:
            The record's new state (``promoted``, ``rejected``, ``expired``, ``cancelled``
            or ``skipped``), or ``None`` when nothing was settled (no pending record, or
            the request is still pending).

        Raises:
            aeterna_common.leases.LeaseLostError: ``lease`` was lost.
        """
        record = await self._pending(tenant, approval.name)
        if record is None:
            return None
        if approval.state == "PENDING":
            await self._close(tenant, approval.name, None, lease=lease)
            return None
        fields = {
            "tenant": tenant,
            "approval_request": approval.name,
            "memory": f"tenants/{tenant}/memories/{record['memory_id']}",
        }
        if approval.state != "APPROVED":
            state = CLOSED_STATES.get(approval.state, SKIPPED)
            reason = "" if state != SKIPPED else f"governance answered {approval.state}"
            if await self._close(tenant, approval.name, state, reason, lease=lease):
                log.info("promotion.closed", state=state, **fields)
            return state
        reason, copy = await self._approved_copy(tenant, record, approval)
        if copy is None:
            if await self._close(tenant, approval.name, SKIPPED, reason, lease=lease):
                log.warning("promotion.not_promoted", reason=reason, **fields)
            return SKIPPED
        copy_id = await self._existing_copy(tenant, fields["memory"], approval.name)
        if copy_id is None:
            created, _ = await self.create(
                lifecycle_principal(tenant),
                [copy],
                method=METHOD,
                request_id=f"promote-approved-{approval.name.rsplit('/', 1)[1]}",
            )
            copy_id = uuid.UUID(created[0].id)
        if await self._close(tenant, approval.name, PROMOTED, lease=lease, copy_id=copy_id):
            log.info("promotion.promoted", copy=f"tenants/{tenant}/memories/{copy_id}", **fields)
        return PROMOTED

    async def _approved_copy(
        self, tenant: str, record: asyncpg.Record, approval: Approval
    ) -> tuple[str, NewMemory | None]:
        """The copy to create for an approved request, or why there is none."""
        memory_name = f"tenants/{tenant}/memories/{record['memory_id']}"
        payload = approval.payload
        if (
            approval.type != "MEMORY_PROMOTION"
            or approval.target != memory_name
            or payload.get("revision") != record["revision"]
            or payload.get("target_layer") != record["target_layer"]
            or payload.get("content_sha256") != record["content_sha256"]
        ):
            return "the approved request is not the one memory asked for", None

        async def read(conn: asyncpg.Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                f"SELECT {_COLUMNS}, archived_at IS NOT NULL AS archived, "
                "coalesce(expire_at <= now(), false) AS expired FROM memories "
                "WHERE tenant_id = $1 AND id = $2",
                tenant,
                record["memory_id"],
            )
            return row

        row = await self.db.run(tenant, read, readonly=True)
        if row is None or row["deleted_at"] is not None:
            return "the memory was deleted", None
        if row["expired"]:
            return "the memory expired", None
        if row["archived"]:
            return "the memory was archived", None
        memory = row_to_memory(row)
        if memory.revision != record["revision"]:
            return (
                f"the memory changed after it was asked for (revision {record['revision']} → "
                f"{memory.revision})",
                None,
            )
        copy = approved_copy(
            memory, record["promotion_score"], record["target_unit"], approval_request=approval.name
        )
        if copy is None:
            return "the memory is sensitive or private", None
        if content_hash(copy.content) != record["content_sha256"]:
            return "the redacted content differs from the approved one", None
        return "", copy

    async def _existing_copy(self, tenant: str, memory: str, approval: str) -> uuid.UUID | None:
        async def read(conn: asyncpg.Connection) -> uuid.UUID | None:
            found: uuid.UUID | None = await conn.fetchval(
                "SELECT id FROM memories WHERE tenant_id = $1 AND metadata ? 'original_memory' "
                "AND metadata->>'original_memory' = $2 AND metadata->>'approval_request' = $3 "
                "LIMIT 1",
                tenant,
                memory,
                approval,
            )
            return found

        return await self.db.run(tenant, read, readonly=True)

    async def _pending(self, tenant: str, approval: str) -> asyncpg.Record | None:
        async def read(conn: asyncpg.Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                "SELECT memory_id, revision, target_layer, target_unit, promotion_score, "
                "content_sha256 "
                "FROM memory_promotions WHERE tenant_id = $1 AND approval_request = $2 "
                "AND state = 'pending'",
                tenant,
                approval,
            )
            return row

        return await self.db.run(tenant, read, readonly=True)

    async def _close(
        self,
        tenant: str,
        approval: str,
        state: str | None,
        reason: str = "",
        *,
        lease: leases.Lease | None,
        copy_id: uuid.UUID | None = None,
    ) -> bool:
        """Move a pending record to ``state`` (``None``: only note that it was checked).

        Returns:
            Whether this call changed it (False: another settled it first).
        """

        async def work(conn: asyncpg.Connection) -> bool:
            if lease is not None:
                await leases.check(conn, lease)
            status = await conn.execute(
                "UPDATE memory_promotions SET state = coalesce($3, state), reason = $4, "
                "copy_id = $5, checked_at = clock_timestamp(), "
                "closed_at = CASE WHEN $3 IS NULL THEN NULL ELSE clock_timestamp() END "
                "WHERE tenant_id = $1 AND approval_request = $2 AND state = 'pending'",
                tenant,
                approval,
                state,
                reason,
                copy_id,
            )
            return bool(status == "UPDATE 1")

        return await self.db.run(tenant, work)

    # ---- 3. reconcile --------------------------------------------------------------------

    async def reconcile(self, lease: leases.Lease | None = None) -> int:
        """Check up to :attr:`reconcile_batch` pending records against governance, least
        recently checked first, and settle those decided (events may have been lost).

        Args:
            lease: The reconciler's lease; each record's update is fenced by it.

        Returns:
            How many records were settled.

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            rows: Sequence[asyncpg.Record] = await conn.fetch(
                "SELECT tenant_id, approval_request FROM memory_promotions "
                "WHERE state = 'pending' ORDER BY checked_at LIMIT $1",
                self.reconcile_batch,
            )
        settled = 0
        for r in rows:
            tenant, name = r["tenant_id"], r["approval_request"]
            try:
                approval = await self.approvals.get(name)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "promotion.reconcile_failed", code=exc.code().name, details=exc.details()
                    )
                    break
                # Governance no longer has it (restored from an older backup): nothing can
                # approve it any more.
                approval = Approval(name=name, type="", state="NOT_FOUND", target="")
            if await self.settle(tenant, approval, lease) is not None:
                settled += 1
        if settled:
            log.info("promotion.reconciled", records=settled)
        return settled
