"""Append rate of the audit log: one tenant (appends serialised by its lock) and several.

One throwaway PostgreSQL cluster with governance's schema. Each append is what the audit
consumer does per event: one transaction of the application role that binds the tenant,
takes the tenant's append lock, looks the event id up, reads the head and inserts the entry
with its SHA-256 over the RFC 8785 form. Runs ``--events`` appends to one tenant from one
task, then from ``--concurrency`` tasks (still one tenant, so they queue on its lock), then
to ``--concurrency`` tenants at once, and prints appends per second of each. Then the same
one-tenant, one-task run with the consumer's batched appends (``AuditLog.append_many``, one
transaction per ``--batch`` events: the audit consumer's read size), with the single appends
as its baseline, each with the client process's CPU time per event (``time.process_time``;
the server's is not counted). Writes ``bench/results/audit_append.json``.

    .venv/bin/python bench/audit_append.py [--events 2000] [--concurrency 8] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from aeterna_common.db import Database, apply_migrations, provision
from aeterna_devstack.servers import PostgresServer
from aeterna_governance.audit.chain import parse_envelope
from aeterna_governance.audit.log import AuditLog

MIGRATIONS = (
    Path(__file__).resolve().parents[1] / "services/governance/aeterna_governance/migrations"
)


def envelope(tenant: str, n: int) -> dict[str, str]:
    return {
        "event_id": f"memory:{n}",
        "service": "memory",
        "type": "memory.updated",
        "tenant": tenant,
        "resource": f"tenants/{tenant}/memories/{n:08d}",
        "actor": "users/alice",
        "time": "2026-11-30T16:00:00.000001Z",
        "payload": json.dumps({"fields": ["content", "tags"], "revision": n}),
    }


async def rate(audit: AuditLog, tenants: list[str], events: int, tasks: int) -> float:
    """Appends per second of ``events`` appends spread over ``tasks`` tasks and ``tenants``."""
    per_task = events // tasks

    async def run(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        for n in range(per_task):
            await audit.append(parse_envelope(envelope(tenant, i * per_task + n)))

    start = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(tasks)))
    return per_task * tasks / (time.perf_counter() - start)


async def batched(audit: AuditLog, tenant: str, events: int, batch: int) -> tuple[float, float]:
    """Appends per second and client CPU milliseconds per append of ``events`` appends to
    one tenant in batches of ``batch`` (one transaction each)."""
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, events, batch):
        last = min(events, first + batch)
        await audit.append_many([parse_envelope(envelope(tenant, n)) for n in range(first, last)])
    return events / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / events


async def single(audit: AuditLog, tenant: str, events: int) -> tuple[float, float]:
    """As :func:`batched`, one transaction per append (the baseline)."""
    cpu = time.process_time()
    per_s = await rate(audit, [tenant], events, 1)
    return per_s, (time.process_time() - cpu) * 1000 / events


async def main(args: argparse.Namespace) -> dict[str, object]:
    base = tempfile.mkdtemp(prefix="aeterna-bench-pg-")
    os.chmod(base, 0o755)
    server = PostgresServer(os.path.join(base, "data")).start()
    try:
        await provision(server.dsn(), "bench", "aeterna_owner", "aeterna_app", "aeterna_indexer")
        await apply_migrations(
            server.dsn("aeterna_owner", "bench"), MIGRATIONS, "aeterna_app", "aeterna_indexer"
        )
        db = Database(server.dsn("aeterna_app", "bench"), max_size=args.concurrency)
        await db.open()
        try:
            audit = AuditLog(db)
            c = args.concurrency
            await rate(audit, ["warm"], 200, 1)
            single_per_s, single_cpu_ms = await single(audit, "single", args.events)
            batch_per_s, batch_cpu_ms = await batched(audit, "batched", args.events, args.batch)
            return {
                "batch": args.batch,
                "one_tenant_single_per_s": round(single_per_s),
                "one_tenant_single_client_cpu_ms_per_event": round(single_cpu_ms, 3),
                "one_tenant_batched_per_s": round(batch_per_s),
                "one_tenant_batched_client_cpu_ms_per_event": round(batch_cpu_ms, 3),
                "batched_over_single_rate": round(batch_per_s / single_per_s, 2),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "events": args.events,
                "one_tenant_1_task_per_s": round(await rate(audit, ["a"], args.events, 1)),
                f"one_tenant_{c}_tasks_per_s": round(await rate(audit, ["b"], args.events, c)),
                f"{c}_tenants_{c}_tasks_per_s": round(
                    await rate(audit, [f"t{i}" for i in range(c)], args.events, c)
                ),
            }
        finally:
            await db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / "audit_append.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
