"""Helpers for the governance service tests: a started server on real PostgreSQL, tokens."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from aeterna.governance.v1 import approval_service_pb2_grpc as approval_grpc
from aeterna.governance.v1 import organization_service_pb2_grpc as org_grpc
from aeterna_common.auth import TokenVerifier
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.server import GrpcServer
from aeterna_devstack.pytest_plugin import DatabaseUrls, auth_settings, session_auth
from aeterna_governance.app import GovernanceApp, build
from aeterna_governance.settings import GovernanceSettings


@dataclass
class GovernanceEnv:
    """A started governance server and stubs on one channel to it."""

    urls: DatabaseUrls
    server: GrpcServer
    app: GovernanceApp
    channel: grpc.aio.Channel
    orgs: org_grpc.OrganizationServiceStub
    approvals: approval_grpc.ApprovalServiceStub


def md(
    tenant: str | None,
    user: str = "u1",
    agent: str | None = None,
    roles: Iterable[str] = (),
) -> tuple[tuple[str, str], ...]:
    """Call metadata with a real bearer token for ``tenant``'s ``user``."""
    token = session_auth().issue_token(tenant, user, agent=agent, roles=roles)
    return (("authorization", f"Bearer {token}"),)


def admin(tenant: str, user: str = "root") -> tuple[tuple[str, str], ...]:
    """Metadata of a TENANT_ADMIN by token role (trusted in tests, as in ``make run``)."""
    return md(tenant, user, roles=("TENANT_ADMIN",))


def service_md(service: str = "memory") -> tuple[tuple[str, str], ...]:
    """Metadata of a service principal (no tenant)."""
    return (("authorization", f"Bearer {session_auth().issue_service_token(service)}"),)


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def start_governance(
    urls: DatabaseUrls,
    *,
    wait_ready: bool = True,
    trust_token_roles: bool = True,
    **settings: Any,
) -> tuple[GrpcServer, GovernanceApp]:
    """Build the service as ``serve`` does (migrating at start) and start it on a free port."""
    common = CommonSettings(
        database_url=urls.app,
        database_owner_url=urls.owner,
        database_indexer_url=urls.indexer,
        service_token_file=session_auth().write_service_token("governance"),
        auth_trust_token_roles=trust_token_roles,
        **auth_settings(),
    )
    # Background jobs run only where a test asks for them; tests call the jobs directly.
    settings.setdefault("idempotency_gc_interval_s", 0)
    settings.setdefault("approval_expiry_interval_s", 0)
    app = await build(common, GovernanceSettings(**settings), SchemaSettings(migrate_on_start=True))
    server = GrpcServer(
        app, verifier=TokenVerifier.from_settings(common), listen="127.0.0.1:0", grace_period_s=2
    )
    await server.start(wait_ready=wait_ready)
    return server, app


def details(exc: grpc.aio.AioRpcError) -> tuple[str, list[str], dict[str, str]]:
    """``(ErrorInfo.reason, BadRequest fields, ErrorInfo.metadata)`` of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)
    assert status is not None
    reason, fields, meta = "", [], {}
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason, meta = info.reason, dict(info.metadata)
            assert info.domain == "aeterna.dev"
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields, meta


async def expect(coro: Any, code: grpc.StatusCode) -> tuple[str, list[str], dict[str, str]]:
    """Await a call that must fail with ``code``; its error details."""
    import pytest

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    return details(info.value)
