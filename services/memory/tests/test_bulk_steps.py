"""A batch create yields to searches in flight between its steps, and stays all-or-nothing.

Real PostgreSQL, Redis, embedded index and ONNX model (the ``env`` fixture).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_common.context import Principal
from aeterna_memory.domain.model import Layer, NewMemory, Scope
from memory_testkit import MemoryEnv, md, memory, new_tenant


def batch(tenant: str, n: int, request_id: str) -> svc.BatchCreateMemoriesRequest:
    return svc.BatchCreateMemoriesRequest(
        parent=f"tenants/{tenant}",
        requests=[
            svc.CreateMemoryRequest(memory=memory(f"note {i} about the garden", user_id=f"u{i}"))
            for i in range(n)
        ],
        request_id=request_id,
    )


async def count(env: MemoryEnv, tenant: str) -> int:
    page = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{tenant}", page_size=100), metadata=md(tenant)
    )
    return len(page.memories)


async def test_a_batch_waits_while_a_search_is_in_flight(env: MemoryEnv) -> None:
    t = new_tenant()
    gauge = env.domain.foreground
    assert env.domain.bulk_step == 20  # the service's default
    gauge.max_yield_s = 60.0  # so that only the search's end can release the batch
    with gauge.track():  # a search in flight in this process
        task = asyncio.ensure_future(
            env.stub.BatchCreateMemories(batch(t, 45, "steps-1"), metadata=md(t))
        )
        for _ in range(2000):  # the first step is done once the batch waits (bounded poll)
            if gauge.waiting:
                break
            await asyncio.sleep(0.01)
        assert gauge.waiting == 1
        assert not task.done()
    created = await task  # the search ended: the batch goes on
    assert len(created.memories) == 45
    assert gauge.waiting == 0
    assert await count(env, t) == 45


async def test_a_batch_without_searches_in_flight_never_waits(env: MemoryEnv) -> None:
    t = new_tenant()
    gauge = env.domain.foreground
    gauge.max_yield_s = 60.0
    created = await env.stub.BatchCreateMemories(batch(t, 45, "steps-2"), metadata=md(t))
    assert len(created.memories) == 45 and gauge.waiting == 0


async def store_create(
    env: MemoryEnv, tenant: str, items: list[Any], between_steps: Callable[[], Awaitable[None]]
) -> list[Any]:
    """The store's create in steps of 20, ``between_steps`` awaited in between."""
    created, _ = await env.domain.store.create(
        tenant,
        items,
        model=env.domain.model_id,
        actor=Principal(tenant, "u").actor,
        method="BatchCreateMemories",
        request_id="",
        request_hash="x",
        step=20,
        between_steps=between_steps,
    )
    return list(created)


async def test_a_step_that_fails_leaves_nothing_written(env: MemoryEnv) -> None:
    t = new_tenant()
    calls = 0

    async def between_steps() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("cancelled between steps")

    items = await env.domain._prepare(
        t, [NewMemory(Layer.USER, Scope(user_id="u"), f"fact {i}") for i in range(50)]
    )
    with pytest.raises(RuntimeError, match="between steps"):
        await store_create(env, t, items, between_steps)
    assert calls == 2  # the first 40 rows were sent, then the transaction rolled back
    assert await count(env, t) == 0
    # The same rows in steps of 20, nothing in the way: all committed, in one transaction.
    created = await store_create(env, t, items, lambda: asyncio.sleep(0))
    assert len(created) == 50 and await count(env, t) == 50
