"""Authorization cost: Cedar decisions in process, and what it adds to a memory search.

1. Decisions: an org of 1 company, 4 organisations, 16 teams and 64 projects, 400 role
   bindings and 100 delegations (entities built once per directory revision, as served).
   Times ``Authorizer.allowed`` (what every RPC's check runs) over a mix of own-memory,
   unit-read, unit-write, delegated-agent and refused decisions, and ``readable_scope``
   (what an open search adds), with p50/p99 in ms. Target: decision p99 ≤ 1 ms. Each
   decision is followed by a trivial awaited call timed in the same loop (the baseline: what
   the machine's scheduling alone costs), both also in thread CPU time, and the collector's
   pauses are counted; run once as Python leaves the collector and once after
   ``gc.freeze()``.
2. Search: one throwaway PostgreSQL and Redis, the memory service's domain built as served,
   ``--memories`` memories; the same queries searched by the same domain through the real
   authorizer (a caller with unit bindings, open scope: checks plus narrowing) and through
   an authorizer that allows everything (the unchecked path before enforcement),
   interleaved in the same run. Reports both latencies and the difference.

Writes ``bench/results/authz.json``. Figures depend on the machine's load: note it.

    .venv/bin/python bench/authz.py [--decisions 20000] [--memories 600] [--queries 300]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aeterna_common.authz import (
    Authorizer,
    Delegation,
    DirectoryCache,
    OrgUnit,
    ReadableScope,
    Resource,
    RoleBinding,
    Snapshot,
    StaticDirectory,
    UnitKind,
)
from aeterna_common.config import CommonSettings
from aeterna_common.context import Principal
from aeterna_common.db import SchemaSettings, provision
from aeterna_common.logging import configure_logging
from aeterna_devstack.servers import PostgresServer, RedisServer
from aeterna_devstack.stack import require_model
from aeterna_memory.app import build
from aeterna_memory.domain.model import Layer, NewMemory, Scope, SearchQuery
from aeterna_memory.settings import MemorySettings

RESULTS = Path(__file__).parent / "results" / "authz.json"
M = "aeterna.memory.v1.MemoryService/"
T = "bench"


def org(tenant: str) -> Snapshot:
    """1 company ⊃ 4 orgs ⊃ 16 teams ⊃ 64 projects; 400 bindings; 100 delegations."""
    units = [OrgUnit("co", UnitKind.COMPANY)]
    units += [OrgUnit(f"o{i}", UnitKind.ORGANIZATION, "co") for i in range(4)]
    units += [OrgUnit(f"t{i}", UnitKind.TEAM, f"o{i % 4}") for i in range(16)]
    units += [OrgUnit(f"p{i}", UnitKind.PROJECT, f"t{i % 16}") for i in range(64)]
    rng = random.Random(7)
    roles = ["VIEWER", "DEVELOPER", "TECH_LEAD", "ARCHITECT", "ADMIN"]
    bindings = [
        RoleBinding(f"users/u{i}", rng.choice(roles), rng.choice(units).id) for i in range(400)
    ]
    delegations = [
        Delegation(f"d{i}", f"u{i}", f"a{i}", frozenset({"memory:read", "memory:write"}))
        for i in range(100)
    ]
    return Snapshot(tenant, 1, tuple(units), tuple(bindings), tuple(delegations))


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of ``samples_ms``, in ms."""
    a = np.asarray(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p90_ms": round(float(np.percentile(a, 90)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
        "n": len(a),
    }


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    """Milliseconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    await fn()
    return (time.perf_counter() - t0) * 1000


async def trivial() -> bool:
    """The first baseline: an awaited Python call that does nothing."""
    return True


def spin(n: int) -> int:
    """Pure Python work of ``n`` steps: the second baseline, sized like a decision."""
    total = 0
    for i in range(n):
        total += i
    return total


def calibrate(target_ms: float) -> int:
    """Steps of :func:`spin` whose median CPU time is about ``target_ms``."""
    n = 1000
    while True:
        times = []
        for _ in range(51):
            c0 = time.thread_time()
            spin(n)
            times.append((time.thread_time() - c0) * 1000)
        median = float(np.median(times))
        if median > 0:
            return max(1, round(n * target_ms / median))
        n *= 10


class GcPauses:
    """Collections of the cyclic garbage collector and their pauses (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._t0) * 1000)

    def summary(self) -> dict[str, float]:
        """Count, total and longest pause in ms."""
        p = self.pauses_ms
        return {
            "collections": len(p),
            "total_ms": round(sum(p), 3),
            "max_ms": round(max(p, default=0.0), 3),
        }


async def interleaved(
    authz: Authorizer, cases: Sequence[tuple[Principal, str, Resource]], steps: int
) -> dict[str, Any]:
    """Each decision, then the trivial call, then ``spin(steps)`` (pure Python work as long
    as a median decision), timed in the same loop.

    Wall time (``perf_counter``) includes whatever the machine does meanwhile (other
    processes on the shared cores, the collector); thread CPU time (``thread_time``) only
    this thread's work. When the decision's wall p99 is far above its CPU p99, and the spin
    of the same length shows the same tail, the tail is time the thread was not running
    (scheduling), not Cedar's work. The trivial call is too short to be preempted often: it
    bounds the timer's own cost.
    """
    wall: list[float] = []
    cpu: list[float] = []
    base_wall: list[float] = []
    base_cpu: list[float] = []
    spin_wall: list[float] = []
    spin_cpu: list[float] = []
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    try:
        for c in cases:
            w0, c0 = time.perf_counter(), time.thread_time()
            await authz.allowed(*c)
            w1, c1 = time.perf_counter(), time.thread_time()
            await trivial()
            w2, c2 = time.perf_counter(), time.thread_time()
            spin(steps)
            w3, c3 = time.perf_counter(), time.thread_time()
            wall.append((w1 - w0) * 1000)
            cpu.append((c1 - c0) * 1000)
            base_wall.append((w2 - w1) * 1000)
            base_cpu.append((c2 - c1) * 1000)
            spin_wall.append((w3 - w2) * 1000)
            spin_cpu.append((c3 - c2) * 1000)
    finally:
        gc.callbacks.remove(gc_pauses)
    return {
        "decision": percentiles(wall),
        "decision_cpu": percentiles(cpu),
        "trivial_call": percentiles(base_wall),
        "trivial_call_cpu": percentiles(base_cpu),
        "spin_like_a_decision": percentiles(spin_wall),
        "spin_like_a_decision_cpu": percentiles(spin_cpu),
        "gc": gc_pauses.summary(),
    }


async def decisions(n: int) -> dict[str, Any]:
    """Decision latency over a mix of cases, entities warm (as in steady state)."""
    snap = org(T)
    authz = Authorizer(DirectoryCache(StaticDirectory({T: snap})))
    rng = random.Random(11)
    proj = [u for u in snap.units if u.kind is UnitKind.PROJECT]
    cases: list[tuple[Principal, str, Resource]] = []
    for _ in range(n):
        user = f"u{rng.randrange(400)}"
        kind = rng.randrange(5)
        if kind == 0:
            cases.append((Principal(T, user), M + "CreateMemory", Resource.user_space(T, user)))
        elif kind == 1:
            p = rng.choice(proj)
            cases.append((Principal(T, user), M + "GetMemory", Resource.unit(T, p.kind, p.id)))
        elif kind == 2:
            p = rng.choice(proj)
            cases.append((Principal(T, user), M + "CreateMemory", Resource.unit(T, p.kind, p.id)))
        elif kind == 3:
            i = rng.randrange(100)
            cases.append(
                (Principal(T, f"u{i}", f"a{i}"), M + "GetMemory", Resource.user_space(T, f"u{i}"))
            )
        else:
            cases.append((Principal(T, user), M + "GetMemory", Resource.user_space(T, "other")))
    # A principal's first decision per directory revision adds it to the tenant's parsed
    # entities (a copy of the graph): timed apart, then every later decision (steady state).
    first: list[float] = []
    seen: set[Principal] = set()
    for p, a, r in cases:
        if p not in seen:
            seen.add(p)
            first.append(await timed(lambda p=p, a=a, r=r: authz.allowed(p, a, r)))  # type: ignore[misc]
    # Steady state as served, the collector as Python leaves it; then after gc.freeze() (what
    # a long-lived server does once warm: the start-up objects leave the collected
    # generations, so collections stop re-scanning them).
    warm: list[float] = []
    for c in cases[:500]:
        c0 = time.thread_time()
        await authz.allowed(*c)
        warm.append((time.thread_time() - c0) * 1000)
    steps = calibrate(float(np.median(warm)))
    as_is = await interleaved(authz, cases, steps)
    gc.collect()
    gc.freeze()
    try:
        frozen = await interleaved(authz, cases, steps)
    finally:
        gc.unfreeze()
    allowed = sum([await authz.allowed(*c) for c in cases[:2000]])
    search = M + "SearchMemories"
    users = [Principal(T, f"u{u}") for u in range(400)]
    scope_cold = [await timed(lambda p=p: authz.readable_scope(p, search)) for p in users]  # type: ignore[misc]
    scope_warm = [await timed(lambda p=p: authz.readable_scope(p, search)) for p in users]  # type: ignore[misc]
    return {
        "decision": as_is["decision"],
        "steady_state": as_is,
        "steady_state_gc_frozen": frozen,
        "first_decision_of_a_principal": percentiles(first),
        "allowed_share": round(allowed / 2000, 3),
        "readable_scope_first": percentiles(scope_cold),
        "readable_scope": percentiles(scope_warm),
        "units": len(snap.units),
        "bindings": len(snap.bindings),
        "delegations": len(snap.delegations),
    }


class AllowAll(Authorizer):
    """The unchecked path: every decision allows, every read is unrestricted."""

    async def decide(
        self, principal: Principal, action: str, resources: Sequence[Resource]
    ) -> list[bool]:
        """Allow everything."""
        return [True] * len(resources)

    async def readable_scope(self, principal: Principal, action: str) -> ReadableScope:
        """Everything."""
        return ReadableScope(everything=True)


async def search(memories: int, queries: int) -> dict[str, Any]:
    """Authorised against unchecked searches, interleaved, over one domain."""
    base = Path(tempfile.mkdtemp(prefix="aeterna-bench-authz-"))
    os.chmod(base, 0o755)
    pg = PostgresServer(str(base / "pg")).start()
    redis = RedisServer().start()
    try:
        name = f"b_{uuid.uuid4().hex[:8]}"
        await provision(pg.dsn(), name, "aeterna_owner", "aeterna_app", "aeterna_indexer")
        common = CommonSettings(
            database_url=pg.dsn("aeterna_app", name),
            database_owner_url=pg.dsn("aeterna_owner", name),
            database_indexer_url=pg.dsn("aeterna_indexer", name),
            redis_url=redis.url,
        )
        directory = StaticDirectory({T: org(T)})
        app = await build(
            common,
            MemorySettings(
                index_dir=base / "index",
                model_dir=require_model(),
                expiry_interval_s=0,
                purge_interval_s=0,
                decay_interval_s=0,
                outbox_trim_interval_s=0,
                promotion_interval_s=0,
            ),
            SchemaSettings(migrate_on_start=True),
            directory=directory,
        )
        try:
            await app.prepare()
            follower = asyncio.create_task(app.follower.run())
            domain = app.domain
            writer = Principal(T, "ops", roles=frozenset({"TENANT_ADMIN"}))
            rng = random.Random(3)
            words = "deploy release cache index schema billing login search queue alert".split()
            batch: list[NewMemory] = []
            for i in range(memories):
                text = " ".join(rng.choices(words, k=6)) + f" note {i}"
                if i % 2:
                    scope, layer = Scope(project_id=f"p{i % 64}"), Layer.PROJECT
                else:
                    scope, layer = Scope(user_id=f"u{i % 400}"), Layer.USER
                batch.append(NewMemory(layer=layer, scope=scope, content=text))
            _, position = await domain.create_unchecked(
                writer, batch, method="BatchCreateMemories", request_id=""
            )
            await app.follower.wait_for(position, 120)
            # A caller bound somewhere in the tree: open searches are narrowed.
            caller = Principal(T, next(b.subject[6:] for b in org(T).bindings))
            checked, unchecked = domain.authz, AllowAll()
            layers = tuple(Layer)
            authorised: list[float] = []
            baseline: list[float] = []
            for i in range(queries):
                query = SearchQuery(
                    text=" ".join(rng.choices(words, k=2)),
                    scope=Scope(),
                    layers=layers,
                    tags=(),
                    metadata=(),
                    top_k=10,
                    min_score=0.0,
                )
                order = [(checked, authorised), (unchecked, baseline)]
                if i % 2:
                    order.reverse()
                for authz, out in order:
                    domain.authz = authz
                    out.append(await timed(lambda q=query: domain.search(caller, q)))  # type: ignore[misc]
            domain.authz = checked
            follower.cancel()
            a, b = percentiles(authorised[10:]), percentiles(baseline[10:])
            return {
                "memories": memories,
                "authorised": a,
                "unchecked": b,
                "added_p50_ms": round(a["p50_ms"] - b["p50_ms"], 3),
                "added_p99_ms": round(a["p99_ms"] - b["p99_ms"], 3),
            }
        finally:
            await app.close()
    finally:
        redis.stop()
        pg.stop()


def main() -> int:
    """Run both parts, print the figures, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=20000, help="decisions timed")
    parser.add_argument("--memories", type=int, default=600, help="memories in the tenant")
    parser.add_argument("--queries", type=int, default=300, help="searches per path")
    args = parser.parse_args()
    configure_logging("warning")
    dec = asyncio.run(decisions(args.decisions))
    for run in ("steady_state", "steady_state_gc_frozen"):
        for key, value in dec[run].items():
            print(f"{run:24}{key:26}{value}")
    for key in ("first_decision_of_a_principal", "readable_scope_first", "readable_scope"):
        print(f"{key:32} {dec[key]}")
    found = asyncio.run(search(args.memories, args.queries))
    print(f"search authorised {found['authorised']}")
    print(f"search unchecked  {found['unchecked']}")
    print(f"added p50 {found['added_p50_ms']} ms, p99 {found['added_p99_ms']} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "decisions": dec,
                "search": found,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
