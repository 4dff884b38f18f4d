"""The index follower applies a batch in steps and defers each step (the first included) while
searches are in flight, bounded per step, but never for a search that waits for the follower
itself (a consistency token): such a search releases a deferred step at once.

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
    """The replica with follower steps of 10, an unbounded deferral (only the end of the
    searches in flight releases a step) and batch creates in one step (so that only the
    follower yields)."""
    monkeypatch.setattr(env.follower, "apply_step", 10)
    monkeypatch.setattr(env.follower, "defer_max_s", 60.0)
    monkeypatch.setattr(env.domain.foreground, "max_yield_s", 60.0)
    monkeypatch.setattr(env.domain, "bulk_step", 0)
    return env


async def import_(env: MemoryEnv, tenant: str, n: int = N) -> int:
    """Batch-create ``n`` memories; returns the write's consistency token position."""
    call = env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(
            parent=f"tenants/{tenant}",
            requests=[
                svc.CreateMemoryRequest(memory=memory(f"marmalade recipe {i}", user_id="u1"))
                for i in range(n)
            ],
            request_id=f"import-{tenant}",
        ),
        metadata=md(tenant),
    )
    created = await call
    assert len(created.memories) == n
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
        # The batch's position is not applied yet.
        assert before <= follower.applied < position
    # The search ended: the follower finishes the batch.
    assert await follower.wait_for(position, 60.0)
    assert gauge.waiting == 0
    found = await search(env, t)
    assert len(found.results) == N


async def test_a_search_waiting_on_its_token_releases_the_follower(stepped: MemoryEnv) -> None:
    env, t = stepped, new_tenant()
    gauge, follower = env.domain.foreground, env.follower
    with gauge.track():  # another search in flight, never ending here, holds the follower
        position = await import_(env, t)
        await until_follower_waits(env)
        # This search waits until the index has applied its token (the import's position):
        # the follower stops deferring for the other search and applies the whole batch
        # (with 60 s per deferred step the search would miss its 2 s token wait).
        found = await asyncio.wait_for(search(env, t), 30)
        assert follower.applied >= position
        assert len(found.results) == N
        # The other search is still in flight: only the waiter released the follower.
        assert gauge.in_flight == 1


async def test_a_one_step_batch_is_deferred_too(stepped: MemoryEnv) -> None:
    env, t = stepped, new_tenant()
    gauge, follower = env.domain.foreground, env.follower
    with gauge.track():
        # Fewer memories than one step: before, a batch's first step was never deferred, so
        # a batch import's every batch reached the index in the middle of the searches.
        position = await import_(env, t, n=5)
        await until_follower_waits(env)
        assert follower.applied < position
    assert await follower.wait_for(position, 60.0)


async def test_deferral_is_bounded_under_a_search_that_never_ends(
    stepped: MemoryEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, t = stepped, new_tenant()
    gauge, follower = env.domain.foreground, env.follower
    monkeypatch.setattr(follower, "defer_max_s", 0.05)
    with gauge.track():  # a search in flight for the whole test
        position = await import_(env, t)
        await until_follower_waits(env)
        # Not a consistency-token wait (that would release the follower): the bound alone
        # brings every step in.
        for _ in range(3000):  # bounded poll, well past 3 steps of 0.05 s on a busy machine
            if follower.applied >= position:
                break
            await asyncio.sleep(0.01)
        assert follower.applied >= position
        assert gauge.in_flight == 1
