"""Keeps a vector index equal to PostgreSQL by following the outbox.

PostgreSQL holds every memory with its vector; an index is a view derived from it. A follower
reads outbox positions in order (they become visible in commit order, see
:mod:`aeterna_memory.adapters.postgres`), re-reads the *current* state of each changed memory
and upserts it, or deletes it from the index when it is deleted or expired. Applying the current
state makes every step idempotent: replaying a change is harmless.

* Embedded mode (qdrant-edge): each replica owns its index directory and its follower; the
  applied position is a file beside the index. A missing index is rebuilt from PostgreSQL
  in one snapshot.
* Shared mode (a Qdrant server): one follower at a time holds the index's lease
  (:mod:`aeterna_common.leases`) and both applies and reconciles. Each batch and its cursor
  write are fenced by the lease's epoch (the lease row locked ``FOR SHARE`` at that epoch in
  the transaction that writes the cursor, the batch bounded in time so that it ends before
  the lease can expire); a deposed leader's write fails and it stops applying. Every replica
  reads the shared position from ``index_cursors``.

Followers read every tenant's rows as the **indexer** role (SELECT only) and write nothing to
PostgreSQL but the shared cursor and the lease (application role). The LISTEN connection is
re-opened when it drops.

Writers wake followers with ``NOTIFY``; a search waits (bounded) until its replica's index
has applied the tenant's latest committed position, so a client reads its own writes through
any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, cast

import asyncpg
import structlog
from aeterna_common import leases
from aeterna_common.admission import ForegroundGauge
from aeterna_common.db import Database
from aeterna_common.telemetry import INDEX_LAG_POSITIONS, INDEX_LAG_SECONDS
from aeterna_common.vectors.port import IndexPoint, SparseVector, VectorIndex
from prometheus_client import Gauge, Histogram

from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL
from aeterna_memory.domain.model import SCOPE_FIELDS, Layer

log = structlog.get_logger("aeterna.memory.index")

KEYWORD_FIELDS = ("layer", *SCOPE_FIELDS, "tags")
"""Payload keys with a keyword index."""

FLOAT_FIELDS = ("created_at",)
"""Payload keys with a float index (epoch seconds)."""

APPLY_STEP = 256
"""Most memories per step of an applied batch (BM25 encoding, then one engine write; the
edge engine's ``WRITE_CHUNK``, so one step is one ``update`` call holding the GIL for ~6 ms at
~23 µs per 384-d point, :mod:`aeterna_common.vectors.edge`). Each step, the first included,
is deferred while the replica has searches in flight (:data:`APPLY_DEFER_MAX_S`,
:mod:`aeterna_common.admission`)."""

APPLY_DEFER_MAX_S = 0.1
"""Longest time in seconds the follower defers one apply step (or its next outbox read) while
searches are in flight in its replica: about one by-user search at the 95th percentile on a
loaded 2-core machine (idle p95 67 ms at 100k in ``bench/results/scale.json``), so a search
that is running when a step is due finishes first, and an apply keeps at least one step per
this time under a continuous stream of searches."""

INDEX_POSITION = Gauge("aeterna_index_applied_position", "Last outbox position applied.")
LEADER = Gauge(
    "aeterna_index_leader", "1 while this replica holds the shared index's lease, else 0."
)
INDEX_LAG_WAIT = Histogram(
    "aeterna_index_wait_seconds",
    "Time a search waited for the index to reach the latest committed change.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)

_ROW_COLUMNS = (
    "tenant_id, id, layer, agent_id, user_id, session_id, project_id, team_id, org_id, "
    "company_id, tags, metadata, importance, extract(epoch FROM created_at) AS created_at, "
    "deleted_at, expire_at, archived_at, revision, content, index_context, embedding, "
    "embedding_model"
)


async def _rows(conn: asyncpg.Connection, keys: set[tuple[str, uuid.UUID]]) -> list[asyncpg.Record]:
    """Current rows of ``(tenant_id, id)`` keys, looked up by primary key."""
    return list(
        await conn.fetch(
            f"SELECT {_ROW_COLUMNS} FROM memories m "
            "JOIN unnest($1::text[], $2::uuid[]) AS k(t, i) ON m.tenant_id = k.t AND m.id = k.i",
            [t for t, _ in keys],
            [i for _, i in keys],
        )
    )


class CursorStore(Protocol):
    """Where a follower records the last outbox position its index has applied.

    ``database`` identifies the database the position belongs to (cluster system identifier
    and database oid): an index built from another database must be rebuilt, not resumed.
    """

    async def load(self, database: str) -> int | None:
        """The stored position, or ``None`` when the index was never built from ``database``."""
        ...

    async def save(self, position: int, database: str) -> None:
        """Record ``position`` (after the index has applied it)."""
        ...


class FileCursor:
    """Position stored in a JSON file beside an embedded index (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self, database: str) -> int | None:
        """The stored position; ``None`` when missing, unreadable or of another database."""
        try:
            data = json.loads(self.path.read_text())
            if data["database"] != database:
                log.warning("index.other_database", stored=data["database"], now=database)
                return None
            return int(data["position"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    async def save(self, position: int, database: str) -> None:
        """Write via a temporary file and rename (atomic on POSIX), off the event loop: it
        runs after every applied batch, and file system calls on a busy disk would hold up
        every request of the replica."""
        await asyncio.to_thread(self._save, position, database)

    def _save(self, position: int, database: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"database": database, "position": position}))
        os.replace(tmp, self.path)


class LeaseFencedError(RuntimeError):
    """A shared index's cursor write was refused: the writer's epoch is stale."""


class FileModelMarker:
    """The model id of an embedded index, in a file beside it (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self) -> str | None:
        """The recorded model id; ``None`` when never recorded."""
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None

    async def save(self, model: str) -> None:
        """Record ``model`` via a temporary file and rename."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(model + "\n")
        os.replace(tmp, self.path)


class PostgresModelMarker:
    """The model id of a shared index, in its ``index_cursors`` row (column ``model``)."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name

    async def load(self) -> str | None:
        """The recorded model id; ``None`` when never recorded."""
        value = await self.db.pool.fetchval(
            "SELECT model FROM index_cursors WHERE name = $1", self.name
        )
        return None if value is None else str(value)

    async def save(self, model: str) -> None:
        """Record ``model`` (the row exists once the index has a position)."""
        await self.db.pool.execute(
            "INSERT INTO index_cursors (name, position, model) VALUES ($1, 0, $2) "
            "ON CONFLICT (name) DO UPDATE SET model = EXCLUDED.model, updated_at = now()",
            self.name,
            model,
        )


class ModelMarker(Protocol):
    """Where the model id of an index's vectors is recorded."""

    async def load(self) -> str | None:
        """The recorded model id, ``None`` when never recorded."""
        ...

    async def save(self, model: str) -> None:
        """Record the model id."""
        ...


class PostgresCursor:
    """Position of a shared index, in the ``index_cursors`` table (application role).

    Writes are fenced: :meth:`save_fenced` commits only while the writer holds the index's
    lease at its epoch, and never over a cursor written by a later epoch.
    """

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name

    async def load(self, database: str) -> int | None:
        """The stored position, ``None`` when the index was never built (the row lives in
        the database itself, so ``database`` always matches)."""
        value = await self.db.pool.fetchval(
            "SELECT position FROM index_cursors WHERE name = $1", self.name
        )
        return None if value is None else int(value)

    async def save(self, position: int, database: str) -> None:
        """Unfenced writes are refused: a shared index's cursor is written only under its
        lease (:meth:`save_fenced`).

        Raises:
            LeaseFencedError: Always.
        """
        raise LeaseFencedError("a shared index's cursor is written only with save_fenced()")

    async def save_fenced(
        self, position: int, lease: leases.Lease, *, margin_s: float = 0.0
    ) -> None:
        """Record ``position`` in one transaction with the lease check (monotonic).

        Args:
            position: The applied outbox position.
            lease: The index's lease, held by the caller.
            margin_s: Required time left on the lease, in seconds.

        Raises:
            LeaseFencedError: The lease is lost or a later epoch wrote the cursor.
        """
        async with self.fenced(lease, margin_s=margin_s) as write:
            await write(position)

    @contextlib.asynccontextmanager
    async def fenced(
        self, lease: leases.Lease, *, margin_s: float = 0.0
    ) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
        """A transaction holding ``lease``'s row ``FOR SHARE`` at its epoch (no takeover
        commits meanwhile); yields the cursor writer, which commits with the transaction.

        Args:
            lease: The index's lease, held by the caller.
            margin_s: Required time left on the lease, in seconds.

        Raises:
            LeaseFencedError: The lease is lost, or a later epoch wrote the cursor.
        """
        async with self.db.pool.acquire() as proxy, proxy.transaction():
            conn = cast(asyncpg.Connection, proxy)
            try:
                await leases.check(conn, lease, margin_s=margin_s)
            except leases.LeaseLostError as exc:
                raise LeaseFencedError(str(exc)) from exc

            async def write(position: int) -> None:
                await self._write(conn, position, lease.epoch)

            yield write

    async def _write(self, conn: asyncpg.Connection, position: int, epoch: int) -> None:
        status = await conn.execute(
            "INSERT INTO index_cursors AS c (name, position, epoch) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET position = greatest(c.position, "
            "EXCLUDED.position), epoch = EXCLUDED.epoch, updated_at = now() "
            "WHERE c.epoch <= EXCLUDED.epoch",
            self.name,
            position,
            epoch,
        )
        if status != "INSERT 0 1":
            raise LeaseFencedError(
                f"cursor {self.name!r} was written by a later epoch than {epoch}"
            )
        # Wakes the other replicas, which follow the shared cursor.
        await conn.execute("SELECT pg_notify($1, 'cursor')", NOTIFY_CHANNEL)


def to_point(row: asyncpg.Record, sparse: SparseVector) -> IndexPoint:
    """The index point of a ``memories`` row (selected with the follower's columns)."""
    payload: dict[str, Any] = {
        "tenant_id": row["tenant_id"],
        "layer": Layer(row["layer"]).name,
        "tags": list(row["tags"]),
        "metadata": json.loads(row["metadata"]),
        "importance": row["importance"],
        "created_at": float(row["created_at"]),
        "revision": int(row["revision"]),
        "embedding_model": row["embedding_model"],
    }
    for f in SCOPE_FIELDS:
        if row[f] is not None:
            payload[f] = row[f]
    return IndexPoint(
        id=str(row["id"]), dense=list(row["embedding"]), sparse=sparse, payload=payload
    )


async def _rows_by_id(conn: asyncpg.Connection, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    """Current rows of the given memory ids, whatever their tenant."""
    return list(await conn.fetch(f"SELECT {_ROW_COLUMNS} FROM memories WHERE id = ANY($1)", ids))


class CopyBuildIndex(VectorIndex, Protocol):
    """An index that builds its search graphs on a copy while it keeps serving
    (:class:`~aeterna_common.vectors.edge.EdgeVectorIndex`)."""

    async def unindexed_points(self) -> int:
        """Points not yet in a search graph."""
        ...

    async def build_copy(self) -> Any:
        """A copy of the live points with its graphs built (an index of the same kind)."""
        ...

    async def swap_in(self, copy: Any) -> None:
        """Serve from ``copy`` from now on."""
        ...

    async def discard(self, copy: Any) -> None:
        """Close and delete a copy that will not be swapped in."""
        ...


def _as_uuids(ids: Iterable[str]) -> list[uuid.UUID]:
    out: list[uuid.UUID] = []
    for i in ids:
        with contextlib.suppress(ValueError):
            out.append(uuid.UUID(i))
    return out


DocumentEncoder = Callable[[Sequence[tuple[str, Sequence[str]]]], Awaitable[list[SparseVector]]]
"""``[(content, context), ...] →`` their BM25F sparse vectors, in order, computed elsewhere."""


class IndexFollower:
    """Applies committed memory changes to one vector index, in outbox order.

    Args:
        db: Application-role database: the shared cursor and the lease.
        indexer: Indexer-role database: reads outbox and memories of every tenant in
            read-only snapshots (never anything else).
        index: The index to maintain.
        cursor: Where the applied position is kept (:class:`PostgresCursor` for a shared
            index).
        encode_sparse: ``(content, context) →`` BM25F sparse vector (the lexical encoder).
        dsn: DSN for the LISTEN connection (the indexer role's).
        dimension: Dense vector size.
        batch_size: Outbox rows per apply step.
        lease_name: For a shared index: the lease whose holder alone applies and reconciles;
            ``None`` in embedded mode (every replica maintains its own index).
        lease_ttl_s: Time to live of that lease in seconds.
        apply_timeout_s: Longest time one batch may take to reach a shared index, in
            seconds (default ``lease_ttl_s / 6``); a batch starts only with at least this much
            left on the lease, so a deposed leader's batch ends before anybody else can hold
            the lease. Must be below the renewal interval, ``lease_ttl_s / 3``.
        poll_s: Seconds between polls when no notification arrives (safety net).
        foreground: The replica's searches in flight. Before each step of an applied batch
            (its first included) and before each read of the outbox, the follower defers
            while any is in flight, at most ``defer_max_s`` per step, and not at all while a
            search waits in :meth:`wait_for` (that search waits for the follower itself).
        apply_step: Most memories per step of an applied batch (``APPLY_STEP``); 0 applies
            each batch in one step without deferring.
        defer_max_s: Longest deferral of one step, in seconds (``APPLY_DEFER_MAX_S``).
        encode_documents: Batch form of ``encode_sparse`` that runs elsewhere (a lowered
            child process: ``ProcessDocumentEncoder.encode`` in
            :mod:`aeterna_memory.adapters.lexical_process`), used instead of it when given;
            ``None`` encodes on a thread of this process.

    Raises:
        ValueError: ``apply_step`` or ``defer_max_s`` is negative, or ``apply_timeout_s`` is
            not below the lease's renewal interval.
    """

    def __init__(
        self,
        db: Database,
        indexer: Database,
        index: VectorIndex,
        cursor: CursorStore,
        encode_sparse: Callable[[str, Sequence[str]], SparseVector],
        *,
        dsn: str,
        dimension: int,
        batch_size: int = 512,
        lease_name: str | None = None,
        lease_ttl_s: float = leases.DEFAULT_TTL_S,
        apply_timeout_s: float | None = None,
        poll_s: float = 1.0,
        foreground: ForegroundGauge | None = None,
        apply_step: int = APPLY_STEP,
        defer_max_s: float = APPLY_DEFER_MAX_S,
        encode_documents: DocumentEncoder | None = None,
    ) -> None:
        if apply_step < 0:
            raise ValueError(f"apply_step must be >= 0, got {apply_step}")
        if defer_max_s < 0:
            raise ValueError(f"defer_max_s must be >= 0, got {defer_max_s}")
        self.defer_max_s = defer_max_s
        self.db = db
        self.indexer = indexer
        self.index = index
        self.cursor = cursor
        self.encode_sparse = encode_sparse
        self.encode_documents = encode_documents
        self.dsn = dsn
        self.dimension = dimension
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.foreground = foreground or ForegroundGauge()
        self.apply_step = apply_step
        self.applied = 0
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        self._listen: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._rebuilds = 0
        # Set while a graph build's copy replays the outbox from this position: the trim must
        # keep those rows, so reports hold back to it.
        self._copy_from: int | None = None
        self.database = ""
        self.keeper: leases.LeaseKeeper | None = None
        self._keeping: asyncio.Task[None] | None = None
        self._epoch = 0
        self.apply_timeout_s = apply_timeout_s or lease_ttl_s / 6
        if lease_name is not None and self.apply_timeout_s >= lease_ttl_s / leases.RENEW_FRACTION:
            # Just before an on-time renewal the keeper counts renew_every_s left
            # (LeaseKeeper.current); a batch needing more would find the lease "not held" on
            # every other step and the leader would give it up.
            raise ValueError(
                f"apply_timeout_s ({self.apply_timeout_s}) must be below the lease's renewal "
                f"interval ({lease_ttl_s / leases.RENEW_FRACTION} s)"
            )
        if lease_name is not None:
            if not isinstance(cursor, PostgresCursor):
                raise TypeError("a shared index keeps its cursor in PostgreSQL")
            self.keeper = leases.LeaseKeeper(
                db.pool, lease_name, ttl_s=lease_ttl_s, on_change=self._on_lease_change
            )
        # BM25 encoding of applied rows on a thread of its own: a batch being encoded never
        # takes a default-executor worker that a search's query encoding or index query needs.
        # Pure Python, so it keeps the process's priority (see aeterna_common.priority).
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="index-encode")

    @property
    def leader(self) -> bool:
        """Whether this follower applies changes (always in embedded mode; in shared mode
        while it holds the lease)."""
        return self.keeper is None or self.keeper.held

    @property
    def listener_pid(self) -> int | None:
        """Server process id of the LISTEN connection (``None`` while disconnected)."""
        if self._listen is None or self._listen.is_closed():
            return None
        return int(self._listen.get_server_pid())

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the index: rebuild it if it was never built, else catch up; then listen."""
        await self.index.ensure_collection(self.dimension)
        await self._connect_listener()
        assert self._listen is not None
        self.database = await self._listen.fetchval(
            "SELECT system_identifier::text || ':' || (SELECT oid FROM pg_database "
            "WHERE datname = current_database())::text FROM pg_control_system()"
        )
        if self.keeper is not None:
            await self.keeper.try_acquire()
            self._keeping = asyncio.create_task(self.keeper.run(), name="index-lease")
        stored = await self.cursor.load(self.database)
        try:
            if stored is None and self.leader:
                await self.rebuild()
            else:
                await self.catch_up()
        except (leases.LeaseLostError, LeaseFencedError) as exc:
            # Lost the shared index's lease while preparing: follow the new leader instead.
            assert self.keeper is not None
            self.keeper.lost(str(exc))
            await self.catch_up()
        log.info("index.ready", position=self.applied, leader=self.leader)

    async def close(self) -> None:
        """Stop listening and give the lease up (the index itself is closed by its owner)."""
        if self._keeping is not None:
            self._keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeping
            self._keeping = None
        if self.keeper is not None:
            await self.keeper.release()
        if self._listen is not None:
            with contextlib.suppress(Exception):
                await self._listen.close()
            self._listen = None
        self._encoder.shutdown(wait=False)

    async def _connect_listener(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_listener_lost)
        self._listen = conn
        log.info("index.listening", pid=conn.get_server_pid())

    def _on_listener_lost(self, conn: Any) -> None:
        log.warning("index.listener_lost")
        self._wake.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        # The leader's own cursor notifications need no round of its own.
        if payload == "cursor" and self.keeper is not None and self.keeper.held:
            return
        self._wake.set()

    def _on_lease_change(self, lease: leases.Lease | None) -> None:
        LEADER.set(1 if lease is not None else 0)
        self._wake.set()

    async def run(self) -> None:
        """Apply changes until cancelled: on each notification, else every ``poll_s``.

        Reconnects the LISTEN connection when it drops (and catches up, since
        notifications sent meanwhile are lost).
        """
        while True:
            connected = self._listen is not None and not self._listen.is_closed()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that races with the wake-up, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s if connected else min(self.poll_s, 0.5)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self._listen is None or self._listen.is_closed():
                    await self._connect_listener()
                await self.catch_up()
                await self.observe_lag()
            except (leases.LeaseLostError, LeaseFencedError) as exc:
                if self.keeper is not None:
                    self.keeper.lost(str(exc))
            except Exception:  # keep following; the next round retries from the cursor
                log.exception("index.apply_failed", position=self.applied)
                await asyncio.sleep(min(self.poll_s, 1.0))

    async def observe_lag(self) -> None:
        """Set ``aeterna_index_lag_positions`` and ``aeterna_index_lag_seconds``: outbox
        positions committed past the applied one, and the age of the oldest of them (two
        primary-key lookups on the outbox)."""
        async with self.indexer.all_tenants_snapshot() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT max(position) FROM outbox) AS head, "
                "(SELECT extract(epoch FROM clock_timestamp() - min(created_at)) FROM outbox "
                "WHERE position > $1) AS age",
                self.applied,
            )
        assert row is not None
        INDEX_LAG_POSITIONS.labels("memory").set(max(0, int(row["head"] or 0) - self.applied))
        INDEX_LAG_SECONDS.labels("memory").set(max(0.0, float(row["age"] or 0.0)))

    # ---- applying ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _fenced(self) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
        """Around one batch to a shared index: the lease row locked ``FOR SHARE`` at our
        epoch with ``apply_timeout_s`` to spare, the batch bounded by that time, and the
        cursor written in the same transaction. Yields the cursor writer. In embedded mode
        the cursor is the file beside the index.

        Raises:
            leases.LeaseLostError: The lease is not held (or not for long enough).
        """
        if self.keeper is None:

            async def save(position: int) -> None:
                await self.cursor.save(position, self.database)

            yield save
            return
        assert isinstance(self.cursor, PostgresCursor)
        lease = self.keeper.current(margin_s=self.apply_timeout_s)
        async with self.cursor.fenced(lease, margin_s=self.apply_timeout_s) as write:
            async with asyncio.timeout(self.apply_timeout_s):
                yield write

    async def catch_up(self) -> int:
        """Apply everything committed after the applied position (the leader), or follow
        the shared cursor (the other replicas of a shared index).

        Returns:
            The number of outbox rows applied.

        Raises:
            leases.LeaseLostError: This replica's lease was lost mid-way.
        """
        async with self._lock:
            if not self.leader:
                stored = await self.cursor.load(self.database)
                await self._advance(stored or 0)
                return 0
            if self.keeper is not None and self.keeper.lease is not None:
                if self._epoch != self.keeper.lease.epoch:
                    # A new term: resume from what the previous leader recorded.
                    self._epoch = self.keeper.lease.epoch
                    stored = await self.cursor.load(self.database)
                    if stored is None:
                        await self._rebuild_locked()
                        return 0
                    self.applied = max(self.applied, stored)
            total = 0
            while True:
                # Decoding a batch of rows with their vectors runs on the event loop.
                await self._defer()
                async with self.indexer.all_tenants_snapshot() as conn:
                    trimmed = int(
                        await conn.fetchval("SELECT upto FROM outbox_trim WHERE id = 1") or 0
                    )
                    # Changes after our position were trimmed while we did not report (see
                    # migration 0007): rebuild (in its own snapshot) instead of skipping them.
                    behind = trimmed > self.applied
                    if not behind:
                        changes = await conn.fetch(
                            "SELECT position, tenant_id, memory_id FROM outbox "
                            "WHERE position > $1 ORDER BY position LIMIT $2",
                            self.applied,
                            self.batch_size,
                        )
                        if not changes:
                            return total
                        keys = {
                            (c["tenant_id"], c["memory_id"])
                            for c in changes
                            if c["memory_id"] is not None
                        }
                        ids = [mid for _, mid in keys]
                        rows = await _rows(conn, keys)
                if behind:
                    log.warning("index.behind_outbox_trim", applied=self.applied, trimmed=trimmed)
                    await self._rebuild_locked()
                    return total
                last = int(changes[-1]["position"])
                async with self._fenced() as save_cursor:
                    await self._apply(rows, ids, positions=(self.applied + 1, last))
                    await save_cursor(last)
                await self._advance(last)
                total += len(changes)

    async def report_position(self, name: str, ttl_s: float) -> bool:
        """Report this follower's applied position for the outbox trim (``outbox_followers``,
        expiring after ``ttl_s`` seconds unless reported again). Only followers that apply
        the outbox report: an embedded index, the leader of a shared one.

        Args:
            name: This follower's name (unique per index copy).
            ttl_s: Seconds until the report expires.

        Returns:
            Whether a report was written.
        """
        if self.keeper is not None and not self.leader:
            return False
        async with self.db.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox_followers (name, position, expires_at) "
                "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                "ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, "
                "expires_at = EXCLUDED.expires_at",
                name,
                self.applied if self._copy_from is None else min(self.applied, self._copy_from),
                ttl_s,
            )
        return True

    async def _apply(
        self,
        rows: Sequence[asyncpg.Record],
        ids: Sequence[uuid.UUID],
        *,
        positions: tuple[int, int] | None = None,
    ) -> None:
        """Make the index hold the current state of ``ids`` (rows: their current rows).

        ``positions`` (first and last outbox position of the batch) is informational.
        """
        await self._apply_to(self.index, rows, ids)

    async def _apply_to(
        self, index: VectorIndex, rows: Sequence[asyncpg.Record], ids: Sequence[uuid.UUID]
    ) -> None:
        now = time.time()
        live = [
            r
            for r in rows
            if r["deleted_at"] is None
            and r["archived_at"] is None
            and (r["expire_at"] is None or r["expire_at"].timestamp() > now)
        ]
        live_ids = {r["id"] for r in live}
        gone = [str(i) for i in ids if i not in live_ids]
        # Every replica applies every tenant's changes, so an import elsewhere is applied
        # here too: in steps (building the points and the engine's write hold the GIL, so a
        # search's every thread hop would wait for them), each deferred while searches are
        # in flight here. ``apply_step`` 0 applies the batch in one step without deferring
        # (the baseline).
        step = self.apply_step or max(len(live), len(gone), 1)
        loop = asyncio.get_running_loop()
        for start in range(0, len(live), step):
            await self._defer()
            part = live[start : start + step]
            if self.encode_documents is not None:
                sparse = await self.encode_documents(
                    [(r["content"], r["index_context"]) for r in part]
                )
                points = await loop.run_in_executor(self._encoder, self._points_of, part, sparse)
            else:
                # Off the event loop, on the encoder's own thread (see __init__).
                points = await loop.run_in_executor(self._encoder, self._points, part)
            await index.upsert(points)
        for start in range(0, len(gone), step):
            await self._defer()
            await index.delete(gone[start : start + step])

    async def _defer(self) -> None:
        """Before a step of apply work (unless ``apply_step`` is 0): wait while searches are
        in flight in this replica, at most ``defer_max_s``, and not while a search waits for
        this follower (:meth:`wait_for`). The step after that wait cannot be pre-empted, so
        a search arriving meanwhile waits for at most one step."""
        if self.apply_step:
            await self.foreground.yield_to_foreground(self.defer_max_s, awaited=True)

    @staticmethod
    def _points_of(
        rows: Sequence[asyncpg.Record], sparse: Sequence[SparseVector]
    ) -> list[IndexPoint]:
        return [to_point(r, v) for r, v in zip(rows, sparse, strict=True)]

    def _points(self, rows: Sequence[asyncpg.Record]) -> list[IndexPoint]:
        return [
            to_point(r, self.encode_sparse(r["content"], list(r["index_context"]))) for r in rows
        ]

    async def _advance(self, position: int) -> None:
        if position <= self.applied:
            return
        self.applied = position
        INDEX_POSITION.set(position)
        async with self._advanced:
            self._advanced.notify_all()

    async def rebuild(self) -> int:
        """Rebuild the index from PostgreSQL in one snapshot (no embedding is recomputed).

        Returns:
            The number of memories indexed.

        Raises:
            leases.LeaseLostError: A shared index's lease was lost mid-way.
        """
        async with self._lock:
            return await self._rebuild_locked()

    async def _rebuild_locked(self) -> int:
        self._rebuilds += 1
        async with self.indexer.all_tenants_snapshot() as conn:
            if self.keeper is not None and self.keeper.lease is not None:
                self._epoch = self.keeper.lease.epoch
            position = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
            count = 0
            cursor = conn.cursor(
                f"SELECT {_ROW_COLUMNS} FROM memories WHERE deleted_at IS NULL "
                "AND archived_at IS NULL AND (expire_at IS NULL OR expire_at > now())",
                prefetch=self.batch_size,
            )
            batch: list[asyncpg.Record] = []
            live: set[str] = set()
            async for row in cursor:
                live.add(str(row["id"]))
                batch.append(row)
                if len(batch) >= self.batch_size:
                    async with self._fenced():
                        await self._apply(batch, [r["id"] for r in batch])
                    count += len(batch)
                    batch = []
            # Points the source of truth does not hold as live (e.g. an index left over from
            # another database) go.
            stale = await self.index.all_ids() - live
            async with self._fenced() as save_cursor:
                if batch:
                    await self._apply(batch, [r["id"] for r in batch])
                    count += len(batch)
                if stale:
                    await self.index.delete(sorted(stale))
                await save_cursor(position)
        await self._advance(position)
        log.info("index.rebuilt", memories=count, removed=len(stale), position=position)
        return count

    async def build_graph(self, min_unindexed: int) -> bool:
        """Build the index's search graphs without blocking searches, when at least
        ``min_unindexed`` points lack one (embedded index only).

        The index copies its points into a second shard and builds the graphs there while
        the live shard serves searches and takes changes. The outbox changes applied since
        the copy began are then replayed into the copy (outside the apply lock, then the last
        few under it) and the copy is swapped in under the lock: no change is lost, and a
        search never waits for the build.

        Args:
            min_unindexed: Least number of points without a graph that starts a build.

        Returns:
            Whether a copy was built and swapped in.

        """
        index = self.index
        if not all(
            hasattr(index, m) for m in ("unindexed_points", "build_copy", "swap_in", "discard")
        ):
            return False
        if self.keeper is not None or min_unindexed <= 0:
            return False
        buildable = cast(CopyBuildIndex, index)
        if await buildable.unindexed_points() < min_unindexed:
            return False
        async with self._lock:
            # Everything up to this position is in the live shard before the copy begins.
            start, rebuilds = self.applied, self._rebuilds
            self._copy_from = start
        began = time.perf_counter()
        try:
            copy = await buildable.build_copy()
        except BaseException:
            self._copy_from = None
            raise
        try:
            position = await self._replay(copy, start)
            async with self._lock:
                if self._rebuilds != rebuilds:
                    log.warning("index.graph_build_abandoned", reason="index rebuilt meanwhile")
                    await buildable.discard(copy)
                    return False
                await self._replay(copy, position)
                await buildable.swap_in(copy)
        except BaseException:
            await buildable.discard(copy)
            raise
        finally:
            self._copy_from = None
        log.info(
            "index.graph_built",
            seconds=round(time.perf_counter() - began, 1),
            replayed_from=start,
            position=self.applied,
        )
        return True

    async def _replay(self, index: VectorIndex, after: int) -> int:
        """Apply the outbox changes after position ``after`` up to the applied position to
        ``index`` (a copy being built); returns the position reached."""
        position = after
        while position < self.applied:
            async with self.indexer.all_tenants_snapshot() as conn:
                changes = await conn.fetch(
                    "SELECT position, tenant_id, memory_id FROM outbox WHERE position > $1 "
                    "AND position <= $2 ORDER BY position LIMIT $3",
                    position,
                    self.applied,
                    self.batch_size,
                )
                if not changes:
                    return self.applied
                keys = {
                    (c["tenant_id"], c["memory_id"]) for c in changes if c["memory_id"] is not None
                }
                rows = await _rows(conn, keys)
            await self._apply_to(index, rows, [mid for _, mid in keys])
            position = int(changes[-1]["position"])
        return position

    async def reconcile(self) -> dict[str, int]:
        """Repair the index: compare every point's revision with PostgreSQL's live rows, and
        apply the current state of each memory that is missing, out of date or no longer
        live. Idempotent.

        The full comparison runs outside the apply lock (catch-up and searches go on); only
        the repair of the differing memories takes it, re-reading their current rows first,
        so a repair never overwrites a newer applied change. In shared mode only the lease
        holder reconciles.

        Returns:
            ``{"added": a, "updated": u, "removed": r}``: memories the index lacked, held at
            another revision, or held though not live (before the re-read).

        Raises:
            leases.LeaseLostError: A shared index's lease was lost mid-way.
        """
        empty = {"added": 0, "updated": 0, "removed": 0}
        if not self.leader:
            return empty
        indexed = await self.index.payload_values("revision")
        async with self.indexer.all_tenants_snapshot() as conn:
            live_rows = await conn.fetch(
                "SELECT id, revision FROM memories WHERE deleted_at IS NULL "
                "AND archived_at IS NULL AND (expire_at IS NULL OR expire_at > now())"
            )
        live = {str(r["id"]): int(r["revision"]) for r in live_rows}
        added = [i for i in live if i not in indexed]
        updated = [i for i, rev in live.items() if i in indexed and indexed[i] != rev]
        removed = [i for i in indexed if i not in live]
        if not (added or updated or removed):
            return empty
        differing = _as_uuids([*added, *updated, *removed])
        async with self._lock:
            for start in range(0, len(differing), self.batch_size):
                chunk = differing[start : start + self.batch_size]
                async with self.indexer.all_tenants_snapshot() as conn:
                    rows = await _rows_by_id(conn, chunk)
                async with self._fenced():
                    await self._apply(rows, chunk)
            bad_ids = sorted({i for i in removed if not _as_uuids([i])})
            if bad_ids:
                async with self._fenced():
                    await self.index.delete(bad_ids)
        result = {"added": len(added), "updated": len(updated), "removed": len(removed)}
        log.warning("index.reconciled", **result)
        return result

    async def other_model_stored(self, model: str) -> bool:
        """Whether any live memory holds a vector of another model than ``model``.

        Cheap enough to poll: two range scans of the ``embedding_model`` index.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM memories WHERE (embedding_model < $1 "
                    "OR embedding_model > $1) AND deleted_at IS NULL "
                    "AND (expire_at IS NULL OR expire_at > now()))",
                    model,
                )
            )

    async def stored_models(self) -> dict[tuple[str, str], int]:
        """Model ids of the live memories' vectors in PostgreSQL.

        Returns:
            ``{(tenant_id, model_id): number of live memories}``.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, embedding_model, count(*) AS n FROM memories "
                "WHERE deleted_at IS NULL AND (expire_at IS NULL OR expire_at > now()) "
                "GROUP BY tenant_id, embedding_model"
            )
        return {(r["tenant_id"], r["embedding_model"]): int(r["n"]) for r in rows}

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Wait until the index has applied ``position``.

        Args:
            position: An outbox position (e.g. the tenant's latest).
            timeout_s: Upper bound of the wait in seconds.

        Returns:
            Whether the position was reached in time (a search proceeds either way).
        """
        if self.applied >= position:
            return True
        start = time.perf_counter()
        self._wake.set()
        try:
            # The waiting search is not in flight for the follower's yield: yielding to it
            # would only delay the apply it waits for.
            # The bound covers taking the condition's lock too, and asyncio.timeout rather
            # than wait_for (Python 3.11 cancellation semantics): a search never waits longer.
            with self.foreground.waiting_on_bulk():
                async with asyncio.timeout(timeout_s), self._advanced:
                    await self._advanced.wait_for(lambda: self.applied >= position)
            return True
        except TimeoutError:
            log.warning("index.behind", applied=self.applied, wanted=position)
            return False
        finally:
            INDEX_LAG_WAIT.observe(time.perf_counter() - start)
