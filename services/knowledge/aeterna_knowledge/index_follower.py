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
lock per text meanwhile (one transaction per tenant and batch: the locks of a batch are
taken in one statement, its texts embedded together); a follower that meets them stored (or
waited on that lock) reuses them. So the replicas share the embedding work, a rebuild (a
new replica, a lost index directory) never embeds again, and a write's consistency token is
reached only once its item is searchable.

Every replica owns its index directory, its follower and a cursor file beside the index; a
missing index or a cursor of another database is rebuilt from PostgreSQL in one snapshot.
Followers read every tenant's rows as the **indexer** role (SELECT only); writers wake them
with ``NOTIFY`` (:data:`aeterna_knowledge.items.NOTIFY_CHANNEL`), and a poll is the safety
net. The LISTEN connection is re-opened when it drops.

Each follower reports its applied position (``outbox_followers``), and the outbox is trimmed
below every live report (:func:`trim_outbox`, migration 0006). A follower that comes back
behind the trim (its report expired) rebuilds its index from PostgreSQL instead of skipping
the trimmed changes.

A periodic :meth:`KnowledgeIndexFollower.reconcile` compares the index with PostgreSQL and
repairs what differs, and :meth:`KnowledgeIndexFollower.build_graph` builds the index's HNSW
graphs on a copy without blocking searches (:func:`aeterna_common.vectors.follow.
build_graph_on_copy`; memory's follower still has its own copy of that sequence).

Catching up is a pipeline of two stages: while one batch's points are BM25-encoded and
written to the index (Python, holding the GIL), the next batch is read, chunked and embedded
(ONNX Runtime, releasing it). Batches are applied to the index in outbox order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import structlog
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import leases, usage
from aeterna_common.db import Database
from aeterna_common.embedding import EmbeddingPort, Embeddings
from aeterna_common.vectors.follow import FileCursor, build_graph_on_copy
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


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch ready for the index: each current item with its chunks, and the point ids
    that must go (gone items, ordinals past an item's chunk count)."""

    indexed: list[tuple[asyncpg.Record, list[ChunkRow]]]
    doomed: list[str]


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
        embed_parallel: Embedding calls one batch's texts are split into, run concurrently
            (set it to the embedder's number of document sessions: each call holds one).
        pipelined: Overlap the embedding of a batch with the index writes of the previous
            one (``False`` applies one batch after the other: the benchmark's baseline).
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
        embed_parallel: int = 1,
        pipelined: bool = True,
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
        self.embed_parallel = max(1, embed_parallel)
        self.pipelined = pipelined
        self.applied = 0
        self.database = ""
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        self._listen: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._rebuilds = 0
        self._hold: int | None = None

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
        """Apply everything committed after the applied position, or rebuild the index when
        the outbox was trimmed past it.

        Returns:
            The number of outbox rows applied.
        """
        async with self._lock:
            total = 0
            read_to = self.applied
            indexing: asyncio.Task[None] | None = None
            try:
                while True:
                    async with self.indexer.all_tenants_snapshot() as conn:
                        trimmed = int(
                            await conn.fetchval("SELECT upto FROM outbox_trim WHERE id = 1") or 0
                        )
                        # Changes after our position were trimmed while our report had
                        # expired: rebuild (in its own snapshot) instead of skipping them.
                        behind = trimmed > read_to
                        if not behind:
                            changes = await conn.fetch(
                                "SELECT position, resource FROM outbox WHERE position > $1 "
                                "ORDER BY position LIMIT $2",
                                read_to,
                                self.batch_size,
                            )
                            if not changes:
                                return total
                            ids = list(
                                {i for c in changes if (i := item_id_of(c["resource"])) is not None}
                            )
                            rows, stored = await self._read(conn, ids)
                    if behind:
                        if indexing is not None:
                            await indexing
                            indexing = None
                        log.warning("index.behind_outbox_trim", applied=read_to, trimmed=trimmed)
                        await self._rebuild_locked()
                        return total
                    # Stage 1 (this task): chunk, embed and store the batch while stage 2
                    # still writes the previous batch's points.
                    prepared = await self._prepare(rows, stored, ids)
                    read_to = int(changes[-1]["position"])
                    if indexing is not None:
                        await indexing
                    indexing = asyncio.create_task(self._index_batch(prepared, read_to))
                    if not self.pipelined:
                        await indexing
                        indexing = None
                    total += len(changes)
            finally:
                if indexing is not None:
                    await indexing

    async def _index_batch(self, prepared: Prepared, position: int) -> None:
        """Stage 2 of catching up: write a prepared batch's points, then record and announce
        ``position``."""
        await self._write_points(self.index, prepared)
        await self.cursor.save(position, self.database)
        await self._advance(position)

    async def rebuild(self) -> int:
        """Rebuild the index from PostgreSQL in one snapshot (stored vectors are reused;
        only texts without stored chunks are embedded).

        Returns:
            The number of items indexed.
        """
        async with self._lock:
            return await self._rebuild_locked()

    async def _rebuild_locked(self) -> int:
        self._rebuilds += 1
        async with self.indexer.all_tenants_snapshot() as conn:
            position = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
            # Nothing trimmed yet reads as position 0: a rebuild covers everything committed.
            position = max(
                position,
                int(await conn.fetchval("SELECT upto FROM outbox_trim WHERE id = 1") or 0),
            )
            ids = [r["id"] for r in await conn.fetch("SELECT id FROM knowledge_items")]
            live: set[str] = set()
            for start in range(0, len(ids), self.batch_size):
                chunk_ids = ids[start : start + self.batch_size]
                rows, stored = await self._read(conn, chunk_ids)
                live |= await self._apply(self.index, rows, stored, chunk_ids, fresh=True)
        stale = await self.index.all_ids() - live
        if stale:
            await self.index.delete(sorted(stale))
        await self.cursor.save(position, self.database)
        await self._advance(position)
        log.info("index.rebuilt", items=len(ids), removed=len(stale), position=position)
        return len(ids)

    async def build_graph(self, min_unindexed: int) -> bool:
        """Build the index's HNSW graphs on a copy without blocking searches, when at least
        ``min_unindexed`` points lack one (:func:`aeterna_common.vectors.follow.
        build_graph_on_copy`). Until the copy is swapped in, this follower reports the
        position the copy began at, so the outbox changes to replay into it are not trimmed.

        Args:
            min_unindexed: Least number of points without a graph that starts a build.

        Returns:
            Whether a copy was built and swapped in.
        """
        self._hold = self.applied
        try:
            return await build_graph_on_copy(
                self.index,
                self._lock,
                lambda: self.applied,
                lambda: self._rebuilds,
                self._replay,
                min_unindexed,
            )
        finally:
            self._hold = None

    async def _replay(self, index: VectorIndex, after: int, upto: int) -> int:
        """Apply the outbox changes in ``(after, upto]`` to ``index`` (a copy being built);
        returns the position reached."""
        position = after
        while position < upto:
            async with self.indexer.all_tenants_snapshot() as conn:
                changes = await conn.fetch(
                    "SELECT position, resource FROM outbox WHERE position > $1 "
                    "AND position <= $2 ORDER BY position LIMIT $3",
                    position,
                    upto,
                    self.batch_size,
                )
                if not changes:
                    return upto
                ids = list({i for c in changes if (i := item_id_of(c["resource"])) is not None})
                rows, stored = await self._read(conn, ids)
            await self._apply(index, rows, stored, ids)
            position = int(changes[-1]["position"])
        return position

    async def reconcile(self) -> dict[str, int]:
        """Repair the index: compare it with PostgreSQL and re-apply the current state of
        every item that differs. Idempotent.

        An item differs when the index holds none of its chunks, holds a chunk of another
        version, or holds another number of chunks than PostgreSQL stores for it; an item
        the index holds that PostgreSQL does not is removed. The comparison runs outside the
        apply lock (catching up and searches go on); only the repair takes it, re-reading
        the items' current rows, so it never overwrites a newer applied change. Items whose
        current text has no stored chunks yet are left to the outbox.

        Returns:
            ``{"added": a, "updated": u, "removed": r}``: items the index lacked, held out of
            date, or held though gone (counted before the re-read).
        """
        versions = await self.index.payload_values("version")
        owners = await self.index.payload_values("item_id")
        indexed: dict[str, tuple[set[int], int]] = {}
        for point, item in owners.items():
            seen, count = indexed.get(str(item), (set(), 0))
            version = versions.get(point)
            seen.add(int(version) if version is not None else -1)
            indexed[str(item)] = (seen, count + 1)
        async with self.indexer.all_tenants_snapshot() as conn:
            rows = await conn.fetch(
                "SELECT i.id, i.version, (SELECT count(*) FROM knowledge_chunks c "
                "WHERE c.tenant_id = i.tenant_id AND c.item_id = i.id "
                "AND c.embedding_model = $1) AS chunks FROM knowledge_items i",
                self.embedder.model,
            )
        live = {str(r["id"]): (int(r["version"]), int(r["chunks"])) for r in rows}
        added = [i for i, (_, chunks) in live.items() if chunks and i not in indexed]
        updated = [
            i
            for i, (version, chunks) in live.items()
            if i in indexed and chunks and indexed[i] != ({version}, chunks)
        ]
        removed = [i for i in indexed if i not in live]
        empty = {"added": 0, "updated": 0, "removed": 0}
        if not (added or updated or removed):
            return empty
        differing: list[uuid.UUID] = []
        doomed: list[str] = []
        for i in [*added, *updated, *removed]:
            try:
                differing.append(uuid.UUID(i))
            except ValueError:
                # Not an item id of ours: drop its points.
                doomed.extend(p for p, item in owners.items() if str(item) == i)
        async with self._lock:
            for start in range(0, len(differing), self.batch_size):
                part = differing[start : start + self.batch_size]
                async with self.indexer.all_tenants_snapshot() as conn:
                    found, stored = await self._read(conn, part)
                await self._apply(self.index, found, stored, part)
            if doomed:
                await self.index.delete(sorted(doomed))
        result = {"added": len(added), "updated": len(updated), "removed": len(removed)}
        log.warning("index.reconciled", **result)
        return result

    async def report_position(self, name: str, ttl_s: float) -> None:
        """Report this follower's applied position for the outbox trim (``outbox_followers``,
        expiring after ``ttl_s`` seconds unless reported again). While a graph build is in
        progress, the position its copy began at is reported instead.

        Args:
            name: This follower's name (unique per replica process).
            ttl_s: Seconds until the report expires.
        """
        position = self.applied if self._hold is None else min(self._hold, self.applied)
        async with self.db.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO outbox_followers (name, position, expires_at) "
                "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                "ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, "
                "expires_at = EXCLUDED.expires_at",
                name,
                position,
                ttl_s,
            )

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
        index: VectorIndex,
        rows: Sequence[asyncpg.Record],
        stored: dict[tuple[uuid.UUID, str], list[ChunkRow]],
        ids: Sequence[uuid.UUID],
        *,
        fresh: bool = False,
    ) -> set[str]:
        """Make ``index`` hold the current chunks of ``ids`` (``rows``: their current rows;
        an id without a row is gone). ``fresh``: the index holds none of their points yet
        (a rebuild), so no stale ordinals are deleted.

        Returns:
            The point ids now indexed for these items.
        """
        return await self._write_points(index, await self._prepare(rows, stored, ids, fresh=fresh))

    async def _prepare(
        self,
        rows: Sequence[asyncpg.Record],
        stored: dict[tuple[uuid.UUID, str], list[ChunkRow]],
        ids: Sequence[uuid.UUID],
        *,
        fresh: bool = False,
    ) -> Prepared:
        """The chunks of the current texts of ``rows`` (embedded and stored where missing)
        and the point ids of ``ids`` to delete (see :meth:`_apply`)."""
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
        return Prepared(indexed, doomed)

    async def _write_points(self, index: VectorIndex, prepared: Prepared) -> set[str]:
        """Write a prepared batch to ``index``; returns the point ids written."""
        # BM25 encoding is pure Python: off the event loop.
        points = await asyncio.to_thread(
            lambda: [self._point(row, c) for row, chunks in prepared.indexed for c in chunks]
        )
        if points:
            await index.upsert(points)
        if prepared.doomed:
            await index.delete(prepared.doomed)
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
                # One round trip for every lock, taken in the rows' (id) order: two followers
                # meeting overlapping batches lock in the same order and never deadlock.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                    "FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n)",
                    [f"knowledge-chunks:{r['id']}:{digests[r['id']]}:{model}" for r in tenant_rows],
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
                embedded = await self._embed(texts)
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
                if todo:
                    # The chunk sets of the items' older texts go, in one statement.
                    await conn.execute(
                        "DELETE FROM knowledge_chunks c USING unnest($2::uuid[], $3::text[]) "
                        "AS t(item_id, source_hash) WHERE c.tenant_id = $1 "
                        "AND c.item_id = t.item_id AND c.source_hash <> t.source_hash",
                        tenant_id,
                        [r["id"] for r in todo],
                        [digests[r["id"]] for r in todo],
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

    async def _embed(self, texts: list[str]) -> Embeddings:
        """Vectors of ``texts`` in order with their token counts, in up to ``embed_parallel``
        concurrent calls of similar length (the embedder sorts each call's texts by length)."""
        if not texts:
            return Embeddings()
        parts = min(self.embed_parallel, max(1, len(texts) // 32))
        if parts == 1:
            return await self.embedder.embed(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        # Interleaved slices of the length order: each call gets short and long texts alike.
        slices = [order[k::parts] for k in range(parts)]
        results = await asyncio.gather(
            *(self.embedder.embed([texts[i] for i in part]) for part in slices)
        )
        out: list[list[float]] = [[] for _ in texts]
        tokens = [0] * len(texts)
        for part, vectors in zip(slices, results, strict=True):
            for k, i in enumerate(part):
                out[i] = vectors[k]
                tokens[i] = vectors.tokens[k]
        return Embeddings(out, tokens)

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


async def trim_outbox(db: Database, lease: leases.Lease | None = None, *, batch: int = 5000) -> int:
    """Delete the outbox rows every live follower has applied (``trim_outbox()`` of migration
    0006: at or below the smallest unexpired report in ``outbox_followers``, the replicas'
    index followers and the event relay), one bounded batch per transaction.

    Args:
        db: Application-role database.
        lease: The job's lease (``knowledge:outbox:trim``); checked in each batch's
            transaction.
        batch: Rows per transaction (at most 10,000).

    Returns:
        How many rows were deleted.

    Raises:
        aeterna_common.leases.LeaseLostError: The lease was lost; what committed stays.
    """
    total = 0
    while True:
        async with db.pool.acquire() as conn, conn.transaction():
            if lease is not None:
                await leases.check(cast(asyncpg.Connection, conn), lease)
            deleted = int(await conn.fetchval("SELECT trim_outbox($1)", batch))
        total += deleted
        if deleted < batch:
            break
    if total:
        log.info("index.outbox_trimmed", rows=total)
    return total
