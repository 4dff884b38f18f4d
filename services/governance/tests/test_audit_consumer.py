"""The audit consumer on real Redis Streams and PostgreSQL: duplicates, a crashed consumer's
pending entries, dead letters, and stream order in the chain."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import redis.asyncio as aioredis
from aeterna_common.events import STREAMS_KEY
from aeterna_governance.audit.chain import parse_envelope
from aeterna_governance.audit.consumer import AuditConsumer
from aeterna_governance.audit.log import AuditLog
from audit_testkit import envelope, until
from governance_testkit import GovernanceEnv, new_tenant


async def chain(audit: AuditLog, tenant: str) -> list[str]:
    return [e.event_id for e in await audit.page(tenant, after=0, limit=1000)]


async def test_each_event_once_in_stream_order_across_a_crash(
    gov: GovernanceEnv, redis_server: Any
) -> None:
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    audit = AuditLog(gov.app.deps.db)
    group = f"audit-{uuid.uuid4().hex[:8]}"
    t1, t2 = new_tenant(), new_tenant()
    s1, s2 = f"events:{t1}", f"events:{t2}"
    try:
        await r.sadd(STREAMS_KEY, s1, s2)
        for n in (1, 2, 3, 4):
            await r.xadd(s1, envelope(t1, n))
        await r.xadd(s1, envelope(t1, 3))  # delivered twice by a relay that restarted
        bad = envelope(t1, 99)
        del bad["payload"]
        await r.xadd(s1, bad)
        for n in (5, 6):
            await r.xadd(s1, envelope(t1, n))
        for n in (1, 2, 3, 4):
            await r.xadd(s2, envelope(t2, n))

        def consumer() -> AuditConsumer:
            return AuditConsumer(r, audit, group=group, batch=3, block_s=0.05)

        # A replica read four entries and crashed after appending two of them, unacked.
        crashed = consumer()
        await crashed.events.refresh()
        delivered = await r.xreadgroup(group, "replica-dead", {s1: ">"}, count=4)
        for _, fields in delivered[0][1][:2]:
            await audit.append(parse_envelope(fields))
        # Another crashed mid-batch: the next two entries delivered to it, none handled.
        await r.xreadgroup(group, crashed.events.consumer, {s1: ">"}, count=2)

        survivor = consumer()
        while await survivor.step():
            pass
        assert await chain(audit, t1) == [f"memory:{n}" for n in range(1, 7)]
        assert await chain(audit, t2) == [f"memory:{n}" for n in range(1, 5)]
        assert (await audit.verify(t1)).valid
        for stream in (s1, s2):
            assert (await r.xpending(stream, group))["pending"] == 0
        dead = await r.xrange(f"{s1}:dead")
        assert [fields["event_id"] for _, fields in dead] == ["memory:99"]
        assert "payload" in dead[0][1]["dead_reason"]

        # The leased loop consumes new entries as they come.
        task = asyncio.create_task(consumer().run(gov.app.deps.db.pool, ttl_s=5))
        await r.xadd(s1, envelope(t1, 7))

        async def seventh() -> bool:
            return len(await chain(audit, t1)) == 7

        await until(seventh, 30, "the leased consumer appends a new event")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert await chain(audit, t1) == [f"memory:{n}" for n in range(1, 8)]
    finally:
        await r.srem(STREAMS_KEY, s1, s2)
        await r.delete(s1, s2, f"{s1}:dead")
        await r.aclose()
