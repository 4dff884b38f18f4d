"""The service starts on a fresh database, reports health per service, and refuses calls
without a token."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as org
from aeterna_governance.app import SERVICERS
from governance_testkit import GovernanceEnv
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def test_every_service_is_serving(gov: GovernanceEnv) -> None:
    health = health_pb2_grpc.HealthStub(gov.channel)
    for name in ["", *(spec.service_name for spec in SERVICERS)]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_call_without_token_is_unauthenticated(gov: GovernanceEnv) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gov.orgs.GetOrgUnit(org.GetOrgUnitRequest(name="tenants/t/orgUnits/x"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_app_role_sees_no_rows_without_a_bound_tenant(gov: GovernanceEnv) -> None:
    conn = await asyncpg.connect(gov.urls.owner)
    try:
        forced = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relforcerowsecurity "
            "AND relnamespace = 'public'::regnamespace ORDER BY relname"
        )
    finally:
        await conn.close()
    assert {r["relname"] for r in forced} >= {
        "org_units",
        "role_bindings",
        "delegations",
        "approval_requests",
        "approval_decisions",
        "idempotency_keys",
        "outbox",
    }
    app = await asyncpg.connect(gov.urls.app)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute(
                "SELECT set_config('aeterna.tenant_binding', 'x/' || repeat('0', 64), false); CREATE TABLE x (a int)"
            )
        assert await app.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await app.close()
