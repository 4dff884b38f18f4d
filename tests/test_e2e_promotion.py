"""Approved promotions (PROJECT→TEAM, TEAM→ORG, USER→TEAM) through governance's approvals,
end to end: a memory replica and a
governance replica behind the gateway, PostgreSQL and Redis as ``make run`` starts them,
memory calling governance through the gateway with its service token.

Memories reach the promotion threshold by use (searches count as accesses); the promotion
job (every half second here) asks governance once per memory revision at the target unit,
the team's TECH_LEAD (or, at the organization, the tenant's admin) decides, and memory applies the decision from governance's events, or,
when an event is lost, from its reconciler.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.type.v1 import layer_pb2
from aeterna_common.consistency import ReadYourWrites
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack
from google.protobuf import field_mask_pb2, json_format, struct_pb2

TENANT = "promo"
PROJECT, TEAM, ORG = "checkout", "payments", "eng"
RECONCILE_ENV = "AETERNA_MEMORY_PROMOTION_RECONCILE_INTERVAL_S"
SEARCHES = 5
"""Searches that return each memory: with importance 1, a promotion score of
0.6 + 0.3 · 5/10 + 0.1 · (accessed just now) ≈ 0.85, over the 0.8 threshold."""


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-promotion-",
        replicas=1,
        governance_replicas=1,
        env={
            "AETERNA_MEMORY_PROMOTION_INTERVAL_S": "0.5",
            # Decisions reach memory by events only, until the reconciler is turned on.
            RECONCILE_ENV: "0",
            "AETERNA_MEMORY_LIFECYCLE_LEASE_TTL_S": "2",
        },
    ) as s:
        yield s


@pytest_asyncio.fixture
async def channels(stack: DevStack) -> AsyncIterator[tuple[grpc.aio.Channel, grpc.aio.Channel]]:
    """Memory's channel (reads see its writes) and governance's."""
    async with (
        grpc.aio.insecure_channel(stack.endpoint, interceptors=[ReadYourWrites()]) as memory,
        grpc.aio.insecure_channel(stack.endpoint) as governance,
    ):
        yield memory, governance


def bearer(stack: DevStack, user: str, *roles: str) -> tuple[tuple[str, str], ...]:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30) -> Any:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout_s
    while not (found := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)
    return found


async def query(stack: DevStack, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of ``sql`` in memory's database, read as the superuser (below RLS)."""
    assert stack.superuser_url is not None
    conn = await asyncpg.connect(stack.superuser_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def copies_of(stack: DevStack, name: str) -> list[asyncpg.Record]:
    """The memories promoted from ``name`` (any layer, also deleted ones)."""
    return await query(
        stack,
        "SELECT id, layer, team_id, metadata::text AS metadata FROM memories "
        "WHERE tenant_id = $1 AND metadata->>'original_memory' = $2",
        TENANT,
        name,
    )


async def records(stack: DevStack, name: str) -> list[tuple[int, str, str]]:
    """Memory's promotion records of ``name``: (revision, state, reason), oldest first."""
    rows = await query(
        stack,
        "SELECT revision, state, reason FROM memory_promotions WHERE tenant_id = $1 "
        "AND memory_id = $2 ORDER BY revision",
        TENANT,
        uuid.UUID(name.rsplit("/", 1)[1]),
    )
    return [(r["revision"], r["state"], r["reason"]) for r in rows]


async def record_state(stack: DevStack, name: str, revision: int = 1) -> str | None:
    """The state of the record of ``name``'s ``revision``, if any."""
    found = [state for r, state, _ in await records(stack, name) if r == revision]
    return found[0] if found else None


async def test_project_memories_reach_their_team_only_when_its_tech_lead_approves(
    stack: DevStack, channels: tuple[grpc.aio.Channel, grpc.aio.Channel]
) -> None:
    memory_channel, governance_channel = channels
    admin = bearer(stack, "root", "TENANT_ADMIN")
    lead = bearer(stack, "lead")
    memories = msvc_grpc.MemoryServiceStub(memory_channel)
    orgs = osvc_grpc.OrganizationServiceStub(governance_channel)
    approvals = asvc_grpc.ApprovalServiceStub(governance_channel)

    parent = ""
    for unit, kind in (
        ("acme", gres.ORG_UNIT_KIND_COMPANY),
        (ORG, gres.ORG_UNIT_KIND_ORGANIZATION),
        (TEAM, gres.ORG_UNIT_KIND_TEAM),
        (PROJECT, gres.ORG_UNIT_KIND_PROJECT),
    ):
        await orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=f"tenants/{TENANT}",
                org_unit=gres.OrgUnit(kind=kind, display_name=unit, parent=parent),
                org_unit_id=unit,
            ),
            metadata=admin,
        )
        parent = f"tenants/{TENANT}/orgUnits/{unit}"
    await orgs.CreateRoleBinding(
        osvc.CreateRoleBindingRequest(
            parent=f"tenants/{TENANT}",
            role_binding=gres.RoleBinding(
                subject="users/lead",
                role=gres.ROLE_TECH_LEAD,
                org_unit=f"tenants/{TENANT}/orgUnits/{TEAM}",
            ),
        ),
        metadata=admin,
    )

    async def add(
        content: str,
        project: str = PROJECT,
        layer: int = layer_pb2.MEMORY_LAYER_PROJECT,
        scope: layer_pb2.Scope | None = None,
        **metadata: Any,
    ) -> str:
        meta = struct_pb2.Struct()
        meta.update(metadata)
        created = await memories.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=f"tenants/{TENANT}",
                memory=mres.Memory(
                    layer=layer,
                    scope=scope or layer_pb2.Scope(project_id=project),
                    content=content,
                    importance=1.0,
                    metadata=meta,
                ),
            ),
            metadata=admin,
        )
        return str(created.name)

    async def use(
        expected: set[str], layer: int = layer_pb2.MEMORY_LAYER_PROJECT, **scope: str
    ) -> None:
        """Search the layer's memories in ``scope`` until each was returned ``SEARCHES``
        times."""
        for _ in range(SEARCHES):
            found = await memories.SearchMemories(
                msvc.SearchMemoriesRequest(
                    parent=f"tenants/{TENANT}",
                    query="how does checkout deploy",
                    scope=layer_pb2.Scope(**scope),
                    layers=[layer],
                ),
                metadata=admin,
            )
            assert expected <= {r.memory.name for r in found.results}

    async def requests() -> dict[str, list[gres.ApprovalRequest]]:
        """Governance's MEMORY_PROMOTION requests by target."""
        listed = await approvals.ListApprovalRequests(
            asvc.ListApprovalRequestsRequest(parent=f"tenants/{TENANT}", page_size=1000),
            metadata=admin,
        )
        by_target: dict[str, list[gres.ApprovalRequest]] = {}
        for r in listed.approval_requests:
            if r.type == gres.APPROVAL_TYPE_MEMORY_PROMOTION:
                by_target.setdefault(r.target, []).append(r)
        return by_target

    shared = await add("Reach the checkout on-call at oncall@example.com or +1 415 555 0134")
    rejected = await add("checkout deploys only on Tuesdays")
    changed = await add("checkout's canary takes 5 % of traffic")
    deleted = await add("checkout's staging database is shared")
    secret = await add("checkout's deploy key rotates monthly", sensitive=True)
    ghost = await add("the ghost project has no unit in the tree", project="ghost")
    # TEAM→ORG: at the team's organization; USER→TEAM: at the team its metadata names.
    team_wide = await add(
        "payments deploys checkout",
        layer=layer_pb2.MEMORY_LAYER_TEAM,
        scope=layer_pb2.Scope(team_id=TEAM),
    )
    user = layer_pb2.Scope(user_id="root")
    mine = await add(
        "I deploy checkout", layer=layer_pb2.MEMORY_LAYER_USER, scope=user, team_id=TEAM
    )
    teamless = await add("I deploy checkout alone", layer=layer_pb2.MEMORY_LAYER_USER, scope=user)
    await use({shared, rejected, changed, deleted, secret}, project_id=PROJECT)
    await use({ghost}, project_id="ghost")
    await use({team_wide}, layer_pb2.MEMORY_LAYER_TEAM, team_id=TEAM)
    await use({mine, teamless}, layer_pb2.MEMORY_LAYER_USER, user_id="root")
    promotable = {shared, rejected, changed, deleted, team_wide, mine}

    async def asked_each() -> dict[str, list[gres.ApprovalRequest]] | None:
        found = await requests()
        return found if promotable <= set(found) else None

    asked = await until(asked_each, "approval requests for the promotable memories")
    assert set(asked) == promotable
    request = asked[shared][0]
    redacted = "Reach the checkout on-call at [email redacted] or [phone redacted]"
    assert request.org_unit == f"tenants/{TENANT}/orgUnits/{TEAM}"
    assert asked[mine][0].org_unit == f"tenants/{TENANT}/orgUnits/{TEAM}"
    assert asked[team_wide][0].org_unit == f"tenants/{TENANT}/orgUnits/{ORG}"
    assert asked[team_wide][0].payload["target_layer"] == "ORG"
    assert request.requester == "services/memory"
    assert request.state == gres.APPROVAL_STATE_PENDING
    assert json_format.MessageToDict(request.payload) == {
        "memory": shared,
        "revision": 1.0,
        "target_layer": "TEAM",
        "content_sha256": hashlib.sha256(redacted.encode()).hexdigest(),
    }
    # The team's lead has them to decide.
    waiting = await approvals.ListApprovalRequests(
        asvc.ListApprovalRequestsRequest(parent=f"tenants/{TENANT}", awaiting_me=True),
        metadata=lead,
    )
    assert {r.target for r in waiting.approval_requests} == promotable - {team_wide}

    # Two change while they wait for a decision.
    await memories.UpdateMemory(
        msvc.UpdateMemoryRequest(
            memory=mres.Memory(name=changed, content="checkout's canary takes 10 % of traffic"),
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        ),
        metadata=admin,
    )
    await memories.DeleteMemory(msvc.DeleteMemoryRequest(name=deleted), metadata=admin)
    for name in (shared, changed, deleted):
        await approvals.ApproveApprovalRequest(
            asvc.ApproveApprovalRequestRequest(name=asked[name][0].name, comment="useful"),
            metadata=lead,
        )
    await approvals.ApproveApprovalRequest(
        asvc.ApproveApprovalRequestRequest(name=asked[team_wide][0].name), metadata=admin
    )
    await approvals.RejectApprovalRequest(
        asvc.RejectApprovalRequestRequest(
            name=asked[rejected][0].name, comment="only checkout deploys on Tuesdays"
        ),
        metadata=lead,
    )

    async def settled() -> bool:
        states = [await record_state(stack, m) for m in (shared, rejected, changed, deleted)]
        return states == ["promoted", "rejected", "skipped", "skipped"] and (
            await record_state(stack, team_wide) == "promoted"
        )

    await until(settled, "the decisions applied from governance's events")
    # Revision 1's request is skipped; the job may already have asked again for revision 2
    # (once per revision), which stays pending.
    first, *again = await records(stack, changed)
    assert first == (1, "skipped", "the memory changed after it was asked for (revision 1 → 2)")
    assert again in ([], [(2, "pending", "")])
    assert await records(stack, deleted) == [(1, "skipped", "the memory was deleted")]
    [copy] = await copies_of(stack, shared)
    team_copy = await memories.GetMemory(
        msvc.GetMemoryRequest(name=f"tenants/{TENANT}/memories/{copy['id']}"), metadata=lead
    )
    assert team_copy.layer == layer_pb2.MEMORY_LAYER_TEAM
    assert team_copy.scope.team_id == TEAM
    assert team_copy.content == redacted
    meta = json_format.MessageToDict(team_copy.metadata)
    assert meta["original_memory"] == shared
    assert meta["original_revision"] == 1
    assert meta["approval_request"] == request.name
    assert meta["promotion_score"] >= 0.8
    for name in (rejected, changed, deleted, mine, teamless):
        assert await copies_of(stack, name) == []
    [org_row] = await copies_of(stack, team_wide)
    org_copy = await memories.GetMemory(
        msvc.GetMemoryRequest(name=f"tenants/{TENANT}/memories/{org_row['id']}"), metadata=admin
    )
    assert (org_copy.layer, org_copy.scope.org_id) == (layer_pb2.MEMORY_LAYER_ORG, ORG)
    assert (
        json_format.MessageToDict(org_copy.metadata)["approval_request"] == asked[team_wide][0].name
    )

    # The job keeps running: a memory that becomes promotable later is asked for, and so is
    # the changed memory's new revision, while the decided revisions, the sensitive and the
    # unplaced memories are not asked (again).
    later = await add("checkout rolls back with the release button")
    await use({later}, project_id=PROJECT)

    async def asked_later() -> dict[str, list[gres.ApprovalRequest]] | None:
        found = await requests()
        return found if later in found and len(found.get(changed, [])) == 2 else None

    asked = await until(asked_later, "requests for the later memory and the new revision")
    counts = {shared: 1, rejected: 1, changed: 2, deleted: 1, later: 1, team_wide: 1, mine: 1}
    assert {target: len(rs) for target, rs in asked.items()} == counts
    assert await records(stack, changed) == [
        (1, "skipped", "the memory changed after it was asked for (revision 1 → 2)"),
        (2, "pending", ""),
    ]
    assert [copy["id"] for copy in await copies_of(stack, shared)] == [copy["id"]]

    # An approval whose event memory never reads (memory is down and its consumer group is
    # moved past the event) is applied by the reconciler.
    replica = stack.replica_list[0]
    await asyncio.to_thread(stack.kill_replica, 0, signal.SIGTERM)
    decided = await approvals.ApproveApprovalRequest(
        asvc.ApproveApprovalRequestRequest(name=asked[later][0].name), metadata=lead
    )
    events = aioredis.Redis.from_url(replica.env["AETERNA_REDIS_URL"], decode_responses=True)
    try:

        async def published() -> bool:
            entries = await events.xrange(f"events:{TENANT}")
            return any(
                fields["type"] == "governance.approval_request.approved"
                and fields["resource"] == decided.name
                for _, fields in entries
            )

        await until(published, "governance's relay publishes the approval")
        await events.xgroup_setid(f"events:{TENANT}", "memory-promotions", "$")
    finally:
        await events.aclose()
    assert await record_state(stack, later) == "pending"
    stack.start_replica(replica, {**replica.env, RECONCILE_ENV: "0.5"})
    await asyncio.to_thread(stack.wait_healthy, replica)

    async def reconciled() -> bool:
        return await record_state(stack, later) == "promoted"

    await until(reconciled, "the reconciler applies the approval")
    [copy] = await copies_of(stack, later)
    assert copy["layer"] == int(layer_pb2.MEMORY_LAYER_TEAM) and copy["team_id"] == TEAM
    assert await copies_of(stack, secret) == [] and await copies_of(stack, ghost) == []
    assert {target: len(rs) for target, rs in (await requests()).items()} == counts
