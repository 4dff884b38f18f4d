"""Keeps each replica's embedded search index equal to PostgreSQL by following the outbox
(the pattern of memory's ``adapters/index_follower.py``, embedded mode).

PostgreSQL holds every item and, in ``knowledge_chunks``, the chunks of its current text with
their embedding vectors; a replica's index is a view derived from them. The follower reads
outbox positions in order (they become visible in commit order, see
:mod:`aeterna_common.writes`), re-reads the *current* state of each changed item and makes
the index hold exactly its chunks, or none when the item is gone. Applying the current state
makes every step idempotent: replaying a change is harmless.

Vectors are made once per text: an item whose current text (:func:`source_hash`) has no
stored chunks is chunked and embedded by the first follower that meets it, which stores the
chunks under the tenant (application role, RLS) before indexing them, holding an advisory
lock per text meanwhile; a follower that meets them stored (or waited on that lock) reuses
them. So the replicas share the embedding work, a rebuild (a new replica, a lost index
directory) never embeds again, and a write's consistency token is reached only once its
item is searchable.

Every replica owns its index directory, its follower and a cursor file beside the index; a
missing index or a cursor of another database is rebuilt from PostgreSQL in one snapshot.
Followers read every tenant's rows as the **indexer** role (SELECT only); writers wake them
with ``NOTIFY`` (:data:`aeterna_knowledge.items.NOTIFY_CHANNEL`), and a poll is the safety
net. The LISTEN connection is re-opened when it drops.

Knowledge's outbox is not trimmed (no job deletes its rows), so a follower never falls
behind a trim; memory's follower handles that case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import usage
from aeterna_common.db import Database
from aeterna_common.embedding import EmbeddingPort
from aeterna_common.vectors.port import IndexPoint, SparseVector, VectorIndex
from prometheus_client import Gauge

from aeterna_knowledge.items import NOTIFY_CHANNEL
from aeterna_knowledge.search_chunks import (
    MAX_CHUNKS,
    Chunk,
    chunk_item,
    chunk_point_id,
    chunk_text,
    source_hash,
)

log = structlog.get_logger("aeterna.knowledge.index")

KEYWORD_FIELDS = ("item_id", "type", "layer", "status", "org_unit_id", "tags")
"""Payload keys with a keyword index (the search filters)."""

FLOAT_FIELDS = ("updated_at",)
"""Payload keys with a float index (epoch seconds)."""

INDEX_POSITION = Gauge(
    "aeterna_knowledge_index_applied_position", "Last outbox position the search index applied."
)

_ITEM_COLUMNS = (
    "tenant_id, id, type, layer, org_unit_id, title, summary, content, status, tags, "
    "variant_role, version, extract(epoch FROM updated_at) AS updated_at"
)


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``ACCEPTED`` for ``KNOWLEDGE_STATUS_ACCEPTED``: the keyword stored in the payload."""
    return str(enum.Name(value)).removeprefix(prefix)


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A stored chunk with its vector."""

    chunk: Chunk
    embedding: Sequence[float]


class FileCursor:
    """The applied position in a JSON file beside an embedded index, with the id of the
    database it belongs to (written atomically; memory's ``FileCursor``)."""

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
        """Write via a temporary file and rename (atomic on POSIX), off the event loop."""
        await asyncio.to_thread(self._save, position, database)

    def _save(self, position: int, database: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"database": database, "position": position}))
        os.replace(tmp, self.path)


def item_id_of(resource: str) -> uuid.UUID | None:
    """The item id of an outbox ``resource`` (``tenants/{t}/knowledgeItems/{id}[/...]``)."""
    parts = resource.split("/")
    if len(parts) >= 4 and parts[2] == "knowledgeItems":
        with contextlib.suppress(ValueError):
            return uuid.UUID(parts[3])
    return None


class KnowledgeIndexFollower:
    """Applies committed item changes to one replica's vector index, in outbox order.

    Args:
        db: Application-role database: stores the chunks an item's new text gets (under its
            tenant) and reads a tenant's latest position.
        indexer: Indexer-role database: reads the outbox, items and chunks of every tenant
            in read-only snapshots.
        index: The replica's index.
        cursor: Where the applied position is kept (beside the index).
        embedder: Embeds the chunks of texts that have none stored.
        encode_sparse: ``text →`` BM25 document vector.
        dsn: DSN of the LISTEN connection (the indexer role's).
        batch_size: Outbox rows (or items, in a rebuild) per step.
        poll_s: Seconds between polls when no notification arrives.
    """

    def __init__(
        self,
        db: Database,
        indexer: Database,
        index: VectorIndex,
        cursor: FileCursor,
        embedder: EmbeddingPort,
        encode_sparse: Callable[[str], SparseVector],
        *,
        dsn: str,
        batch_size: int = 256,
        poll_s: float = 1.0,
    ) -> None:
        self.db = db
        self.indexer = indexer
        self.index = index
        self.cursor = cursor
        self.embedder = embedder
        self.encode_sparse = encode_sparse
        self.dsn = dsn
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.applied = 0
        self.database = ""
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        self._listen: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the index: rebuild it if it was never built from this database, else
        catch up; then listen."""
        await self.index.ensure_collection(self.embedder.dimension)
        await self._connect_listener()
        assert self._listen is not None
        self.database = await self._listen.fetchval(
            "SELECT system_identifier::text || ':' || (SELECT oid FROM pg_database "
            "WHERE datname = current_database())::text FROM pg_control_system()"
        )
        stored = await self.cursor.load(self.database)
        if stored is None:
            await self.rebuild()
        else:
            self.applied = stored
            await self.catch_up()
        log.info("index.ready", position=self.applied)

    async def close(self) -> None:
        """Stop listening (the index itself is closed by its owner)."""
        if self._listen is not None:
            with contextlib.suppress(Exception):
                # Our own close is no lost connection.
                self._listen.remove_termination_listener(self._on_listener_lost)
                await self._listen.close()
            self._listen = None

    async def _connect_listener(self) -> None:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_listener_lost)
        self._listen = conn

    def _on_listener_lost(self, conn: Any) -> None:
        log.warning("index.listener_lost")
        self._wake.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Apply changes until cancelled: on each notification, else every ``poll_s``;
        re-open a dropped LISTEN connection (and catch up: notifications were lost)."""
        while True:
            connected = self._listen is not None and not self._listen.is_closed()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s if connected else min(self.poll_s, 0.5)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self._listen is None or self._listen.is_closed():
                    await self._connect_listener()
                await self.catch_up()
            except Exception:  # keep following; the next round retries from the cursor
                log.exception("index.apply_failed", position=self.applied)
                await asyncio.sleep(min(self.poll_s, 1.0))

    # ---- applying ----------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Apply everything committed after the applied position.

        Returns:
            The number of outbox rows applied.
        """
        async with self._lock:
            total = 0
            while True:
                async with self.indexer.all_tenants_snapshot() as conn:
                    changes = await conn.fetch(
                        "SELECT position, resource FROM outbox WHERE position > $1 "
                        "ORDER BY position LIMIT $2",
                        self.applied,
                        self.batch_size,
                    )
                    if not changes:
                        return total
                    ids = list({i for c in changes if (i := item_id_of(c["resource"])) is not None})
                    rows, stored = await self._read(conn, ids)
                await self._apply(rows, stored, ids)
                last = int(changes[-1]["position"])
                await self.cursor.save(last, self.database)
                await self._advance(last)
                total += len(changes)

    async def rebuild(self) -> int:
        """Rebuild the index from PostgreSQL in one snapshot (stored vectors are reused;
        only texts without stored chunks are embedded).

        Returns:
            The number of items indexed.
        """
        async with self._lock:
            async with self.indexer.all_tenants_snapshot() as conn:
                position = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
                ids = [r["id"] for r in await conn.fetch("SELECT id FROM knowledge_items")]
                live: set[str] = set()
                for start in range(0, len(ids), self.batch_size):
                    chunk_ids = ids[start : start + self.batch_size]
                    rows, stored = await self._read(conn, chunk_ids)
                    live |= await self._apply(rows, stored, chunk_ids, fresh=True)
            stale = await self.index.all_ids() - live
            if stale:
                await self.index.delete(sorted(stale))
            await self.cursor.save(position, self.database)
        await self._advance(position)
        log.info("index.rebuilt", items=len(ids), removed=len(stale), position=position)
        return len(ids)

    async def _read(
        self, conn: asyncpg.Connection, ids: Sequence[uuid.UUID]
    ) -> tuple[list[asyncpg.Record], dict[tuple[uuid.UUID, str], list[ChunkRow]]]:
        """Current rows of the items ``ids`` and their stored chunks of this embedder's
        model, by ``(item id, source hash)``."""
        if not ids:
            return [], {}
        rows = list(
            await conn.fetch(
                f"SELECT {_ITEM_COLUMNS} FROM knowledge_items WHERE id = ANY($1::uuid[])", ids
            )
        )
        chunks = await conn.fetch(
            "SELECT item_id, source_hash, ordinal, heading, body, embedding "
            "FROM knowledge_chunks WHERE item_id = ANY($1::uuid[]) AND embedding_model = $2 "
            "ORDER BY item_id, source_hash, ordinal",
            ids,
            self.embedder.model,
        )
        stored: dict[tuple[uuid.UUID, str], list[ChunkRow]] = {}
        for c in chunks:
            stored.setdefault((c["item_id"], c["source_hash"]), []).append(
                ChunkRow(Chunk(c["ordinal"], c["heading"], c["body"]), c["embedding"])
            )
        return rows, stored

    async def _apply(
        self,
        rows: Sequence[asyncpg.Record],
        stored: dict[tuple[uuid.UUID, str], list[ChunkRow]],
        ids: Sequence[uuid.UUID],
        *,
        fresh: bool = False,
    ) -> set[str]:
        """Make the index hold the current chunks of ``ids`` (``rows``: their current rows;
        an id without a row is gone). ``fresh``: the index holds none of their points yet
        (a rebuild), so no stale ordinals are deleted.

        Returns:
            The point ids now indexed for these items.
        """
        indexed: list[tuple[asyncpg.Record, list[ChunkRow]]] = []
        doomed: list[str] = []
        present = {r["id"] for r in rows}
        for item_id in ids:
            if item_id not in present and not fresh:
                doomed.extend(chunk_point_id(item_id, i) for i in range(MAX_CHUNKS))
        digests = {r["id"]: source_hash(r["title"], r["summary"], r["content"]) for r in rows}
        made = await self._embed_and_store(
            [r for r in rows if (r["id"], digests[r["id"]]) not in stored]
        )
        for row in rows:
            # An item deleted meanwhile gets no chunks (and loses its points).
            chunks = stored.get((row["id"], digests[row["id"]])) or made.get(row["id"], [])
            indexed.append((row, chunks))
            if not fresh:
                doomed.extend(chunk_point_id(row["id"], i) for i in range(len(chunks), MAX_CHUNKS))
        # BM25 encoding is pure Python: off the event loop.
        points = await asyncio.to_thread(
            lambda: [self._point(row, c) for row, chunks in indexed for c in chunks]
        )
        if points:
            await self.index.upsert(points)
        if doomed:
            await self.index.delete(doomed)
        return {p.id for p in points}

    async def _embed_and_store(
        self, rows: Sequence[asyncpg.Record]
    ) -> dict[uuid.UUID, list[ChunkRow]]:
        """The chunks of the current texts of ``rows``, embedding and storing those that no
        other follower has stored meanwhile.

        Per tenant, one transaction takes an advisory lock per (item, text) in a fixed order,
        reads the chunks stored under it, embeds the texts still missing (one embedding call)
        and stores them, replacing the chunk sets of the items' older texts, and bills the
        embedding (calls and tokens, :mod:`aeterna_common.usage`) with them. Another replica's
        follower meeting the same texts waits on the locks and then finds the rows: each text
        is embedded once however many replicas follow the outbox.

        Returns:
            Item id → its chunks with their vectors (items deleted meanwhile are left out).
        """
        if not rows:
            return {}
        # Markdown parsing of up to 256 KiB per item: off the event loop.
        cut = await asyncio.to_thread(
            lambda: {r["id"]: chunk_item(r["title"], r["summary"], r["content"]) for r in rows}
        )
        model = self.embedder.model
        made: dict[uuid.UUID, list[ChunkRow]] = {}
        by_tenant: dict[str, list[asyncpg.Record]] = {}
        for r in rows:
            by_tenant.setdefault(r["tenant_id"], []).append(r)
        for tenant_id in sorted(by_tenant):
            tenant_rows = sorted(by_tenant[tenant_id], key=lambda r: r["id"])

            async def work(
                conn: asyncpg.Connection,
                tenant_id: str = tenant_id,
                tenant_rows: list[asyncpg.Record] = tenant_rows,
            ) -> dict[uuid.UUID, list[ChunkRow]]:
                digests = {
                    r["id"]: source_hash(r["title"], r["summary"], r["content"])
                    for r in tenant_rows
                }
                for r in tenant_rows:
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        f"knowledge-chunks:{r['id']}:{digests[r['id']]}:{model}",
                    )
                ids = [r["id"] for r in tenant_rows]
                live = {
                    x["id"]
                    for x in await conn.fetch(
                        "SELECT id FROM knowledge_items WHERE tenant_id = $1 "
                        "AND id = ANY($2::uuid[])",
                        tenant_id,
                        ids,
                    )
                }
                found: dict[uuid.UUID, list[ChunkRow]] = {}
                for c in await conn.fetch(
                    "SELECT item_id, source_hash, ordinal, heading, body, embedding "
                    "FROM knowledge_chunks WHERE tenant_id = $1 AND item_id = ANY($2::uuid[]) "
                    "AND embedding_model = $3 ORDER BY item_id, ordinal",
                    tenant_id,
                    ids,
                    model,
                ):
                    if c["source_hash"] == digests[c["item_id"]]:
                        found.setdefault(c["item_id"], []).append(
                            ChunkRow(Chunk(c["ordinal"], c["heading"], c["body"]), c["embedding"])
                        )
                todo = [r for r in tenant_rows if r["id"] in live and r["id"] not in found]
                texts = [chunk_text(r["title"], c) for r in todo for c in cut[r["id"]]]
                embedded = await self.embedder.embed(texts)
                # Billed in this transaction, which stores the chunks under their locks: a
                # text is embedded, stored and billed once however many replicas follow.
                await usage.record_usage(
                    conn,
                    tenant_id,
                    {
                        usage.EMBEDDING_CALLS: len(texts),
                        usage.EMBEDDING_TOKENS: embedded.total_tokens,
                    },
                )
                vectors = iter(embedded)
                fresh = {r["id"]: [ChunkRow(c, next(vectors)) for c in cut[r["id"]]] for r in todo}
                for r in todo:
                    await conn.execute(
                        "DELETE FROM knowledge_chunks WHERE tenant_id = $1 AND item_id = $2 "
                        "AND source_hash <> $3",
                        tenant_id,
                        r["id"],
                        digests[r["id"]],
                    )
                await conn.executemany(
                    "INSERT INTO knowledge_chunks (tenant_id, item_id, source_hash, "
                    "embedding_model, ordinal, point_id, heading, body, embedding) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                    [
                        (
                            tenant_id,
                            item_id,
                            digests[item_id],
                            model,
                            c.chunk.ordinal,
                            uuid.UUID(chunk_point_id(item_id, c.chunk.ordinal)),
                            c.chunk.heading,
                            c.chunk.body,
                            c.embedding,
                        )
                        for item_id, chunks in fresh.items()
                        for c in chunks
                    ],
                )
                return {**found, **fresh}

            made.update(await self.db.run(tenant_id, work))
        return made

    def _point(self, row: asyncpg.Record, stored: ChunkRow) -> IndexPoint:
        chunk = stored.chunk
        return IndexPoint(
            id=chunk_point_id(row["id"], chunk.ordinal),
            dense=list(stored.embedding),
            sparse=self.encode_sparse(chunk_text(row["title"], chunk)),
            payload={
                "tenant_id": row["tenant_id"],
                "item_id": str(row["id"]),
                "ordinal": chunk.ordinal,
                "type": enum_name(res.KnowledgeType, row["type"], "KNOWLEDGE_TYPE_"),
                "layer": enum_name(res.KnowledgeLayer, row["layer"], "KNOWLEDGE_LAYER_"),
                "status": enum_name(res.KnowledgeStatus, row["status"], "KNOWLEDGE_STATUS_"),
                "org_unit_id": row["org_unit_id"],
                "tags": list(row["tags"]),
                "variant_role": int(row["variant_role"]),
                "version": int(row["version"]),
                "updated_at": float(row["updated_at"]),
            },
        )

    async def _advance(self, position: int) -> None:
        if position <= self.applied:
            return
        self.applied = position
        INDEX_POSITION.set(position)
        async with self._advanced:
            self._advanced.notify_all()

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Wait until the index has applied ``position``.

        Args:
            position: An outbox position (a consistency token's, or a tenant's latest).
            timeout_s: Upper bound of the wait in seconds.

        Returns:
            Whether the position was reached in time.
        """
        if self.applied >= position:
            return True
        self._wake.set()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s), self._advanced:
                await self._advanced.wait_for(lambda: self.applied >= position)
            return True
        except TimeoutError:
            log.warning(
                "index.behind",
                applied=self.applied,
                wanted=position,
                waited_s=round(time.perf_counter() - started, 3),
            )
            return False
