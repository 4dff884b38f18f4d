"""Settings of the memory service (environment prefix ``AETERNA_MEMORY_``), validated at start.
Shared settings (database, Redis, listen address, logs) are in
:class:`aeterna_common.config.CommonSettings` (prefix ``AETERNA_``)."""

from __future__ import annotations

from pathlib import Path

from aeterna_common.admission import DEFAULT_MAX_YIELD_S
from aeterna_common.events import RelaySettings
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aeterna_memory.adapters.index_follower import APPLY_DEFER_MAX_S, APPLY_STEP

BATCH_ITEMS_PER_S = 25.0
"""Default per-tenant BatchCreateMemories admission limit, in memories per second per replica:
about 15 % of what a 2-core replica embeds (~170 memories/s, int8 MiniLM, batch 4; see
``embedding_batch_size``), so that one tenant's import leaves most of a replica to the other
tenants' searches, and a few importing at once still do (90,000 memories an hour per replica
per tenant). ``make bench-scale``'s ``during_ingest`` reports the import rate it allows."""


class MemorySettings(BaseSettings, RelaySettings):
    """Configuration of the memory service; the outbox relay's ``events_*`` settings are
    :class:`~aeterna_common.events.RelaySettings`'s (``AETERNA_MEMORY_EVENTS_*``).

    Attributes:
        vector_store: ``edge`` (Qdrant's embedded engine, one index per replica, derived from
            PostgreSQL) or ``qdrant`` (a Qdrant server shared by all replicas).
        index_dir: Directory of this replica's embedded index (one process per directory).
        qdrant_url: Qdrant server URL, used when ``vector_store`` is ``qdrant``; ``:memory:``
            runs qdrant-client's in-process local mode (one process; tests and trials).
        qdrant_api_key: Qdrant API key, if the server needs one.
        qdrant_collection: Collection name on the Qdrant server.
        embedding: ``minilm`` (all-MiniLM-L6-v2 in process) or ``openai`` (any
            OpenAI-compatible ``/v1/embeddings`` endpoint).
        embedding_url: Base URL of the OpenAI-compatible endpoint.
        embedding_model: Model name sent to that endpoint.
        embedding_dimension: Vector size that endpoint returns.
        embedding_api_key: Bearer token for that endpoint.
        model_dir: Directory of the all-MiniLM-L6-v2 ONNX model (fp32 and int8), built by
            ``make model`` or the image's builder stage; only read. A missing or unreadable
            model stops the service at start.
        embedding_threads: ONNX Runtime intra-op threads.
        embedding_int8: Serve MiniLM quantized to int8 (about 2x faster, same LoCoMo
            recall; recorded as model ``all-MiniLM-L6-v2-int8``).
        embedding_batch_size: Texts per ONNX Runtime call. Small batches of length-sorted
            texts pad less and stay in cache: on 2 cores, int8, LoCoMo turns, batch 4 ran
            172-193 texts/s against 85-158 at batch 64.
        embedding_query_lane: Embed search queries on a separate ONNX session and thread,
            so that they never wait behind a document batch (a 1,000-memory import holds the
            document session for seconds); ``False`` queues them with documents (the former
            behaviour, the baseline of ``make bench-query-lane``).
        background_nice: Nice increment (0-19) of the threads that embed documents (writes,
            imports, re-embeds): they use all the CPU that searches leave and give it back
            within a scheduling period when a search needs it (nice 10 weighs about a tenth
            of a search thread; ``aeterna_common.priority``). 0 runs them at the process's
            priority (the former behaviour, the baseline of ``make bench-scale``'s
            ``during_ingest``).
        background_process: Run document work in child processes at ``background_nice``
            instead of threads of the serving process: embedding documents (writes, imports,
            re-embeds; the query lane stays in process) and the index follower's BM25
            encoding of applied memories. The serving process's GIL is then never held by
            bulk work. ``False`` runs both on threads of this process (the former behaviour,
            the baseline of ``make bench-scale``'s ``during_ingest``).
        background_idle: Run those child processes under ``SCHED_IDLE`` instead of
            ``background_nice``: they run only on CPU time that no normal task of the
            machine wants, so a search anywhere on it preempts them at once
            (``aeterna_common.priority``). Takes effect with ``background_process``. On a
            machine kept busy by other work, the import then slows down with it (the trade
            is measured by ``make bench-scale``'s ``during_ingest``).
        bulk_step: Memories per step of a batch create (authorization, embedding, rows
            sent to PostgreSQL); between two steps the batch yields the event loop to
            searches in flight, at most ``bulk_yield_max_s`` per step
            (``aeterna_common.admission``). 0 does a batch in one step (the former
            behaviour, the baseline of ``make bench-scale``'s ``during_ingest``).
        batch_items_per_s: Per-tenant admission limit of BatchCreateMemories, in memories
            per second per replica (0: no limit): past it a batch is refused with
            ``RESOURCE_EXHAUSTED`` and ``RetryInfo`` (when to retry), before any work, and
            the CLI's and the SDK helpers' imports wait and retry with the same request id
            (``aeterna_common.admission.TenantRateLimit``). A tenant's import then leaves
            the replicas' CPU to other tenants' searches (noisy-neighbour isolation); the
            rate it costs the import is measured by ``make bench-scale``'s
            ``during_ingest``. CreateMemory (one memory) is not limited.
        batch_items_burst: Bucket size of that limit, in memories: a tenant idle for a
            while may send this many at once (a batch larger than it waits for a full
            bucket, then is admitted whole).
        bulk_yield_max_s: Longest wait per step for in-flight searches, in seconds.
        index_apply_step: Memories per step when the index follower applies a batch of
            outbox changes (BM25 encoding, one engine write). Before each step, and before
            each read of the outbox, it defers while searches are in flight, at most
            ``index_apply_defer_max_s`` per step, and never while a search waits for a
            consistency token's position. 0 applies each batch in one step without deferring
            (the baseline of ``make bench-scale``'s ``during_ingest``).
        index_apply_defer_max_s: Longest deferral of one apply step for searches in flight,
            in seconds (0: never defer). Under a continuous stream of searches the follower
            still applies one step per this time.
        dense_context: Preceding session turns in the dense index text.
        lexical_context: Preceding session turns in the BM25 index text.
        index_metadata_keys: Metadata keys whose values are indexed with the content.
        dense_metadata: Also prefix the dense text with those values.
        candidates: Hits per ranking per layer before the one fusion across layers.
        fusion: Score fusion: ``minmax``, ``dbsf`` or ``rrf``.
        dense_weight: Weight of the dense ranking in the fusion.
        lexical_weight: Weight of the BM25 ranking in the fusion.
        ranker: Second-stage ranker of search candidates: ``lambdamart`` (the LightGBM
            model file, checked at start: a file of another version or feature list stops
            the service), ``hand-tuned`` (fused score plus boosts, no file) or ``none`` (the
            fused order).
        ranker_file: A LambdaMART ranker file to load instead of the packaged one.
        rerank_depth: First-stage candidates the second stage re-ranks.
        read_wait_s: Longest wait in seconds of a search without a consistency token for the
            index to reach the tenant's latest write; past it the answer is served and marked
            ``x-aeterna-index-stale: true``.
        reconcile_interval_s: Seconds between reconciler runs (0 disables); with a shared
            index only the holder of the index's lease reconciles.
        index_lease_ttl_s: Time to live in seconds of the shared index's lease: a leader cut
            off from PostgreSQL is replaced after about this long; it renews every third.
        consistency_wait_s: Longest wait in seconds of a search with a consistency token for
            the index to reach the token's position; past it the replica answers
            ``UNAVAILABLE`` (``CONSISTENCY_TOKEN_NOT_REACHED``) and the edge retries another
            replica. Keep it well below the edge's per-try timeout (10 s).
        idempotency_ttl_s: Seconds a ``request_id`` is remembered per (tenant, principal,
            method); a later call with the same id is a new request (24 h by default).
        idempotency_gc_interval_s: Seconds between runs of the collector of expired
            idempotency keys (0 disables); one replica runs it, under the lease
            ``memory:idempotency:gc`` (concurrent runs would be safe, just wasted).
        reconcile_interval_s: Seconds between reconciler runs (0 disables).
        expiry_interval_s: Seconds between runs of the expiry job (0 disables): memories past
            their ``expire_at`` emit ``memory.expired`` and leave the index. One replica runs
            it, under the lease ``memory:lifecycle:expire``.
        purge_interval_s: Seconds between runs of the purge job (0 disables), under the lease
            ``memory:lifecycle:purge``.
        retention_s: Seconds a soft-deleted or expired memory is kept before the purge
            removes its row, vector, cache entry and revisions' content (30 days, the
            retention of DOMAIN.md).
        decay_interval_s: Seconds between runs of the decay job (0 disables), under the lease
            ``memory:lifecycle:decay``; each run decays the memories whose last decay is a
            day old by the layer's daily rate (DOMAIN.md) and archives those below 0.01.
        outbox_trim_interval_s: Seconds between runs of the outbox trim (0 disables), under
            the lease ``memory:outbox:trim``: rows at or below the smallest position that a
            live follower reported are deleted.
        outbox_report_interval_s: Seconds between this replica's reports of its applied
            outbox position (an embedded index, or the leader of a shared one); a report
            expires after three intervals, after which this replica no longer holds the
            trim back (if it falls behind the trim, it rebuilds its index).
        promotion_interval_s: Seconds between runs of the promotion job (0 disables), under
            the lease ``memory:lifecycle:promote``: AGENT→USER and SESSION→PROJECT copies,
            and approval requests for USER→TEAM, PROJECT→TEAM, TEAM→ORG and ORG→COMPANY
            (``promotion_approvals``).
        promotion_threshold: Promotion score (0.6·importance + 0.3·min(access_count/10, 1)
            + 0.1·max(0, 1 − days since last access)) from which a memory is promoted (0.8,
            DOMAIN.md).
        promotion_approvals: Promote USER, PROJECT, TEAM and ORG memories to their
            target unit (TEAM, TEAM, ORG, COMPANY) once governance approves it: the
            promotion job opens the approval requests, a consumer of governance's events
            (one replica, lease ``memory:promotions:consume``, needs ``AETERNA_REDIS_URL``)
            and the reconciler apply the decisions. Takes effect where governance is configured
            (``AETERNA_AUTHZ_DIRECTORY_URL``, called with ``AETERNA_SERVICE_TOKEN_FILE``).
        promotion_reconcile_interval_s: Seconds between runs of the reconciler of pending
            promotion approvals (0 disables), under the lease ``memory:promotions:reconcile``:
            it reads pending requests from governance in case their events were lost.
        promotion_reconcile_batch: Pending approvals the reconciler checks per run (one
            ``GetApprovalRequest`` each), least recently checked first.
        lifecycle_lease_ttl_s: Time to live in seconds of the lifecycle jobs' leases.
        reembed_per_s: Rate limit of a re-embed (``ReembedMemories``), in memories per
            second, so that a re-embed leaves the model and the database to live traffic
            (50/s is about a quarter of int8 MiniLM's throughput on 2 cores).
        graph_build_min_points: Points of the embedded index without an HNSW graph that
            start a background graph build (a copy of the shard is optimised while the live
            one keeps serving, then swapped in); 0 disables. 20,000 384-d vectors are about
            3x the engine's indexing threshold (10,000 KB), below which exact search is fast.
        graph_build_interval_s: Seconds between checks of that threshold (never at start).
        model_check_interval_s: While stored vectors are of another embedding model (health
            NOT_SERVING), seconds between checks whether a re-embed has finished.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_MEMORY_", extra="ignore")

    vector_store: str = Field(default="edge", pattern="^(edge|qdrant)$")
    index_dir: Path = Path(".var/memory/index")
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    qdrant_collection: str = "memories"
    embedding: str = Field(default="minilm", pattern="^(minilm|openai)$")
    embedding_url: str = ""
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_dimension: int = Field(default=384, ge=1)
    embedding_api_key: str = ""
    model_dir: Path = Path(".var/models")
    embedding_threads: int = Field(default=1, ge=1)
    embedding_int8: bool = True
    embedding_batch_size: int = Field(default=4, ge=1, le=256)
    embedding_query_lane: bool = True
    background_nice: int = Field(default=10, ge=0, le=19)
    background_process: bool = True
    background_idle: bool = True
    bulk_step: int = Field(default=20, ge=0, le=1000)
    batch_items_per_s: float = Field(default=BATCH_ITEMS_PER_S, ge=0)
    batch_items_burst: float = Field(default=500, ge=1)
    bulk_yield_max_s: float = Field(default=DEFAULT_MAX_YIELD_S, ge=0, le=1.0)
    index_apply_step: int = Field(default=APPLY_STEP, ge=0, le=10_000)
    index_apply_defer_max_s: float = Field(default=APPLY_DEFER_MAX_S, ge=0, le=5.0)
    dense_context: int = Field(default=0, ge=0, le=10)
    lexical_context: int = Field(default=2, ge=0, le=10)
    index_metadata_keys: list[str] = ["session_time"]
    dense_metadata: bool = False
    candidates: int = Field(default=50, ge=10, le=1000)
    fusion: str = Field(default="minmax", pattern="^(minmax|dbsf|rrf)$")
    dense_weight: float = Field(default=0.4, ge=0)
    lexical_weight: float = Field(default=0.6, ge=0)
    ranker: str = Field(default="lambdamart", pattern="^(lambdamart|hand-tuned|none)$")
    ranker_file: Path | None = None
    rerank_depth: int = Field(default=50, ge=1, le=1000)
    read_wait_s: float = Field(default=0.1, ge=0, le=1.0)
    consistency_wait_s: float = Field(default=2.0, gt=0, le=8.0)
    idempotency_ttl_s: float = Field(default=86_400.0, ge=3600)
    idempotency_gc_interval_s: float = Field(default=600.0, ge=0)
    reconcile_interval_s: float = Field(default=600.0, ge=0)
    index_lease_ttl_s: float = Field(default=15.0, ge=1.0, le=600.0)
    expiry_interval_s: float = Field(default=30.0, ge=0)
    purge_interval_s: float = Field(default=3600.0, ge=0)
    retention_s: float = Field(default=30 * 86_400.0, ge=0)
    decay_interval_s: float = Field(default=3600.0, ge=0)
    outbox_trim_interval_s: float = Field(default=300.0, ge=0)
    outbox_report_interval_s: float = Field(default=10.0, gt=0)
    promotion_interval_s: float = Field(default=600.0, ge=0)
    promotion_threshold: float = Field(default=0.8, gt=0, le=1)
    promotion_approvals: bool = True
    promotion_reconcile_interval_s: float = Field(default=300.0, ge=0)
    promotion_reconcile_batch: int = Field(default=100, ge=1, le=10_000)
    lifecycle_lease_ttl_s: float = Field(default=30.0, ge=1.0, le=600.0)
    reembed_per_s: float = Field(default=50.0, gt=0)
    model_check_interval_s: float = Field(default=5.0, gt=0)
    graph_build_min_points: int = Field(default=20_000, ge=0)
    graph_build_interval_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MemorySettings:
        if self.vector_store == "qdrant" and not self.qdrant_url:
            raise ValueError("AETERNA_MEMORY_QDRANT_URL is required when vector_store=qdrant")
        if self.embedding == "openai" and not self.embedding_url:
            raise ValueError("AETERNA_MEMORY_EMBEDDING_URL is required when embedding=openai")
        if self.dense_weight == 0 and self.lexical_weight == 0:
            raise ValueError("dense_weight and lexical_weight cannot both be 0")
        return self
