"""Composition root of the memory service: builds adapters, the domain and the servicer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
import structlog
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_common import leases
from aeterna_common.admission import ForegroundGauge, TenantRateLimit
from aeterna_common.anomaly import monitor_job
from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz import Authorizer, Directory, DirectoryCache
from aeterna_common.authz.governance import directory_from_settings
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database, SchemaNotReadyError, SchemaSettings, prepare_schema
from aeterna_common.embedding.port import EmbeddingPort
from aeterna_common.events import (
    EventConsumer,
    LeasedConsumer,
    OutboxRelay,
    consumer_redis,
    relay_from_settings,
)
from aeterna_common.search.lexical import encode_document, encode_query
from aeterna_common.server import ServiceApp, StartupError
from aeterna_common.usage import EmbeddingCap, UsageReporter, UsageSettings
from aeterna_common.vectors.port import VectorIndex

from aeterna_memory.adapters.governance import GovernanceApprovals
from aeterna_memory.adapters.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    CursorStore,
    FileCursor,
    FileModelMarker,
    IndexFollower,
    ModelMarker,
    PostgresCursor,
    PostgresModelMarker,
)
from aeterna_memory.adapters.lexical_process import ProcessDocumentEncoder
from aeterna_memory.adapters.lifecycle import LifecycleJobs
from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL, PostgresMemoryStore
from aeterna_memory.adapters.redis_cache import NoCache, RedisEmbeddingCache
from aeterna_memory.adapters.team_promotion import (
    CONSUME_LEASE,
    GROUP,
    RECONCILE_LEASE,
    TeamPromotions,
)
from aeterna_memory.domain.indexing import IndexingPolicy
from aeterna_memory.domain.ranking import (
    HandTunedRanker,
    LambdaMartRanker,
    Ranker,
    RankerFileError,
)
from aeterna_memory.domain.service import MemoryDomain, SearchTuning
from aeterna_memory.ports import EmbeddingCache
from aeterna_memory.servicer import SERVICE_NAME, MemoryServicer
from aeterna_memory.settings import MemorySettings

log = structlog.get_logger("aeterna.memory")

MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(kw_only=True)
class MemoryApp(ServiceApp):
    """The memory service's :class:`ServiceApp`, exposing its parts to operators and tests.

    Attributes:
        domain: The use cases.
        follower: The index follower (rebuild, reconcile, applied position).
        authz: The authorizer every call goes through first (its ``directory`` is the
            bindings cache, when governance is configured).
        lifecycle: The expiry and purge jobs (run periodically under leases).
        credentials: The service principal's token for calls that background work makes to
            other services (``AETERNA_SERVICE_TOKEN_FILE``); None when not configured. Index
            maintenance reads PostgreSQL as the indexer and calls no service yet.
        relay: The outbox relay to Redis Streams; None when disabled or without Redis.
        promotions: Approved promotions (USER→TEAM, PROJECT→TEAM, TEAM→ORG, ORG→COMPANY)
            through governance's approvals; None where governance is not configured or
            ``AETERNA_MEMORY_PROMOTION_APPROVALS`` is off.
    """

    domain: MemoryDomain
    authz: Authorizer
    follower: IndexFollower
    lifecycle: LifecycleJobs
    credentials: ServiceCredentials | None = None
    relay: OutboxRelay | None = None
    promotions: TeamPromotions | None = None


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


class ModelGuard:
    """Keeps a replica out of service while the stored vectors are of another model.

    Vectors of two models live in different spaces, so a replica never serves a search over
    vectors its model did not make. At start (after the index is up to date) it compares its
    model id with the model ids recorded with the live memories in PostgreSQL (the source of
    the index) and with the index's marker:

    * PostgreSQL holds vectors of another model: the readable reason is logged and set on
      the domain (searches answer FAILED_PRECONDITION with it), and health stays
      NOT_SERVING, re-checked every ``interval_s``, until a re-embed (``ReembedMemories``,
      which this replica serves meanwhile on its own address) leaves none; then SERVING,
      without a restart.
    * Only the index's marker names another model (PostgreSQL was re-embedded while this
      index was away): an embedded index is rebuilt from PostgreSQL; a shared one follows the
      re-embed through the outbox and only its marker is updated.

    Staying up NOT_SERVING rather than failing the start lets the replica run the re-embed
    with its own (the new) model, and the edge routes it no traffic meanwhile. Once serving,
    :meth:`watch` keeps checking: when vectors of another model appear (a rotation under
    way elsewhere), searches are refused again until they are gone. Each check is an
    indexed existence query; the per-tenant census runs only when it finds something.

    Args:
        follower: The index follower (reads PostgreSQL as index maintenance does).
        domain: The domain whose searches are refused while the models differ.
        marker: Where the index's model id is recorded.
        interval_s: Seconds between checks while the models differ.
    """

    def __init__(
        self, follower: IndexFollower, domain: MemoryDomain, marker: ModelMarker, interval_s: float
    ) -> None:
        self.follower = follower
        self.domain = domain
        self.marker = marker
        self.interval_s = interval_s

    async def check(self) -> str | None:
        """Compare the stored models with this replica's; rebuild or refuse as above.

        Returns:
            The refusal message, or ``None`` when the replica may serve.
        """
        model = self.domain.model_id
        if not await self.follower.other_model_stored(model):
            await self._agreed(model)
            return None
        stored = await self.follower.stored_models()
        foreign = {(t, m): n for (t, m), n in stored.items() if m != model}
        if foreign:
            models = sorted({m for _, m in foreign})
            tenants = sorted({t for t, _ in foreign})
            shown = ", ".join(tenants[:10]) + (
                f" and {len(tenants) - 10} more" if len(tenants) > 10 else ""
            )
            message = (
                f"embedding model mismatch: {sum(foreign.values())} live memories hold vectors "
                f"of {', '.join(repr(m) for m in models)}, but this replica is configured for "
                f"{model!r}; vectors of different models cannot be compared, so this replica "
                "refuses searches (a starting replica stays NOT_SERVING) until they are "
                "re-embedded. Re-embed "
                f"with `aeterna memory reembed --tenant TENANT` (ReembedMemories, role "
                f"TENANT_ADMIN) against this replica for each tenant ({shown}), or configure "
                f"the replica back to {models[0]!r}"
            )
            self.domain.model_mismatch = message
            return message
        await self._agreed(model)
        return None

    async def _agreed(self, model: str) -> None:
        recorded = await self.marker.load()
        if recorded != model:
            # Re-embeds reach every index through the outbox; a rebuild of a replica's own
            # embedded index guards against one that missed them. A shared index is only
            # ever written by the lease holder, so it is not rebuilt from here.
            if recorded is not None and self.follower.keeper is None:
                log.warning("index.model_changed", recorded=recorded, model=model)
                await self.follower.rebuild()
            await self.marker.save(model)
        self.domain.model_mismatch = None
        return None

    async def prepare(self) -> None:
        """Bring the index up to date, then wait (NOT_SERVING) until the models agree."""
        await self.follower.start()
        logged = None
        while (message := await self.check()) is not None:
            if message != logged:
                log.error("embedding_model.mismatch", message=message)
                logged = message
            await asyncio.sleep(self.interval_s)
        if logged is not None:
            log.info("embedding_model.agreed", model=self.domain.model_id)

    async def watch(self) -> None:
        """While serving, re-check every ``interval_s``: vectors of another model appearing
        (another replica re-embedding for a model rotation) make this replica refuse searches
        until they are gone again, so two spaces are never compared."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                before = self.domain.model_mismatch
                message = await self.check()
                if message is not None and message != before:
                    log.error("embedding_model.mismatch", message=message)
                elif message is None and before is not None:
                    log.info("embedding_model.agreed", model=self.domain.model_id)
            except Exception:
                log.exception("embedding_model.check_failed")


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
            query_lane=settings.embedding_query_lane,
            document_nice=settings.background_nice,
            document_process=settings.background_process,
            document_idle=settings.background_idle,
        )
    except ModelUnavailableError as exc:
        raise StartupError(
            f"the embedding model cannot be loaded from AETERNA_MEMORY_MODEL_DIR="
            f"{settings.model_dir.absolute()}: {exc}. Build it with `make model` (or "
            "`python -m aeterna_common.embedding.export --out DIR` with the model-export "
            "extra) and point AETERNA_MEMORY_MODEL_DIR at it."
        ) from exc


def build_ranker(settings: MemorySettings) -> Ranker | None:
    """The configured second-stage ranker, loaded now so that a bad file stops the start.

    Raises:
        StartupError: The LambdaMART file is missing, unreadable, or was trained for another
            version or feature list (the message says which and how to retrain).
    """
    if settings.ranker == "none":
        return None
    if settings.ranker == "hand-tuned":
        return HandTunedRanker()
    try:
        return LambdaMartRanker.load(settings.ranker_file)
    except RankerFileError as exc:
        raise StartupError(
            f"{exc} (or set AETERNA_MEMORY_RANKER=hand-tuned to run without the file)"
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
    return EdgeVectorIndex(
        str(settings.index_dir / "shard"),
        KEYWORD_FIELDS,
        FLOAT_FIELDS,
    )


def build_authorizer(
    common: CommonSettings,
    credentials: ServiceCredentials | None,
    directory: Directory | None = None,
) -> Authorizer:
    """The authorizer: role bindings from ``directory`` or else from governance
    (``AETERNA_AUTHZ_DIRECTORY_URL``, called with the service's own credentials), cached per
    tenant and invalidated by governance events on Redis; with neither, own memories and
    trusted token roles only.

    Raises:
        StartupError: A governance directory is configured without service credentials.
    """
    directory = directory_from_settings(common, directory, credentials)
    cache = None
    if directory is not None:
        cache = DirectoryCache(
            directory,
            redis_url=common.redis_url,
            ttl_s=common.authz_cache_ttl_s,
            stale_grace_s=common.authz_stale_grace_s,
        )
    return Authorizer(cache, trust_token_roles=common.auth_trust_token_roles)


async def build(
    common: CommonSettings | None = None,
    settings: MemorySettings | None = None,
    schema: SchemaSettings | None = None,
    directory: Directory | None = None,
) -> MemoryApp:
    """Build the memory service: load the model, migrate or wait for the schema, open
    stores, wire the domain. The index is brought up to date by the app's ``prepare`` step,
    which the server runs while its health says NOT_SERVING.

    Args:
        common: Shared settings; read from the environment when omitted.
        settings: Memory settings; read from the environment when omitted.
        schema: Migrate at start or wait for the schema; read from the environment when
            omitted.
        directory: Source of role bindings in place of governance's (plain data, e.g. a
            :class:`~aeterna_common.authz.StaticDirectory`).

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
    ranker = build_ranker(settings)
    try:
        await prepare_schema(
            schema,
            database_url=common.database_url,
            owner_url=common.database_owner_url,
            directory=MIGRATIONS,
            indexer_url=common.database_indexer_url,
        )
    except SchemaNotReadyError as exc:
        await embedder.close()
        raise StartupError(str(exc)) from exc
    except BaseException:
        await embedder.close()
        raise
    db = Database(common.database_url, min_size=common.db_pool_min, max_size=common.db_pool_max)
    await db.open()
    # Index maintenance reads every tenant as the indexer role, on a pool of its own.
    indexer = Database(common.database_indexer_url, min_size=1, max_size=common.db_indexer_pool_max)
    try:
        await indexer.open()
    except BaseException:
        await db.close()
        await embedder.close()
        raise
    cache: EmbeddingCache = RedisEmbeddingCache(common.redis_url) if common.redis_url else NoCache()
    index = build_index(settings)
    cursor: CursorStore
    marker: ModelMarker
    if settings.vector_store == "edge":
        cursor = FileCursor(settings.index_dir / "applied_position")
        marker = FileModelMarker(settings.index_dir / "embedding_model")
        lease_name = None
    else:
        cursor = PostgresCursor(db, f"qdrant:{settings.qdrant_collection}")
        marker = PostgresModelMarker(db, f"qdrant:{settings.qdrant_collection}")
        lease_name = f"memory:index:qdrant:{settings.qdrant_collection}"
    # One gauge per process: the searches it tracks are yielded to by batch creates and by
    # the index follower alike.
    foreground = ForegroundGauge(settings.bulk_yield_max_s)
    lexical = (
        await asyncio.to_thread(
            ProcessDocumentEncoder, settings.background_nice, idle=settings.background_idle
        )
        if settings.background_process
        else None
    )
    follower = IndexFollower(
        db,
        indexer,
        index,
        cursor,
        encode_document,
        dsn=common.database_indexer_url,
        dimension=embedder.dimension,
        lease_name=lease_name,
        lease_ttl_s=settings.index_lease_ttl_s,
        foreground=foreground,
        apply_step=settings.index_apply_step,
        defer_max_s=settings.index_apply_defer_max_s,
        encode_documents=lexical.encode if lexical is not None else None,
    )
    store = PostgresMemoryStore(db, idempotency_ttl_s=settings.idempotency_ttl_s)
    authz = build_authorizer(common, credentials, directory)
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
            rerank_depth=settings.rerank_depth,
        ),
        authz=authz,
        foreground=foreground,
        bulk_step=settings.bulk_step,
        ranker=ranker,
        batch_limit=TenantRateLimit(settings.batch_items_per_s, settings.batch_items_burst),
    )
    servicer = MemoryServicer(domain, reembed_per_s=settings.reembed_per_s)
    guard = ModelGuard(follower, domain, marker, settings.model_check_interval_s)

    async def reconcile_forever() -> None:
        # Shared index: only the lease holder reconciles (reconcile() returns at once
        # elsewhere). Embedded: each replica reconciles its own index.
        if not settings.reconcile_interval_s:
            return
        while True:
            await asyncio.sleep(settings.reconcile_interval_s)
            try:
                await follower.reconcile()
            except Exception:
                log.exception("index.reconcile_failed")

    lifecycle = LifecycleJobs(
        db,
        indexer,
        cache,
        domain.dense_text,
        retention_s=settings.retention_s,
        create=domain.create_unchecked,
        promotion_threshold=settings.promotion_threshold,
    )

    # Approved promotions ask governance, where memory already reads its bindings from.
    promotions: TeamPromotions | None = None
    if (
        settings.promotion_approvals
        and common.authz_directory_url
        and credentials is not None
        and authz.directory is not None
    ):
        promotions = TeamPromotions(
            db,
            indexer,
            GovernanceApprovals(common.authz_directory_url, credentials),
            authz.directory.get,
            domain.create_unchecked,
            threshold=settings.promotion_threshold,
            reconcile_batch=settings.promotion_reconcile_batch,
        )

    async def promote(lease: leases.Lease) -> None:
        # The automatic promotions failing does not hold back the asks for approval.
        try:
            await lifecycle.promote_due(lease)
        except leases.LeaseLostError:
            raise
        except Exception:
            log.exception("lifecycle.promote_failed")
        if promotions is not None:
            await promotions.ask_due(lease)

    def under_lease(
        name: str, interval_s: float, job: Callable[[leases.Lease], Awaitable[object]]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            if not interval_s:
                return
            await leases.run_periodic_under_lease(
                db.pool, name, job, interval_s=interval_s, ttl_s=settings.lifecycle_lease_ttl_s
            )

        return run

    async def collect_idempotency_keys(lease: leases.Lease) -> None:
        deleted = await store.gc_idempotency_keys()
        if deleted:
            log.info("idempotency.collected", deleted=deleted)

    jobs = [
        under_lease(
            "memory:idempotency:gc", settings.idempotency_gc_interval_s, collect_idempotency_keys
        ),
        under_lease("memory:lifecycle:expire", settings.expiry_interval_s, lifecycle.expire_due),
        under_lease("memory:lifecycle:purge", settings.purge_interval_s, lifecycle.purge_due),
        under_lease("memory:lifecycle:decay", settings.decay_interval_s, lifecycle.decay_due),
        under_lease("memory:lifecycle:promote", settings.promotion_interval_s, promote),
        under_lease("memory:outbox:trim", settings.outbox_trim_interval_s, lifecycle.trim_outbox),
    ]
    # This index copy's name in outbox_followers: the shared index's, or a fresh one per
    # embedded replica process (an old process's report just expires).
    follower_name = (
        f"qdrant:{settings.qdrant_collection}"
        if settings.vector_store == "qdrant"
        else f"edge:{leases.new_owner_id()}"
    )

    async def build_graph_forever() -> None:
        # Embedded index only: builds HNSW graphs on a copy of the shard (searches are never
        # blocked), never at start.
        if settings.vector_store != "edge" or not settings.graph_build_min_points:
            return
        while True:
            await asyncio.sleep(settings.graph_build_interval_s)
            try:
                await follower.build_graph(settings.graph_build_min_points)
            except Exception:
                log.exception("index.graph_build_failed")

    async def report_position_forever() -> None:
        while True:
            try:
                await follower.report_position(follower_name, 3 * settings.outbox_report_interval_s)
            except Exception:
                log.exception("index.report_failed")
            await asyncio.sleep(settings.outbox_report_interval_s)

    jobs.append(report_position_forever)
    usage_settings = UsageSettings()
    jobs.append(UsageReporter(db, indexer, service="memory", channel=NOTIFY_CHANNEL).run)
    jobs.append(monitor_job(db, NOTIFY_CHANNEL, "memory", indexer))
    # The hard cap: governance says whether a tenant's budget is spent (when it is on there).
    embedding_cap: EmbeddingCap | None = None
    if usage_settings.cap_check_s and common.authz_directory_url and credentials is not None:
        embedding_cap = EmbeddingCap(
            common.authz_directory_url, credentials, usage_settings.cap_check_s
        )
        domain.embedding_cap = embedding_cap.check

    if promotions is not None:
        jobs.append(
            under_lease(
                RECONCILE_LEASE, settings.promotion_reconcile_interval_s, promotions.reconcile
            )
        )
        if common.redis_url:
            redis_url, team_promotions = common.redis_url, promotions

            async def consume_approvals() -> None:
                client = consumer_redis(redis_url, block_s=1.0)
                consumer = EventConsumer(
                    client,
                    GROUP,
                    team_promotions.handle,
                    batch_handler=team_promotions.handle_batch,
                    start="0",
                )
                try:
                    await LeasedConsumer(consumer, CONSUME_LEASE).run(
                        db.pool, ttl_s=settings.lifecycle_lease_ttl_s
                    )
                finally:
                    with contextlib.suppress(Exception):
                        await client.aclose()

            jobs.append(consume_approvals)
        else:
            log.warning(
                "promotion.no_events",
                detail="AETERNA_REDIS_URL is not set: approvals are applied by the reconciler only",
            )

    async def watch_bindings() -> None:
        if authz.directory is not None:
            await authz.directory.watch()

    events_redis: aioredis.Redis | None = None
    relay: OutboxRelay | None = None
    relaying = relay_from_settings(
        settings,
        redis_url=common.redis_url,
        db=db,
        reader=indexer,
        service="memory",
        listen_dsn=common.database_indexer_url,
        notify_channel=NOTIFY_CHANNEL,
    )
    if relaying is not None:
        relay, events_redis = relaying
        jobs.append(relay.run)

    async def close() -> None:
        if authz.directory is not None:
            await authz.directory.close()
        if promotions is not None:
            await promotions.approvals.close()
        await domain.drain_touches()
        await follower.close()
        with contextlib.suppress(Exception):
            await index.close()
        await cache.close()
        if events_redis is not None:
            await events_redis.aclose()
        await embedder.close()
        if lexical is not None:
            lexical.close()
        if embedding_cap is not None:
            await embedding_cap.close()
        await indexer.close()
        await db.close()

    def register(server: grpc.aio.Server) -> None:
        svc_grpc.add_MemoryServiceServicer_to_server(servicer, server)

    return MemoryApp(
        service_names=[SERVICE_NAME],
        register=register,
        close=close,
        # Rebuild or catch up with the outbox, and agree on the embedding model, before
        # health says SERVING.
        prepare=guard.prepare,
        background=[
            follower.run,
            reconcile_forever,
            guard.watch,
            watch_bindings,
            *jobs,
            build_graph_forever,
        ],
        domain=domain,
        authz=authz,
        follower=follower,
        lifecycle=lifecycle,
        credentials=credentials,
        relay=relay,
        promotions=promotions,
    )
