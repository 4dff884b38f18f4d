"""The index follower applies a batch in steps and yields to searches in flight between them,
but never to a search that waits for the follower itself (a consistency token).

Real PostgreSQL, Redis, embedded index and ONNX model (the ``env`` fixture).
"""

from __future__ import annotations

import asyncio

import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, decode_token
from memory_testkit import MemoryEnv, md, memory, new_tenant

N = 25
"""Memories per import: three steps of 10 in the follower."""


@pytest.fixture
def stepped(env: MemoryEnv, monkeypatch: pytest.MonkeyPatch) -> MemoryEnv:
    """The replica with follower steps of 10, an unbounded yield (only the end of the
    searches in flight releases a step) and batch creates in one step (so that only the
    follower yields)."""
    monkeypatch.setattr(env.follower, "apply_step", 10)
    monkeypatch.setattr(env.domain.foreground, "max_yield_s", 60.0)
    monkeypatch.setattr(env.domain, "bulk_step", 0)
    return env


async def import_(env: MemoryEnv, tenant: str) -> int:
    """Batch-create ``N`` memories; returns the write's consistency token position."""
    call = env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(
            parent=f"tenants/{tenant}",
            requests=[
                svc.CreateMemoryRequest(memory=memory(f"marmalade recipe {i}", user_id="u1"))
                for i in range(N)
            ],
            request_id=f"import-{tenant}",
        ),
        metadata=md(tenant),
    )
    created = await call
    assert len(created.memories) == N
    return decode_token(dict(await call.initial_metadata())[CONSISTENCY_TOKEN_KEY])


async def until_follower_waits(env: MemoryEnv) -> None:
    for _ in range(2000):  # bounded poll: the follower's first step is done once it waits
        if env.domain.foreground.waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the follower never yielded")


def search(env: MemoryEnv, tenant: str) -> asyncio.Future[svc.SearchMemoriesResponse]:
    """A search on the env's channel: it carries the channel's latest consistency token."""
    return asyncio.ensure_future(
        env.stub.SearchMemories(
            svc.SearchMemoriesRequest(
                parent=f"tenants/{tenant}", query="marmalade recipe", top_k=N
            ),
            metadata=md(tenant),
        )
    )


async def test_apply_waits_while_a_search_is_in_flight_and_resumes(stepped: MemoryEnv) -> None:
    env, t = stepped, new_tenant()
    gauge, follower = env.domain.foreground, env.follower
    before = follower.applied
    with gauge.track():  # a search in flight in this replica
        position = await import_(env, t)
        await until_follower_waits(env)
        assert gauge.waiting == 1
        # The first step is in the index, the batch's position is not applied yet.
        assert before <= follower.applied < position
    # The search ended: the follower finishes the batch.
    assert await follower.wait_for(position, 60.0)
    assert gauge.waiting == 0
    found = await search(env, t)
    assert len(found.results) == N


async def test_a_search_waiting_on_its_token_is_not_yielded_to(stepped: MemoryEnv) -> None:
    env, t = stepped, new_tenant()
    gauge, follower = env.domain.foreground, env.follower
    with gauge.track():  # another search in flight holds the follower after its first step
        position = await import_(env, t)
        await until_follower_waits(env)
        # This search waits until the index has applied its token (the import's position).
        waiting = search(env, t)
        for _ in range(2000):  # bounded poll: until the search has started waiting
            if gauge.blocked_on_bulk:
                break
            await asyncio.sleep(0.01)
        assert gauge.blocked_on_bulk == 1, "the search never waited for its token"
        # Only the other search counts as in flight: not the one waiting for the follower.
        assert gauge.in_flight == 1 and not waiting.done()
    # The other search ended. The waiting one is tracked too, yet the follower does not
    # yield to it (with a 60 s yield per step it would miss its 2 s token wait, UNAVAILABLE).
    found = await waiting
    assert follower.applied >= position
    assert len(found.results) == N
