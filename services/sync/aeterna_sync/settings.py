"""Settings of the sync service (environment prefix ``AETERNA_SYNC_``), validated at start.
Shared settings (database, Redis, listen address, logs, auth, the authorization directory)
are in :class:`aeterna_common.config.CommonSettings` (prefix ``AETERNA_``)."""

from __future__ import annotations

from aeterna.sync.v1 import resources_pb2 as res
from aeterna_common.promotion import DEFAULT_THRESHOLD
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SyncSettings(BaseSettings):
    """Configuration of the sync service.

    Attributes:
        subscriber_buffer: Live events held per subscriber waiting to be sent; a subscriber
            that falls further behind is ended with ``RESOURCE_EXHAUSTED`` and the cursor to
            resume from, so a replica never buffers without limit (issue 9).
        keepalive_s: Seconds without an event after which a subscriber gets a keepalive
            message with its cursor (keeps proxies' idle timeouts from ending the stream).
        catchup_page: Entries read per ``XRANGE`` while a resumed subscriber catches up.
        block_ms: Longest ``XREAD BLOCK`` of a tenant feed, in milliseconds.
        max_rooms: Most rooms in one subscription or heartbeat.
        presence_interval_s: Seconds between heartbeats a client is told to keep (issue 9:
            30 s).
        presence_ttl_s: Seconds after its last heartbeat a client is gone (issue 9: 90 s).
        presence_sweep_s: Seconds between sweeps for clients gone silent (each replica
            sweeps; removal is atomic, so one replica announces each leave).
        idempotency_ttl_s: Seconds a ``request_id`` is remembered; 24 h, as the other
            services'.
        jobs_lease_ttl_s: Time to live in seconds of the background jobs' leases (and of a
            tenant's pointer cycle lease).
        knowledge_url: ``host:port`` of knowledge for pointer sync; empty: the authorization
            directory's address (the sidecar or gateway, which routes every service).
        memory_url: ``host:port`` of memory for pointer and device sync; empty: as
            ``knowledge_url``.
        device_max_entries: Most entries in one PushMemories (the proto's 500).
        device_max_push_bytes: Most bytes of contents and tags in one PushMemories.
        device_max_skew_s: Seconds a device's edit time may lie in the future (issue 9: 24 h).
        device_settle_s: Seconds a memory change may take from its update time to its commit;
            a pull cursor never passes younger changes (they are sent again next pull).
        reconcile_interval_s: Seconds between scheduled full reconciles of every tenant's
            pointers (one replica at a time, under the lease ``sync:pointers-reconcile``);
            they also resume cycles a dead replica left and delete expired failed items.
        follow_knowledge_events: Run a cycle for a tenant when knowledge's events
            (``knowledge.*``) reach its stream, so an accepted item gets its pointer within
            seconds without a call.
        event_debounce_s: Seconds a replica waits after a knowledge event before the
            tenant's cycle, so a burst of changes costs one cycle.
        item_attempts: Attempts of one call to memory or knowledge within a cycle
            (exponential backoff between them, on transient codes only).
        failed_retry_base_s: Backoff before a failed item's second attempt in a later
            cycle, in seconds; it doubles with every failure.
        failed_retry_max_s: Longest backoff of a failed item, in seconds.
        failed_retention_days: Days a failed item is kept (issue 9: 30), then deleted by
            the scheduled job.
        auto_resolve: Conflict kinds resolved automatically (comma-separated names such as
            ``HASH_MISMATCH``); the others are left open for ``ResolveSyncConflict``.
        proposal_threshold: Promotion score (DOMAIN.md formula) from which a PROJECT, TEAM
            or ORG memory is proposed as a knowledge draft, in [0, 1]; DOMAIN.md's 0.8.
        proposal_events: Propose from memory events on the bus (consumer group
            ``sync-proposals``); off, only ``TriggerSync`` proposes.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_SYNC_", extra="ignore")

    subscriber_buffer: int = Field(default=10_000, ge=10, le=1_000_000)
    keepalive_s: float = Field(default=15.0, gt=0, le=300)
    catchup_page: int = Field(default=500, ge=1, le=10_000)
    block_ms: int = Field(default=5_000, ge=10, le=60_000)
    max_rooms: int = Field(default=16, ge=1, le=256)
    presence_interval_s: float = Field(default=30.0, gt=0)
    presence_ttl_s: float = Field(default=90.0, gt=0)
    presence_sweep_s: float = Field(default=5.0, gt=0)
    idempotency_ttl_s: float = Field(default=86_400.0, ge=3600)
    jobs_lease_ttl_s: float = Field(default=30.0, ge=1.0, le=600.0)
    knowledge_url: str = ""
    memory_url: str = ""
    device_max_entries: int = Field(default=500, ge=1, le=500)
    device_max_push_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    device_max_skew_s: float = Field(default=86_400.0, ge=0)
    device_settle_s: float = Field(default=5.0, ge=0, le=600)
    reconcile_interval_s: float = Field(default=300.0, gt=0)
    follow_knowledge_events: bool = True
    event_debounce_s: float = Field(default=0.5, ge=0, le=60)
    item_attempts: int = Field(default=3, ge=1, le=10)
    failed_retry_base_s: float = Field(default=30.0, gt=0)
    failed_retry_max_s: float = Field(default=3600.0, gt=0)
    failed_retention_days: float = Field(default=30.0, gt=0)
    auto_resolve: str = (
        "HASH_MISMATCH,ORPHANED_POINTER,MISSING_POINTER,DUPLICATE_POINTER,STATUS_CHANGE,"
        "LAYER_MISMATCH"
    )

    proposal_threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    proposal_events: bool = True

    @field_validator("auto_resolve")
    @classmethod
    def _known_kinds(cls, value: str) -> str:
        for raw in value.split(","):
            name = raw.strip().upper().removeprefix("CONFLICT_KIND_")
            if name and f"CONFLICT_KIND_{name}" not in res.ConflictKind.keys():
                raise ValueError(f"unknown conflict kind {raw.strip()!r}")
        return value
