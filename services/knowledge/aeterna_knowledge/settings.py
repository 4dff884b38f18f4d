"""Settings of the knowledge service (environment prefix ``AETERNA_KNOWLEDGE_``), validated at
start. Shared settings (database, Redis, listen address, logs, auth, the authorization
directory) are in :class:`aeterna_common.config.CommonSettings` (prefix ``AETERNA_``)."""

from __future__ import annotations

from pathlib import Path

from aeterna_common.events import RelaySettings
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KnowledgeSettings(BaseSettings, RelaySettings):
    """Configuration of the knowledge service; the outbox relay's ``events_*`` settings are
    :class:`~aeterna_common.events.RelaySettings`'s (``AETERNA_KNOWLEDGE_EVENTS_*``, lease
    ``knowledge:events:relay``).

    Attributes:
        idempotency_ttl_s: Seconds a ``request_id`` is remembered per (tenant, principal,
            method); 24 h, as memory's and governance's.
        idempotency_gc_interval_s: Seconds between runs of the collector of expired
            idempotency keys (0 disables), under the lease ``knowledge:idempotency:gc``.
        jobs_lease_ttl_s: Time to live in seconds of the background jobs' leases.
        reconcile_interval_s: Seconds between runs of each replica's reconciler of its index
            against PostgreSQL (0 disables).
        outbox_trim_interval_s: Seconds between runs of the outbox trim (0 disables), under
            the lease ``knowledge:outbox:trim``: rows at or below the smallest position that
            a live follower (each replica's index, the event relay) has reported go.
        outbox_report_interval_s: Seconds between this replica's reports of its index's
            applied position; a report expires after three intervals.
        graph_build_min_points: Points of the embedded index without an HNSW graph that
            start a background graph build on a copy of the shard (0 disables: searches
            scan exactly). Off by default: at 50k items ``bench/knowledge.py`` measured
            the graph (memory's edge tuning) cutting hybrid recall@3 of the written queries
            from 0.917 to 0.792 and dense-only from 0.792 to 0.333, for p50 18 ms instead
            of 82 ms.
        graph_build_interval_s: Seconds between checks of that threshold (never at start).
        embedding_sessions: ONNX sessions embedding documents (each a copy of the weights,
            ~23 MB int8); the index follower splits each batch across them, so more than one
            uses more than one core.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_KNOWLEDGE_", extra="ignore")

    idempotency_ttl_s: float = Field(default=86_400.0, ge=3600)
    idempotency_gc_interval_s: float = Field(default=600.0, ge=0)
    jobs_lease_ttl_s: float = Field(default=30.0, ge=1.0, le=600.0)
    index_dir: Path = Path(".var/knowledge/index")
    model_dir: Path = Path(".var/models")
    embedding_int8: bool = True
    embedding_threads: int = Field(default=1, ge=1)
    embedding_sessions: int = Field(default=1, ge=1, le=16)
    search_candidates: int = Field(default=100, ge=10, le=1000)
    dense_weight: float = Field(default=0.5, ge=0)
    lexical_weight: float = Field(default=0.5, ge=0)
    bm25_avgdl: float = Field(default=60.0, gt=0)
    read_wait_s: float = Field(default=0.5, ge=0)
    consistency_wait_s: float = Field(default=5.0, gt=0)
    reconcile_interval_s: float = Field(default=600.0, ge=0)
    outbox_trim_interval_s: float = Field(default=300.0, ge=0)
    outbox_report_interval_s: float = Field(default=10.0, gt=0)
    graph_build_min_points: int = Field(default=0, ge=0)
    graph_build_interval_s: float = Field(default=60.0, gt=0)
