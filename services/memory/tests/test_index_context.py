"""What an update re-indexes: the BM25 context follows metadata changes, and a changed
memory's context is the turns that preceded it in its session, not the session's latest."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from google.protobuf import field_mask_pb2
from memory_testkit import MemoryEnv, create, md, memory, new_tenant, start_memory


async def index_row(env: MemoryEnv, name: str) -> asyncpg.Record:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        row = await conn.fetchrow(
            "SELECT index_context, embedding FROM memories WHERE id = $1::uuid",
            name.rsplit("/", 1)[1],
        )
    finally:
        await conn.close()
    assert row is not None
    return row


def turn(content: str, session_time: str | None = None) -> res.Memory:
    m = memory(content, "SESSION", user_id="u", session_id="s")
    if session_time is not None:
        m.metadata.update({"session_time": session_time})
    return m


async def update(stub: Any, tenant: str, name: str, paths: list[str], **fields: Any) -> res.Memory:
    m = res.Memory(name=name, **{k: v for k, v in fields.items() if k != "metadata"})
    if "metadata" in fields:
        m.metadata.update(fields["metadata"])
    return await stub.UpdateMemory(
        svc.UpdateMemoryRequest(memory=m, update_mask=field_mask_pb2.FieldMask(paths=paths)),
        metadata=md(tenant),
    )


async def lexical_hit(stub: Any, tenant: str, query: str, name: str) -> float:
    r = await stub.SearchMemories(
        svc.SearchMemoriesRequest(
            parent=f"tenants/{tenant}",
            query=query,
            scope=layer_pb2.Scope(user_id="u"),
            top_k=20,
        ),
        metadata=md(tenant),
    )
    return max((h.lexical_score for h in r.results if h.memory.name == name), default=0.0)


async def test_metadata_only_update_reindexes_session_time(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, turn("We adopted a kitten", "8 May 2023"))
    assert "8 May 2023" in (await index_row(env, m.name))["index_context"]

    await update(env.stub, t, m.name, ["metadata"], metadata={"session_time": "19 October 2024"})

    context = (await index_row(env, m.name))["index_context"]
    assert "19 October 2024" in context and "8 May 2023" not in context
    # The follower re-encodes the BM25 vector from the new context: the new time is found,
    # the old one no longer is.
    assert await lexical_hit(env.stub, t, "October 2024", m.name) > 0
    assert await lexical_hit(env.stub, t, "May 2023", m.name) == 0


async def test_metadata_only_update_re_embeds_when_metadata_is_in_the_dense_text(
    make_database: Any, redis_server: Any, scratch: Any
) -> None:
    urls = await make_database()
    server, app = await start_memory(
        urls, redis_server.url, scratch / "dense-metadata", dense_metadata=True
    )
    try:
        import grpc
        from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = svc_grpc.MemoryServiceStub(channel)
            t = new_tenant()
            m = await stub.CreateMemory(
                svc.CreateMemoryRequest(parent=f"tenants/{t}", memory=turn("Kitten", "May 2023")),
                metadata=md(t),
            )
            env = MemoryEnv(urls, redis_server.url, server, stub, app, scratch)
            before = list((await index_row(env, m.name))["embedding"])
            await update(stub, t, m.name, ["metadata"], metadata={"session_time": "June 1999"})
            after = list((await index_row(env, m.name))["embedding"])
            expected = (await app.domain.embed(t, ["[June 1999] Kitten"]))[0]
            assert after != before
            assert after == pytest.approx(expected, abs=1e-6)
    finally:
        await server.stop()


async def test_content_update_takes_the_turns_before_it_as_context(env: MemoryEnv) -> None:
    t = new_tenant()
    names = []
    for content in ("first turn alpha", "second turn bravo", "third turn charlie"):
        names.append((await create(env, t, turn(content))).name)
    for content in ("fourth turn delta", "fifth turn echo"):
        await create(env, t, turn(content))
    # Created second: its context is the first turn only, however many turns came later.
    assert list((await index_row(env, names[1]))["index_context"]) == ["first turn alpha"]

    await update(env.stub, t, names[1], ["content"], content="second turn, now bravo two")
    assert list((await index_row(env, names[1]))["index_context"]) == ["first turn alpha"]

    await update(env.stub, t, names[2], ["content"], content="third turn, now charlie two")
    assert list((await index_row(env, names[2]))["index_context"]) == [
        "first turn alpha",
        "second turn, now bravo two",
    ]
    # The first turn has nothing before it.
    await update(env.stub, t, names[0], ["content"], content="first turn, now alpha two")
    assert list((await index_row(env, names[0]))["index_context"]) == []
