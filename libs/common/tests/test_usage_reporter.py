"""The usage reporter under concurrent recording: every unit is reported exactly once and no
report breaks ``reported <= quantity``.

Real PostgreSQL (the project's throwaway cluster) with the memory schema; writers record usage
in tenant transactions, as memory's write and search paths do, while reporter rounds run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
from aeterna_common.db import Database
from aeterna_common.usage import EMBEDDING_CALLS, EMBEDDING_TOKENS, UsageReporter, record_usage
from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL


async def test_every_unit_is_reported_once_while_writers_record(
    pools: tuple[Database, Database],
) -> None:
    """Six writers record 300 units while reporter rounds run back to back: no round fails
    (before the fix one did, on ``usage_hourly_check``), and the reported events add up to
    exactly what was recorded."""
    app, indexer = pools
    tenant = f"ur-{uuid.uuid4().hex[:8]}"
    reporter = UsageReporter(app, indexer, service="memory", channel=NOTIFY_CHANNEL)
    writers, per_writer = 6, 50
    done = asyncio.Event()

    async def record(conn: asyncpg.Connection) -> None:
        await record_usage(conn, tenant, {EMBEDDING_TOKENS: 7, EMBEDDING_CALLS: 1})

    async def writer() -> None:
        for _ in range(per_writer):
            await app.run(tenant, record)

    async def reporting() -> int:
        rounds = 0
        while not done.is_set():
            rounds += await reporter.report_once()
        return rounds

    rounds = asyncio.create_task(reporting())
    try:
        await asyncio.gather(*(writer() for _ in range(writers)))
    finally:
        done.set()
    assert await rounds > 1  # reports really ran between the writes
    await reporter.report_once()

    async def state(conn: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
        events = await conn.fetch(
            "SELECT payload FROM outbox WHERE tenant_id = $1 AND event_type = $2",
            tenant,
            "memory.usage.reported",
        )
        rows = await conn.fetch(
            "SELECT metric, quantity, reported FROM usage_hourly WHERE tenant_id = $1", tenant
        )
        return list(events), list(rows)

    events, rows = await app.run(tenant, state, readonly=True)
    reported: dict[str, int] = {}
    for e in events:
        for d in json.loads(e["payload"])["deltas"]:
            reported[d["metric"]] = reported.get(d["metric"], 0) + d["quantity"]
    units = writers * per_writer
    assert reported == {EMBEDDING_TOKENS: 7 * units, EMBEDDING_CALLS: units}
    assert all(r["reported"] == r["quantity"] for r in rows)
