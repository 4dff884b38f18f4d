"""Keeps a vector index equal to PostgreSQL by following the outbox.

PostgreSQL holds every memory with its vector; an index is a view derived from it. A follower
reads outbox positions in order (they become visible in commit order, see
:mod:`aeterna_memory.adapters.postgres`), re-reads the *current* state of each changed memory
and upserts it, or deletes it from the index when it is deleted or expired. Applying the current
state makes every step idempotent: replaying a change is harmless.

* Embedded mode (qdrant-edge): each replica owns its index directory and its follower; the
  applied position is a file beside the index. A missing index is rebuilt from PostgreSQL
  in one snapshot.
* Shared mode (a Qdrant server): one follower at a time holds a PostgreSQL advisory lock (the
  lease) and applies; every replica reads the shared position from ``index_cursors``.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import structlog
from aeterna_common.db import Database
from aeterna_common.vectors.port import IndexPoint, SparseVector, VectorIndex
from prometheus_client import Gauge, Histogram

from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL
from aeterna_memory.domain.model import SCOPE_FIELDS, Layer

log = structlog.get_logger("aeterna.memory.index")

KEYWORD_FIELDS = ("layer", *SCOPE_FIELDS, "tags")
"""Payload keys with a keyword index."""

FLOAT_FIELDS = ("created_at",)
"""Payload keys with a float index (epoch seconds)."""

INDEX_POSITION = Gauge("aeterna_index_applied_position", "Last outbox position applied.")
INDEX_LAG_WAIT = Histogram(
    "aeterna_index_wait_seconds",
    "Time a search waited for the index to reach the latest committed change.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)

_ROW_COLUMNS = (
    "tenant_id, id, layer, agent_id, user_id, session_id, project_id, team_id, org_id, "
    "company_id, tags, metadata, importance, extract(epoch FROM created_at) AS created_at, "
    "deleted_at, expire_at, content, index_context, embedding"
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
        """Write via a temporary file and rename (atomic on POSIX)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"database": database, "position": position}))
        os.replace(tmp, self.path)


class PostgresCursor:
    """Position of a shared index, in the ``index_cursors`` table."""

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
        """Upsert the position (monotonic: never moves back)."""
        await self.db.pool.execute(
            "INSERT INTO index_cursors (name, position) VALUES ($1, $2) ON CONFLICT (name) "
            "DO UPDATE SET position = greatest(index_cursors.position, EXCLUDED.position), "
            "updated_at = now()",
            self.name,
            position,
        )


def to_point(row: asyncpg.Record, sparse: SparseVector) -> IndexPoint:
    """The index point of a ``memories`` row (selected with the follower's columns)."""
    payload: dict[str, Any] = {
        "tenant_id": row["tenant_id"],
        "layer": Layer(row["layer"]).name,
        "tags": list(row["tags"]),
        "metadata": json.loads(row["metadata"]),
        "importance": row["importance"],
        "created_at": float(row["created_at"]),
    }
    for f in SCOPE_FIELDS:
        if row[f] is not None:
            payload[f] = row[f]
    return IndexPoint(
        id=str(row["id"]), dense=list(row["embedding"]), sparse=sparse, payload=payload
    )


class IndexFollower:
    """Applies committed memory changes to one vector index, in outbox order.

    Args:
        db: Application-role database (reads every tenant in read-only snapshots).
        index: The index to maintain.
        cursor: Where the applied position is kept.
        encode_sparse: ``(content, context) →`` BM25F sparse vector (the lexical encoder).
        dsn: DSN for the LISTEN connection.
        dimension: Dense vector size.
        batch_size: Outbox rows per apply step.
        leader_lock: For a shared index: advisory lock key of the lease; ``None`` in
            embedded mode (every follower applies).
        poll_s: Seconds between polls when no notification arrives (safety net).
    """

    def __init__(
        self,
        db: Database,
        index: VectorIndex,
        cursor: CursorStore,
        encode_sparse: Callable[[str, Sequence[str]], SparseVector],
        *,
        dsn: str,
        dimension: int,
        batch_size: int = 512,
        leader_lock: int | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.db = db
        self.index = index
        self.cursor = cursor
        self.encode_sparse = encode_sparse
        self.dsn = dsn
        self.dimension = dimension
        self.batch_size = batch_size
        self.leader_lock = leader_lock
        self.poll_s = poll_s
        self.applied = 0
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        self._listen: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._leader = leader_lock is None
        self.database = ""

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the index: rebuild it if it was never built, else catch up; then listen."""
        await self.index.ensure_collection(self.dimension)
        self._listen = await asyncpg.connect(self.dsn)
        await self._listen.add_listener(NOTIFY_CHANNEL, self._on_notify)
        if self.leader_lock is not None:
            self._leader = bool(
                await self._listen.fetchval("SELECT pg_try_advisory_lock($1)", self.leader_lock)
            )
        self.database = await self._listen.fetchval(
            "SELECT system_identifier::text || ':' || (SELECT oid FROM pg_database "
            "WHERE datname = current_database())::text FROM pg_control_system()"
        )
        stored = await self.cursor.load(self.database)
        if stored is None and self._leader:
            await self.rebuild()
        else:
            self.applied = stored or 0
            await self.catch_up()
        log.info("index.ready", position=self.applied, leader=self._leader)

    async def close(self) -> None:
        """Stop listening (the index itself is closed by its owner)."""
        if self._listen is not None:
            with contextlib.suppress(Exception):
                await self._listen.close()
            self._listen = None

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Apply changes until cancelled: on each notification, else every ``poll_s``."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            try:
                if not self._leader and self.leader_lock is not None and self._listen:
                    self._leader = bool(
                        await self._listen.fetchval(
                            "SELECT pg_try_advisory_lock($1)", self.leader_lock
                        )
                    )
                await self.catch_up()
            except Exception:  # keep following; the next round retries from the cursor
                log.exception("index.apply_failed", position=self.applied)
                await asyncio.sleep(self.poll_s)

    # ---- applying ----------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Apply everything committed after the applied position.

        Returns:
            The number of outbox rows applied.
        """
        async with self._lock:
            if not self._leader:
                stored = await self.cursor.load(self.database)
                await self._advance(stored or 0)
                return 0
            total = 0
            while True:
                async with self.db.all_tenants_snapshot() as conn:
                    changes = await conn.fetch(
                        "SELECT position, tenant_id, memory_id FROM outbox WHERE position > $1 "
                        "ORDER BY position LIMIT $2",
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
                await self._apply(rows, ids)
                last = int(changes[-1]["position"])
                await self.cursor.save(last, self.database)
                await self._advance(last)
                total += len(changes)

    async def _apply(self, rows: Sequence[asyncpg.Record], ids: Sequence[uuid.UUID]) -> None:
        now = time.time()
        live = [
            r
            for r in rows
            if r["deleted_at"] is None
            and (r["expire_at"] is None or r["expire_at"].timestamp() > now)
        ]
        live_ids = {r["id"] for r in live}
        gone = [str(i) for i in ids if i not in live_ids]
        if live:
            # BM25 encoding is CPU work (a 512-row batch takes tens of milliseconds): off the
            # event loop, so that searches are not held up while a batch is applied.
            points = await asyncio.to_thread(self._points, live)
            await self.index.upsert(points)
        if gone:
            await self.index.delete(gone)

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
        """
        async with self._lock, self.db.all_tenants_snapshot() as conn:
            position = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
            count = 0
            cursor = conn.cursor(
                f"SELECT {_ROW_COLUMNS} FROM memories WHERE deleted_at IS NULL "
                "AND (expire_at IS NULL OR expire_at > now())",
                prefetch=self.batch_size,
            )
            batch: list[asyncpg.Record] = []
            live: set[str] = set()
            async for row in cursor:
                live.add(str(row["id"]))
                batch.append(row)
                if len(batch) >= self.batch_size:
                    await self._apply(batch, [r["id"] for r in batch])
                    count += len(batch)
                    batch = []
            if batch:
                await self._apply(batch, [r["id"] for r in batch])
                count += len(batch)
            # Points the source of truth does not hold as live (e.g. an index left over from
            # another database) go.
            stale = await self.index.all_ids() - live
            if stale:
                await self.index.delete(sorted(stale))
        await self.cursor.save(position, self.database)
        await self._advance(position)
        log.info("index.rebuilt", memories=count, removed=len(stale), position=position)
        return count

    async def reconcile(self) -> dict[str, int]:
        """Repair the index: add live memories it lacks, drop points PostgreSQL does not
        hold as live. Idempotent; safe to run at any time (it re-reads after listing).

        Returns:
            ``{"added": n, "removed": m}``.
        """
        # Serialised with catch_up: a repair never overwrites a newer applied change.
        async with self._lock:
            indexed = await self.index.all_ids()
            async with self.db.all_tenants_snapshot() as conn:
                live_rows = await conn.fetch(
                    "SELECT tenant_id, id FROM memories WHERE deleted_at IS NULL "
                    "AND (expire_at IS NULL OR expire_at > now())"
                )
                live = {str(r["id"]) for r in live_rows}
                absent = live - indexed
                missing_keys = {
                    (r["tenant_id"], r["id"]) for r in live_rows if str(r["id"]) in absent
                }
                missing = [mid for _, mid in missing_keys]
                rows = await _rows(conn, missing_keys) if missing_keys else []
            extra = sorted(indexed - live)
            if rows:
                await self._apply(rows, missing)
            if extra:
                await self.index.delete(extra)
            if missing or extra:
                log.warning("index.reconciled", added=len(missing), removed=len(extra))
            return {"added": len(missing), "removed": len(extra)}

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
            async with self._advanced:
                await asyncio.wait_for(
                    self._advanced.wait_for(lambda: self.applied >= position), timeout_s
                )
            return True
        except TimeoutError:
            log.warning("index.behind", applied=self.applied, wanted=position)
            return False
        finally:
            INDEX_LAG_WAIT.observe(time.perf_counter() - start)
