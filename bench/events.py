"""Throughput and latency of the outbox relay to Redis Streams.

One throwaway PostgreSQL cluster (the memory schema, three roles) and one Redis server.

* Backlog drain: ``--backlog`` outbox rows over 100 tenants are loaded at once, then one
  relay publishes them all (pipelined XADDs of ``--batch`` rows, cursor fenced by the lease);
  reports rows per second for each batch size in ``--batches``.
* End to end: ``--events`` changes committed one per transaction (as memory commits them:
  advisory lock, outbox row, NOTIFY) at ``--rate`` per second while the relay and one
  consumer group run; reports the time from each COMMIT returning to the consumer's handler
  receiving the event (p50, p95, p99, max, in ms).
* Subscribers: two sync replicas (``python -m aeterna_sync``, as ``make run`` starts them)
  follow the same Redis; ``--subscribers`` concurrent ``Subscribe`` streams (half on each
  replica, room ``tenant``) receive ``--sub-events`` changes committed at ``--sub-rate`` per
  second through the relay; reports commit-to-client latency (p50, p99) over every
  (subscriber, event) and events lost, beside a bare Redis ``XREAD BLOCK`` consumer of the
  same stream measured in the same run (the baseline). ``--subscribers 0`` skips it.

Writes ``bench/results/events.json``.

    .venv/bin/python bench/events.py [--backlog 20000] [--events 1000] [--rate 200]
        [--subscribers 1000] [--sub-events 200] [--sub-rate 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import numpy as np
import redis.asyncio as aioredis
from aeterna_common.db import Database, apply_migrations, provision
from aeterna_common.events import Event, EventConsumer, OutboxRelay, stream_key
from aeterna_devstack.servers import PostgresServer, RedisServer, free_port
from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL, _append_outbox
from aeterna_memory.app import MIGRATIONS

RESULTS = Path(__file__).parent / "results" / "events.json"
TENANTS = [f"t-{i:03d}" for i in range(100)]


async def load_backlog(superuser: str, rows: int) -> None:
    """Replace the outbox with ``rows`` rows over 100 tenants (positions from the sequence)."""
    conn = await asyncpg.connect(superuser)
    try:
        await conn.execute("TRUNCATE outbox")
        await conn.execute(
            "INSERT INTO outbox (position, tenant_id, event_type, resource, memory_id, actor) "
            "SELECT nextval('outbox_position'), 't-' || lpad((n % 100)::text, 3, '0'), "
            "'memory.created', 'tenants/x/memories/' || n, gen_random_uuid(), 'users/bench' "
            "FROM generate_series(1, $1) AS n",
            rows,
        )
    finally:
        await conn.close()


async def drain(relay: OutboxRelay) -> tuple[int, float]:
    began = time.perf_counter()
    total = await relay.publish_once()
    return total, time.perf_counter() - began


async def main(args: argparse.Namespace) -> dict[str, object]:
    base = tempfile.mkdtemp(prefix="aeterna-bench-pg-")
    os.chmod(base, 0o755)
    pg = PostgresServer(os.path.join(base, "data")).start()
    rd = RedisServer().start()
    report: dict[str, object] = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        await provision(pg.dsn(), "bench", "aeterna_owner", "aeterna_app", "aeterna_indexer")
        await apply_migrations(
            pg.dsn("aeterna_owner", "bench"), MIGRATIONS, "aeterna_app", "aeterna_indexer"
        )
        db = Database(pg.dsn("aeterna_app", "bench"), max_size=4)
        indexer = Database(pg.dsn("aeterna_indexer", "bench"), max_size=2)
        await db.open()
        await indexer.open()
        redis = aioredis.Redis.from_url(rd.url, decode_responses=True)
        try:
            drains = {}
            for batch in args.batches:
                await load_backlog(pg.dsn("postgres", "bench"), args.backlog)
                # A relay of its own (cursor 0): it publishes the whole backlog.
                relay = OutboxRelay(
                    db, indexer, redis, service="memory", batch_size=batch, name=f"bench:{batch}",
                    lease_name=f"bench:{batch}",
                )  # fmt: skip
                await relay.register()
                assert await relay.keeper.try_acquire()
                total, seconds = await drain(relay)
                await relay.keeper.release()
                drains[f"batch_{batch}"] = {
                    "rows": total,
                    "seconds": round(seconds, 3),
                    "rows_per_s": round(total / seconds),
                }
            report["backlog_drain"] = drains
            await load_backlog(pg.dsn("postgres", "bench"), 0)
            report["end_to_end"] = await end_to_end(db, indexer, redis, pg, args)
            if args.subscribers:
                report["subscribers"] = await subscribers(db, indexer, redis, pg, rd, args)
        finally:
            await redis.aclose()
            await indexer.close()
            await db.close()
    finally:
        rd.stop()
        pg.stop()
    return report


async def end_to_end(
    db: Database,
    indexer: Database,
    redis: aioredis.Redis,
    pg: PostgresServer,
    args: argparse.Namespace,
) -> dict[str, object]:
    committed: dict[str, float] = {}
    received: dict[str, float] = {}
    done = asyncio.Event()
    tenant = "e2e"

    async def handle(event: Event) -> None:
        if event.tenant == tenant:
            received.setdefault(event.event_id, time.perf_counter())
            if len(received) >= args.events and set(committed) <= set(received):
                done.set()

    async def commit_one() -> None:
        # The commit time is taken when COMMIT returns, before the connection goes back to
        # the pool (a reset round trip during which the event may already arrive).
        async with db.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT aeterna_bind_tenant($1)", tenant)
            position = await _append_outbox(
                conn, tenant, "memory.created", [uuid.uuid4()], actor="users/bench"
            )
            await tx.commit()
            committed[f"memory:{position}"] = time.perf_counter()

    relay = OutboxRelay(
        db, indexer, redis, service="memory", listen_dsn=pg.dsn("aeterna_indexer", "bench"),
        notify_channel=NOTIFY_CHANNEL, name="bench:e2e", lease_name="bench:e2e",
    )  # fmt: skip
    consumer = EventConsumer(
        redis, f"bench-{uuid.uuid4().hex[:6]}", handle, start="$", refresh_s=0.2
    )
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(consumer.run())]
    try:
        # Until the relay holds its lease and the consumer's group exists on the stream.
        while not relay.leader or stream_key(tenant) not in consumer.streams:
            async with db.transaction(tenant) as conn:  # creates the stream and its group
                await _append_outbox(conn, tenant, "memory.created", [uuid.uuid4()], actor="x")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        received.clear()
        for _ in range(args.events):
            await commit_one()
            await asyncio.sleep(1 / args.rate)
        async with asyncio.timeout(60):
            await done.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ms = np.array([received[e] - t for e, t in committed.items()]) * 1000
    return {
        "events": len(ms),
        "rate_per_s": args.rate,
        "commit_to_handler_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p95": round(float(np.percentile(ms, 95)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
        },
    }


async def subscribers(
    db: Database,
    indexer: Database,
    redis: aioredis.Redis,
    pg: PostgresServer,
    rd: RedisServer,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Commit-to-client latency of ``args.subscribers`` Subscribe streams on two sync
    replicas, and of a bare ``XREAD`` consumer of the same stream (the baseline)."""
    import grpc
    from aeterna.sync.v1 import sync_service_pb2 as ssvc
    from aeterna.sync.v1 import sync_service_pb2_grpc as ssvc_grpc
    from aeterna_devstack.auth import DevAuth
    from aeterna_devstack.stack import DevStack

    tenant = "subs"
    await provision(pg.dsn(), "bench_sync", "aeterna_owner", "aeterna_app", "aeterna_indexer")
    root = Path(tempfile.mkdtemp(prefix="aeterna-bench-sync-"))
    os.chmod(root, 0o755)
    os.environ.update(
        {
            "AETERNA_DATABASE_URL": pg.dsn("aeterna_app", "bench"),
            "AETERNA_REDIS_URL": rd.url,
            "AETERNA_SYNC_DATABASE_URL": pg.dsn("aeterna_app", "bench_sync"),
            "AETERNA_SYNC_DATABASE_OWNER_URL": pg.dsn("aeterna_owner", "bench_sync"),
            "AETERNA_SYNC_DATABASE_INDEXER_URL": pg.dsn("aeterna_indexer", "bench_sync"),
        }
    )
    stack = DevStack(
        replicas=0, governance_replicas=0, sync_replicas=2, root=root, port=free_port()
    )
    await asyncio.to_thread(stack.start, lambda *_: None)
    token = DevAuth(root / "auth").issue_token(tenant, "bench", roles=("TENANT_ADMIN",))
    md = (("authorization", f"Bearer {token}"),)
    committed: dict[str, float] = {}
    bare: dict[str, float] = {}
    got: list[dict[str, float]] = [{} for _ in range(args.subscribers)]
    channels = [grpc.aio.insecure_channel(r.target) for r in stack.sync_list]
    live = 0
    all_live = asyncio.Event()

    async def follow(i: int) -> None:
        nonlocal live
        stub = ssvc_grpc.SyncServiceStub(channels[i % len(channels)])
        call = stub.Subscribe(
            ssvc.SubscribeRequest(parent=f"tenants/{tenant}", rooms=["tenant"]), metadata=md
        )
        mine = got[i]
        first = True
        async for message in call:
            if first:
                first = False
                live += 1
                if live == args.subscribers:
                    all_live.set()
            if message.HasField("event"):
                mine.setdefault(message.event.event_id, time.perf_counter())

    async def xread() -> None:
        last = "$"
        key = stream_key(tenant)
        while True:
            for _, entries in await redis.xread({key: last}, block=1000) or ():
                for entry_id, fields in entries:
                    bare.setdefault(fields["event_id"], time.perf_counter())
                    last = entry_id

    async def commit_one() -> None:
        async with db.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT aeterna_bind_tenant($1)", tenant)
            position = await _append_outbox(
                conn, tenant, "memory.created", [uuid.uuid4()], actor="users/bench"
            )
            await tx.commit()
            committed[f"memory:{position}"] = time.perf_counter()

    def delivered() -> bool:
        expected = set(committed)
        return expected <= set(bare) and all(expected <= set(g) for g in got)

    relay = OutboxRelay(
        db, indexer, redis, service="memory", listen_dsn=pg.dsn("aeterna_indexer", "bench"),
        notify_channel=NOTIFY_CHANNEL, name="bench:subs", lease_name="bench:subs",
    )  # fmt: skip
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(xread())]
    tasks += [asyncio.create_task(follow(i)) for i in range(args.subscribers)]
    try:
        async with asyncio.timeout(300):
            await all_live.wait()
            while not relay.leader:  # noqa: ASYNC110 (another task's state)
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        for _ in range(args.sub_events):
            await commit_one()
            await asyncio.sleep(1 / args.sub_rate)
        # Wait until every subscriber has every event (or 60 s: the rest count as lost).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                while not delivered():  # noqa: ASYNC110 (other tasks' state)
                    await asyncio.sleep(0.2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        await asyncio.to_thread(stack.stop)

    def summary(samples: list[float]) -> dict[str, float]:
        ms = np.array(samples) * 1000
        return {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
        }

    subs = [g[e] - t for g in got for e, t in committed.items() if e in g]
    lost = sum(1 for g in got for e in committed if e not in g)
    base = [bare[e] - t for e, t in committed.items() if e in bare]
    sub_ms, base_ms = summary(subs), summary(base)
    return {
        "subscribers": args.subscribers,
        "replicas": 2,
        "events": len(committed),
        "rate_per_s": args.sub_rate,
        "deliveries": len(subs),
        "lost": lost,
        "commit_to_subscriber_ms": sub_ms,
        "baseline_bare_xread_ms": base_ms,
        "p99_ratio_to_baseline": round(sub_ms["p99"] / max(base_ms["p99"], 1e-6), 2),
        "note": "subscribers, replicas, Redis, PostgreSQL and the relay share the 2 cores",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--sub-events", type=int, default=200)
    parser.add_argument("--sub-rate", type=float, default=10.0)
    report = asyncio.run(main(parser.parse_args()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
