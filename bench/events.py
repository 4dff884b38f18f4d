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
  (subscriber, event), events lost and duplicated, beside a bare Redis ``XREAD BLOCK``
  consumer of the same stream in this process, measured in the same run (the baseline).
  The subscribers are separate clients: they are spread over ``--client-procs`` processes
  (default: cores + 1), each with its own event loop and one channel per replica, as 1,000
  agents would be; a single interpreter receiving 1,000 copies of every event would measure
  its own queue. Commit and receive times are both ``time.perf_counter()``
  (``CLOCK_MONOTONIC``, one clock for every process of the machine).
  ``--subscribers 0`` skips it.

Writes ``bench/results/events.json`` (or ``--out``).

    .venv/bin/python bench/events.py [--backlog 20000] [--events 1000] [--rate 200]
        [--subscribers 1000] [--sub-events 200] [--sub-rate 10] [--client-procs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
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
    report: dict[str, object] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
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
            report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
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


def client_process(
    targets: list[str], token: str, tenant: str, first: int, count: int, conn: Connection
) -> None:
    """One client process: ``count`` subscribers (numbers ``first``…), each its own
    ``Subscribe`` stream, alternating between the replicas ``targets``.

    Talks to the bench over ``conn``: sends ``("live", count)`` once every stream has its
    first message, receives the expected event ids, sends ``("done", count)`` once every
    subscriber has them (or after 60 s), and then, per subscriber, each
    event id with the ``perf_counter()`` seconds of its first reception and the number of
    receptions (duplicates are counted, not hidden).
    """
    asyncio.run(_client(targets, token, tenant, first, count, conn))


async def _client(
    targets: list[str], token: str, tenant: str, first: int, count: int, conn: Connection
) -> None:
    import grpc
    from aeterna.sync.v1 import sync_service_pb2 as ssvc
    from aeterna.sync.v1 import sync_service_pb2_grpc as ssvc_grpc

    md = (("authorization", f"Bearer {token}"),)
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    stubs = [ssvc_grpc.SyncServiceStub(ch) for ch in channels]
    got: list[dict[str, float]] = [{} for _ in range(count)]
    seen: list[dict[str, int]] = [{} for _ in range(count)]
    live = 0
    all_live = asyncio.Event()

    async def follow(i: int) -> None:
        nonlocal live
        call = stubs[(first + i) % len(stubs)].Subscribe(
            ssvc.SubscribeRequest(parent=f"tenants/{tenant}", rooms=["tenant"]), metadata=md
        )
        mine, times = got[i], seen[i]
        started = False
        async for message in call:
            if message.HasField("event"):
                now = time.perf_counter()
                event_id = message.event.event_id
                mine.setdefault(event_id, now)
                times[event_id] = times.get(event_id, 0) + 1
            if not started:
                started = True
                live += 1
                if live == count:
                    all_live.set()

    tasks = [asyncio.create_task(follow(i)) for i in range(count)]
    try:
        await all_live.wait()
        conn.send(("live", count))
        expected: set[str] = set(await asyncio.to_thread(conn.recv))
        # Until every subscriber has every event (or 60 s: the rest count as lost).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                while not all(expected <= g.keys() for g in got):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        conn.send(("done", count))
        # A little longer, so that a duplicate sent after the last first copy is seen.
        await asyncio.sleep(0.5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    conn.send([(g, s) for g, s in zip(got, seen, strict=True)])
    conn.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far, all its threads
    (``/proc/{pid}/stat`` fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def subscribers(
    db: Database,
    indexer: Database,
    redis: aioredis.Redis,
    pg: PostgresServer,
    rd: RedisServer,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Commit-to-client latency of ``args.subscribers`` Subscribe streams on two sync
    replicas, received in ``args.client_procs`` client processes, and of a bare ``XREAD``
    consumer of the same stream in this process (the baseline)."""
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
    targets = [r.target for r in stack.sync_list]
    committed: dict[str, float] = {}
    bare: dict[str, float] = {}
    bare_seen: dict[str, int] = {}

    async def xread() -> None:
        last = "$"
        key = stream_key(tenant)
        while True:
            for _, entries in await redis.xread({key: last}, block=1000) or ():
                for entry_id, fields in entries:
                    event_id = fields["event_id"]
                    bare.setdefault(event_id, time.perf_counter())
                    bare_seen[event_id] = bare_seen.get(event_id, 0) + 1
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

    procs_n = max(1, min(args.client_procs, args.subscribers))
    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    procs: list[mp.process.BaseProcess] = []
    share, extra = divmod(args.subscribers, procs_n)
    first = 0
    for p in range(procs_n):
        count = share + (1 if p < extra else 0)
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(
            target=client_process, args=(targets, token, tenant, first, count, theirs)
        )
        proc.start()
        theirs.close()
        pipes.append(mine)
        procs.append(proc)
        first += count

    relay = OutboxRelay(
        db, indexer, redis, service="memory", listen_dsn=pg.dsn("aeterna_indexer", "bench"),
        notify_channel=NOTIFY_CHANNEL, name="bench:subs", lease_name="bench:subs",
    )  # fmt: skip
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(xread())]
    results: list[tuple[dict[str, float], dict[str, int]]] = []
    try:
        async with asyncio.timeout(300):
            for pipe in pipes:
                kind, _ = await asyncio.to_thread(pipe.recv)
                assert kind == "live"
            while not relay.leader:  # noqa: ASYNC110 (another task's state)
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        replica_pids = [r.proc.pid for r in stack.sync_list if r.proc is not None]
        client_pids = [p.pid for p in procs if p.pid is not None]
        cpu_before = {pid: cpu_seconds(pid) for pid in replica_pids + client_pids}
        for _ in range(args.sub_events):
            await commit_one()
            await asyncio.sleep(1 / args.sub_rate)
        for pipe in pipes:
            pipe.send(list(committed))
        for pipe in pipes:
            kind, _ = await asyncio.to_thread(pipe.recv)
            assert kind == "done"
        # Every subscriber has every event, or its process gave up waiting.
        cpu = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in cpu_before}
        for pipe in pipes:
            results += await asyncio.to_thread(pipe.recv)
        # The baseline's last events (it is never behind the subscribers).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while not committed.keys() <= bare.keys():  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
        await asyncio.to_thread(stack.stop)

    def summary(samples: list[float]) -> dict[str, float]:
        ms = np.array(samples) * 1000
        return {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2),
        }

    subs = [g[e] - t for g, _ in results for e, t in committed.items() if e in g]
    lost = sum(1 for g, _ in results for e in committed if e not in g)
    duplicated = sum(n - 1 for _, s in results for e, n in s.items() if e in committed and n > 1)
    base = [bare[e] - t for e, t in committed.items() if e in bare]
    sub_ms, base_ms = summary(subs), summary(base)
    return {
        "subscribers": len(results),
        "replicas": 2,
        "client_processes": procs_n,
        "events": len(committed),
        "rate_per_s": args.sub_rate,
        "deliveries": len(subs),
        "lost": lost,
        "duplicated": duplicated,
        "commit_to_subscriber_ms": sub_ms,
        "baseline_bare_xread_ms": base_ms,
        "baseline_lost": sum(1 for e in committed if e not in bare),
        "baseline_duplicated": sum(n - 1 for n in bare_seen.values() if n > 1),
        "p99_ratio_to_baseline": round(sub_ms["p99"] / max(base_ms["p99"], 1e-6), 2),
        # CPU of the replicas and client processes while the events were committed and
        # delivered, per event (each replica sends it to half of the subscribers).
        "cpu_ms_per_event": {
            "replicas": [round(cpu[p] * 1000 / len(committed), 2) for p in replica_pids],
            "client_processes": round(sum(cpu[p] for p in client_pids) * 1000 / len(committed), 2),
        },
        "note": "client processes, replicas, Redis, PostgreSQL and the relay share the cores",
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
    parser.add_argument("--client-procs", type=int, default=(os.cpu_count() or 1) + 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parsed = parser.parse_args()
    report = asyncio.run(main(parsed))
    parsed.out.parent.mkdir(exist_ok=True)
    parsed.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
