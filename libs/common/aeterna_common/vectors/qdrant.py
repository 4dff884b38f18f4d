"""Vector index adapter on ``qdrant-client`` (a Qdrant server, or the client's local mode).

Local mode (``AsyncQdrantClient(location=":memory:")`` or ``path=...``) is a brute-force
Python implementation meant for tests: payload indexes are accepted but have no effect there.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Sequence
from typing import Any

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.conversions import common_types as types

from aeterna_common.vectors.filters import (
    SCROLL_PAGE as _SCROLL_PAGE,
)
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

_OPTIMIZE_POLL_S = 0.5


class _ClientBuilder:
    """:class:`~aeterna_common.vectors.filters.FilterBuilder` for ``qdrant_client.models``."""

    def match_value(self, key: str, value: str | int | bool) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    def match_any(self, key: str, values: list[str] | list[int]) -> models.Condition:
        return models.FieldCondition(key=key, match=models.MatchAny(any=values))

    def range(self, key: str, gte: float | None, lte: float | None) -> models.Condition:
        return models.FieldCondition(key=key, range=models.Range(gte=gte, lte=lte))

    def filter(
        self,
        must: Sequence[models.Condition],
        should: Sequence[models.Condition],
        must_not: Sequence[models.Condition],
    ) -> models.Condition:
        return models.Filter(
            must=list(must) or None, should=list(should) or None, must_not=list(must_not) or None
        )


_BUILDER = _ClientBuilder()


def _as_filter(cond: models.Condition) -> models.Filter:
    # The builder's ``filter`` always returns a models.Filter; narrow the union for the client.
    assert isinstance(cond, models.Filter)
    return cond


def _sparse(vector: SparseVector) -> models.SparseVector:
    indices, values = sparse_parts(vector)
    return models.SparseVector(indices=indices, values=values)


class QdrantVectorIndex:
    """:class:`~aeterna_common.vectors.port.VectorIndex` on one Qdrant collection.

    Args:
        client: The client; the index takes ownership and closes it in :meth:`close`.
        collection: Collection name.
        keyword_fields: Payload keys indexed as keywords (dotted paths allowed);
            ``tenant_id`` is always indexed, with ``is_tenant=True``.
        float_fields: Payload keys indexed as floats (range filters), e.g. ``created_at``.
        idf_scope: ``"tenant"`` (default) computes the sparse IDF over the searching tenant's
            points (``IdfCorpusParams``); ``"collection"`` uses collection-wide statistics,
            which a server takes from its sparse index and so keeps counting deleted points.
        hnsw_ef: Search-time HNSW beam width on a server; ``None`` uses the server default.
            Not sent in local mode, which searches exactly.

    Point ids are UUID strings and come back in canonical lower-case form.

    """

    def __init__(
        self,
        client: AsyncQdrantClient,
        collection: str,
        keyword_fields: Sequence[str],
        float_fields: Sequence[str] = (),
        *,
        idf_scope: IdfScope = "tenant",
        hnsw_ef: int | None = None,
    ) -> None:
        self._client = client
        self._collection = collection
        self._keyword_fields = tuple(dict.fromkeys(f for f in keyword_fields if f != TENANT_FIELD))
        self._float_fields = tuple(dict.fromkeys(float_fields))
        self._idf_scope: IdfScope = idf_scope
        self._hnsw_ef = hnsw_ef
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        collection: str,
        keyword_fields: Sequence[str],
        float_fields: Sequence[str] = (),
        *,
        api_key: str | None = None,
        prefer_grpc: bool = True,
        timeout_s: int = 10,
        idf_scope: IdfScope = "tenant",
        hnsw_ef: int | None = None,
    ) -> QdrantVectorIndex:
        """Connect to a Qdrant server.

        Args:
            url: Server URL, e.g. ``http://qdrant:6333`` (gRPC on 6334 when ``prefer_grpc``).
            collection: Collection name.
            keyword_fields: See the class.
            float_fields: See the class.
            api_key: Server API key, if the server requires one.
            prefer_grpc: Use the gRPC API (faster for bulk upserts) instead of REST.
            timeout_s: Per-request timeout in seconds.
            idf_scope: See the class.
            hnsw_ef: See the class.

        Returns:
            An index owning a new client; no request is made until the first call.

        """
        client = AsyncQdrantClient(
            url=url, api_key=api_key, prefer_grpc=prefer_grpc, timeout=timeout_s
        )
        return cls(
            client,
            collection,
            keyword_fields,
            float_fields,
            idf_scope=idf_scope,
            hnsw_ef=hnsw_ef,
        )

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"vector index on collection {self._collection!r} is closed")

    @property
    def _local(self) -> bool:
        # Local mode searches exactly and warns about index parameters, so they are not sent.
        opts = self._client.init_options
        return opts.get("path") is not None or opts.get("location") == ":memory:"

    async def ensure_collection(self, dimension: int) -> None:
        """Create the collection and payload indexes if missing.

        Args:
            dimension: Dense vector size (384 for all-MiniLM-L6-v2).

        Raises:
            RuntimeError: If the collection exists with another dense size, or the index is
                closed.

        """
        self._check()
        if await self._client.collection_exists(self._collection):
            info = await self._client.get_collection(self._collection)
            vectors = info.config.params.vectors
            size = vectors[DENSE_VECTOR].size if isinstance(vectors, dict) else None
            if size != dimension:
                raise RuntimeError(
                    f"collection {self._collection!r} has dense size {size}, expected {dimension}"
                )
            present = set(info.payload_schema)
        else:
            await self._client.create_collection(
                self._collection,
                vectors_config={
                    DENSE_VECTOR: models.VectorParams(
                        size=dimension, distance=models.Distance.COSINE
                    )
                },
                sparse_vectors_config={
                    SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)
                },
            )
            present = set()
        wanted: list[tuple[str, models.PayloadSchemaType | models.KeywordIndexParams]] = [
            (
                TENANT_FIELD,
                models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
            )
        ]
        wanted += [(f, models.PayloadSchemaType.KEYWORD) for f in self._keyword_fields]
        wanted += [(f, models.PayloadSchemaType.FLOAT) for f in self._float_fields]
        with warnings.catch_warnings():
            # Local mode warns that payload indexes have no effect there; that is expected.
            warnings.simplefilter("ignore", UserWarning)
            for name, schema in wanted:
                if name not in present:
                    await self._client.create_payload_index(
                        self._collection, name, field_schema=schema, wait=True
                    )

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points; waits until the server has applied them.

        Raises:
            ValueError: If a point id is not a UUID string.

        """
        self._check()
        if not points:
            return
        structs = [
            models.PointStruct(
                id=normalize_id(p.id),
                vector={
                    DENSE_VECTOR: [float(x) for x in p.dense],
                    SPARSE_VECTOR: _sparse(p.sparse),
                },
                payload=dict(p.payload),
            )
            for p in points
        ]
        await self._client.upsert(self._collection, points=structs, wait=True)

    async def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; missing ids are ignored.

        Raises:
            ValueError: If an id is not a UUID string.

        """
        self._check()
        if not ids:
            return
        selector = models.PointIdsList(points=[normalize_id(i) for i in ids])
        await self._client.delete(self._collection, points_selector=selector, wait=True)

    async def _query(
        self,
        query: list[float] | models.SparseVector,
        using: str,
        flt: IndexFilter,
        limit: int,
        params: models.SearchParams | None,
    ) -> list[ScoredId]:
        self._check()
        translated = translate(_BUILDER, flt)
        if translated.condition is None or limit <= 0:
            return []
        response = await self._client.query_points(
            self._collection,
            query=query,
            using=using,
            query_filter=_as_filter(translated.condition),
            search_params=params,
            limit=limit,
            with_payload=False,
            with_vectors=False,
        )
        return [ScoredId(str(p.id), float(p.score)) for p in response.points]

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
        params = None
        if self._hnsw_ef is not None and not self._local:
            params = models.SearchParams(hnsw_ef=self._hnsw_ef)
        return await self._query([float(x) for x in vector], DENSE_VECTOR, flt, limit, params)

    async def search_sparse(
        self, vector: SparseVector, flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Best BM25 matches: sum over shared terms of query weight x IDF x document weight.

        IDF is ``ln(1 + (N - n + 0.5) / (n + 0.5))`` (Qdrant ``Modifier.IDF``) with N and n
        counted over the tenant's points (``idf_scope="tenant"``) or the whole collection.

        Args:
            vector: Query terms (weights usually 1).
            flt: Tenant and payload conditions.
            limit: Maximum number of hits.

        Returns:
            Up to ``limit`` hits with a positive score, best first.

        """
        query = _sparse(vector)
        if not query.indices:
            return []
        params = None
        if self._idf_scope == "tenant":
            corpus = _as_filter(tenant_filter(_BUILDER, flt.tenant_id))
            params = models.SearchParams(idf=models.IdfCorpusParams(corpus=corpus))
        return await self._query(query, SPARSE_VECTOR, flt, limit, params)

    async def retrieve_dense(self, ids: Sequence[str]) -> dict[str, list[float]]:
        """Dense vectors of the given points that exist, keyed by canonical id."""
        self._check()
        if not ids:
            return {}
        records = await self._client.retrieve(
            self._collection,
            [normalize_id(i) for i in ids],
            with_payload=False,
            with_vectors=[DENSE_VECTOR],
        )
        out: dict[str, list[float]] = {}
        for r in records:
            vectors = r.vector
            if isinstance(vectors, dict):
                dense = vectors.get(DENSE_VECTOR)
                if isinstance(dense, list):
                    out[str(r.id)] = [float(x) for x in dense]  # type: ignore[arg-type]
        return out

    async def count(self, flt: IndexFilter) -> int:
        """Exact number of points matching the filter."""
        self._check()
        translated = translate(_BUILDER, flt)
        if translated.condition is None:
            return 0
        result = await self._client.count(
            self._collection, count_filter=_as_filter(translated.condition), exact=True
        )
        return int(result.count)

    async def all_ids(self, tenant_id: str | None = None) -> set[str]:
        """Every point id, of one tenant or of all, in canonical form."""
        self._check()
        flt = None if tenant_id is None else _as_filter(tenant_filter(_BUILDER, tenant_id))
        ids: set[str] = set()
        offset: types.PointId | None = None
        while True:
            records, offset = await self._client.scroll(
                self._collection,
                scroll_filter=flt,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=False,
                with_vectors=False,
            )
            ids.update(str(r.id) for r in records)
            if offset is None:
                return ids

    async def payload_values(self, key: str) -> dict[str, Any]:
        """Every point id (canonical form) with its payload value under ``key``."""
        self._check()
        values: dict[str, Any] = {}
        offset: types.PointId | None = None
        while True:
            records, offset = await self._client.scroll(
                self._collection,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=[key],
                with_vectors=False,
            )
            for r in records:
                values[str(r.id)] = (r.payload or {}).get(key)
            if offset is None:
                return values

    async def optimize(self, timeout_s: float = 600.0) -> None:
        """Wait until the server's background optimizers are idle (collection status green).

        Qdrant servers index and merge segments on their own; there is nothing to start.

        Args:
            timeout_s: Give up after this many seconds.

        Raises:
            TimeoutError: If the collection is still being optimized after ``timeout_s``.

        """
        self._check()
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self._client.get_collection(self._collection)
            if info.status == models.CollectionStatus.GREEN:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"collection {self._collection!r} still {info.status} after {timeout_s} s"
                )
            await asyncio.sleep(_OPTIMIZE_POLL_S)

    async def close(self) -> None:
        """Close the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._client.close()
