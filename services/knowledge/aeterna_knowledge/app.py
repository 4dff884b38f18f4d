"""Composition root of the knowledge service: opens the database, builds the authorizer
(role bindings from governance, cached per tenant and invalidated by governance's events),
the servicers listed in :data:`SERVICERS`, the idempotency-key collector and the outbox relay
to Redis Streams."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis
import structlog
from aeterna_common import leases, writes
from aeterna_common.anomaly import monitor_job
from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz import Authorizer, Directory, DirectoryCache
from aeterna_common.authz.governance import directory_from_settings
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database, SchemaNotReadyError, SchemaSettings, prepare_schema
from aeterna_common.events import relay_from_settings
from aeterna_common.server import ServiceApp, StartupError
from aeterna_common.usage import UsageReporter

from aeterna_knowledge import items, servicer
from aeterna_knowledge.access import Access
from aeterna_knowledge.deps import Deps, Job, Registered, ServicerSpec
from aeterna_knowledge.index_follower import trim_outbox
from aeterna_knowledge.promotion import PromotionApprovals
from aeterna_knowledge.promotion_governance import GovernanceApprovals
from aeterna_knowledge.search import SearchParts, open_search
from aeterna_knowledge.settings import KnowledgeSettings

log = structlog.get_logger("aeterna.knowledge")

MIGRATIONS = Path(__file__).parent / "migrations"

SERVICERS: list[ServicerSpec] = [servicer.SPEC]
"""Every service knowledge serves; a new servicer module adds its ``SPEC`` here."""


@dataclass(kw_only=True)
class KnowledgeApp(ServiceApp):
    """The knowledge service's :class:`ServiceApp`.

    Attributes:
        deps: The shared dependencies.
        servicers: Service name → its registration (filled when the server starts).
    """

    deps: Deps
    servicers: dict[str, Registered] = field(default_factory=dict)


async def build(
    common: CommonSettings | None = None,
    settings: KnowledgeSettings | None = None,
    schema: SchemaSettings | None = None,
    directory: Directory | None = None,
    approvals: PromotionApprovals | None = None,
) -> KnowledgeApp:
    """Build the knowledge service: migrate or wait for the schema, open the pools.

    Args:
        common: Shared settings; read from the environment when omitted.
        settings: Knowledge settings; read from the environment when omitted.
        schema: Migrate at start or wait for the schema; read from the environment when
            omitted.
        directory: Source of role bindings in place of governance's (plain data, e.g. a
            :class:`~aeterna_common.authz.StaticDirectory`).
        approvals: Governance's approvals for promotions in place of the one built from
            ``AETERNA_AUTHZ_DIRECTORY_URL`` with the service's own token.

    Raises:
        StartupError: The schema did not reach the version this code needs in time, or the
            directory is misconfigured.
    """
    common = common or CommonSettings()
    settings = settings or KnowledgeSettings()
    schema = schema or SchemaSettings()
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
    indexer = Database(common.database_indexer_url, min_size=1, max_size=common.db_indexer_pool_max)
    try:
        await indexer.open()
    except BaseException:
        await db.close()
        raise
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
    access = Access(authorizer)
    try:
        # Search: the model and this replica's index; the follower catches up in ``prepare``.
        searching = await open_search(common, settings, db, indexer, access)
    except BaseException:
        await indexer.close()
        await db.close()
        raise
    owned_approvals: GovernanceApprovals | None = None
    if approvals is None and common.authz_directory_url:
        credentials = ServiceCredentials.from_settings(common)
        if credentials is not None:
            owned_approvals = GovernanceApprovals(common.authz_directory_url, credentials)
            approvals = owned_approvals
    deps = Deps(
        common=common,
        settings=settings,
        db=db,
        access=access,
        search=searching.search,
        approvals=approvals,
    )

    async def collect_idempotency_keys(lease: leases.Lease) -> None:
        deleted = await writes.gc_idempotency_keys(db, settings.idempotency_ttl_s)
        if deleted:
            log.info("idempotency.collected", deleted=deleted)

    async def idempotency_gc() -> None:
        if settings.idempotency_gc_interval_s:
            await leases.run_periodic_under_lease(
                db.pool,
                "knowledge:idempotency:gc",
                collect_idempotency_keys,
                interval_s=settings.idempotency_gc_interval_s,
                ttl_s=settings.jobs_lease_ttl_s,
            )

    follower = searching.follower
    # This replica's name in outbox_followers: fresh per process (an old one's report expires).
    follower_name = f"edge:{leases.new_owner_id()}"

    async def report_position() -> None:
        while True:
            try:
                await follower.report_position(follower_name, 3 * settings.outbox_report_interval_s)
            except Exception:
                log.exception("index.report_failed")
            await asyncio.sleep(settings.outbox_report_interval_s)

    async def trim(lease: leases.Lease) -> None:
        await trim_outbox(db, lease)

    async def outbox_trim() -> None:
        if settings.outbox_trim_interval_s:
            await leases.run_periodic_under_lease(
                db.pool,
                "knowledge:outbox:trim",
                trim,
                interval_s=settings.outbox_trim_interval_s,
                ttl_s=settings.jobs_lease_ttl_s,
            )

    async def reconcile() -> None:
        # Every replica reconciles its own embedded index.
        while settings.reconcile_interval_s:
            await asyncio.sleep(settings.reconcile_interval_s)
            try:
                await follower.reconcile()
            except Exception:
                log.exception("index.reconcile_failed")

    async def build_graph() -> None:
        # HNSW graphs are built on a copy of the shard (searches never wait), never at start.
        while settings.graph_build_min_points:
            await asyncio.sleep(settings.graph_build_interval_s)
            try:
                await follower.build_graph(settings.graph_build_min_points)
            except Exception:
                log.exception("index.graph_build_failed")

    jobs: list[Job] = [
        idempotency_gc,
        follower.run,
        report_position,
        outbox_trim,
        reconcile,
        build_graph,
        UsageReporter(db, indexer, service="knowledge", channel=items.NOTIFY_CHANNEL).run,
        monitor_job(db, items.NOTIFY_CHANNEL, "knowledge", indexer),
    ]
    if bindings is not None:
        jobs.append(bindings.watch)
    relaying = relay_from_settings(
        settings,
        redis_url=common.redis_url,
        db=db,
        reader=indexer,
        service="knowledge",
        listen_dsn=common.database_indexer_url,
        notify_channel=items.NOTIFY_CHANNEL,
    )
    events_redis: aioredis.Redis | None = None
    if relaying is not None:
        relay, events_redis = relaying
        jobs.append(relay.run)
    app = KnowledgeApp(
        service_names=[spec.service_name for spec in SERVICERS],
        register=lambda server: None,
        close=lambda: _close(db, indexer, bindings, events_redis, searching, owned_approvals),
        prepare=searching.follower.start,
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


async def _close(
    db: Database,
    indexer: Database,
    bindings: DirectoryCache | None,
    events_redis: aioredis.Redis | None,
    searching: SearchParts,
    approvals: GovernanceApprovals | None = None,
) -> None:
    await searching.close()
    if approvals is not None:
        await approvals.close()
    if bindings is not None:
        await bindings.close()
    if events_redis is not None:
        await events_redis.aclose()
    await indexer.close()
    await db.close()
