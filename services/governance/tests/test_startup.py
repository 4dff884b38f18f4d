"""The service starts on a fresh database, reports health per service, and refuses calls
without a token."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as org
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_governance.app import SERVICERS
from governance_testkit import GovernanceEnv, admin
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


async def test_every_table_forces_rls_and_a_forged_binding_sees_nothing(
    gov: GovernanceEnv,
) -> None:
    owner = await asyncpg.connect(gov.urls.owner)
    try:
        forced = await owner.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relforcerowsecurity "
            "AND relnamespace = 'public'::regnamespace"
        )
    finally:
        await owner.close()
    assert {r["relname"] for r in forced} >= {
        "org_units",
        "role_bindings",
        "delegations",
        "approval_requests",
        "approval_decisions",
        "idempotency_keys",
        "outbox",
    }
    await gov.orgs.CreateOrgUnit(
        org.CreateOrgUnitRequest(
            parent="tenants/forge",
            org_unit_id="acme",
            org_unit=res.OrgUnit(kind=res.ORG_UNIT_KIND_COMPANY, display_name="Acme"),
        ),
        metadata=admin("forge"),
    )
    app = await asyncpg.connect(gov.urls.app)
    try:
        async with app.transaction():
            # A binding written by hand, not by aeterna_bind_tenant: its seal does not match.
            await app.execute(
                "SELECT set_config('aeterna.tenant_binding', 'forge/' || repeat('0', 64), true)"
            )
            assert await app.fetchval("SELECT aeterna_tenant()") is None
            assert await app.fetchval("SELECT count(*) FROM org_units") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("CREATE TABLE scratch (a int)")
    finally:
        await app.close()
