"""Composition root of the governance service: opens the database, builds the authorizer
(its directory reads governance's own tables), every servicer listed in :data:`SERVICERS`,
their background jobs and the outbox relay to Redis Streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as aioredis
import structlog
from aeterna_common.anomaly import UsageWindow, monitor_job
from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz import Authorizer, DirectoryCache
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database, SchemaNotReadyError, SchemaSettings, prepare_schema
from aeterna_common.events import relay_from_settings
from aeterna_common.leases import Lease
from aeterna_common.server import ServiceApp, StartupError
from aeterna_common.usage import EVENTS_DELIVERED

from aeterna_governance import (
    approval_servicer,
    audit_servicer,
    organization_servicer,
    policy_servicer,
    store,
    usage_servicer,
)
from aeterna_governance.access import Access, OwnTablesDirectory
from aeterna_governance.deps import Deps, Job, Registered, ServicerSpec
from aeterna_governance.organization import read_snapshot
from aeterna_governance.settings import GovernanceSettings

log = structlog.get_logger("aeterna.governance")

MIGRATIONS = Path(__file__).parent / "migrations"

SERVICERS: list[ServicerSpec] = [
    organization_servicer.SPEC,
    approval_servicer.SPEC,
    policy_servicer.SPEC,
    audit_servicer.SPEC,
    usage_servicer.SPEC,
]
"""Every service governance serves; a new servicer module adds its ``SPEC`` here."""


@dataclass(kw_only=True)
class GovernanceApp(ServiceApp):
    """The governance service's :class:`ServiceApp`.

    Attributes:
        deps: The shared dependencies.
        servicers: Service name → its registration (filled when the server starts).
    """

    deps: Deps
    servicers: dict[str, Registered] = field(default_factory=dict)


async def build(
    common: CommonSettings | None = None,
    settings: GovernanceSettings | None = None,
    schema: SchemaSettings | None = None,
) -> GovernanceApp:
    """Build the governance service: migrate or wait for the schema, open the pools.

    Args:
        common: Shared settings; read from the environment when omitted.
        settings: Governance settings; read from the environment when omitted.
        schema: Migrate at start or wait for the schema; read from the environment when
            omitted.

    Raises:
        StartupError: The schema did not reach the version this code needs in time.
    """
    common = common or CommonSettings()
    settings = settings or GovernanceSettings()
    schema = schema or SchemaSettings()
    credentials = ServiceCredentials.from_settings(common)
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
    # One authorizer per replica, its directory this replica's own tables (the source of
    # the bindings), cached and invalidated as in every service (aeterna_common.authz).
    bindings = DirectoryCache(
        OwnTablesDirectory(lambda tenant_id: read_snapshot(db, tenant_id)),
        redis_url=common.redis_url,
        ttl_s=common.authz_cache_ttl_s,
        stale_grace_s=common.authz_stale_grace_s,
    )
    deps = Deps(
        common=common,
        settings=settings,
        db=db,
        indexer=indexer,
        access=Access(Authorizer(bindings, trust_token_roles=common.auth_trust_token_roles)),
        credentials=credentials,
    )

    async def collect_idempotency_keys(lease: Lease) -> None:
        deleted = await store.gc_idempotency_keys(db, settings.idempotency_ttl_s)
        if deleted:
            log.info("idempotency.collected", deleted=deleted)

    jobs: list[Job] = [
        deps.under_lease(
            "governance:idempotency:gc",
            settings.idempotency_gc_interval_s,
            collect_idempotency_keys,
        ),
        bindings.watch,
        # Governance's own usage: the events it counts as delivered (its ledger's other
        # rows are memory's and knowledge's usage, which their own detectors watch).
        monitor_job(
            db,
            store.NOTIFY_CHANNEL,
            "governance",
            usage=UsageWindow(indexer, "tenant_usage_hourly", metrics=[EVENTS_DELIVERED]),
        ),
    ]
    relaying = relay_from_settings(
        settings,
        redis_url=common.redis_url,
        db=db,
        reader=indexer,
        service="governance",
        listen_dsn=common.database_indexer_url,
        notify_channel=store.NOTIFY_CHANNEL,
    )
    events_redis: aioredis.Redis | None = None
    if relaying is not None:
        relay, events_redis = relaying
        jobs.append(relay.run)
    app = GovernanceApp(
        service_names=[spec.service_name for spec in SERVICERS],
        register=lambda server: None,
        close=lambda: _close(db, indexer, bindings, events_redis),
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
    db: Database, indexer: Database, bindings: DirectoryCache, events_redis: aioredis.Redis | None
) -> None:
    await bindings.close()
    if events_redis is not None:
        await events_redis.aclose()
    await indexer.close()
    await db.close()
