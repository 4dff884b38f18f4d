"""The permission model as a table of cases, evaluated by the Cedar policies, and the
directory cache against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import redis.asyncio as aioredis
from aeterna_common.authz import (
    ACTION_NOT_ALLOWED,
    DIRECTORY_UNAVAILABLE,
    Authorizer,
    Delegation,
    DirectoryCache,
    OrgUnit,
    PolicyModel,
    Resource,
    RoleBinding,
    Snapshot,
    StaticDirectory,
    UnitKind,
)
from aeterna_common.context import Principal
from aeterna_common.errors import PermissionDenied, Unavailable
from google.protobuf import descriptor_pool

M = "aeterna.memory.v1.MemoryService/"
READ, WRITE, FEEDBACK, REEMBED = (
    M + "GetMemory",
    M + "CreateMemory",
    M + "RecordMemoryFeedback",
    M + "ReembedMemories",
)
KREAD = "aeterna.knowledge.v1.KnowledgeService/GetKnowledgeItem"
T = "acme"

# acme ⊃ payments (org) ⊃ checkout (team) ⊃ {cart, pay} (projects); search (team) beside it;
# risk (org) beside payments.
UNITS = (
    OrgUnit("acme", UnitKind.COMPANY),
    OrgUnit("payments", UnitKind.ORGANIZATION, "acme"),
    OrgUnit("checkout", UnitKind.TEAM, "payments"),
    OrgUnit("search", UnitKind.TEAM, "payments"),
    OrgUnit("cart", UnitKind.PROJECT, "checkout"),
    OrgUnit("pay", UnitKind.PROJECT, "checkout"),
    OrgUnit("risk", UnitKind.ORGANIZATION, "acme"),
)
BINDINGS = (
    RoleBinding("users/vic", "VIEWER", "checkout"),
    RoleBinding("users/dev", "DEVELOPER", "cart"),
    RoleBinding("users/lead", "TECH_LEAD", "checkout"),
    RoleBinding("users/arch", "ARCHITECT", "payments"),
    RoleBinding("users/adm", "ADMIN", "acme"),
    RoleBinding("users/ten", "TENANT_ADMIN"),
    RoleBinding("users/plat", "PLATFORM_ADMIN"),
    RoleBinding("agents/bot", "AGENT", "search"),
)
# alice → a1 (read, write) → a2 (read) → a3 (read) → a4 (read); bob → b1 revoked → b2.
DELEGATIONS = (
    Delegation("d1", "alice", "a1", frozenset({"memory:read", "memory:write"})),
    Delegation("d2", "alice", "a2", frozenset({"memory:read"}), "d1"),
    Delegation("d3", "alice", "a3", frozenset({"memory:read", "memory:write"}), "d2"),
    Delegation("d4", "alice", "a4", frozenset({"memory:read"}), "d3"),
    Delegation("e1", "bob", "b1", frozenset({"memory:read"}), active=False),
    Delegation("e2", "bob", "b2", frozenset({"memory:read"}), "e1"),
)
SNAPSHOT = Snapshot(T, 7, UNITS, BINDINGS, DELEGATIONS)


def unit(kind: UnitKind, uid: str) -> Resource:
    return Resource.unit(T, kind, uid)


P, TM, ORG, CO = UnitKind.PROJECT, UnitKind.TEAM, UnitKind.ORGANIZATION, UnitKind.COMPANY

# (user, agent, action, resource, allowed)
CASES: list[tuple[str, str | None, str, Resource, bool]] = [
    # own memories
    ("alice", None, READ, Resource.user_space(T, "alice"), True),
    ("alice", None, WRITE, Resource.user_space(T, "alice"), True),
    ("bob", None, READ, Resource.user_space(T, "alice"), False),
    ("bob", None, WRITE, Resource.user_space(T, "alice"), False),
    ("bob", None, FEEDBACK, Resource.user_space(T, "alice"), False),
    # delegation depth 1..4 and capabilities intersecting down the chain
    ("alice", "a1", READ, Resource.user_space(T, "alice"), True),
    ("alice", "a1", WRITE, Resource.user_space(T, "alice"), True),
    ("alice", "a1", READ, Resource.user_space(T, "bob"), False),
    ("alice", "a2", READ, Resource.user_space(T, "alice"), True),
    ("alice", "a2", WRITE, Resource.user_space(T, "alice"), False),
    ("alice", "a3", READ, Resource.user_space(T, "alice"), True),
    ("alice", "a3", WRITE, Resource.user_space(T, "alice"), False),  # d2 gave no write
    ("alice", "a4", READ, Resource.user_space(T, "alice"), False),  # depth 4
    ("bob", "b1", READ, Resource.user_space(T, "bob"), False),  # revoked
    ("bob", "b2", READ, Resource.user_space(T, "bob"), False),  # made from a revoked one
    ("alice", "zz", READ, Resource.user_space(T, "alice"), False),  # no delegation
    # VIEWER at a team: reads it and below, writes nothing, nothing above or beside
    ("vic", None, READ, unit(TM, "checkout"), True),
    ("vic", None, READ, unit(P, "cart"), True),
    ("vic", None, WRITE, unit(P, "cart"), False),
    ("vic", None, FEEDBACK, unit(P, "cart"), True),
    ("vic", None, READ, unit(ORG, "payments"), False),
    ("vic", None, READ, unit(TM, "search"), False),
    # DEVELOPER at a project: writes it, not its sibling nor its team
    ("dev", None, WRITE, unit(P, "cart"), True),
    ("dev", None, WRITE, unit(P, "pay"), False),
    ("dev", None, READ, unit(TM, "checkout"), False),
    ("dev", None, WRITE, unit(TM, "checkout"), False),
    # TECH_LEAD at a team: writes the team and its projects (inherited), not the org
    ("lead", None, WRITE, unit(TM, "checkout"), True),
    ("lead", None, WRITE, unit(P, "pay"), True),
    ("lead", None, WRITE, unit(ORG, "payments"), False),
    ("lead", None, READ, unit(TM, "search"), False),
    # ARCHITECT at the org: writes the org and everything below; reads, not writes, nothing above
    ("arch", None, WRITE, unit(ORG, "payments"), True),
    ("arch", None, WRITE, unit(TM, "search"), True),
    ("arch", None, WRITE, unit(P, "cart"), True),
    ("arch", None, WRITE, unit(CO, "acme"), False),
    ("arch", None, READ, unit(CO, "acme"), False),
    # ADMIN at the company: writes every layer of the tree, but no one's own memories
    ("adm", None, WRITE, unit(CO, "acme"), True),
    ("adm", None, WRITE, unit(P, "pay"), True),
    ("adm", None, READ, Resource.user_space(T, "alice"), False),
    ("adm", None, REEMBED, Resource.tenant(T), False),
    # a unit missing from the tree: only tenant-wide bindings reach it
    ("adm", None, READ, unit(P, "elsewhere"), False),
    ("ten", None, WRITE, unit(P, "elsewhere"), True),
    # knowledge reads upward: a project's DEVELOPER reads its team's, org's and company's
    # items, not a sibling project's, team's or org's; memory stays downward only
    ("dev", None, KREAD, unit(P, "cart"), True),
    ("dev", None, KREAD, unit(TM, "checkout"), True),
    ("dev", None, KREAD, unit(ORG, "payments"), True),
    ("dev", None, KREAD, unit(CO, "acme"), True),
    ("dev", None, KREAD, unit(P, "pay"), False),
    ("dev", None, KREAD, unit(TM, "search"), False),
    ("dev", None, KREAD, unit(ORG, "risk"), False),
    ("dev", None, READ, unit(ORG, "payments"), False),
    ("dev", None, READ, unit(CO, "acme"), False),
    ("lead", None, KREAD, unit(ORG, "payments"), True),
    ("lead", None, KREAD, unit(P, "cart"), True),
    ("arch", None, KREAD, unit(CO, "acme"), True),
    ("arch", None, KREAD, unit(ORG, "risk"), False),
    ("x", "bot", KREAD, unit(ORG, "payments"), True),
    ("x", "bot", KREAD, unit(TM, "checkout"), False),
    ("nobody", None, KREAD, unit(CO, "acme"), False),
    # a unit missing from the tree: still only tenant-wide bindings read its knowledge
    ("adm", None, KREAD, unit(P, "elsewhere"), False),
    ("dev", None, KREAD, unit(P, "elsewhere"), False),
    ("ten", None, KREAD, unit(P, "elsewhere"), True),
    # TENANT_ADMIN: everything in its tenant, nothing in another
    ("ten", None, READ, Resource.user_space(T, "alice"), True),
    ("ten", None, WRITE, unit(CO, "acme"), True),
    ("ten", None, REEMBED, Resource.tenant(T), True),
    ("ten", None, READ, Resource.tenant_data(T), True),
    ("ten", None, READ, Resource.user_space("other", "alice"), False),
    # PLATFORM_ADMIN: admin methods in every tenant, no content
    ("plat", None, REEMBED, Resource.tenant(T), True),
    ("plat", None, REEMBED, Resource.tenant("other"), True),
    ("plat", None, READ, Resource.user_space(T, "alice"), False),
    ("plat", None, READ, unit(CO, "acme"), False),
    # an agent's own AGENT binding: member of its team
    ("x", "bot", READ, unit(TM, "search"), True),
    ("x", "bot", WRITE, unit(TM, "search"), False),
    # coarse checks: members may call read/write methods in their tenant only
    ("nobody", None, READ, Resource.tenant(T), True),
    ("nobody", None, READ, Resource.tenant("other"), False),
    ("nobody", None, REEMBED, Resource.tenant(T), False),
    ("nobody", None, READ, Resource.tenant_data(T), False),
]


@pytest.fixture(scope="module")
def authorizer() -> Authorizer:
    return Authorizer(DirectoryCache(StaticDirectory({T: SNAPSHOT})))


@pytest.mark.parametrize(("user", "agent", "action", "resource", "allowed"), CASES)
async def test_permission_table(
    authorizer: Authorizer,
    user: str,
    agent: str | None,
    action: str,
    resource: Resource,
    allowed: bool,
) -> None:
    assert await authorizer.allowed(Principal(T, user, agent), action, resource) is allowed


async def test_refusal_names_the_action(authorizer: Authorizer) -> None:
    with pytest.raises(PermissionDenied) as err:
        await authorizer.authorize(Principal(T, "bob"), READ, Resource.user_space(T, "alice"))
    assert (err.value.reason, err.value.metadata) == (ACTION_NOT_ALLOWED, {"action": READ})


async def test_batch_is_all_or_none(authorizer: Authorizer) -> None:
    dev = Principal(T, "dev")
    with pytest.raises(PermissionDenied):
        await authorizer.authorize(dev, WRITE, unit(P, "cart"), unit(P, "pay"))
    await authorizer.authorize(dev, WRITE, unit(P, "cart"), Resource.user_space(T, "dev"))


async def test_token_roles_only_when_trusted() -> None:
    admin = Principal(T, "ops", roles=frozenset({"TENANT_ADMIN"}))
    assert not await Authorizer().allowed(admin, REEMBED, Resource.tenant(T))
    assert await Authorizer(trust_token_roles=True).allowed(admin, REEMBED, Resource.tenant(T))


async def test_service_principal_reads_snapshots_only() -> None:
    svc = Principal("", "service:memory", roles=frozenset({"SERVICE"}))
    snap = "aeterna.governance.v1.OrganizationService/GetAuthorizationSnapshot"
    authz = Authorizer()
    assert await authz.allowed(svc, snap, Resource.tenant(T))
    assert not await authz.allowed(svc, READ, Resource.tenant(T))
    assert not await authz.allowed(Principal("", "service:x"), snap, Resource.tenant(T))


async def test_readable_scope(authorizer: Authorizer) -> None:
    lead = await authorizer.readable_scope(Principal(T, "lead"), M + "SearchMemories")
    assert not lead.everything and lead.user_ids == {"lead"}
    assert lead.units[P] == {"cart", "pay"} and lead.units[TM] == {"checkout"}
    assert not lead.units[ORG] and not lead.all_units
    agent = await authorizer.readable_scope(Principal(T, "alice", "a2"), M + "SearchMemories")
    assert agent.user_ids == {"alice"}
    ten = await authorizer.readable_scope(Principal(T, "ten"), M + "SearchMemories")
    assert ten.everything


def test_every_rpc_is_an_action() -> None:
    # Importing the SDK's modules registers every service in the default pool.
    import aeterna.governance.v1.approval_service_pb2
    import aeterna.governance.v1.audit_service_pb2
    import aeterna.governance.v1.organization_service_pb2
    import aeterna.governance.v1.policy_service_pb2
    import aeterna.knowledge.v1.knowledge_service_pb2
    import aeterna.memory.v1.memory_service_pb2  # noqa: F401

    model = PolicyModel()
    pool = descriptor_pool.Default()
    methods = []
    for file in (
        "memory/v1/memory_service",
        *(
            f"governance/v1/{n}"
            for n in ("organization_service", "policy_service", "approval_service", "audit_service")
        ),
        "knowledge/v1/knowledge_service",
    ):
        fd = pool.FindFileByName(f"aeterna/{file}.proto")
        for service in fd.services_by_name.values():
            methods += [f"{service.full_name}/{m.name}" for m in service.methods]
    assert len(methods) > 60
    missing = [m for m in methods if not model.action_groups.get(m)]
    assert not missing, f"RPCs without an action in an action group: {missing}"


async def test_cache_invalidated_by_a_governance_event(redis_server: Any) -> None:
    tenant = "t-invalidate"
    directory = StaticDirectory({tenant: Snapshot(tenant, 1)})
    cache = DirectoryCache(directory, redis_url=redis_server.url, ttl_s=3600)
    authz = Authorizer(cache)
    watcher = asyncio.create_task(cache.watch())
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        dev = Principal(tenant, "dev")
        target = Resource.unit(tenant, UnitKind.PROJECT, "p")
        assert not await authz.allowed(dev, WRITE, target)
        directory.put(
            Snapshot(
                tenant,
                2,
                (OrgUnit("p", UnitKind.PROJECT),),
                (RoleBinding("users/dev", "DEVELOPER", "p"),),
            )
        )
        assert not await authz.allowed(dev, WRITE, target)  # cached (TTL 1 h)
        # An unrelated event leaves the snapshot; a role binding event drops it.
        await r.xadd(f"events:{tenant}", {"type": "memory.created", "event_id": "memory:1"})
        await r.xadd(
            f"events:{tenant}",
            {"type": "governance.role_binding.created", "event_id": "governance:9"},
        )
        async with asyncio.timeout(5):
            while cache.cached(tenant) is not None:  # noqa: ASYNC110 (the watcher drops it)
                await asyncio.sleep(0.01)
        assert cache.invalidations == 1
        assert await authz.allowed(dev, WRITE, target)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await r.aclose()
        await cache.close()


async def test_directory_down_keeps_cache_until_ttl_and_grace_then_unavailable() -> None:
    tenant = "t-down"
    snap = Snapshot(
        tenant, 1, (OrgUnit("p", UnitKind.PROJECT),), (RoleBinding("users/dev", "DEVELOPER", "p"),)
    )
    directory = StaticDirectory({tenant: snap})
    cache = DirectoryCache(directory, ttl_s=0.05, stale_grace_s=0.2)
    authz = Authorizer(cache)
    dev = Principal(tenant, "dev")
    target = Resource.unit(tenant, UnitKind.PROJECT, "p")
    assert await authz.allowed(dev, WRITE, target)
    directory.available = False
    await asyncio.sleep(0.06)  # past the TTL, within the grace: still enforced from the cache
    assert await authz.allowed(dev, WRITE, target)
    await asyncio.sleep(0.2)  # past TTL + grace: never allowed, UNAVAILABLE
    with pytest.raises(Unavailable) as err:
        await authz.allowed(dev, WRITE, target)
    assert err.value.reason == DIRECTORY_UNAVAILABLE
    # Own memories need no directory at all.
    assert await authz.allowed(dev, WRITE, Resource.user_space(tenant, "dev"))
    directory.available = True
    assert await authz.allowed(dev, WRITE, target)


def test_governance_snapshot_conversion() -> None:
    from aeterna.governance.v1 import resources_pb2 as gres
    from aeterna_common.authz.governance import snapshot_from_pb

    pb = gres.AuthorizationSnapshot(
        name="tenants/acme/authorizationSnapshot",
        revision=42,
        org_units=[
            gres.OrgUnit(name="tenants/acme/orgUnits/acme", kind=gres.ORG_UNIT_KIND_COMPANY),
            gres.OrgUnit(
                name="tenants/acme/orgUnits/core",
                kind=gres.ORG_UNIT_KIND_TEAM,
                parent="tenants/acme/orgUnits/acme",
            ),
        ],
        role_bindings=[
            gres.RoleBinding(
                subject="users/lead",
                role=gres.ROLE_TECH_LEAD,
                org_unit="tenants/acme/orgUnits/core",
            ),
            gres.RoleBinding(subject="users/ten", role=gres.ROLE_TENANT_ADMIN),
        ],
        delegations=[
            gres.Delegation(
                name="tenants/acme/delegations/d2",
                user_id="alice",
                agent_id="a2",
                capabilities=["memory:read"],
                parent_delegation="tenants/acme/delegations/d1",
                depth=2,
                state=gres.DELEGATION_STATE_ACTIVE,
            )
        ],
    )
    snap = snapshot_from_pb("acme", pb)
    assert snap.revision == 42
    assert snap.units == (
        OrgUnit("acme", UnitKind.COMPANY),
        OrgUnit("core", UnitKind.TEAM, "acme"),
    )
    assert snap.bindings == (
        RoleBinding("users/lead", "TECH_LEAD", "core"),
        RoleBinding("users/ten", "TENANT_ADMIN"),
    )
    assert snap.delegations == (Delegation("d2", "alice", "a2", frozenset({"memory:read"}), "d1"),)
