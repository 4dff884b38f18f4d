"""Per-tenant admission limit of BatchCreateMemories: a tenant over its bulk write rate is
refused with ``RESOURCE_EXHAUSTED`` and ``RetryInfo`` before any write, another tenant is
unaffected, and the client helper waits the delay and retries with the same request id.

Real PostgreSQL, Redis, embedded index and ONNX model (the ``env`` fixture); the limit's
clock is a counter the tests advance, so no assertion depends on timing.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_cli.client import honour_retry_info, retry_delay_s
from aeterna_common.admission import RATE_LIMITED, TenantRateLimit
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memory_testkit import MemoryEnv, md, memory, new_tenant


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def batch(tenant: str, n: int, request_id: str, user: str = "u1") -> svc.BatchCreateMemoriesRequest:
    return svc.BatchCreateMemoriesRequest(
        parent=f"tenants/{tenant}",
        requests=[
            svc.CreateMemoryRequest(memory=memory(f"limit note {i}", user_id=user))
            for i in range(n)
        ],
        request_id=request_id,
    )


async def count(env: MemoryEnv, tenant: str) -> int:
    page = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{tenant}", page_size=100), metadata=md(tenant)
    )
    return len(page.memories)


@pytest.fixture
def limited(env: MemoryEnv) -> Iterator[Clock]:
    """10 memories/s per tenant, a bucket of 5, on a clock the test moves."""
    clock = Clock()
    before = env.domain.batch_limit
    env.domain.batch_limit = TenantRateLimit(10.0, 5, clock=clock)
    yield clock
    env.domain.batch_limit = before


async def test_over_the_rate_is_refused_with_retry_info_and_writes_nothing(
    env: MemoryEnv, limited: Clock
) -> None:
    t, other = new_tenant(), new_tenant()
    assert (
        len((await env.stub.BatchCreateMemories(batch(t, 5, "a1"), metadata=md(t))).memories) == 5
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.stub.BatchCreateMemories(batch(t, 4, "a2"), metadata=md(t))
    exc = refused.value
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(exc)
    assert status is not None
    reasons = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.append(info.reason)
    assert reasons == [RATE_LIMITED]
    # The bucket is empty: 4 memories at 10/s are 0.4 s away.
    assert retry_delay_s(exc) == pytest.approx(0.4)
    assert await count(env, t) == 5  # nothing of the refused batch was written
    # Another tenant has a bucket of its own.
    assert (
        len(
            (await env.stub.BatchCreateMemories(batch(other, 5, "b1"), metadata=md(other))).memories
        )
        == 5
    )
    # Once the delay has passed, the same request is admitted.
    limited.now += 0.4
    again = await env.stub.BatchCreateMemories(batch(t, 4, "a2"), metadata=md(t))
    assert len(again.memories) == 4 and await count(env, t) == 9


async def test_a_replayed_batch_and_a_single_create_are_not_limited(
    env: MemoryEnv, limited: Clock
) -> None:
    t = new_tenant()
    first = await env.stub.BatchCreateMemories(batch(t, 5, "r1"), metadata=md(t))
    # The bucket is empty, yet the retry of a done batch is answered from its request id.
    replay = await env.stub.BatchCreateMemories(batch(t, 5, "r1"), metadata=md(t))
    assert [m.name for m in replay.memories] == [m.name for m in first.memories]
    one = await env.stub.CreateMemory(
        svc.CreateMemoryRequest(parent=f"tenants/{t}", memory=memory("single", user_id="u1")),
        metadata=md(t),
    )
    assert one.name and await count(env, t) == 6


async def test_permission_is_decided_before_the_limit(env: MemoryEnv, limited: Clock) -> None:
    t = new_tenant()
    await env.stub.BatchCreateMemories(batch(t, 5, "p1"), metadata=md(t))
    # A plain user writing another user's memories: PERMISSION_DENIED, not a hint about
    # the tenant's rate.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.stub.BatchCreateMemories(
            batch(t, 2, "p2", user="someone-else"), metadata=md(t, "u1", roles=())
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_client_waits_out_retry_info(env: MemoryEnv) -> None:
    t = new_tenant()
    before = env.domain.batch_limit

    class Ticking(Clock):
        def __call__(self) -> float:  # 0.1 s passes at each admission check
            self.now += 0.1
            return self.now

    # 10 memories/s, a bucket of 5: after the first batch, the second is refused four times
    # (the bucket holds 1, 2, 3, 4 at those checks) and admitted at the fifth.
    env.domain.batch_limit = TenantRateLimit(10.0, 5, clock=Ticking())
    waits: list[float] = []
    try:
        for key in ("c1", "c2"):
            reply = await honour_retry_info(
                lambda key=key: env.stub.BatchCreateMemories(batch(t, 5, key), metadata=md(t)),
                on_wait=waits.append,
            )
            assert len(reply.memories) == 5
    finally:
        env.domain.batch_limit = before
    assert len(waits) == 4
    # Each wait is the delay RetryInfo named, plus up to 20 % jitter.
    assert all(d <= w <= d * 1.2 + 1e-6 for w, d in zip(waits, (0.4, 0.3, 0.2, 0.1), strict=True))
    assert await count(env, t) == 10


def test_the_bucket_admits_a_batch_larger_than_the_burst_at_the_average_rate() -> None:
    clock = Clock()
    limit = TenantRateLimit(100.0, 50, clock=clock)
    limit.admit("t", 500)  # a full bucket admits it whole; the balance goes to -450
    with pytest.raises(Exception) as refused:
        limit.admit("t", 1)
    assert getattr(refused.value, "retry_after_s", None) == pytest.approx(4.51)
    clock.now += 4.51
    limit.admit("t", 1)
    with pytest.raises(ValueError):
        TenantRateLimit(-1, 10)
    with pytest.raises(ValueError):
        TenantRateLimit(1, 0)
    TenantRateLimit(0, 1).admit("t", 10**6)  # 0: no limit
