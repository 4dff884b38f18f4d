"""Composition root of the sync service: opens the database and Redis, builds the
authorizer (role bindings from governance, cached per tenant and invalidated by
governance's events), the replica's tenant feeds, the presence book and the servicers
listed in :data:`SERVICERS`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis
import structlog
from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz import Authorizer, Directory, DirectoryCache
from aeterna_common.authz.governance import directory_from_settings
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database, SchemaNotReadyError, SchemaSettings, prepare_schema
from aeterna_common.events import EventConsumer, StreamTrim, consumer_redis
from aeterna_common.server import ServiceApp, StartupError

from aeterna_sync import pointer_jobs, servicer
from aeterna_sync.access import Access
from aeterna_sync.deps import Deps, Job, Registered, ServicerSpec
from aeterna_sync.devices import DeviceLimits, DeviceSync
from aeterna_sync.live import LiveEvents
from aeterna_sync.pointers import PointerSync
from aeterna_sync.presence import PresenceBook
from aeterna_sync.proposals import GROUP as PROPOSALS_GROUP
from aeterna_sync.proposals import Proposals
from aeterna_sync.settings import SyncSettings

log = structlog.get_logger("aeterna.sync")

MIGRATIONS = Path(__file__).parent / "migrations"

SERVICERS: list[ServicerSpec] = [servicer.SPEC]
"""Every service sync serves; a new servicer module adds its ``SPEC`` here."""


@dataclass(kw_only=True)
class SyncApp(ServiceApp):
    """The sync service's :class:`ServiceApp`.

    Attributes:
        deps: The shared dependencies.
        servicers: Service name → its registration (filled when the server starts).
    """

    deps: Deps
    servicers: dict[str, Registered] = field(default_factory=dict)


async def build(
    common: CommonSettings | None = None,
    settings: SyncSettings | None = None,
    schema: SchemaSettings | None = None,
    directory: Directory | None = None,
) -> SyncApp:
    """Build the sync service: migrate or wait for the schema, open the pools.

    Args:
        common: Shared settings; read from the environment when omitted.
        settings: Sync settings; read from the environment when omitted.
        schema: Migrate at start or wait for the schema; read from the environment when
            omitted.
        directory: Source of role bindings in place of governance's (plain data, e.g. a
            :class:`~aeterna_common.authz.StaticDirectory`).

    Raises:
        StartupError: The schema did not reach the version this code needs in time, the
            directory is misconfigured, or no Redis is configured (the event bus).
    """
    common = common or CommonSettings()
    settings = settings or SyncSettings()
    schema = schema or SchemaSettings()
    if not common.redis_url:
        raise StartupError("AETERNA_REDIS_URL is required: live events come from its streams")
    source = directory_from_settings(common, directory)
    try:
        await prepare_schema(
            schema,
            database_url=common.database_url,
            owner_url=common.database_owner_url,
            directory=MIGRATIONS,
            indexer_url=common.database_indexer_url,
        )
    except SchemaNotReadyError as exc:
        raise StartupError(str(exc)) from exc
    db = Database(common.database_url, min_size=common.db_pool_min, max_size=common.db_pool_max)
    await db.open()
    bindings = (
        DirectoryCache(
            source,
            redis_url=common.redis_url,
            ttl_s=common.authz_cache_ttl_s,
            stale_grace_s=common.authz_stale_grace_s,
        )
        if source is not None
        else None
    )
    authorizer = Authorizer(bindings, trust_token_roles=common.auth_trust_token_roles)
    # Feeds block in XREAD (one pooled connection per followed tenant): no socket timeout
    # shorter than a block.
    redis = aioredis.Redis.from_url(common.redis_url, decode_responses=True, max_connections=10_000)
    live = LiveEvents(redis, buffer=settings.subscriber_buffer, block_ms=settings.block_ms)
    presence = PresenceBook(redis, ttl_s=settings.presence_ttl_s, trim=StreamTrim())
    pointers = _pointers(common, settings, db)
    limits = DeviceLimits(
        max_entries=settings.device_max_entries,
        max_push_bytes=settings.device_max_push_bytes,
        max_skew_s=settings.device_max_skew_s,
        settle_s=settings.device_settle_s,
    )
    memory_url = settings.memory_url or settings.knowledge_url or common.authz_directory_url
    # Device sync forwards each caller's own token: it needs memory's address, no credentials.
    devices = DeviceSync(db, memory_url, limits) if memory_url else None
    # Proposals need what pointer sync needs, and call the same services over its channels.
    proposals = (
        Proposals(
            db,
            pointers.knowledge,
            pointers.memory,
            pointers.credentials,
            settings.proposal_threshold,
        )
        if pointers is not None
        else None
    )
    deps = Deps(
        common=common,
        settings=settings,
        db=db,
        access=Access(authorizer),
        live=live,
        presence=presence,
        pointers=pointers,
        devices=devices,
        devices_limits=limits,
        proposals=proposals,
    )
    jobs: list[Job] = []
    if bindings is not None:
        jobs.append(bindings.watch)
    if pointers is not None:
        jobs.extend(_pointer_jobs(db, pointers, redis, settings))
    if proposals is not None and settings.proposal_events:
        jobs.append(_proposal_consumer(common.redis_url, proposals))
    app = SyncApp(
        service_names=[spec.service_name for spec in SERVICERS],
        register=lambda server: None,
        close=lambda: _close(db, bindings, live, redis, pointers, devices),
        background=jobs,
        deps=deps,
    )

    def register(server: grpc.aio.Server) -> None:
        for spec in SERVICERS:
            registered = spec.build(deps, server)
            app.servicers[spec.service_name] = registered
            jobs.extend(registered.background)

    app.register = register
    return app


def _pointers(common: CommonSettings, settings: SyncSettings, db: Database) -> PointerSync | None:
    """Pointer sync, calling knowledge and memory with the service's own token; None (pointer
    RPCs answer FAILED_PRECONDITION) without a token or an address to call."""
    credentials = ServiceCredentials.from_settings(common)
    knowledge = settings.knowledge_url or common.authz_directory_url
    memory = settings.memory_url or knowledge
    if credentials is None or not knowledge:
        return None
    return PointerSync(db, knowledge, memory, credentials, settings)


def _pointer_jobs(
    db: Database, pointers: PointerSync, redis: aioredis.Redis, settings: SyncSettings
) -> list[Job]:
    """The scheduled reconcile and, unless turned off, the cycles after knowledge's events."""

    async def schedule() -> None:
        await pointer_jobs.scheduled(db, pointers, redis, settings)

    jobs: list[Job] = [schedule]
    if settings.follow_knowledge_events:
        jobs.append(pointer_jobs.KnowledgeEvents(pointers, redis, settings).run)
    return jobs


def _proposal_consumer(redis_url: str, proposals: Proposals) -> Job:
    """The job consuming memory events into proposals: one consumer group over every
    tenant stream, shared by the replicas (each event handled by one of them; a revision is
    proposed once whichever handles it)."""

    async def consume() -> None:
        client = consumer_redis(redis_url, block_s=1.0)
        consumer = EventConsumer(
            client,
            PROPOSALS_GROUP,
            proposals.handle,
            batch_handler=proposals.handle_batch,
            start="0",
        )
        try:
            await consumer.run()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    return consume


async def _close(
    db: Database,
    bindings: DirectoryCache | None,
    live: LiveEvents,
    redis: aioredis.Redis,
    pointers: PointerSync | None,
    devices: DeviceSync | None,
) -> None:
    if pointers is not None:
        await pointers.close()
    if devices is not None:
        await devices.close()
    await live.stop()
    if bindings is not None:
        await bindings.close()
    await redis.aclose()
    await db.close()
