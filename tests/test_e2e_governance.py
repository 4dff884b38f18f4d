"""Governance end to end: two governance replicas behind the gateway Envoy (as ``make run``
starts them, migrated by the owner role first), driven by the ``aeterna`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack
from grpc_health.v1 import health_pb2, health_pb2_grpc


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack("aeterna-e2e-gov-", replicas=0, governance_replicas=2) as s:
        yield s


def cli(stack: DevStack, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    done = subprocess.run(
        [sys.executable, "-m", "aeterna_cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


async def test_governance_behind_the_gateway(stack: DevStack) -> None:
    assert len(stack.governance_list) == 2
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        for replica in stack.governance_list:
            async with grpc.aio.insecure_channel(replica.target) as direct:
                reply = await health_pb2_grpc.HealthStub(direct).Check(
                    health_pb2.HealthCheckRequest(service="aeterna.governance.v1.ApprovalService")
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Without a token the edge refuses; with one, the route reaches a replica.
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await orgs.ListOrgUnits(osvc.ListOrgUnitsRequest(parent="tenants/edge"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = DevAuth(stack.root / "auth").issue_token("edge", "u")
        listed = await orgs.ListOrgUnits(
            osvc.ListOrgUnitsRequest(parent="tenants/edge"),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        assert list(listed.org_units) == []


def test_cli_org_and_role_groups(stack: DevStack) -> None:
    admin = ("--tenant", "acme", "--user", "root", "--roles", "TENANT_ADMIN")
    created = json.loads(
        cli(stack, "org", "create", "acme", "--kind", "company", *admin, "--json").stdout
    )
    assert created["name"] == "tenants/acme/orgUnits/acme" and created["consistencyToken"]
    cli(stack, "org", "create", "eng", "--kind", "organization", "--parent", "acme", *admin)
    cli(stack, "org", "create", "payments", "--kind", "team", "--parent", "eng", *admin)
    cli(stack, "org", "create", "ops", "--kind", "organization", "--parent", "acme", *admin)
    # A retried create with its request id creates nothing new.
    keyed = ("org", "create", "search", "--kind", "team", "--parent", "eng", *admin, "--json")
    first = json.loads(cli(stack, *keyed, "--request-id", "mk-search").stdout)
    again = json.loads(cli(stack, *keyed, "--request-id", "mk-search").stdout)
    assert first["createTime"] == again["createTime"]
    moved = json.loads(cli(stack, "org", "move", "search", "--to", "ops", *admin, "--json").stdout)
    assert moved["parent"] == "tenants/acme/orgUnits/ops"
    # The wrong parent kind comes back with its field.
    bad = cli(
        stack, "org", "create", "p1", "--kind", "project", "--parent", "eng", *admin, ok=False
    )
    assert "PARENT_KIND_MISMATCH" in bad.stdout and "org_unit.parent" in bad.stdout
    units = json.loads(
        cli(stack, "org", "list", "--tenant", "acme", "--user", "bob", "--json").stdout
    )
    assert [u["name"].rsplit("/", 1)[1] for u in units] == [
        "acme",
        "eng",
        "ops",
        "payments",
        "search",
    ]
    got = json.loads(cli(stack, "org", "get", "payments", "--tenant", "acme", "--json").stdout)
    assert got[0]["parent"] == "tenants/acme/orgUnits/eng"

    granted = json.loads(
        cli(stack, "role", "grant", "lead", "ADMIN", "--unit", "payments", *admin, "--json").stdout
    )
    assert granted["subject"] == "users/lead" and granted["role"] == "ROLE_ADMIN"
    # The lead administers payments: it creates a project there, not under ops.
    lead = ("--tenant", "acme", "--user", "lead")
    cli(stack, "org", "create", "checkout", "--kind", "project", "--parent", "payments", *lead)
    refused = cli(
        stack, "org", "create", "x", "--kind", "project", "--parent", "search", *lead, ok=False
    )
    assert "PERMISSION_DENIED" in refused.stdout and "ACTION_NOT_ALLOWED" in refused.stdout
    unknown = cli(stack, "role", "grant", "bob", "OVERLORD", "--unit", "eng", *admin, ok=False)
    assert "unknown role" in unknown.stdout + unknown.stderr
    listed = json.loads(
        cli(stack, "role", "list", "--subject", "lead", "--tenant", "acme", "--json").stdout
    )
    assert [b["name"] for b in listed] == [granted["name"]]
    cli(stack, "role", "revoke", granted["name"].rsplit("/", 1)[1], *admin)
    assert json.loads(cli(stack, "role", "list", "--tenant", "acme", "--json").stdout) == []
    # Bob cannot delete the unit; the admin can, once it is empty.
    cli(stack, "org", "delete", "checkout", "--tenant", "acme", "--user", "bob", ok=False)
    cli(stack, "org", "delete", "checkout", *admin)
    gone = cli(stack, "org", "get", "checkout", "--tenant", "acme", ok=False)
    assert "NOT_FOUND" in gone.stdout


def test_cli_approval_group(stack: DevStack) -> None:
    admin = ("--tenant", "appr", "--user", "root", "--roles", "TENANT_ADMIN")
    cli(stack, "org", "create", "acme", "--kind", "company", *admin)
    cli(stack, "role", "grant", "boss", "ADMIN", "--unit", "acme", *admin)
    from aeterna.governance.v1 import approval_service_pb2 as asvc
    from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
    from aeterna.governance.v1 import resources_pb2 as res

    async def ask() -> str:
        token = DevAuth(stack.root / "auth").issue_token("appr", "dev")
        async with grpc.aio.insecure_channel(stack.endpoint) as ch:
            made = await asvc_grpc.ApprovalServiceStub(ch).CreateApprovalRequest(
                asvc.CreateApprovalRequestRequest(
                    parent="tenants/appr",
                    approval_request=res.ApprovalRequest(
                        type=res.APPROVAL_TYPE_ROLE,
                        org_unit="tenants/appr/orgUnits/acme",
                        target="tenants/appr/roleBindings/x",
                        title="make dev an architect",
                    ),
                ),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        return made.name

    import asyncio

    name = asyncio.run(ask())
    waiting = json.loads(
        cli(
            stack,
            "approval",
            "list",
            "--awaiting-me",
            "--tenant",
            "appr",
            "--user",
            "boss",
            "--json",
        ).stdout
    )
    assert [a["name"] for a in waiting] == [name]
    selfish = cli(stack, "approval", "approve", name, "--tenant", "appr", "--user", "dev", ok=False)
    assert "PERMISSION_DENIED" in selfish.stdout
    no_reason = cli(
        stack,
        "approval",
        "reject",
        name,
        "--comment",
        "",
        "--tenant",
        "appr",
        "--user",
        "boss",
        ok=False,
    )
    assert "comment" in no_reason.stdout
    approved = json.loads(
        cli(
            stack, "approval", "approve", name, "--tenant", "appr", "--user", "boss", "--json"
        ).stdout
    )
    assert approved["state"] == "APPROVAL_STATE_APPROVED"
    done = json.loads(
        cli(stack, "approval", "list", "--state", "approved", "--tenant", "appr", "--json").stdout
    )
    assert [a["name"] for a in done] == [name]
