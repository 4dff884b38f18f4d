"""A tenant's usage spike is an anomaly: the detector reads the usage rows the service records
(``usage_hourly``) and appends ``memory.anomaly.detected`` to the outbox.

Real PostgreSQL (the project's throwaway cluster) with the memory schema: usage is recorded
with :func:`aeterna_common.usage.record_usage` in tenant transactions, read back across
tenants as the indexer role, as the service's anomaly job does every interval.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
from aeterna_common.anomaly import (
    AnomalyMonitor,
    Kind,
    Signal,
    UsageWindow,
    feed_usage,
    outbox_sink,
)
from aeterna_common.db import Database
from aeterna_common.usage import EMBEDDING_CALLS, EMBEDDING_TOKENS, record_usage
from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL


async def use(db: Database, tenant_id: str, tokens: int) -> None:
    async def work(conn: asyncpg.Connection) -> None:
        await record_usage(conn, tenant_id, {EMBEDDING_TOKENS: tokens, EMBEDDING_CALLS: 1})

    await db.run(tenant_id, work)


async def anomaly_events(db: Database, tenant_id: str) -> list[dict[str, Any]]:
    async def work(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        rows = await conn.fetch(
            "SELECT payload FROM outbox WHERE tenant_id = $1 AND event_type = $2 ORDER BY position",
            tenant_id,
            "memory.anomaly.detected",
        )
        return [json.loads(r["payload"]) for r in rows]

    return await db.run(tenant_id, work, readonly=True)


async def test_a_usage_spike_appends_an_anomaly_event(pools: tuple[Database, Database]) -> None:
    app, indexer = pools
    spiky, steady = f"us-{uuid.uuid4().hex[:8]}", f"us-{uuid.uuid4().hex[:8]}"
    monitor = AnomalyMonitor("memory", outbox_sink(app, NOTIFY_CHANNEL, "memory"))
    window = UsageWindow(indexer)
    await use(app, spiky, 5_000)  # before the job's first read: the baseline, not a point
    assert await feed_usage(monitor, window, 0.0) == 0

    history = monitor.configs[Signal.USAGE].min_history
    for i in range(history + 10):  # warm-up, then normal points
        await use(app, spiky, 400 + 10 * (i % 5))
        await use(app, steady, 300 + 10 * (i % 3))
        await feed_usage(monitor, window, float(i + 1))
    assert await anomaly_events(app, spiky) == []

    await use(app, spiky, 40_000)  # one interval of a hundred times the tokens
    await use(app, steady, 310)
    await feed_usage(monitor, window, 1e6)

    events = await anomaly_events(app, spiky)
    assert [(e["signal"], e["metric"], e["kind"]) for e in events] == [
        (Signal.USAGE.value, EMBEDDING_TOKENS, Kind.SPIKE.value)
    ]
    assert events[0]["value"] == 40_000 and events[0]["at"] == 1e6
    assert await anomaly_events(app, steady) == []  # the other tenant's series is its own


async def test_a_tenant_that_stops_using_is_fed_zero(pools: tuple[Database, Database]) -> None:
    app, indexer = pools
    t = f"us-{uuid.uuid4().hex[:8]}"
    monitor = AnomalyMonitor("memory", outbox_sink(app, NOTIFY_CHANNEL, "memory"))
    window = UsageWindow(indexer)
    await feed_usage(monitor, window, 0.0)
    await use(app, t, 100)
    assert await feed_usage(monitor, window, 1.0) == 2  # tokens and calls
    assert monitor.series(Signal.USAGE) == {(t, EMBEDDING_TOKENS), (t, EMBEDDING_CALLS)}
    assert await feed_usage(monitor, window, 2.0) == 2  # silent: both series get a 0
