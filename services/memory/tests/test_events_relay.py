"""The memory service relays its outbox to Redis Streams, with the actor of each change."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna_common.events import STREAMS_KEY, Event, stream_key
from google.protobuf import field_mask_pb2
from memory_testkit import MemoryEnv, md, memory, new_tenant, start_memory


async def test_memory_changes_reach_the_tenant_stream_with_their_actor(
    env: MemoryEnv, scratch: Path
) -> None:
    t = new_tenant()
    # A second replica with the relay on (the session's replica runs without it).
    server, app = await start_memory(
        env.urls, env.redis_url, scratch / f"relay-{uuid.uuid4().hex[:6]}", events_relay=True
    )
    redis = aioredis.Redis.from_url(env.redis_url, decode_responses=True)
    try:
        created = await env.stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{t}", memory=memory("likes green tea", user_id="alice")
            ),
            metadata=md(t, "alice", agent="helper"),
        )
        await env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=res.Memory(name=created.name, content="likes jasmine tea"),
                update_mask=field_mask_pb2.FieldMask(paths=["content"]),
            ),
            metadata=md(t, "alice"),
        )
        await env.stub.DeleteMemory(
            svc.DeleteMemoryRequest(name=created.name), metadata=md(t, "bob")
        )
        key = stream_key(t)
        events: list[Event] = []
        last = "0"
        try:
            async with asyncio.timeout(60):
                while len(events) < 3:
                    for _, entries in await redis.xread({key: last}, block=1000):
                        events += [Event.from_fields(f) for _, f in entries]
                        last = entries[-1][0]
        except TimeoutError:
            pytest.fail("the relay did not publish the three changes")
        assert [(e.type, e.actor) for e in events] == [
            ("memory.created", "users/alice/agents/helper"),
            ("memory.updated", "users/alice"),
            ("memory.deleted", "users/bob"),
        ]
        assert {e.resource for e in events} == {created.name}
        assert all(e.tenant == t and e.service == "memory" for e in events)
        # Events never carry content; they carry the layer and scope (live event rooms).
        assert not any("tea" in str(e.payload) for e in events)
        assert all(e.payload == {"layer": 2, "user_id": "alice"} for e in events)
        assert await redis.sismember(STREAMS_KEY, key)
        assert app.relay is not None and app.relay.leader
        assert env.app.relay is None
    finally:
        await redis.aclose()
        await server.stop()
