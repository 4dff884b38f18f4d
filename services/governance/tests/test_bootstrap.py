"""``aeterna-governance bootstrap``: the first TENANT_ADMIN of a tenant, as an operator runs
it (a process with the owner DSN), idempotent and recorded in the outbox."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import grpc
from aeterna.governance.v1 import organization_service_pb2 as svc
from aeterna.governance.v1 import resources_pb2 as res
from governance_testkit import GovernanceEnv, expect, md, new_tenant
from test_organization import COMPANY, outbox


async def run_bootstrap(gov: GovernanceEnv, *args: str) -> tuple[int, str]:
    """Run the command in a process as an operator would; exit code and output."""
    env = {
        **os.environ,
        "AETERNA_DATABASE_URL": gov.urls.app,
        "AETERNA_DATABASE_OWNER_URL": gov.urls.owner,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aeterna_governance",
        "bootstrap",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def create_company(t: str, unit_id: str) -> svc.CreateOrgUnitRequest:
    return svc.CreateOrgUnitRequest(
        parent=f"tenants/{t}",
        org_unit_id=unit_id,
        org_unit=res.OrgUnit(kind=COMPANY, display_name=unit_id),
    )


async def test_bootstrap_binds_the_first_tenant_admin_once(gov: GovernanceEnv) -> None:
    t = new_tenant()
    code, out = await run_bootstrap(gov, "--tenant", t, "--admin", "users/root")
    assert code == 0 and "bound now" in out, out
    # The binding, not a token role, makes root a tenant admin (md sends no roles).
    await gov.orgs.CreateOrgUnit(create_company(t, "acme"), metadata=md(t, "root"))
    await expect(
        gov.orgs.CreateOrgUnit(create_company(t, "other"), metadata=md(t, "mallory")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Idempotent: a second run writes nothing, and the change is one outbox event.
    code, out = await run_bootstrap(gov, "--tenant", t, "--admin", "users/root")
    assert code == 0 and "already bound" in out, out
    events = [(e["event_type"], e["actor"]) for e in await outbox(gov, t)]
    assert events[0] == ("governance.role_binding.created", "services/governance-bootstrap")
    assert [e for e in events if e[1] == "services/governance-bootstrap"] == [events[0]]


async def test_bootstrap_refuses_bad_input_and_the_owner_sees_nothing_else(
    gov: GovernanceEnv,
) -> None:
    code, out = await run_bootstrap(gov, "--tenant", "no spaces", "--admin", "users/root")
    assert code == 1 and "invalid arguments: tenant" in out, out
    code, out = await run_bootstrap(gov, "--tenant", new_tenant(), "--admin", "agents/bot")
    assert code == 1 and "invalid arguments: admin" in out, out
    # The owner's bootstrap policies admit tenant-wide TENANT_ADMIN bindings and their events
    # only: it still reads no unit, and writes no other binding.
    t = new_tenant()
    await run_bootstrap(gov, "--tenant", t, "--admin", "users/root")
    await gov.orgs.CreateOrgUnit(create_company(t, "acme"), metadata=md(t, "root"))
    owner = await asyncpg.connect(gov.urls.owner)
    try:
        assert await owner.fetchval("SELECT count(*) FROM org_units WHERE tenant_id = $1", t) == 0
        try:
            await owner.execute(
                "INSERT INTO role_bindings (tenant_id, id, subject, role, org_unit_id, creator) "
                "VALUES ($1, gen_random_uuid(), 'users/x', 5, 'acme', "
                "'services/governance-bootstrap')",
                t,
            )
            raise AssertionError("the owner wrote a unit binding")
        except asyncpg.InsufficientPrivilegeError:
            pass
    finally:
        await owner.close()
