"""Cost of the sealed tenant binding against the settable ``app.tenant_id`` it replaced.

One throwaway PostgreSQL cluster, the memory schema migrated with the three roles, and
``--rows`` memories over 100 tenants. Each measured unit is what a Get does: one
transaction of the application role that binds its tenant and reads one memory by primary
key. The baseline, in the same run and on the same data, is a copy of ``memories`` guarded by
the old policy (``tenant_id = current_setting('app.tenant_id', true)``) with the tenant set by
``set_config``. Reports per-transaction latency percentiles (ms) of both, sequentially on one
connection and with ``--concurrency`` connections at once, and writes
``bench/results/tenancy.json``.

    .venv/bin/python bench/tenancy.py [--rows 20000] [--transactions 3000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import numpy as np
from aeterna_common.db import apply_migrations, provision
from aeterna_devstack.servers import PostgresServer
from aeterna_memory.app import MIGRATIONS

RESULTS = Path(__file__).parent / "results" / "tenancy.json"
TENANTS = [f"t-{i:03d}" for i in range(100)]


async def seed(superuser: str, rows: int) -> list[tuple[str, uuid.UUID]]:
    conn = await asyncpg.connect(superuser)
    try:
        keys = [(TENANTS[i % len(TENANTS)], uuid.uuid4()) for i in range(rows)]
        await conn.copy_records_to_table(
            "memories",
            records=[
                (t, i, 2, "u", f"memory {n}", f"h{n}", "m", [0.0] * 4)
                for n, (t, i) in enumerate(keys)
            ],
            columns=[
                "tenant_id",
                "id",
                "layer",
                "user_id",
                "content",
                "content_hash",
                "embedding_model",
                "embedding",
            ],
        )
        await conn.execute(
            "CREATE TABLE baseline_memories (LIKE memories INCLUDING ALL);"
            "INSERT INTO baseline_memories SELECT * FROM memories;"
            "ALTER TABLE baseline_memories ENABLE ROW LEVEL SECURITY;"
            "ALTER TABLE baseline_memories FORCE ROW LEVEL SECURITY;"
            "CREATE POLICY old_style ON baseline_memories USING "
            "(tenant_id = current_setting('app.tenant_id', true));"
            "GRANT SELECT ON baseline_memories TO aeterna_app;"
            "ANALYZE memories; ANALYZE baseline_memories;"
        )
        return keys
    finally:
        await conn.close()


async def sealed(conn: asyncpg.Connection, tenant: str, mid: uuid.UUID) -> None:
    async with conn.transaction(readonly=True):
        await conn.execute("SELECT aeterna_bind_tenant($1)", tenant)
        got = await conn.fetchval("SELECT content FROM memories WHERE id = $1", mid)
    assert got is not None


async def settable(conn: asyncpg.Connection, tenant: str, mid: uuid.UUID) -> None:
    async with conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant)
        got = await conn.fetchval("SELECT content FROM baseline_memories WHERE id = $1", mid)
    assert got is not None


Unit = Callable[[asyncpg.Connection, str, uuid.UUID], Awaitable[None]]


async def measure(
    pool: asyncpg.Pool, unit: Unit, keys: list[tuple[str, uuid.UUID]], n: int, concurrency: int
) -> dict[str, float]:
    rng = np.random.default_rng(3)
    picks = [keys[int(i)] for i in rng.integers(0, len(keys), n)]
    latencies: list[float] = []
    queue = list(picks)

    async def worker() -> None:
        async with pool.acquire() as conn:
            while queue:
                tenant, mid = queue.pop()
                start = time.perf_counter()
                await unit(conn, tenant, mid)
                latencies.append((time.perf_counter() - start) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    arr = np.array(latencies)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p95_ms": round(float(np.percentile(arr, 95)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "tx_per_s": round(n / wall, 1),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    base = tempfile.mkdtemp(prefix="aeterna-bench-pg-")
    os.chmod(base, 0o755)
    server = PostgresServer(os.path.join(base, "data")).start()
    try:
        await provision(server.dsn(), "bench", "aeterna_owner", "aeterna_app", "aeterna_indexer")
        await apply_migrations(
            server.dsn("aeterna_owner", "bench"), MIGRATIONS, "aeterna_app", "aeterna_indexer"
        )
        keys = await seed(server.dsn("postgres", "bench"), args.rows)
        pool = await asyncpg.create_pool(
            server.dsn("aeterna_app", "bench"), min_size=args.concurrency, max_size=args.concurrency
        )
        results: dict[str, object] = {}
        try:
            for unit in (settable, sealed):
                await measure(pool, unit, keys, 300, 1)  # warm-up
            for conc in (1, args.concurrency):
                for name, unit in (("settable_baseline", settable), ("sealed", sealed)):
                    results[f"{name}_c{conc}"] = await measure(
                        pool, unit, keys, args.transactions, conc
                    )
        finally:
            await pool.close()
        return {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "rows": args.rows,
            "transactions": args.transactions,
            "results": results,
        }
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--transactions", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    report = asyncio.run(main(parser.parse_args()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
