"""Lifecycle jobs of memories: expiry and purge after retention (DOMAIN.md, Memory).

Both jobs work across tenants without giving the application role a way to read another
tenant: they find due memories (ids only) as the **indexer** role, which may SELECT every
tenant's memories and nothing else, then act on each tenant in a transaction of the
**application** role bound to that tenant (``aeterna_bind_tenant``), which re-checks the
condition under ``FOR UPDATE`` so a memory changed meanwhile is left alone. Each job runs on
one replica at a time under a lease (:func:`aeterna_common.leases.run_periodic_under_lease`)
and every transaction is fenced by the lease's epoch (:func:`aeterna_common.leases.check`),
so a deposed holder commits nothing more.

* **Expiry** (:meth:`LifecycleJobs.expire_due`): a live memory whose ``expire_at`` has
  passed gets ``expired_at`` and one ``memory.expired`` outbox event in the same
  transaction; the index followers then delete its point at once (a memory past its
  ``expire_at`` is not live for them). ``expired_at IS NULL`` in the condition makes the job
  idempotent: each expired memory is processed once.
* **Decay** (:meth:`LifecycleJobs.decay_due`): importance decays by the layer's daily rate;
  below 0.01 a memory is archived (a state: ``archived_at``) until the cold tier exists.
* **Purge** (:meth:`LifecycleJobs.purge_due`): a memory soft-deleted, or past its
  ``expire_at``, for longer than the retention loses its row (and with it its vector), its
  embedding cache entry and its revisions' content (a revision keeps ids, action, actor,
  time and changed fields) and its promotion records; a ``memory.purged`` outbox event makes
  the followers delete the index point of a memory that still had one. The cache entry is
  deleted first: if Redis cannot be reached the tenant's batch is left for the next run
  rather than losing the text the key is derived from.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import structlog
from aeterna_common import leases
from aeterna_common.context import Principal
from aeterna_common.db import Database

from aeterna_memory.adapters.postgres import (
    _COLUMNS,
    SERVICE_ACTOR,
    _append_outbox,
    row_to_memory,
)
from aeterna_memory.domain.model import Layer, Memory, NewMemory
from aeterna_memory.domain.promotion import DEFAULT_THRESHOLD, promoted_copy, promotion_score
from aeterna_memory.ports import EmbeddingCache

log = structlog.get_logger("aeterna.memory.lifecycle")

BATCH = 500
"""Memories handled per round of a job (one indexer query, one transaction per tenant)."""

MAX_ROUNDS = 20
"""Rounds per run of a job; the rest waits for the next run (bounds one run's work)."""

EXPIRED_EVENT = "memory.expired"
"""Outbox event of an expired memory."""

PURGED_EVENT = "memory.purged"
"""Outbox event of a purged memory."""

DECAYED_EVENT = "memory.decayed"
"""Outbox event of a memory whose importance decayed (the index payload holds importance)."""

ARCHIVED_EVENT = "memory.archived"
"""Outbox event of a memory archived by decay (it leaves the index)."""

DECAY_RATES = {
    Layer.AGENT: 0.10,
    Layer.SESSION: 0.05,
    Layer.USER: 0.03,
    Layer.PROJECT: 0.01,
    Layer.TEAM: 0.008,
    Layer.ORG: 0.005,
    Layer.COMPANY: 0.002,
}
"""Daily decay rate of importance per layer (DOMAIN.md, Memory: Decay)."""

ARCHIVE_BELOW = 0.01
"""Importance below which decay archives a memory (DOMAIN.md, Memory: Decay)."""


def promotable(threshold: str) -> str:
    """SQL condition on ``memories m``: live (not deleted, archived or past its expiry),
    neither ``sensitive`` nor ``private``, and a promotion score (DOMAIN.md, as
    :func:`~aeterna_memory.domain.promotion.promotion_score`) of at least the parameter
    ``threshold`` (e.g. ``'$3'``)."""
    return (
        "m.deleted_at IS NULL AND m.archived_at IS NULL "
        "AND (m.expire_at IS NULL OR m.expire_at > now()) "
        "AND coalesce(m.metadata->>'sensitive', 'false') IN ('false', '', '0') "
        "AND coalesce(m.metadata->>'private', 'false') IN ('false', '', '0') "
        "AND 0.6 * m.importance + 0.3 * least(m.access_count / 10.0, 1) + 0.1 * "
        "coalesce(greatest(0, 1 - extract(epoch FROM now() - m.last_accessed_at) "
        f"/ 86400.0), 0) >= {threshold} - 1e-9"
    )


def lifecycle_principal(tenant: str) -> Principal:
    """Who the promotion jobs create copies as (their revisions' and events' actor)."""
    return Principal(tenant_id=tenant, user_id="aeterna-lifecycle")


_RATE_SQL = (
    "CASE layer "
    + " ".join(f"WHEN {int(layer)} THEN {rate}" for layer, rate in DECAY_RATES.items())
    + " END"
)


class LifecycleJobs:
    """Expiry and purge of memories, one tenant transaction at a time.

    Args:
        db: Pool of the application role (tenant-bound transactions, the lease).
        indexer: Pool of the indexer role (finds due memories across tenants).
        cache: The embedding cache whose entries a purge removes.
        dense_text: The dense text a stored memory was embedded from, given the memory and
            its stored BM25 context (the cache key's text).
        retention_s: Seconds a soft-deleted or expired memory is kept before purge.
        decay_period_s: A memory decays once its last decay (or creation) is this many
            seconds old (a day by default; the result does not depend on it, since
            ``(1 - r)^a · (1 - r)^b = (1 - r)^(a + b)``, only the number of writes does).
        create: The domain's create use case (``MemoryDomain.create``), which embeds and
            stores promoted copies; ``None`` disables promotion.
        promotion_threshold: Promotion score from which a memory is promoted (0.8).
        batch: Memories per round (see :data:`BATCH`).
    """

    def __init__(
        self,
        db: Database,
        indexer: Database,
        cache: EmbeddingCache,
        dense_text: Callable[[Memory, Sequence[str]], str],
        *,
        retention_s: float,
        decay_period_s: float = 86_400.0,
        create: Callable[..., Awaitable[Any]] | None = None,
        promotion_threshold: float = DEFAULT_THRESHOLD,
        batch: int = BATCH,
    ) -> None:
        if retention_s < 0:
            raise ValueError(f"retention_s must not be negative, got {retention_s}")
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.db = db
        self.indexer = indexer
        self.cache = cache
        self.dense_text = dense_text
        self.retention_s = retention_s
        self.decay_period_s = decay_period_s
        self.create = create
        self.promotion_threshold = promotion_threshold
        self.batch = batch

    async def _due(self, query: str, *args: object) -> dict[str, list[uuid.UUID]]:
        async with self.indexer.all_tenants_snapshot() as conn:
            rows = await conn.fetch(query, *args)
        by_tenant: dict[str, list[uuid.UUID]] = defaultdict(list)
        for r in rows:
            by_tenant[r["tenant_id"]].append(r["id"])
        return by_tenant

    async def _in_rounds(
        self,
        event: str,
        one_round: Callable[[], Awaitable[tuple[int, bool]]],
        *,
        unit: str = "memories",
        rounds: int = MAX_ROUNDS,
    ) -> int:
        """The shape of every job: bounded rounds until one says there is no more work.

        Args:
            event: Log event written with the total when it is not zero.
            one_round: Does one round; returns ``(items handled, whether to go on)``.
            unit: Log field name of the total.
            rounds: Most rounds in this run (the rest waits for the next run).

        Returns:
            Items handled over all rounds.

        Raises:
            aeterna_common.leases.LeaseLostError: From ``one_round``; what committed stays.
        """
        total = 0
        for _ in range(rounds):
            done, more = await one_round()
            total += done
            if not more:
                break
        if total:
            log.info(event, **{unit: total})
        return total

    async def _per_tenant(
        self,
        act: Callable[[str, Sequence[uuid.UUID], leases.Lease | None], Awaitable[int]],
        lease: leases.Lease | None,
        query: str,
        *args: object,
        failure_event: str | None = None,
    ) -> tuple[int, bool]:
        """One round of a job: find due memories across tenants (``query`` as the indexer
        role, its last parameter the batch size), then ``act`` on each tenant's ids.

        Args:
            act: ``(tenant, ids, lease) →`` memories handled, in the tenant's transactions.
            lease: The job's lease, passed to ``act``.
            query: Selects ``tenant_id, id`` of at most :attr:`batch` due memories.
            *args: The query's parameters.
            failure_event: When set, a tenant whose ``act`` fails is logged under this event
                and the round ends the run after the other tenants (a lost lease still
                raises); when ``None`` the failure propagates.

        Returns:
            ``(memories handled, whether a full batch was due and nothing failed)``.
        """
        due = await self._due(query, *args)
        done = 0
        failed = False
        for tenant, ids in due.items():
            try:
                done += await act(tenant, ids, lease)
            except leases.LeaseLostError:
                raise
            except Exception:
                if failure_event is None:
                    raise
                log.exception(failure_event, tenant=tenant)
                failed = True
        return done, not failed and sum(len(v) for v in due.values()) >= self.batch

    async def expire_due(self, lease: leases.Lease | None = None) -> int:
        """Process memories whose ``expire_at`` has passed (see the module docstring).

        Args:
            lease: The job's lease; each transaction is fenced by it. ``None`` runs unfenced
                (tests and one-off operator runs).

        Returns:
            How many memories were marked expired (each emitted one ``memory.expired``).

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """
        return await self._in_rounds(
            "lifecycle.expired",
            lambda: self._per_tenant(
                self._expire,
                lease,
                "SELECT tenant_id, id FROM memories WHERE expired_at IS NULL "
                "AND deleted_at IS NULL AND expire_at IS NOT NULL AND expire_at <= now() "
                "ORDER BY expire_at LIMIT $1",
                self.batch,
            ),
        )

    async def _expire(
        self, tenant: str, ids: Sequence[uuid.UUID], lease: leases.Lease | None
    ) -> int:
        async def work(conn: asyncpg.Connection) -> int:
            if lease is not None:
                await leases.check(conn, lease)
            done = await conn.fetch(
                "UPDATE memories SET expired_at = clock_timestamp() "
                "WHERE tenant_id = $1 AND id = ANY($2::uuid[]) AND expired_at IS NULL "
                "AND deleted_at IS NULL AND expire_at <= clock_timestamp() RETURNING id",
                tenant,
                list(ids),
            )
            if done:
                await _append_outbox(
                    conn, tenant, EXPIRED_EVENT, [r["id"] for r in done], actor=SERVICE_ACTOR
                )
            return len(done)

        return await self.db.run(tenant, work)

    async def purge_due(self, lease: leases.Lease | None = None) -> int:
        """Purge memories soft-deleted or expired longer than the retention.

        Args:
            lease: The job's lease (as in :meth:`expire_due`).

        Returns:
            How many memories were purged.

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """
        return await self._in_rounds(
            "lifecycle.purged",
            lambda: self._per_tenant(
                self._purge,
                lease,
                "SELECT tenant_id, id FROM memories "
                "WHERE (deleted_at IS NOT NULL OR expire_at IS NOT NULL) "
                "AND coalesce(deleted_at, expire_at) < now() - make_interval(secs => $1) "
                "ORDER BY coalesce(deleted_at, expire_at) LIMIT $2",
                self.retention_s,
                self.batch,
                failure_event="lifecycle.purge_failed",
            ),
        )

    def _condition(self) -> str:
        return (
            "(deleted_at IS NOT NULL OR expire_at IS NOT NULL) AND coalesce(deleted_at, "
            "expire_at) < clock_timestamp() - make_interval(secs => $3)"
        )

    async def _purge(
        self, tenant: str, ids: Sequence[uuid.UUID], lease: leases.Lease | None
    ) -> int:
        # 1. The cache keys derive from the content: delete the entries while it is there.
        async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f"SELECT {_COLUMNS}, index_context FROM memories WHERE tenant_id = $1 "
                    f"AND id = ANY($2::uuid[]) AND {self._condition()}",
                    tenant,
                    list(ids),
                    self.retention_s,
                )
            )

        rows = await self.db.run(tenant, read, readonly=True)
        if not rows:
            return 0
        texts: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            memory = row_to_memory(r)
            texts[memory.embedding_model].append(self.dense_text(memory, list(r["index_context"])))
        for model, model_texts in texts.items():
            await self.cache.delete_many(tenant, model, model_texts)

        # 2. Rows, revisions' content and the outbox event in one fenced transaction.
        async def work(conn: asyncpg.Connection) -> int:
            if lease is not None:
                await leases.check(conn, lease)
            gone = await conn.fetch(
                "DELETE FROM memories WHERE tenant_id = $1 AND id = ANY($2::uuid[]) "
                f"AND {self._condition()} RETURNING id",
                tenant,
                [r["id"] for r in rows],
                self.retention_s,
            )
            purged = [r["id"] for r in gone]
            if not purged:
                return 0
            await conn.execute(
                "UPDATE memory_revisions SET old_content = NULL, new_content = NULL "
                "WHERE tenant_id = $1 AND memory_id = ANY($2::uuid[])",
                tenant,
                purged,
            )
            # Their promotion records hold a hash of their content.
            await conn.execute(
                "DELETE FROM memory_promotions WHERE tenant_id = $1 "
                "AND memory_id = ANY($2::uuid[])",
                tenant,
                purged,
            )
            await _append_outbox(conn, tenant, PURGED_EVENT, purged, actor=SERVICE_ACTOR)
            return len(purged)

        return await self.db.run(tenant, work)

    async def decay_due(self, lease: leases.Lease | None = None) -> int:
        """Decay the importance of live memories not decayed for ``decay_period_s``.

        New importance = importance · (1 − rate of the layer)^days since the last decay (or
        the creation), days fractional; below :data:`ARCHIVE_BELOW` the memory is archived
        (``archived_at``), which takes it out of the index, searches and default listings.
        Each decayed memory gets one outbox event (``memory.decayed``, or
        ``memory.archived``) so that the index payload follows. Running again at once
        decays nothing (the period has not passed), and any cadence yields the same
        importance.

        Args:
            lease: The job's lease (as in :meth:`expire_due`).

        Returns:
            How many memories decayed (archived ones included).

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """
        return await self._in_rounds(
            "lifecycle.decayed",
            lambda: self._per_tenant(
                self._decay,
                lease,
                "SELECT tenant_id, id FROM memories WHERE archived_at IS NULL "
                "AND deleted_at IS NULL "
                "AND coalesce(decayed_at, created_at) < now() - make_interval(secs => $1) "
                "ORDER BY coalesce(decayed_at, created_at) LIMIT $2",
                self.decay_period_s,
                self.batch,
            ),
        )

    async def _decay(
        self, tenant: str, ids: Sequence[uuid.UUID], lease: leases.Lease | None
    ) -> int:
        async def work(conn: asyncpg.Connection) -> int:
            if lease is not None:
                await leases.check(conn, lease)
            done = await conn.fetch(
                "WITH d AS (SELECT id, importance * power((1 - " + _RATE_SQL + ")::float8, "
                "(extract(epoch FROM clock_timestamp() - coalesce(decayed_at, created_at)) "
                "/ 86400.0)::float8) AS value FROM memories WHERE tenant_id = $1 "
                "AND id = ANY($2::uuid[]) AND archived_at IS NULL AND deleted_at IS NULL "
                "AND coalesce(decayed_at, created_at) < clock_timestamp() "
                "- make_interval(secs => $3) FOR UPDATE) "
                "UPDATE memories m SET importance = greatest(d.value, 0), "
                "decayed_at = clock_timestamp(), "
                "archived_at = CASE WHEN d.value < $4 THEN clock_timestamp() END "
                "FROM d WHERE m.tenant_id = $1 AND m.id = d.id "
                "RETURNING m.id, m.archived_at IS NOT NULL AS archived",
                tenant,
                list(ids),
                self.decay_period_s,
                ARCHIVE_BELOW,
            )
            decayed = [r["id"] for r in done if not r["archived"]]
            archived = [r["id"] for r in done if r["archived"]]
            if decayed:
                await _append_outbox(conn, tenant, DECAYED_EVENT, decayed, actor=SERVICE_ACTOR)
            if archived:
                await _append_outbox(conn, tenant, ARCHIVED_EVENT, archived, actor=SERVICE_ACTOR)
            return len(done)

        return await self.db.run(tenant, work)

    async def trim_outbox(self, lease: leases.Lease | None = None, *, batch: int = 5000) -> int:
        """Delete outbox rows every live follower has applied (``trim_outbox()`` of
        migration 0007: at or below the smallest unexpired report in ``outbox_followers``).

        Args:
            lease: The job's lease; checked before each batch.
            batch: Rows per transaction (at most 10,000).

        Returns:
            How many rows were deleted.

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
        """

        async def one_batch() -> tuple[int, bool]:
            async with self.db.pool.acquire() as conn, conn.transaction():
                if lease is not None:
                    await leases.check(cast(asyncpg.Connection, conn), lease)
                deleted = int(await conn.fetchval("SELECT trim_outbox($1)", batch))
            return deleted, deleted >= batch

        return await self._in_rounds("lifecycle.outbox_trimmed", one_batch, unit="rows")

    async def promote_due(self, lease: leases.Lease | None = None) -> int:
        """Promote AGENT memories to USER and SESSION memories to PROJECT automatically.

        A live memory whose promotion score (:func:`promotion_score`) reaches the threshold,
        whose metadata is neither ``sensitive`` nor ``private`` and (SESSION) which names a
        ``project_id`` in its metadata gets one redacted copy at the target layer, made by
        the domain's create (so it is embedded and indexed like any memory) with the
        request id ``promote-{id}-{revision}``: once per memory revision, also across a
        retried commit or a successor job within the idempotency TTL; beyond it the copy
        itself (``original_memory`` and ``original_revision`` in its metadata) excludes the
        revision from the candidates.

        Args:
            lease: The job's lease; checked before each tenant's batch.

        Returns:
            How many copies were created.

        Raises:
            aeterna_common.leases.LeaseLostError: The lease was lost.
        """
        if self.create is None:
            return 0
        # One round: the copies made are excluded from the candidates only once their
        # transaction is visible, and the next run comes soon enough.
        return await self._in_rounds(
            "lifecycle.promoted",
            lambda: self._per_tenant(
                self._promote,
                lease,
                "SELECT m.tenant_id, m.id FROM memories m WHERE m.layer = ANY($1::smallint[]) "
                f"AND {promotable('$3')} "
                "AND (m.layer <> $2 OR coalesce(m.metadata->>'project_id', '') <> '') "
                "AND NOT EXISTS (SELECT 1 FROM memories c WHERE c.tenant_id = m.tenant_id "
                "AND c.metadata ? 'original_memory' "
                "AND c.metadata->>'original_memory' = "
                "'tenants/' || m.tenant_id || '/memories/' || m.id::text "
                "AND c.metadata->>'original_revision' = m.revision::text) "
                "ORDER BY m.tenant_id LIMIT $4",
                [int(Layer.AGENT), int(Layer.SESSION)],
                int(Layer.SESSION),
                self.promotion_threshold,
                self.batch,
            ),
            rounds=1,
        )

    async def _promote(
        self, tenant: str, ids: Sequence[uuid.UUID], lease: leases.Lease | None
    ) -> int:
        assert self.create is not None
        if lease is not None:
            async with self.db.transaction(tenant) as conn:
                await leases.check(conn, lease)
        principal = lifecycle_principal(tenant)
        now = datetime.now(UTC)
        done = 0
        for row in await self.db.run(tenant, _reader(tenant, ids), readonly=True):
            memory = row_to_memory(row)
            score = promotion_score(memory, now)
            copy: NewMemory | None = None
            if score >= self.promotion_threshold - 1e-9:
                copy = promoted_copy(memory, score)
            if copy is None:
                continue
            await self.create(
                principal,
                [copy],
                method="lifecycle:promote",
                request_id=f"promote-{memory.id}-{memory.revision}",
            )
            done += 1
        return done


def _reader(
    tenant: str, ids: Sequence[uuid.UUID]
) -> Callable[[asyncpg.Connection], Awaitable[list[asyncpg.Record]]]:
    async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 "
                "AND id = ANY($2::uuid[]) AND deleted_at IS NULL",
                tenant,
                list(ids),
            )
        )

    return read
