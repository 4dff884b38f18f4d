"""Helpers for the memory service tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_common.auth import TokenVerifier
from aeterna_common.authz import StaticDirectory
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.server import GrpcServer
from aeterna_devstack.pytest_plugin import DatabaseUrls, auth_settings, session_auth
from aeterna_devstack.stack import require_model
from aeterna_memory.app import build
from aeterna_memory.settings import MemorySettings


@dataclass
class MemoryEnv:
    urls: DatabaseUrls
    redis_url: str
    server: GrpcServer
    stub: svc_grpc.MemoryServiceStub
    app: Any
    index_dir: Path

    @property
    def domain(self) -> Any:
        return self.app.domain

    @property
    def follower(self) -> Any:
        return self.app.follower


def md(
    tenant: str,
    user: str = "u1",
    agent: str | None = None,
    roles: tuple[str, ...] = ("TENANT_ADMIN",),
) -> tuple[tuple[str, str], ...]:
    """Call metadata with a real bearer token for ``tenant``'s ``user`` (and ``agent``).

    The tests of memory's behaviour act as TENANT_ADMIN (token roles are trusted by the test
    servers, as in ``make run``); the permission tests pass ``roles=()``.
    """
    token = session_auth().issue_token(tenant, user, agent=agent, roles=roles)
    return (("authorization", f"Bearer {token}"),)


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def memory(content: str, layer: str = "USER", **scope: str) -> res.Memory:
    return res.Memory(
        layer=layer_pb2.MemoryLayer.Value(f"MEMORY_LAYER_{layer}"),
        scope=layer_pb2.Scope(**scope),
        content=content,
    )


async def create(env: MemoryEnv, tenant: str, m: res.Memory, **kw: Any) -> res.Memory:
    return await env.stub.CreateMemory(
        svc.CreateMemoryRequest(parent=f"tenants/{tenant}", memory=m, **kw), metadata=md(tenant)
    )


async def start_memory(
    urls: DatabaseUrls,
    redis_url: str,
    index_dir: Path,
    *,
    schema: SchemaSettings | None = None,
    wait_ready: bool = True,
    **settings: Any,
) -> tuple[GrpcServer, Any]:
    common = CommonSettings(
        database_url=urls.app,
        database_owner_url=urls.owner,
        database_indexer_url=urls.indexer,
        redis_url=redis_url,
        service_token_file=session_auth().write_service_token("memory"),
        auth_trust_token_roles=True,
        **auth_settings(),
    )
    # The model built by `make model` (AETERNA_MEMORY_MODEL_DIR), as the service loads it.
    settings.setdefault("model_dir", require_model())
    # Lifecycle jobs run only where a test asks for them: tests call them directly and
    # assert exactly what one run did.
    settings.setdefault("expiry_interval_s", 0)
    settings.setdefault("purge_interval_s", 0)
    settings.setdefault("decay_interval_s", 0)
    settings.setdefault("outbox_trim_interval_s", 0)
    settings.setdefault("promotion_interval_s", 0)
    settings.setdefault("outbox_report_interval_s", 3600)
    # Role bindings from plain data: a test puts its tenant's org tree and bindings in
    # ``app.authz.directory.directory`` (a StaticDirectory) before its first call.
    # The events relay's cursor holds the outbox trim back; tests that trim assert exact
    # bounds, so the relay runs only where a test asks for it (test_events_relay.py).
    settings.setdefault("events_relay", False)
    # Bulk work in child processes (the shipped default) costs two spawned interpreters per
    # replica: the session's shared replica (conftest ``env``) runs with them, the many
    # short-lived replicas of single tests embed and encode in process.
    settings.setdefault("background_process", False)
    app = await build(
        common,
        MemorySettings(index_dir=index_dir, **settings),
        schema or SchemaSettings(migrate_on_start=True),
        directory=StaticDirectory(),
    )
    server = GrpcServer(
        app, verifier=TokenVerifier.from_settings(common), listen="127.0.0.1:0", grace_period_s=2
    )
    await server.start(wait_ready=wait_ready)
    return server, app
