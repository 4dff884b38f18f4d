"""OrganizationService over a real server and PostgreSQL: the unit tree, bindings,
delegations, snapshots, idempotency, the outbox, and every refusal."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from aeterna.governance.v1 import organization_service_pb2 as svc
from aeterna.governance.v1 import resources_pb2 as res
from google.protobuf import field_mask_pb2
from governance_testkit import GovernanceEnv, admin, expect, md, new_tenant, service_md

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

COMPANY, ORG, TEAM, PROJECT = (
    res.ORG_UNIT_KIND_COMPANY,
    res.ORG_UNIT_KIND_ORGANIZATION,
    res.ORG_UNIT_KIND_TEAM,
    res.ORG_UNIT_KIND_PROJECT,
)


async def unit(
    gov: GovernanceEnv,
    t: str,
    uid: str,
    kind: int,
    parent: str = "",
    meta=None,
    **kw,  # type: ignore[no-untyped-def]
) -> res.OrgUnit:
    return await gov.orgs.CreateOrgUnit(
        svc.CreateOrgUnitRequest(
            parent=f"tenants/{t}",
            org_unit_id=uid,
            org_unit=res.OrgUnit(
                kind=kind,
                display_name=uid.upper(),
                parent=f"tenants/{t}/orgUnits/{parent}" if parent else "",
            ),
            **kw,
        ),
        metadata=meta or admin(t),
    )


async def tree(gov: GovernanceEnv, t: str) -> None:
    """acme ⊃ eng ⊃ {payments ⊃ checkout, search}."""
    await unit(gov, t, "acme", COMPANY)
    await unit(gov, t, "eng", ORG, "acme")
    await unit(gov, t, "payments", TEAM, "eng")
    await unit(gov, t, "search", TEAM, "eng")
    await unit(gov, t, "checkout", PROJECT, "payments")


async def bind(
    gov: GovernanceEnv, t: str, subject: str, role: int, at: str = "", meta=None
) -> res.RoleBinding:  # type: ignore[no-untyped-def]
    return await gov.orgs.CreateRoleBinding(
        svc.CreateRoleBindingRequest(
            parent=f"tenants/{t}",
            role_binding=res.RoleBinding(
                subject=subject, role=role, org_unit=f"tenants/{t}/orgUnits/{at}" if at else ""
            ),
        ),
        metadata=meta or admin(t),
    )


async def outbox(gov: GovernanceEnv, t: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(gov.urls.app)
    try:
        async with conn.transaction():
            await conn.execute("SELECT aeterna_bind_tenant($1)", t)
            return list(
                await conn.fetch(
                    "SELECT position, event_type, resource, actor, payload FROM outbox ORDER BY position"
                )
            )
    finally:
        await conn.close()


async def test_tree_kinds_moves_and_deletes(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await tree(gov, t)
    got = await gov.orgs.GetOrgUnit(
        svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/checkout"), metadata=md(t, "anyone")
    )
    assert got.parent == f"tenants/{t}/orgUnits/payments" and got.kind == PROJECT
    # A parent must be of the kind just above.
    reason, fields, _ = await expect(unit(gov, t, "p2", PROJECT, "eng"), INVALID)
    assert (reason, fields) == ("PARENT_KIND_MISMATCH", ["org_unit.parent"])
    reason, fields, _ = await expect(unit(gov, t, "c2", COMPANY, "acme"), INVALID)
    assert fields == ["org_unit.parent"]
    _, fields, _ = await expect(unit(gov, t, "Bad_Id", 9), INVALID)
    assert fields == ["org_unit_id", "org_unit.kind", "org_unit.parent"] or set(fields) >= {
        "org_unit_id",
        "org_unit.kind",
    }
    await expect(unit(gov, t, "acme", COMPANY), grpc.StatusCode.ALREADY_EXISTS)
    _, fields, _ = await expect(
        gov.orgs.CreateOrgUnit(
            svc.CreateOrgUnitRequest(
                parent=f"tenants/{t}",
                org_unit_id="long",
                org_unit=res.OrgUnit(kind=COMPANY, display_name="x" * 201),
            ),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert fields == ["org_unit.display_name"]
    # Move: a unit under itself or below itself is a cycle; a stale etag is ABORTED.
    eng = await gov.orgs.GetOrgUnit(
        svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/eng"), metadata=admin(t)
    )
    reason, fields, _ = await expect(
        gov.orgs.MoveOrgUnit(
            svc.MoveOrgUnitRequest(name=eng.name, new_parent=f"tenants/{t}/orgUnits/payments"),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert (reason, fields) == ("CYCLE", ["new_parent"])
    await unit(gov, t, "ops", ORG, "acme")
    search = f"tenants/{t}/orgUnits/search"
    before = await gov.orgs.GetOrgUnit(svc.GetOrgUnitRequest(name=search), metadata=admin(t))
    moved = await gov.orgs.MoveOrgUnit(
        svc.MoveOrgUnitRequest(
            name=search, new_parent=f"tenants/{t}/orgUnits/ops", etag=before.etag
        ),
        metadata=admin(t),
    )
    assert moved.parent == f"tenants/{t}/orgUnits/ops" and moved.etag != before.etag
    reason, _, _ = await expect(
        gov.orgs.MoveOrgUnit(
            svc.MoveOrgUnitRequest(
                name=search, new_parent=f"tenants/{t}/orgUnits/eng", etag=before.etag
            ),
            metadata=admin(t),
        ),
        grpc.StatusCode.ABORTED,
    )
    assert reason == "ETAG_MISMATCH"
    reason, fields, _ = await expect(
        gov.orgs.MoveOrgUnit(
            svc.MoveOrgUnitRequest(name=search, new_parent=f"tenants/{t}/orgUnits/checkout"),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert (reason, fields) == ("PARENT_KIND_MISMATCH", ["new_parent"])
    # Update: display name only, by field mask.
    renamed = await gov.orgs.UpdateOrgUnit(
        svc.UpdateOrgUnitRequest(
            org_unit=res.OrgUnit(name=search, display_name="Search & Ranking"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=admin(t),
    )
    assert renamed.display_name == "Search & Ranking"
    reason, _, _ = await expect(
        gov.orgs.UpdateOrgUnit(
            svc.UpdateOrgUnitRequest(
                org_unit=res.OrgUnit(name=search, kind=COMPANY),
                update_mask=field_mask_pb2.FieldMask(paths=["kind"]),
            ),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert reason == "FIELD_NOT_UPDATABLE"
    # Delete only when empty.
    reason, _, meta = await expect(
        gov.orgs.DeleteOrgUnit(
            svc.DeleteOrgUnitRequest(name=f"tenants/{t}/orgUnits/payments"), metadata=admin(t)
        ),
        PRECONDITION,
    )
    assert reason == "ORG_UNIT_NOT_EMPTY" and meta["units"] == "1"
    await gov.orgs.DeleteOrgUnit(
        svc.DeleteOrgUnitRequest(name=f"tenants/{t}/orgUnits/checkout"), metadata=admin(t)
    )
    reason, _, _ = await expect(
        gov.orgs.GetOrgUnit(
            svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/checkout"), metadata=admin(t)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "ORG_UNIT_NOT_FOUND"
    listed = await gov.orgs.ListOrgUnits(
        svc.ListOrgUnitsRequest(parent=f"tenants/{t}", page_size=2), metadata=admin(t)
    )
    rest = await gov.orgs.ListOrgUnits(
        svc.ListOrgUnitsRequest(parent=f"tenants/{t}", page_token=listed.next_page_token),
        metadata=admin(t),
    )
    names = [u.name.rsplit("/", 1)[1] for u in [*listed.org_units, *rest.org_units]]
    assert names == ["acme", "eng", "ops", "payments", "search"] and not rest.next_page_token
    events = [(e["event_type"], e["resource"].rsplit("/", 1)[1]) for e in await outbox(gov, t)]
    assert events[-4:] == [
        ("governance.org_unit.created", "ops"),
        ("governance.org_unit.moved", "search"),
        ("governance.org_unit.updated", "search"),
        ("governance.org_unit.deleted", "checkout"),
    ]


async def test_unit_admins_manage_their_subtree_only(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await tree(gov, t)
    await bind(gov, t, "users/lead", res.ROLE_ADMIN, "payments")
    await bind(gov, t, "users/dev", res.ROLE_DEVELOPER, "payments")
    lead, dev = md(t, "lead"), md(t, "dev")
    # ADMIN at payments creates under payments, and binds there.
    await unit(gov, t, "refunds", PROJECT, "payments", meta=lead)
    dev_binding = await bind(gov, t, "users/eve", res.ROLE_VIEWER, "refunds", meta=lead)
    # ...but not under search, nor above, nor tenant-wide.
    for call in (
        unit(gov, t, "ranking", PROJECT, "search", meta=lead),
        unit(gov, t, "acme2", COMPANY, meta=lead),
        bind(gov, t, "users/eve", res.ROLE_VIEWER, "search", meta=lead),
        bind(gov, t, "users/lead", res.ROLE_TENANT_ADMIN, meta=lead),
        unit(gov, t, "refunds2", PROJECT, "payments", meta=dev),
        # A unit that does not exist: the same refusal as one the caller may not manage.
        unit(gov, t, "ghost-child", PROJECT, "no-such-team", meta=lead),
    ):
        reason, _, meta = await expect(call, DENIED)
        assert reason == "ACTION_NOT_ALLOWED" and meta["action"].startswith(
            "aeterna.governance.v1."
        )
    # Deleting a binding: refused alike whether it exists (outside the caller's units) or not.
    outside = await bind(gov, t, "users/eve", res.ROLE_VIEWER, "search")
    missing = f"tenants/{t}/roleBindings/00000000-0000-4000-8000-000000000000"
    for name in (outside.name, missing):
        reason, _, _ = await expect(
            gov.orgs.DeleteRoleBinding(svc.DeleteRoleBindingRequest(name=name), metadata=lead),
            DENIED,
        )
        assert reason == "ACTION_NOT_ALLOWED"
    await expect(
        gov.orgs.DeleteRoleBinding(svc.DeleteRoleBindingRequest(name=missing), metadata=admin(t)),
        grpc.StatusCode.NOT_FOUND,
    )
    await gov.orgs.DeleteRoleBinding(
        svc.DeleteRoleBindingRequest(name=dev_binding.name), metadata=lead
    )
    # Another tenant's names: TENANT_MISMATCH before any lookup.
    other = new_tenant()
    reason, _, _ = await expect(
        gov.orgs.GetOrgUnit(
            svc.GetOrgUnitRequest(name=f"tenants/{t}/orgUnits/acme"), metadata=admin(other)
        ),
        DENIED,
    )
    assert reason == "TENANT_MISMATCH"
    # Roles in the token count only when trusted; a plain user is refused the snapshot.
    reason, _, _ = await expect(
        gov.orgs.GetAuthorizationSnapshot(
            svc.GetAuthorizationSnapshotRequest(name=f"tenants/{t}/authorizationSnapshot"),
            metadata=dev,
        ),
        DENIED,
    )
    assert reason == "ACTION_NOT_ALLOWED"
    events = [e["event_type"] for e in await outbox(gov, t)]
    assert events.count("governance.role_binding.deleted") == 1


async def test_binding_input_is_checked(gov: GovernanceEnv) -> None:
    t, other = new_tenant(), new_tenant()
    await tree(gov, t)
    await unit(gov, other, "acme", COMPANY)
    cases = [
        (
            res.RoleBinding(subject="users/a", role=99, org_unit=f"tenants/{t}/orgUnits/eng"),
            "UNKNOWN_ROLE",
            "role_binding.role",
        ),
        (
            res.RoleBinding(
                subject="users/a",
                role=res.ROLE_DEVELOPER,
                org_unit=f"tenants/{other}/orgUnits/acme",
            ),
            "CROSS_TENANT_REFERENCE",
            "role_binding.org_unit",
        ),
        (
            res.RoleBinding(subject="users/a", role=res.ROLE_DEVELOPER),
            "MISSING_UNIT",
            "role_binding.org_unit",
        ),
        (
            res.RoleBinding(
                subject="users/a", role=res.ROLE_TENANT_ADMIN, org_unit=f"tenants/{t}/orgUnits/eng"
            ),
            "TENANT_WIDE_ROLE",
            "role_binding.org_unit",
        ),
        (
            res.RoleBinding(
                subject="groups/a", role=res.ROLE_VIEWER, org_unit=f"tenants/{t}/orgUnits/eng"
            ),
            "INVALID_SUBJECT",
            "role_binding.subject",
        ),
        (
            res.RoleBinding(
                subject="users/" + "a" * 256,
                role=res.ROLE_VIEWER,
                org_unit=f"tenants/{t}/orgUnits/eng",
            ),
            "INVALID_SUBJECT",
            "role_binding.subject",
        ),
    ]
    for binding, want_reason, want_field in cases:
        reason, fields, _ = await expect(
            gov.orgs.CreateRoleBinding(
                svc.CreateRoleBindingRequest(parent=f"tenants/{t}", role_binding=binding),
                metadata=admin(t),
            ),
            INVALID,
        )
        assert (reason, fields) == (want_reason, [want_field])
    reason, fields, _ = await expect(
        bind(gov, t, "users/a", res.ROLE_VIEWER, "nowhere"), PRECONDITION
    )
    assert (reason, fields) == ("ORG_UNIT_NOT_FOUND", ["role_binding.org_unit"])
    first = await bind(gov, t, "agents/bot", res.ROLE_AGENT, "payments")
    await expect(
        bind(gov, t, "agents/bot", res.ROLE_AGENT, "payments"), grpc.StatusCode.ALREADY_EXISTS
    )
    listed = await gov.orgs.ListRoleBindings(
        svc.ListRoleBindingsRequest(parent=f"tenants/{t}", subject="agents/bot"),
        metadata=md(t, "x"),
    )
    assert [b.name for b in listed.role_bindings] == [first.name]
    assert first.creator == "users/root"


async def test_request_id_makes_writes_idempotent(gov: GovernanceEnv) -> None:
    t = new_tenant()
    calls = [unit(gov, t, "acme", COMPANY, request_id="make-acme") for _ in range(4)]
    results = await asyncio.gather(*calls)
    assert len({r.SerializeToString(deterministic=True) for r in results}) == 1
    again = await unit(gov, t, "acme", COMPANY, request_id="make-acme")
    assert again == results[0]
    reason, _, _ = await expect(
        unit(gov, t, "other", COMPANY, request_id="make-acme"), PRECONDITION
    )
    assert reason == "REQUEST_ID_REUSED"
    # Keys are per principal: another admin's same request_id is its own request.
    await expect(
        unit(gov, t, "acme", COMPANY, request_id="make-acme", meta=admin(t, "root2")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    events = await outbox(gov, t)
    assert [e["event_type"] for e in events] == ["governance.org_unit.created"]
    assert events[0]["actor"] == "users/root"


async def delegate(
    gov: GovernanceEnv,
    t: str,
    caps: list[str],
    meta,
    parent: str = "",
    agent: str = "a1",
    user: str = "alice",
    **kw,
) -> res.Delegation:  # type: ignore[no-untyped-def]
    return await gov.orgs.CreateDelegation(
        svc.CreateDelegationRequest(
            parent=f"tenants/{t}",
            delegation=res.Delegation(
                user_id=user, agent_id=agent, capabilities=caps, parent_delegation=parent, **kw
            ),
        ),
        metadata=meta,
    )


async def test_delegation_chains_depth_subsets_and_cascading_revocation(gov: GovernanceEnv) -> None:
    t = new_tenant()
    alice = md(t, "alice")
    d1 = await delegate(gov, t, ["memory:read", "memory:write"], alice, agent="a1")
    assert (d1.depth, d1.state) == (1, res.DELEGATION_STATE_ACTIVE)
    d2 = await delegate(gov, t, ["memory:read"], md(t, "alice", agent="a1"), d1.name, agent="a2")
    d3 = await delegate(gov, t, ["memory:read"], md(t, "alice", agent="a2"), d2.name, agent="a3")
    assert (d2.depth, d3.depth) == (2, 3)
    reason, fields, _ = await expect(
        delegate(gov, t, ["memory:read"], md(t, "alice", agent="a3"), d3.name, agent="a4"),
        PRECONDITION,
    )
    assert (reason, fields) == ("DELEGATION_TOO_DEEP", ["delegation.parent_delegation"])
    reason, fields, _ = await expect(
        delegate(gov, t, ["memory:write"], md(t, "alice", agent="a2"), d2.name, agent="a5"),
        PRECONDITION,
    )
    assert (reason, fields) == ("CAPABILITY_NOT_DELEGATED", ["delegation.capabilities"])
    # Only the user delegates directly; only the holder delegates onward.
    for call in (
        delegate(gov, t, ["memory:read"], md(t, "bob"), agent="b1"),
        delegate(gov, t, ["memory:read"], md(t, "bob", agent="a1"), d1.name, agent="b2"),
        delegate(
            gov,
            t,
            ["memory:read"],
            alice,
            f"tenants/{t}/delegations/00000000-0000-4000-8000-000000000000",
        ),
    ):
        reason, _, _ = await expect(call, DENIED)
        assert reason == "ACTION_NOT_ALLOWED"
    _, fields, _ = await expect(
        delegate(
            gov,
            t,
            ["read everything"],
            alice,
            expire_time=_ts(datetime.now(UTC) - timedelta(hours=1)),
        ),
        INVALID,
    )
    assert fields == ["delegation.capabilities[0]", "delegation.expire_time"]
    # Bob may not revoke alice's delegation; alice's revocation takes the chain with it.
    await expect(
        gov.orgs.RevokeDelegation(svc.RevokeDelegationRequest(name=d1.name), metadata=md(t, "bob")),
        DENIED,
    )
    revoked = await gov.orgs.RevokeDelegation(
        svc.RevokeDelegationRequest(name=d1.name), metadata=alice
    )
    assert revoked.state == res.DELEGATION_STATE_REVOKED and revoked.HasField("revoke_time")
    for d in (d2, d3):
        got = await gov.orgs.GetDelegation(svc.GetDelegationRequest(name=d.name), metadata=alice)
        assert got.state == res.DELEGATION_STATE_REVOKED
    events = [(e["event_type"], e["resource"]) for e in await outbox(gov, t)]
    assert events[-3:] == [("governance.delegation.revoked", d.name) for d in (d1, d2, d3)]
    again = await gov.orgs.RevokeDelegation(
        svc.RevokeDelegationRequest(name=d1.name), metadata=alice
    )
    assert again.revoke_time == revoked.revoke_time
    reason, _, _ = await expect(
        delegate(gov, t, ["memory:read"], md(t, "alice", agent="a1"), d1.name, agent="a9"),
        PRECONDITION,
    )
    assert reason == "PARENT_INACTIVE"
    active = await gov.orgs.ListDelegations(
        svc.ListDelegationsRequest(parent=f"tenants/{t}"), metadata=alice
    )
    everything = await gov.orgs.ListDelegations(
        svc.ListDelegationsRequest(parent=f"tenants/{t}", show_revoked=True), metadata=alice
    )
    assert len(active.delegations) == 0 and len(everything.delegations) == 3


def _ts(value: datetime):  # type: ignore[no-untyped-def]
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


async def test_snapshot_holds_the_tenant_as_of_its_revision(gov: GovernanceEnv) -> None:
    t = new_tenant()
    await tree(gov, t)
    await bind(gov, t, "users/dev", res.ROLE_DEVELOPER, "checkout")
    kept = await delegate(gov, t, ["memory:read"], md(t, "alice"), agent="a1")
    gone = await delegate(gov, t, ["memory:read"], md(t, "alice"), agent="a2")
    await gov.orgs.RevokeDelegation(
        svc.RevokeDelegationRequest(name=gone.name), metadata=md(t, "alice")
    )
    name = f"tenants/{t}/authorizationSnapshot"
    first = await gov.orgs.GetAuthorizationSnapshot(
        svc.GetAuthorizationSnapshotRequest(name=name), metadata=service_md()
    )
    assert len(first.org_units) == 5 and len(first.role_bindings) == 1
    assert [d.name for d in first.delegations] == [kept.name]
    assert first.revision == (await outbox(gov, t))[-1]["position"]
    await unit(gov, t, "ledger", PROJECT, "payments")
    second = await gov.orgs.GetAuthorizationSnapshot(
        svc.GetAuthorizationSnapshotRequest(name=name), metadata=admin(t)
    )
    assert second.revision > first.revision and len(second.org_units) == 6
