"""Memory's enforcement of the permission model through the gRPC server: refusals with
``ACTION_NOT_ALLOWED``, permission before existence, narrowed open searches and listings.

Bindings come from a directory of plain data (``app.authz.directory.directory``)."""

from __future__ import annotations

import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_common.authz import Delegation, OrgUnit, RoleBinding, Snapshot, UnitKind
from google.protobuf import field_mask_pb2
from memory_testkit import MemoryEnv, md, memory, new_tenant
from test_grpc_api import expect

NONE: tuple[str, ...] = ()


def as_user(tenant: str, user: str, agent: str | None = None) -> tuple[tuple[str, str], ...]:
    """A plain user's token: no roles, so only bindings and own memories count."""
    return md(tenant, user, agent, roles=NONE)


async def put(env: MemoryEnv, tenant: str, who: str, m: res.Memory) -> res.Memory:
    return await env.stub.CreateMemory(
        svc.CreateMemoryRequest(parent=f"tenants/{tenant}", memory=m), metadata=as_user(tenant, who)
    )


def bind(env: MemoryEnv, snapshot: Snapshot) -> None:
    env.app.authz.directory.directory.put(snapshot)


async def denied(call: object) -> None:
    reason, _ = await expect(call, grpc.StatusCode.PERMISSION_DENIED)
    assert reason == "ACTION_NOT_ALLOWED"


async def test_bob_cannot_touch_alices_user_memories(env: MemoryEnv) -> None:
    t = new_tenant()
    mine = await put(
        env, t, "alice", memory("alice keeps her keys in the blue drawer", user_id="alice")
    )
    bob = as_user(t, "bob")
    s = env.stub
    await denied(s.GetMemory(svc.GetMemoryRequest(name=mine.name), metadata=bob))
    await denied(
        s.ListMemoryRevisions(svc.ListMemoryRevisionsRequest(name=mine.name), metadata=bob)
    )
    await denied(
        s.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=res.Memory(name=mine.name, content="bob was here"),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=bob,
        )
    )
    await denied(
        s.RecordMemoryFeedback(
            svc.RecordMemoryFeedbackRequest(
                name=mine.name, type=res.FEEDBACK_TYPE_IRRELEVANT, score=-1.0
            ),
            metadata=bob,
        )
    )
    await denied(s.DeleteMemory(svc.DeleteMemoryRequest(name=mine.name), metadata=bob))
    # Nor write into them, alone or inside a batch (nothing of the batch is written).
    await denied(put(env, t, "bob", memory("planted", user_id="alice")))
    await denied(
        s.BatchCreateMemories(
            svc.BatchCreateMemoriesRequest(
                parent=f"tenants/{t}",
                requests=[
                    svc.CreateMemoryRequest(memory=memory("bob's own note", user_id="bob")),
                    svc.CreateMemoryRequest(memory=memory("planted", user_id="alice")),
                ],
            ),
            metadata=bob,
        )
    )
    # An explicit scope bob may not read is refused; his open search never shows alice's.
    await denied(
        s.SearchMemories(
            svc.SearchMemoriesRequest(
                parent=f"tenants/{t}", query="keys drawer", scope=layer_pb2.Scope(user_id="alice")
            ),
            metadata=bob,
        )
    )
    await put(env, t, "bob", memory("bob keeps his keys in the red drawer", user_id="bob"))
    found = await s.SearchMemories(
        svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="keys drawer", top_k=5),
        metadata=bob,
    )
    assert [r.memory.scope.user_id for r in found.results] == ["bob"]
    listed = await s.ListMemories(svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=bob)
    assert [m.content for m in listed.memories] == ["bob keeps his keys in the red drawer"]
    # alice still has hers, untouched; the tenant admin sees both.
    got = await s.GetMemory(svc.GetMemoryRequest(name=mine.name), metadata=as_user(t, "alice"))
    assert got.content == "alice keeps her keys in the blue drawer" and got.revision == 1
    everything = await s.SearchMemories(
        svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="keys drawer", top_k=5),
        metadata=md(t, "ops"),
    )
    assert sorted(r.memory.scope.user_id for r in everything.results) == ["alice", "bob"]


async def test_permission_before_existence(env: MemoryEnv) -> None:
    t = new_tenant()
    missing = f"tenants/{t}/memories/00000000-0000-4000-8000-000000000000"
    # A caller who could not read it if it existed learns nothing: the same refusal.
    await denied(env.stub.GetMemory(svc.GetMemoryRequest(name=missing), metadata=as_user(t, "bob")))
    # A caller with tenant-wide read learns that it is missing.
    await expect(
        env.stub.GetMemory(svc.GetMemoryRequest(name=missing), metadata=md(t, "ops")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_unit_roles_and_narrowed_reads(env: MemoryEnv) -> None:
    t = new_tenant()
    bind(
        env,
        Snapshot(
            t,
            1,
            (
                OrgUnit("acme", UnitKind.COMPANY),
                OrgUnit("eng", UnitKind.ORGANIZATION, "acme"),
                OrgUnit("core", UnitKind.TEAM, "eng"),
                OrgUnit("web", UnitKind.TEAM, "eng"),
                OrgUnit("p1", UnitKind.PROJECT, "core"),
            ),
            (
                RoleBinding("users/dev", "DEVELOPER", "p1"),
                RoleBinding("users/lead", "TECH_LEAD", "core"),
                RoleBinding("users/webdev", "TECH_LEAD", "web"),
            ),
        ),
    )
    # A DEVELOPER bound at p1 writes p1's memories, not its team's.
    await put(
        env, t, "dev", memory("p1 deploys with blue-green releases", "PROJECT", project_id="p1")
    )
    await denied(put(env, t, "dev", memory("core owns the deploy tooling", "TEAM", team_id="core")))
    await put(env, t, "lead", memory("core owns the deploy tooling", "TEAM", team_id="core"))
    await put(env, t, "webdev", memory("web deploys on fridays", "TEAM", team_id="web"))
    # The tech lead of core reads core and p1 (below it), never web: narrowed silently.
    found = await env.stub.SearchMemories(
        svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="deploys deploy", top_k=10),
        metadata=as_user(t, "lead"),
    )
    assert sorted(r.memory.content for r in found.results) == [
        "core owns the deploy tooling",
        "p1 deploys with blue-green releases",
    ]
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=as_user(t, "dev")
    )
    assert [m.content for m in listed.memories] == ["p1 deploys with blue-green releases"]
    await denied(
        env.stub.ListMemories(
            svc.ListMemoriesRequest(parent=f"tenants/{t}", scope=layer_pb2.Scope(team_id="web")),
            metadata=as_user(t, "lead"),
        )
    )


async def test_agents_act_within_their_delegation(env: MemoryEnv) -> None:
    t = new_tenant()
    bind(
        env,
        Snapshot(
            t,
            1,
            delegations=(
                Delegation("d1", "alice", "reader", frozenset({"memory:read"})),
                Delegation("d2", "alice", "gone", frozenset({"memory:read"}), active=False),
            ),
        ),
    )
    mine = await put(env, t, "alice", memory("alice's flight lands at nine", user_id="alice"))
    reader = as_user(t, "alice", "reader")
    got = await env.stub.GetMemory(svc.GetMemoryRequest(name=mine.name), metadata=reader)
    assert got.content == "alice's flight lands at nine"
    await denied(
        env.stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{t}", memory=memory("written by an agent", user_id="alice")
            ),
            metadata=reader,
        )
    )
    await denied(
        env.stub.GetMemory(
            svc.GetMemoryRequest(name=mine.name), metadata=as_user(t, "alice", "gone")
        )
    )
