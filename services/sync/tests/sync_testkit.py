"""Helpers for the sync service tests: a started server on real PostgreSQL and Redis whose
role bindings come from a :class:`StaticDirectory`, one org tree per test tenant, and a
publisher that appends envelopes to a tenant stream as the services' outbox relays do."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import redis.asyncio as aioredis
from aeterna.sync.v1 import sync_service_pb2_grpc as svc_grpc
from aeterna_common.auth import TokenVerifier
from aeterna_common.authz import OrgUnit, RoleBinding, Snapshot, StaticDirectory, UnitKind
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.events import STREAMS_KEY, Event, stream_key
from aeterna_common.events.envelope import rfc3339
from aeterna_common.server import GrpcServer
from aeterna_devstack.pytest_plugin import DatabaseUrls, auth_settings
from aeterna_sync.app import SyncApp, build
from aeterna_sync.settings import SyncSettings
from governance_testkit import md, new_tenant

UNITS = (
    OrgUnit("acme", UnitKind.COMPANY),
    OrgUnit("eng", UnitKind.ORGANIZATION, "acme"),
    OrgUnit("payments", UnitKind.TEAM, "eng"),
    OrgUnit("checkout", UnitKind.PROJECT, "payments"),
    OrgUnit("search", UnitKind.TEAM, "eng"),
)
"""The tree of every test tenant (knowledge's)."""

BINDINGS = (
    RoleBinding("users/dev", "DEVELOPER", "checkout"),
    RoleBinding("users/viewer", "VIEWER", "payments"),
    RoleBinding("users/other", "TECH_LEAD", "search"),
)
"""Who holds which role where in every test tenant."""


@dataclass
class SyncEnv:
    """A started sync server, its directory, Redis and a stub."""

    server: GrpcServer
    app: SyncApp
    channel: grpc.aio.Channel
    stub: svc_grpc.SyncServiceStub
    directory: StaticDirectory
    redis: aioredis.Redis

    def tenant(self) -> str:
        """A new tenant with the tree :data:`UNITS` and the bindings :data:`BINDINGS`."""
        tenant = new_tenant()
        self.directory.put(Snapshot(tenant, 1, UNITS, BINDINGS))
        return tenant

    async def close(self) -> None:
        """Close the channel, Redis and the server."""
        await self.channel.close()
        await self.redis.aclose()
        await self.server.stop()


async def start_sync(
    urls: DatabaseUrls, redis_url: str, directory: StaticDirectory, **settings: Any
) -> SyncEnv:
    """Build the service as ``serve`` does (migrating at start) and start it on a free port;
    token roles are trusted (tenant admins by token, as in ``make run``)."""
    common = CommonSettings(
        database_url=urls.app,
        database_owner_url=urls.owner,
        database_indexer_url=urls.indexer,
        redis_url=redis_url,
        auth_trust_token_roles=True,
        **auth_settings(),
    )
    app = await build(
        common, SyncSettings(**settings), SchemaSettings(migrate_on_start=True), directory
    )
    server = GrpcServer(
        app, verifier=TokenVerifier.from_settings(common), listen="127.0.0.1:0", grace_period_s=1
    )
    await server.start(wait_ready=True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return SyncEnv(
        server=server,
        app=app,
        channel=channel,
        stub=svc_grpc.SyncServiceStub(channel),
        directory=directory,
        redis=aioredis.Redis.from_url(redis_url, decode_responses=True),
    )


def who(tenant: str, user: str) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``user`` of ``tenant`` (``root`` is a TENANT_ADMIN by token role)."""
    return md(tenant, user, roles=("TENANT_ADMIN",) if user == "root" else ())


class Publisher:
    """Appends events to a tenant stream with the envelope the outbox relays write (the
    producer side of the bus; positions count from 1 per publisher)."""

    def __init__(self, redis: aioredis.Redis, tenant: str, service: str = "memory") -> None:
        self.redis = redis
        self.tenant = tenant
        self.service = service
        self.position = 0

    async def publish(
        self, event_type: str, payload: Mapping[str, Any], resource: str = "", count: int = 1
    ) -> list[str]:
        """Append ``count`` events; returns their entry ids."""
        key = stream_key(self.tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            for _ in range(count):
                self.position += 1
                event = Event(
                    event_id=f"{self.service}:{self.position}",
                    service=self.service,
                    type=event_type,
                    tenant=self.tenant,
                    resource=resource or f"tenants/{self.tenant}/memories/m{self.position}",
                    actor="users/dev",
                    time=rfc3339(datetime.fromtimestamp(time.time(), UTC)),
                    position=self.position,
                    payload=json.loads(json.dumps(dict(payload))),
                )
                pipe.xadd(key, event.to_fields())  # type: ignore[arg-type]
            pipe.sadd(STREAMS_KEY, key)
            ids = await pipe.execute()
        return [str(i) for i in ids[:-1]]
