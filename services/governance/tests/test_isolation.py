"""Refusals below the API: row-level security between tenants, token roles that are not
trusted, the consistency token, NOTIFY of outbox appends, and expired delegations."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
from aeterna.governance.v1 import organization_service_pb2 as svc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common.authz import Authorizer
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, decode_token
from aeterna_common.context import Principal
from aeterna_governance.access import Access
from aeterna_governance.store import NOTIFY_CHANNEL
from governance_testkit import GovernanceEnv, admin, expect, md, new_tenant
from test_organization import COMPANY, delegate, tree, unit


async def test_rls_keeps_each_tenant_to_its_rows(gov: GovernanceEnv) -> None:
    a, b = new_tenant(), new_tenant()
    await unit(gov, a, "acme", COMPANY)
    await unit(gov, b, "other", COMPANY)
    conn = await asyncpg.connect(gov.urls.app)
    try:
        async with conn.transaction():
            await conn.execute("SELECT aeterna_bind_tenant($1)", a)
            seen = await conn.fetch("SELECT tenant_id, id FROM org_units")
            assert {(r["tenant_id"], r["id"]) for r in seen} == {(a, "acme")}
            # Writing another tenant's row is refused by the policy's WITH CHECK.
            try:
                await conn.execute(
                    "INSERT INTO org_units (tenant_id, id, kind, display_name) VALUES ($1, 'x', 1, 'X')",
                    b,
                )
                raise AssertionError("insert into another tenant succeeded")
            except asyncpg.InsufficientPrivilegeError:
                pass
        # Unbound, the application role sees nothing at all.
        assert await conn.fetchval("SELECT count(*) FROM org_units") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await conn.close()


async def test_token_roles_count_only_when_trusted(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await tree(gov, t)
    claimed = Principal(tenant_id=t, user_id="mallory", roles=frozenset({"TENANT_ADMIN"}))
    bindings = gov.app.deps.access.authorizer.directory
    strict = Access(Authorizer(bindings, trust_token_roles=False))
    trusting = Access(Authorizer(bindings, trust_token_roles=True))
    create = "aeterna.governance.v1.OrganizationService/CreateOrgUnit"
    snapshot = "aeterna.governance.v1.OrganizationService/GetAuthorizationSnapshot"
    for action, unit_id in ((create, "eng"), (snapshot, None)):
        await trusting.require_at(claimed, t, action, unit_id)
        try:
            await strict.require_at(claimed, t, action, unit_id)
            raise AssertionError("an untrusted token role was honoured")
        except Exception as exc:
            assert getattr(exc, "reason", "") == "ACTION_NOT_ALLOWED"
    # A binding counts in either mode (the write invalidated this replica's cache).
    await gov.orgs.CreateRoleBinding(
        svc.CreateRoleBindingRequest(
            parent=f"tenants/{t}",
            role_binding=res.RoleBinding(subject="users/mallory", role=res.ROLE_TENANT_ADMIN),
        ),
        metadata=admin(t),
    )
    await strict.require_at(claimed, t, create, "eng")


async def test_writes_send_consistency_tokens_and_reads_check_them(gov: GovernanceEnv) -> None:
    t = new_tenant()
    call = gov.orgs.CreateOrgUnit(
        svc.CreateOrgUnitRequest(
            parent=f"tenants/{t}",
            org_unit_id="acme",
            org_unit=res.OrgUnit(kind=COMPANY, display_name="Acme"),
        ),
        metadata=admin(t),
    )
    await call
    token = dict(await call.initial_metadata())[CONSISTENCY_TOKEN_KEY]
    assert decode_token(token) > 0
    got = await gov.orgs.GetOrgUnit(
        svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/acme"),
        metadata=(*md(t), (CONSISTENCY_TOKEN_KEY, token)),
    )
    assert got.display_name == "Acme"
    reason, fields, _ = await expect(
        gov.orgs.GetOrgUnit(
            svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/acme"),
            metadata=(*md(t), (CONSISTENCY_TOKEN_KEY, "garbage")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("INVALID_CONSISTENCY_TOKEN", [CONSISTENCY_TOKEN_KEY])
    # The header's request id must be the body's.
    reason, _, _ = await expect(
        gov.orgs.CreateOrgUnit(
            svc.CreateOrgUnitRequest(
                parent=f"tenants/{t}",
                org_unit_id="beta",
                org_unit=res.OrgUnit(kind=COMPANY, display_name="Beta"),
                request_id="a",
            ),
            metadata=(*admin(t), ("x-aeterna-request-id", "b")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert reason == "REQUEST_ID_MISMATCH"
    _, fields, _ = await expect(
        unit(gov, t, "gamma", COMPANY, request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert fields == ["request_id"]


async def test_outbox_appends_notify_listeners(gov: GovernanceEnv) -> None:
    t = new_tenant()
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(gov.urls.indexer)
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda *args: heard.put_nowait(args[3]))
        await unit(gov, t, "acme", COMPANY)
        position = int(await asyncio.wait_for(heard.get(), timeout=10))
        async with listener.transaction(readonly=True):
            row = await listener.fetchrow(
                "SELECT tenant_id, event_type, actor FROM outbox WHERE position = $1", position
            )
        assert dict(row) == {
            "tenant_id": t,
            "event_type": "governance.org_unit.created",
            "actor": "users/root",
        }
    finally:
        await listener.close()


async def test_expired_delegations_leave_the_snapshot(gov: GovernanceEnv) -> None:
    t = new_tenant()
    alice = md(t, "alice")
    lasting = await delegate(gov, t, ["memory:read"], alice, agent="a1")
    ending = await delegate(gov, t, ["memory:read", "memory:write"], alice, agent="a2")
    child = await delegate(
        gov, t, ["memory:read"], md(t, "alice", agent="a2"), ending.name, agent="a3"
    )
    owner = await asyncpg.connect(gov.urls.owner)
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE delegations NO FORCE ROW LEVEL SECURITY")
            await owner.execute(
                "UPDATE delegations SET expire_at = now() - interval '1 second' WHERE id = ANY($1)",
                [uuid.UUID(d.name.rsplit("/", 1)[1]) for d in (ending, child)],
            )
            await owner.execute("ALTER TABLE delegations FORCE ROW LEVEL SECURITY")
    finally:
        await owner.close()
    snap = await gov.orgs.GetAuthorizationSnapshot(
        svc.GetAuthorizationSnapshotRequest(name=f"tenants/{t}/authorizationSnapshot"),
        metadata=admin(t),
    )
    assert [d.name for d in snap.delegations] == [lasting.name]
    reason, _, _ = await expect(
        delegate(gov, t, ["memory:read"], md(t, "alice", agent="a2"), ending.name, agent="a4"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "PARENT_INACTIVE"


async def test_expired_idempotency_keys_are_collected(gov: GovernanceEnv) -> None:
    from aeterna_governance import store

    t = new_tenant()
    await unit(gov, t, "acme", COMPANY, request_id="once")
    owner = await asyncpg.connect(gov.urls.owner)
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE idempotency_keys NO FORCE ROW LEVEL SECURITY")
            await owner.execute(
                "UPDATE idempotency_keys SET created_at = now() - interval '2 days' "
                "WHERE tenant_id = $1",
                t,
            )
            await owner.execute("ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY")
    finally:
        await owner.close()
    assert await store.gc_idempotency_keys(gov.app.deps.db, 86_400) >= 1
    # The key is gone: the same request_id is a new request now (and the unit exists).
    await expect(unit(gov, t, "acme", COMPANY, request_id="once"), grpc.StatusCode.ALREADY_EXISTS)
