"""Composition root of the memory service: builds adapters, the domain and the servicer."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_common.auth import ServiceCredentials
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database, SchemaNotReadyError, SchemaSettings, prepare_schema
from aeterna_common.embedding.port import EmbeddingPort
from aeterna_common.search.lexical import encode_document, encode_query
from aeterna_common.server import ServiceApp, StartupError
from aeterna_common.vectors.port import VectorIndex

from aeterna_memory.adapters.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    CursorStore,
    FileCursor,
    IndexFollower,
    PostgresCursor,
)
from aeterna_memory.adapters.postgres import PostgresMemoryStore
from aeterna_memory.adapters.redis_cache import NoCache, RedisEmbeddingCache
from aeterna_memory.domain.indexing import IndexingPolicy
from aeterna_memory.domain.service import MemoryDomain, SearchTuning
from aeterna_memory.ports import EmbeddingCache
from aeterna_memory.servicer import SERVICE_NAME, MemoryServicer
from aeterna_memory.settings import MemorySettings

log = structlog.get_logger("aeterna.memory")

MIGRATIONS = Path(__file__).parent / "migrations"
SHARED_INDEX_LOCK = 7_311_000_003
"""Advisory lock key of the lease to apply changes to a shared (server) index."""


@dataclass(kw_only=True)
class MemoryApp(ServiceApp):
    """The memory service's :class:`ServiceApp`, exposing its parts to operators and tests.

    Attributes:
        domain: The use cases.
        follower: The index follower (rebuild, reconcile, applied position).
        credentials: The service principal's token for calls that background work makes to
            other services (``AETERNA_SERVICE_TOKEN_FILE``); None when not configured. Index
            maintenance reads PostgreSQL as the indexer and calls no service yet.
    """

    domain: MemoryDomain
    follower: IndexFollower
    credentials: ServiceCredentials | None = None


class IndexedSearch:
    """The domain's :class:`~aeterna_memory.ports.SearchIndex`: the index plus its follower."""

    def __init__(self, index: VectorIndex, follower: IndexFollower) -> None:
        self.index = index
        self.follower = follower
        self.search_dense = index.search_dense
        self.search_sparse = index.search_sparse

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Wait until the index has applied ``position`` (bounded)."""
        return await self.follower.wait_for(position, timeout_s)

    @property
    def applied_position(self) -> int:
        """The last outbox position the index has applied."""
        return self.follower.applied


def build_embedder(settings: MemorySettings) -> EmbeddingPort:
    """The configured embedding adapter (blocks about a second while ONNX Runtime loads).

    Raises:
        StartupError: The in-process model directory is missing or unreadable; the message
            names ``AETERNA_MEMORY_MODEL_DIR`` and ``make model``.
    """
    if settings.embedding == "openai":
        from aeterna_common.embedding.openai_compat import OpenAICompatibleEmbedder

        return OpenAICompatibleEmbedder(
            settings.embedding_url,
            settings.embedding_model,
            settings.embedding_dimension,
            api_key=settings.embedding_api_key or None,
        )
    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder, ModelUnavailableError

    try:
        return MiniLMEmbedder(
            settings.model_dir,
            intra_op_threads=settings.embedding_threads,
            quantize=settings.embedding_int8,
            batch_size=settings.embedding_batch_size,
        )
    except ModelUnavailableError as exc:
        raise StartupError(
            f"the embedding model cannot be loaded from AETERNA_MEMORY_MODEL_DIR="
            f"{settings.model_dir.absolute()}: {exc}. Build it with `make model` (or "
            "`python -m aeterna_common.embedding.export --out DIR` with the model-export "
            "extra) and point AETERNA_MEMORY_MODEL_DIR at it."
        ) from exc


def build_index(settings: MemorySettings) -> VectorIndex:
    """The configured vector index adapter."""
    if settings.vector_store == "qdrant":
        from aeterna_common.vectors.qdrant import QdrantVectorIndex
        from qdrant_client import AsyncQdrantClient

        if settings.qdrant_url == ":memory:":
            # qdrant-client's local mode: same API, one process; for tests and trials.
            return QdrantVectorIndex(
                AsyncQdrantClient(location=":memory:"),
                settings.qdrant_collection,
                KEYWORD_FIELDS,
                FLOAT_FIELDS,
            )
        return QdrantVectorIndex.from_url(
            settings.qdrant_url,
            settings.qdrant_collection,
            KEYWORD_FIELDS,
            FLOAT_FIELDS,
            api_key=settings.qdrant_api_key or None,
        )
    from aeterna_common.vectors.edge import EdgeVectorIndex

    settings.index_dir.mkdir(parents=True, exist_ok=True)
    return EdgeVectorIndex(str(settings.index_dir / "shard"), KEYWORD_FIELDS, FLOAT_FIELDS)


async def build(
    common: CommonSettings | None = None,
    settings: MemorySettings | None = None,
    schema: SchemaSettings | None = None,
) -> MemoryApp:
    """Build the memory service: load the model, migrate or wait for the schema, open
    stores, wire the domain. The index is brought up to date by the app's ``prepare`` step,
    which the server runs while its health says NOT_SERVING.

    Args:
        common: Shared settings; read from the environment when omitted.
        settings: Memory settings; read from the environment when omitted.
        schema: Migrate at start or wait for the schema; read from the environment when
            omitted.

    Raises:
        StartupError: The model cannot be loaded, or the schema did not reach the version
            this code needs in time.
    """
    common = common or CommonSettings()
    settings = settings or MemorySettings()
    credentials = ServiceCredentials.from_settings(common)
    schema = schema or SchemaSettings()
    # The model first: a missing artifact is reported before anything else is touched.
    embedder = await asyncio.to_thread(build_embedder, settings)
    try:
        await prepare_schema(
            schema,
            database_url=common.database_url,
            owner_url=common.database_owner_url,
            directory=MIGRATIONS,
        )
    except SchemaNotReadyError as exc:
        await embedder.close()
        raise StartupError(str(exc)) from exc
    except BaseException:
        await embedder.close()
        raise
    db = Database(common.database_url, min_size=common.db_pool_min, max_size=common.db_pool_max)
    await db.open()
    cache: EmbeddingCache = RedisEmbeddingCache(common.redis_url) if common.redis_url else NoCache()
    index = build_index(settings)
    cursor: CursorStore
    if settings.vector_store == "edge":
        cursor = FileCursor(settings.index_dir / "applied_position")
        leader_lock = None
    else:
        cursor = PostgresCursor(db, f"qdrant:{settings.qdrant_collection}")
        leader_lock = SHARED_INDEX_LOCK
    follower = IndexFollower(
        db,
        index,
        cursor,
        encode_document,
        dsn=common.database_url,
        dimension=embedder.dimension,
        leader_lock=leader_lock,
    )
    store = PostgresMemoryStore(db, idempotency_ttl_s=settings.idempotency_ttl_s)
    domain = MemoryDomain(
        store,
        IndexedSearch(index, follower),
        embedder,
        cache,
        encode_query,
        indexing=IndexingPolicy(
            dense_context=settings.dense_context,
            lexical_context=settings.lexical_context,
            metadata_keys=tuple(settings.index_metadata_keys),
            dense_metadata=settings.dense_metadata,
        ),
        tuning=SearchTuning(
            candidates=settings.candidates,
            fusion_method=settings.fusion,
            dense_weight=settings.dense_weight,
            lexical_weight=settings.lexical_weight,
            wait_s=settings.read_wait_s,
            token_wait_s=settings.consistency_wait_s,
        ),
    )
    servicer = MemoryServicer(domain)

    async def reconcile_forever() -> None:
        if not settings.reconcile_interval_s:
            return
        while True:
            await asyncio.sleep(settings.reconcile_interval_s)
            try:
                await follower.reconcile()
            except Exception:
                log.exception("index.reconcile_failed")

    async def collect_idempotency_keys_forever() -> None:
        # Every replica runs this: the database function deletes bounded batches with
        # SKIP LOCKED, so concurrent runs share the work and an idle run is one index probe.
        if not settings.idempotency_gc_interval_s:
            return
        while True:
            await asyncio.sleep(settings.idempotency_gc_interval_s)
            try:
                deleted = await store.gc_idempotency_keys()
                if deleted:
                    log.info("idempotency.collected", deleted=deleted)
            except Exception:
                log.exception("idempotency.collect_failed")

    async def close() -> None:
        await follower.close()
        with contextlib.suppress(Exception):
            await index.close()
        await cache.close()
        await embedder.close()
        await db.close()

    def register(server: grpc.aio.Server) -> None:
        svc_grpc.add_MemoryServiceServicer_to_server(servicer, server)

    return MemoryApp(
        service_names=[SERVICE_NAME],
        register=register,
        close=close,
        # Rebuild or catch up with the outbox before health says SERVING.
        prepare=follower.start,
        background=[follower.run, reconcile_forever, collect_idempotency_keys_forever],
        domain=domain,
        follower=follower,
        credentials=credentials,
    )
