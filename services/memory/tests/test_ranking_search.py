"""Second-stage ranking through the gRPC server: event dates stored at write time, episode
and neighbour features never reaching a memory the caller may not read, and the same results
from two replicas and after a restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_memory.domain import ranking as rk
from memory_testkit import MemoryEnv, md, memory, new_tenant, start_memory
from test_permissions import as_user

TIME = "1:56 pm on 8 May, 2023"


def turn(text: str, user: str, session: str, speaker: str) -> svc.CreateMemoryRequest:
    m = memory(text, "SESSION", user_id=user, session_id=session)
    m.metadata.update({"session_time": TIME, "speaker": speaker})
    return svc.CreateMemoryRequest(memory=m)


async def batch(
    env: MemoryEnv, tenant: str, who: str, reqs: list[svc.CreateMemoryRequest]
) -> list[res.Memory]:
    reply = await env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(parent=f"tenants/{tenant}", requests=reqs),
        metadata=as_user(tenant, who),
    )
    return list(reply.memories)


async def test_relative_dates_are_stored_as_event_dates(env: MemoryEnv) -> None:
    t = new_tenant()
    said, plain = await batch(
        env,
        t,
        "ann",
        [
            turn("Ann: I ran a charity race yesterday!", "ann", "s1", "Ann"),
            turn("Ann: I like running.", "ann", "s1", "Ann"),
        ],
    )
    assert list(said.metadata[rk.EVENT_DATE_KEY]) == ["2023-05-07"]
    assert rk.EVENT_DATE_KEY not in plain.metadata
    # The writer's own metadata is unchanged beside it.
    assert said.metadata["session_time"] == TIME


async def test_expansion_never_reaches_a_memory_the_caller_may_not_read(env: MemoryEnv) -> None:
    t = new_tenant()
    # Ann's session holds the answer right before a turn that matches the query well; Bo's
    # session (same session id, another user) holds only the matching reply.
    ann = await batch(
        env,
        t,
        "ann",
        [
            turn("Ann: I adopted a golden retriever named Max.", "ann", "s1", "Ann"),
            turn("Bo: what a lovely puppy, puppies are the best puppy", "ann", "s1", "Bo"),
        ],
    )
    bo = await batch(
        env,
        t,
        "bo",
        [
            turn("Bo: my neighbour has a puppy too", "bo", "s1", "Bo"),
            turn("Bo: lovely puppy, the best puppy ever", "bo", "s1", "Bo"),
        ],
    )
    secret = {m.name for m in ann}
    for scope in (layer_pb2.Scope(), layer_pb2.Scope(user_id="bo")):
        found = await env.stub.SearchMemories(
            svc.SearchMemoriesRequest(
                parent=f"tenants/{t}", query="lovely puppy Max", scope=scope, top_k=10
            ),
            metadata=as_user(t, "bo"),
        )
        names = {r.memory.name for r in found.results}
        assert names == {m.name for m in bo}
        assert not names & secret
    # Ann (and an admin) do get her answer, lifted by its neighbour in her session.
    found = await env.stub.SearchMemories(
        svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="lovely puppy Max", top_k=10),
        metadata=md(t, "ops"),
    )
    assert secret <= {r.memory.name for r in found.results}


async def test_same_results_on_two_replicas_and_after_a_restart(
    env: MemoryEnv, scratch: Path
) -> None:
    t = new_tenant()
    reqs = []
    for s in range(3):
        for i, text in enumerate(
            [
                "Ann: I went hiking last weekend with my sister.",
                "Bo: sounds fun, where did you go?",
                "Ann: up the mountain trail near the lake, yesterday it rained",
                "Bo: I painted a sunset the same day.",
            ]
        ):
            reqs.append(turn(f"{text} ({s}.{i})", "u", f"s{s}", text.split(":")[0]))
    await batch(env, t, "u", reqs)
    queries = ["When did Ann go hiking?", "What did Bo paint?", "lake trail rain"]

    async def results(stub: svc_grpc.MemoryServiceStub) -> list[list[tuple[str, float]]]:
        out = []
        for q in queries:
            r = await stub.SearchMemories(
                svc.SearchMemoriesRequest(
                    parent=f"tenants/{t}", query=q, scope=layer_pb2.Scope(user_id="u"), top_k=8
                ),
                metadata=md(t),
            )
            out.append([(h.memory.name, round(h.score, 6)) for h in r.results])
        return out

    first = await results(env.stub)
    assert all(len(r) == 8 for r in first)
    for _ in range(2):  # another replica, then that replica restarted on a fresh index
        server, _app = await start_memory(
            env.urls, env.redis_url, scratch / f"replica-{uuid.uuid4().hex[:6]}"
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                assert await results(svc_grpc.MemoryServiceStub(ch)) == first
        finally:
            await server.stop()


async def test_session_neighbours_are_the_turns_around_a_hit_in_its_own_scope(
    env: MemoryEnv,
) -> None:
    t = new_tenant()
    ann = await batch(env, t, "ann", [turn(f"Ann: line {i}", "ann", "s1", "Ann") for i in range(5)])
    # Same session id, another user: not Ann's episode, so never a neighbour of her turns.
    other_user = await batch(env, t, "bo", [turn("Bo: line", "bo", "s1", "Bo")])
    ids = [m.name.rsplit("/", 1)[1] for m in ann]
    store = env.domain.store

    async def near(expand: list[str], before: int, after: int) -> set[str]:
        hits, neighbours = await store.read_pool(t, [], expand, before, after)
        assert hits == {}
        return set(neighbours)

    assert await near([ids[2]], 2, 1) == {ids[0], ids[1], ids[3]}
    assert await near([ids[0]], 2, 1) == {ids[1]}
    assert await near([ids[4]], 1, 1) == {ids[3]}
    foreign = {m.name.rsplit("/", 1)[1] for m in other_user}
    # Asked for every turn, each is a hit and its neighbours are the others.
    hits, neighbours = await store.read_pool(t, ids, ids, 5, 5, vectors=False)
    assert set(hits) == set(ids) and neighbours == {}
    assert all(vector == [] for _, vector in hits.values())
    assert await near(ids[:1], 0, 5) == set(ids[1:])
    assert not await near(ids, 5, 5) & foreign
    # A deleted turn is skipped: the nearest live one takes its place.
    await env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=ann[1].name), metadata=md(t))
    assert await near([ids[2]], 1, 0) == {ids[0]}
    # Another tenant's session of the same user and session id is invisible.
    assert await store.read_pool(new_tenant(), [ids[2]], [ids[2]], 2, 1) == ({}, {})
