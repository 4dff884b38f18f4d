"""Vector index adapter on ``qdrant-edge-py`` (Qdrant's embedded engine, one shard per process).

The engine is synchronous; every call runs in a worker thread. Its queries release the GIL
and are safe from several threads, and an ``update`` does not block queries, so no lock is
taken around reads. ``optimize()`` does block queries while it runs.

Measured here (qdrant-edge 0.9): ``update``, ``flush``, ``close`` and ``EdgeShard.load`` hold
the GIL for their whole run (about 23 µs per upserted 384-d point; 0.35 s to load a 5,000
point shard), so while one runs no other thread of the process, the event loop included,
runs Python. Writes therefore go to the engine in chunks of at most ``write_chunk`` points
(a few milliseconds each), from a writer thread of their own, so that searches (which use
the default executor) are held up by at most one chunk and never wait for a free worker
behind index maintenance.

A shard directory can be opened by one process (one :class:`EdgeVectorIndex`) at a time: the
write-ahead log is locked. The WAL is always on: without it nothing is locked and unflushed
updates are lost on a crash.

HNSW graphs are built without blocking queries: :meth:`EdgeVectorIndex.build_copy` fills a
second shard directory (a new *generation*) from the live shard's points and runs
``optimize()`` on that copy while the live shard keeps answering; the caller brings the copy up
to date and :meth:`EdgeVectorIndex.swap_in` makes it the live shard. The active generation is
named in a pointer file beside the index (``<path>.active``, written atomically), so a restart
opens the swapped shard and a crash mid-build leaves the previous one in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import qdrant_edge as qe

from aeterna_common.vectors.filters import (
    TENANT_FIELD,
    IdfScope,
    normalize_id,
    sparse_parts,
    tenant_filter,
    translate,
)
from aeterna_common.vectors.port import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    IndexFilter,
    IndexPoint,
    ScoredId,
    SparseVector,
)

WRITE_CHUNK = 256
"""Default most points per engine ``update`` call (see the module docstring)."""

_EDGE_SCROLL_PAGE = 1024
"""Ids or payload values listed per engine ``scroll`` call (the GIL is held for each)."""


class VectorIndexLockedError(RuntimeError):
    """The shard directory is already open (in this or another process)."""


class _EdgeBuilder:
    """:class:`~aeterna_common.vectors.filters.FilterBuilder` for ``qdrant_edge``."""

    def match_value(self, key: str, value: str | int | bool) -> Any:
        return qe.FieldCondition(key, match=qe.MatchValue(value))

    def match_any(self, key: str, values: list[str] | list[int]) -> Any:
        return qe.FieldCondition(key, match=qe.MatchAny(values))

    def range(self, key: str, gte: float | None, lte: float | None) -> Any:
        return qe.FieldCondition(key, range=qe.RangeFloat(gte=gte, lte=lte))

    def filter(self, must: Sequence[Any], should: Sequence[Any], must_not: Sequence[Any]) -> Any:
        return qe.Filter(
            must=list(must) or None, should=list(should) or None, must_not=list(must_not) or None
        )


_BUILDER = _EdgeBuilder()


@dataclass(frozen=True, slots=True)
class EdgeTuning:
    """Index and optimizer settings of an edge shard.

    The defaults are the configuration measured by ``bench/bench_vectors.py`` (100k x 384-d
    clustered random points, one tenant, 2 cores; ``bench/results/vectors.json``): after
    ``optimize()`` (168 s) dense p95 6.2 ms unfiltered, 5.5 ms on layer+tags, 3.0 ms on
    user_id; m=16/ef=128 built in 50 s but reached recall@10 0.61 unfiltered vs 0.88 here.

    Attributes:
        hnsw_m: HNSW edges per node (Qdrant default 16).
        hnsw_ef_construct: HNSW build candidates (Qdrant default 100).
        full_scan_threshold_kb: Below this many KB of vectors matching a filter, a segment is
            scanned exactly instead of walking the graph (Qdrant default 10000).
        payload_m: HNSW edges per node in the per-tenant subgraphs built for ``is_tenant``
            fields; ``None`` keeps Qdrant's default (``hnsw_m``).
        hnsw_ef: Search-time beam width; ``None`` uses Qdrant's default (``ef_construct``).
        indexing_threshold_kb: Segments above this many KB of vectors get an HNSW graph when
            :meth:`EdgeVectorIndex.optimize` runs (Qdrant default 10000, i.e. about 6.5k
            384-d float32 vectors).
        max_segment_size_kb: Upper bound of an optimized segment; ``None`` lets Qdrant derive it.
        default_segment_number: Target number of segments; 0 lets Qdrant derive it from CPUs.
        field_hnsw: Build extra HNSW links per value of the keyword/float payload indexes
            (Qdrant ``enable_hnsw``) when optimizing. Helps mid-selectivity filters, costs
            optimize time; the tenant field always gets them.

    """

    hnsw_m: int = 32
    hnsw_ef_construct: int = 200
    full_scan_threshold_kb: int = 10_000
    payload_m: int | None = None
    hnsw_ef: int | None = 256
    indexing_threshold_kb: int = 10_000
    max_segment_size_kb: int | None = None
    default_segment_number: int = 0
    field_hnsw: bool = False


class EdgeVectorIndex:
    """:class:`~aeterna_common.vectors.port.VectorIndex` on an embedded Qdrant edge shard.

    Args:
        path: Shard directory; created on :meth:`ensure_collection` if it holds no shard.
        keyword_fields: Payload keys indexed as keywords (dotted paths allowed, e.g.
            ``metadata.speaker``); ``tenant_id`` is always indexed, with ``is_tenant=True``.
        float_fields: Payload keys indexed as floats (range filters), e.g. ``created_at``.
        tuning: HNSW and optimizer settings; defaults to :class:`EdgeTuning`.
        idf_scope: ``"tenant"`` (default) computes the sparse IDF over the searching tenant's
            points, so one tenant's documents never change another's scores; ``"collection"``
            uses the engine's global statistics, which keep counting deleted points.
        write_chunk: Most points per engine ``update`` call (the engine holds the GIL for the
            whole call: 256 points is about 6 ms on this project's machines).

    Point ids are UUID strings and come back in canonical lower-case form.

    """

    def __init__(
        self,
        path: str,
        keyword_fields: Sequence[str],
        float_fields: Sequence[str] = (),
        *,
        tuning: EdgeTuning | None = None,
        idf_scope: IdfScope = "tenant",
        write_chunk: int = WRITE_CHUNK,
    ) -> None:
        if write_chunk < 1:
            raise ValueError(f"write_chunk must be >= 1, got {write_chunk}")
        self._path = os.path.abspath(path)
        self._write_chunk = write_chunk
        # Writes and shard maintenance have a thread of their own (one: the engine applies
        # updates one at a time anyway), so they never occupy the default executor's workers
        # that searches run on. It keeps the process's priority: it holds the GIL, and a
        # lowered thread preempted while holding it would stall the event loop.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="edge-writes")
        self._keyword_fields = tuple(dict.fromkeys(f for f in keyword_fields if f != TENANT_FIELD))
        self._float_fields = tuple(dict.fromkeys(float_fields))
        self._tuning = tuning or EdgeTuning()
        self._idf_scope: IdfScope = idf_scope
        self._shard: Any = None
        self._closed = False
        self._open_lock = asyncio.Lock()
        self._dimension = 0
        self._active = self._read_active()
        self._users: dict[int, int] = {}
        self._retired: list[Any] = []
        self._drained: dict[int, asyncio.Event] = {}

    @property
    def path(self) -> str:
        """Absolute base path of the index (the first generation's shard directory)."""
        return self._path

    @property
    def active_path(self) -> str:
        """Absolute path of the shard directory in use (changes when a copy is swapped in)."""
        return self._active

    @property
    def _pointer(self) -> str:
        return self._path + ".active"

    def _read_active(self) -> str:
        try:
            with open(self._pointer) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return self._path
        if not name or os.sep in name or not name.startswith(os.path.basename(self._path)):
            raise RuntimeError(f"vector index pointer {self._pointer} names {name!r}")
        return os.path.join(os.path.dirname(self._path), name)

    def _config(self, dimension: int) -> Any:
        t = self._tuning
        return qe.EdgeConfig(
            vectors={
                DENSE_VECTOR: qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)
            },
            sparse_vectors={SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            hnsw_config=qe.HnswIndexConfig(
                m=t.hnsw_m,
                ef_construct=t.hnsw_ef_construct,
                full_scan_threshold=t.full_scan_threshold_kb,
                payload_m=t.payload_m,
            ),
            optimizers=qe.EdgeOptimizersConfig(
                indexing_threshold=t.indexing_threshold_kb,
                max_segment_size=t.max_segment_size_kb,
                default_segment_number=t.default_segment_number,
            ),
        )

    def _open(self, dimension: int) -> Any:
        config = self._config(dimension)
        path = self._active
        exists = os.path.exists(os.path.join(path, "edge_config.json"))
        try:
            if exists:
                shard = qe.EdgeShard.load(path, config)
            else:
                shard = qe.EdgeShard.create(path, config)
        except Exception as exc:
            if "WouldBlock" in str(exc):
                raise VectorIndexLockedError(
                    f"vector index directory {path} is already open by another process "
                    "or index instance; a shard directory can be opened by one at a time"
                ) from exc
            raise RuntimeError(f"cannot open vector index at {path}: {exc}") from exc
        try:
            present = set(shard.info().payload_schema)
            wanted: list[tuple[str, Any]] = [(TENANT_FIELD, qe.KeywordIndexParams(is_tenant=True))]
            hnsw = self._tuning.field_hnsw
            wanted += [(f, qe.KeywordIndexParams(enable_hnsw=hnsw)) for f in self._keyword_fields]
            wanted += [(f, qe.FloatIndexParams(enable_hnsw=hnsw)) for f in self._float_fields]
            for name, schema in wanted:
                if name not in present:
                    shard.update(qe.UpdateOperation.create_field_index(name, schema))
        except BaseException:
            shard.close()
            raise
        return shard

    async def ensure_collection(self, dimension: int) -> None:
        """Create or load the shard and create missing payload indexes.

        Args:
            dimension: Dense vector size (384 for all-MiniLM-L6-v2).

        Raises:
            VectorIndexLockedError: If the directory is already open elsewhere.
            RuntimeError: If the shard cannot be created or loaded (e.g. it was created with
                another dimension), or this index was closed.

        """
        async with self._open_lock:
            if self._closed:
                raise RuntimeError(f"vector index at {self._path} is closed")
            if self._shard is None:
                self._shard = await asyncio.to_thread(self._open, dimension)
                self._dimension = dimension

    def _live(self) -> Any:
        if self._closed:
            raise RuntimeError(f"vector index at {self._path} is closed")
        if self._shard is None:
            raise RuntimeError("call ensure_collection() before using the vector index")
        return self._shard

    @contextlib.contextmanager
    def _using(self) -> Iterator[Any]:
        """The live shard, counted as in use until the block ends (a swapped-out shard is
        closed only once no call uses it). Runs on the event loop thread only."""
        shard = self._live()
        key = id(shard)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield shard
        finally:
            left = self._users[key] - 1
            if left:
                self._users[key] = left
            else:
                del self._users[key]
                if key in self._drained:
                    self._drained[key].set()

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points, ``write_chunk`` at a time on the writer thread.

        Every id is checked before the first chunk; a failure of the engine part-way leaves
        the earlier chunks applied (callers apply current states, so applying again is
        harmless).

        Raises:
            ValueError: If a point id is not a UUID string (nothing is written).

        """
        if not points:
            return
        for p in points:
            normalize_id(p.id)  # validate before anything is written
        with self._using() as shard:
            await self._write(self._upsert_sync, shard, points)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _upsert_sync(self, shard: Any, points: Sequence[IndexPoint]) -> None:
        # The conversion to engine points is Python work too: on the writer thread, not the
        # event loop, a chunk at a time.
        for start in range(0, len(points), self._write_chunk):
            batch = [
                qe.Point(
                    normalize_id(p.id),
                    {
                        DENSE_VECTOR: [float(x) for x in p.dense],
                        SPARSE_VECTOR: qe.SparseVector(*sparse_parts(p.sparse)),
                    },
                    dict(p.payload),
                )
                for p in points[start : start + self._write_chunk]
            ]
            shard.update(qe.UpdateOperation.upsert_points(batch))

    def _delete_sync(self, shard: Any, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), self._write_chunk):
            shard.update(
                qe.UpdateOperation.delete_points(
                    [normalize_id(i) for i in ids[start : start + self._write_chunk]]
                )
            )

    async def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; missing ids are ignored.

        Raises:
            ValueError: If an id is not a UUID string.

        """
        if not ids:
            return
        for i in ids:
            normalize_id(i)  # validate before anything is deleted
        with self._using() as shard:
            await self._write(self._delete_sync, shard, list(ids))

    async def _query(self, query: Any, flt: IndexFilter, limit: int, params: Any) -> list[ScoredId]:
        self._live()
        translated = translate(_BUILDER, flt)
        if translated.condition is None or limit <= 0:
            return []
        request = qe.QueryRequest(
            limit=limit,
            query=query,
            filter=translated.condition,
            with_payload=False,
            with_vector=False,
            params=params,
        )
        with self._using() as shard:
            hits = await asyncio.to_thread(shard.query, request)
        return [ScoredId(str(h.id), float(h.score)) for h in hits]

    async def search_dense(
        self, vector: Sequence[float], flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Nearest neighbours by cosine similarity, best first.

        Args:
            vector: Query embedding, ``dimension`` floats.
            flt: Tenant and payload conditions.
            limit: Maximum number of hits.

        Returns:
            Up to ``limit`` hits, scores in [-1, 1].

        """
        query = qe.Query.Nearest([float(x) for x in vector], using=DENSE_VECTOR)
        params = qe.SearchParams(hnsw_ef=self._tuning.hnsw_ef)
        return await self._query(query, flt, limit, params)

    async def search_sparse(
        self, vector: SparseVector, flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Best BM25 matches: sum over shared terms of query weight x IDF x document weight.

        IDF is ``ln(1 + (N - n + 0.5) / (n + 0.5))`` (Qdrant ``Modifier.Idf``) with N and n
        counted over the tenant's points (``idf_scope="tenant"``) or all points.

        Args:
            vector: Query terms (weights usually 1).
            flt: Tenant and payload conditions.
            limit: Maximum number of hits.

        Returns:
            Up to ``limit`` hits with a positive score, best first.

        """
        indices, values = sparse_parts(vector)
        if not indices:
            return []
        query = qe.Query.Nearest(qe.SparseVector(indices, values), using=SPARSE_VECTOR)
        params = None
        if self._idf_scope == "tenant":
            corpus = tenant_filter(_BUILDER, flt.tenant_id)
            params = qe.SearchParams(idf=qe.IdfParams(corpus=corpus))
        return await self._query(query, flt, limit, params)

    async def retrieve_dense(self, ids: Sequence[str]) -> dict[str, list[float]]:
        """Dense vectors of the given points that exist, keyed by canonical id."""
        if not ids:
            return {}
        wanted = [normalize_id(i) for i in ids]
        with self._using() as shard:
            records = await asyncio.to_thread(
                shard.retrieve, wanted, with_payload=False, with_vector=[DENSE_VECTOR]
            )
        out: dict[str, list[float]] = {}
        for r in records:
            vectors = r.vector
            if isinstance(vectors, dict) and DENSE_VECTOR in vectors:
                out[str(r.id)] = list(vectors[DENSE_VECTOR])
        return out

    async def count(self, flt: IndexFilter) -> int:
        """Exact number of points matching the filter."""
        self._live()
        translated = translate(_BUILDER, flt)
        if translated.condition is None:
            return 0
        request = qe.CountRequest(exact=True, filter=translated.condition)
        with self._using() as shard:
            return int(await asyncio.to_thread(shard.count, request))

    def _scroll_ids(self, shard: Any, flt: Any) -> set[str]:
        ids: set[str] = set()
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset,
                    limit=_EDGE_SCROLL_PAGE,
                    filter=flt,
                    with_payload=False,
                    with_vector=False,
                )
            )
            ids.update(str(r.id) for r in records)
            if offset is None:
                return ids

    async def all_ids(self, tenant_id: str | None = None) -> set[str]:
        """Every point id, of one tenant or of all, in canonical form."""
        flt = None if tenant_id is None else tenant_filter(_BUILDER, tenant_id)
        with self._using() as shard:
            # A read: on the default executor, so a full listing never holds up writes.
            return await asyncio.to_thread(self._scroll_ids, shard, flt)

    def _scroll_values(self, shard: Any, key: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset,
                    limit=_EDGE_SCROLL_PAGE,
                    with_payload=[key],
                    with_vector=False,
                )
            )
            for r in records:
                values[str(r.id)] = (r.payload or {}).get(key)
            if offset is None:
                return values

    async def payload_values(self, key: str) -> dict[str, Any]:
        """Every point id (canonical form) with its payload value under ``key``."""
        with self._using() as shard:
            return await asyncio.to_thread(self._scroll_values, shard, key)

    async def optimize(self) -> None:
        """Merge segments and build HNSW graphs; blocks queries while it runs (minutes at 100k)."""
        with self._using() as shard:
            await asyncio.to_thread(shard.optimize)

    async def unindexed_points(self) -> int:
        """Points whose dense vector is not yet in an HNSW graph.

        The engine counts indexed vectors of both kinds; every point has a dense and a
        sparse vector and sparse vectors are always indexed, so this is ``2 x points -
        indexed vectors`` (at least 0).
        """
        info = await self.info()
        return max(0, 2 * info["points"] - info["indexed_vectors"])

    def _generations(self) -> list[str]:
        """Shard directories of this index on disk (the base and every ``.gN`` copy)."""
        base = os.path.basename(self._path)
        parent = os.path.dirname(self._path)
        found = [self._path] if os.path.isdir(self._path) else []
        for name in os.listdir(parent):
            suffix = name[len(base) + 2 :]
            if name.startswith(base + ".g") and suffix.isdigit():
                found.append(os.path.join(parent, name))
        return found

    def _next_generation(self) -> str:
        numbers = [0]
        for path in self._generations():
            if path != self._path:
                numbers.append(int(path.rsplit(".g", 1)[1]))
        return f"{self._path}.g{max(numbers) + 1}"

    async def build_copy(self, *, page: int | None = None) -> EdgeVectorIndex:
        """Copy the live shard's points into a new shard directory and build its HNSW graphs
        there, while the live shard keeps answering queries and taking updates.

        The copy holds every point the live shard held when the copy began, plus some or all
        of the updates applied meanwhile: the caller replays the changes applied since it
        called this method into the copy (applying a change twice is harmless), then calls
        :meth:`swap_in`. Directories of earlier failed builds are removed first.

        Args:
            page: Points copied per step (default ``write_chunk``); the engine holds the GIL
                for each step.

        Returns:
            The copy, an open :class:`EdgeVectorIndex` on the new directory (same fields and
            tuning), its graphs built.

        Raises:
            RuntimeError: If this index is not open.

        """
        self._live()
        page = page or self._write_chunk
        for stale in self._generations():
            if stale != self._active:
                await asyncio.to_thread(shutil.rmtree, stale, True)
        copy = EdgeVectorIndex(
            self._next_generation(),
            (TENANT_FIELD, *self._keyword_fields),
            self._float_fields,
            tuning=self._tuning,
            idf_scope=self._idf_scope,
            write_chunk=self._write_chunk,
        )
        try:
            await copy.ensure_collection(self._dimension)
            offset: Any = None
            while True:
                # Small pages: the engine holds the GIL while it scrolls and while it
                # upserts (pages of 10,000 points stalled every search for ~0.45 s each).
                with self._using() as shard, copy._using() as target:
                    offset = await self._write(_copy_page, shard, target, offset, page)
                if offset is None:
                    break
            # optimize() blocks queries of its shard and holds the GIL for its whole run
            # (measured: another shard's queries in this process starved for a minute), so
            # it runs in a child process on the closed copy, which is then reopened.
            await copy.close()
            await _optimize_in_child(copy.active_path, self._dimension, self._tuning)
            copy = EdgeVectorIndex(
                copy.active_path,
                (TENANT_FIELD, *self._keyword_fields),
                self._float_fields,
                tuning=self._tuning,
                idf_scope=self._idf_scope,
                write_chunk=self._write_chunk,
            )
            # Loading the optimised copy holds the GIL for its whole run (the engine's
            # binding; ~0.5 s at 30k points): the one stall of a build that is not ours to
            # split.
            await copy.ensure_collection(self._dimension)
        except BaseException:
            await self.discard(copy)
            raise
        return copy

    async def discard(self, copy: EdgeVectorIndex) -> None:
        """Close a copy from :meth:`build_copy` that will not be swapped in, and delete it."""
        await copy.close()
        if copy.active_path != self._active:
            await asyncio.to_thread(shutil.rmtree, copy.active_path, True)

    async def swap_in(self, copy: EdgeVectorIndex, *, drain_timeout_s: float = 30.0) -> None:
        """Make ``copy`` (from :meth:`build_copy`, brought up to date by the caller) the live
        shard. Calls made after this returns use the copy; calls in flight on the old shard
        finish on it, then it is closed and its directory deleted.

        The caller must hold off updates while swapping (the follower's apply lock).

        Args:
            copy: The copy to use from now on; it is taken over (do not use or close it).
            drain_timeout_s: Longest wait for calls in flight on the old shard, in seconds;
                past it the old shard is left open (closed at :meth:`close`).

        Raises:
            RuntimeError: If this index is not open or ``copy`` is not open.

        """
        old = self._live()
        new = copy._live()
        await self._write(new.flush)
        name = os.path.basename(copy.active_path)
        tmp = self._pointer + ".tmp"

        def write_pointer() -> None:
            with open(tmp, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._pointer)

        await asyncio.to_thread(write_pointer)
        old_path = self._active
        self._shard, self._active = new, copy.active_path
        copy._shard, copy._closed = None, True
        copy._writer.shutdown(wait=False)
        if self._users.get(id(old)):
            drained = asyncio.Event()
            self._drained[id(old)] = drained
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), drain_timeout_s)
            self._drained.pop(id(old), None)
        if self._users.get(id(old)):
            self._retired.append(old)
            return
        await self._write(_flush_and_close, old)
        await asyncio.to_thread(shutil.rmtree, old_path, True)

    async def close(self) -> None:
        """Flush and close the shard, releasing the directory lock. Idempotent."""
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True
            shard, self._shard = self._shard, None
            for old in self._retired:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(_flush_and_close, old)
            self._retired.clear()
            if shard is not None:
                await asyncio.to_thread(_flush_and_close, shard)
            self._writer.shutdown(wait=False)

    async def info(self) -> dict[str, int]:
        """Shard statistics: ``points``, ``segments`` and ``indexed_vectors`` counts."""
        with self._using() as shard:
            info = await asyncio.to_thread(shard.info)
        return {
            "points": int(info.points_count),
            "segments": int(info.segments_count),
            "indexed_vectors": int(info.indexed_vectors_count),
        }


def _copy_page(source: Any, target: Any, offset: Any, page: int) -> Any:
    """Copy one scroll page of points (vectors and payloads) from ``source`` to ``target``;
    returns the next offset (``None`` after the last page)."""
    records, offset = source.scroll(
        qe.ScrollRequest(offset=offset, limit=page, with_payload=True, with_vector=True)
    )
    if records:
        points = [qe.Point(r.id, r.vector, r.payload or {}) for r in records]
        target.update(qe.UpdateOperation.upsert_points(points))
    return offset


def _flush_and_close(shard: Any) -> None:
    try:
        shard.flush()
    finally:
        shard.close()


async def _optimize_in_child(path: str, dimension: int, tuning: EdgeTuning) -> None:
    """Run ``optimize()`` on the closed shard at ``path`` in a child process (niced).

    Raises:
        RuntimeError: If the child fails (its standard error is in the message).

    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aeterna_common.vectors.edge",
        path,
        str(dimension),
        json.dumps(asdict(tuning)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"optimizing the vector index copy at {path} failed "
            f"(exit {proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )


def _optimize_main(argv: Sequence[str]) -> int:
    """Child process of :func:`_optimize_in_child`: ``PATH DIMENSION TUNING_JSON``."""
    path, dimension, tuning_json = argv
    with contextlib.suppress(OSError):
        os.nice(10)  # the serving process comes first on a shared machine
    index = EdgeVectorIndex(path, (), tuning=EdgeTuning(**json.loads(tuning_json)))
    shard = index._open(int(dimension))
    try:
        shard.optimize()
    finally:
        _flush_and_close(shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(_optimize_main(sys.argv[1:]))
