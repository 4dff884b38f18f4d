"""Scale benchmark: N synthetic memories in one tenant through Envoy (default 100k).

Starts a fresh local stack (two replicas, embedded index), ingests N short synthetic memories
with the batch API (users, sessions, tags), then measures SearchMemories latency through
Envoy: unfiltered (every layer of the tenant), filtered by user, and filtered by user plus
tags. The vector store alone is measured by ``bench/bench_vectors.py``. Writes
``bench/results/scale.json``.

    make bench-scale            # 100k
    python bench/scale.py --n 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_cli import client
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECTS = [
    "the deploy",
    "my sister",
    "the budget",
    "our API",
    "the garden",
    "the trip to Lisbon",
    "the quarterly review",
    "the database",
    "the puppy",
    "the marathon",
    "the kitchen",
    "the release",
    "the invoice",
    "the concert",
    "the onboarding",
    "the migration",
]
VERBS = [
    "needs",
    "moved to",
    "depends on",
    "was delayed by",
    "is blocked on",
    "improved after",
    "costs more than",
    "reminds me of",
    "starts with",
    "ended with",
]
OBJECTS = [
    "a new index",
    "Friday",
    "the red team",
    "two more weeks",
    "a cheaper plan",
    "the vet",
    "Postgres 15",
    "a long run",
    "fresh basil",
    "the contract",
    "an outage",
    "the keynote",
]
TAGS = ["work", "home", "health", "finance", "travel", "family", "tech", "hobby"]


def synthetic(i: int, users: int, rng: random.Random) -> res.Memory:
    user = f"user-{rng.randrange(users)}"
    m = res.Memory(
        layer=layer_pb2.MEMORY_LAYER_SESSION,
        scope=layer_pb2.Scope(user_id=user, session_id=f"s-{rng.randrange(20)}"),
        content=f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} (note {i})",
        tags=rng.sample(TAGS, 2),
    )
    return m


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q / 100 * len(ordered))))]


async def run(endpoint: str, token: str, tenant: str, n: int, users: int, queries: int) -> dict:
    rng = random.Random(7)
    channel, stub = client.memory_stub(endpoint)
    md = client.metadata(token)
    batch_size = 500
    sem = asyncio.Semaphore(4)

    async def send(start: int) -> None:
        reqs = [
            svc.CreateMemoryRequest(memory=synthetic(i, users, rng))
            for i in range(start, min(n, start + batch_size))
        ]
        async with sem:
            await stub.BatchCreateMemories(
                svc.BatchCreateMemoriesRequest(
                    parent=f"tenants/{tenant}", requests=reqs, request_id=f"scale-{start}"
                ),
                metadata=client.write_metadata(token, f"scale-{start}"),
                timeout=600,
            )

    t0 = time.perf_counter()
    done = 0
    starts = list(range(0, n, batch_size))
    for chunk in range(0, len(starts), 8):
        await asyncio.gather(*(send(s) for s in starts[chunk : chunk + 8]))
        done = min(n, (chunk + 8) * batch_size)
        print(f"  {done}/{n} ingested ({done / (time.perf_counter() - t0):.0f}/s)", flush=True)
    ingest_s = time.perf_counter() - t0

    async def measure(kind: str) -> dict[str, float]:
        lat = []
        for _q in range(queries):
            user = f"user-{rng.randrange(users)}"
            text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}"
            req = svc.SearchMemoriesRequest(parent=f"tenants/{tenant}", query=text, top_k=10)
            if kind == "unfiltered":
                req.layers.append(layer_pb2.MEMORY_LAYER_SESSION)
            else:
                req.scope.user_id = user
            if kind == "user+tags":
                req.tags.extend(rng.sample(TAGS, 1))
            t = time.perf_counter()
            await stub.SearchMemories(req, metadata=md, timeout=30)
            lat.append((time.perf_counter() - t) * 1000)
        return {
            "p50": round(statistics.median(lat), 2),
            "p95": round(pct(lat, 95), 2),
            "p99": round(pct(lat, 99), 2),
        }

    async with channel:
        await measure("by user")  # warm-up
        search = {k: await measure(k) for k in ("unfiltered", "by user", "user+tags")}
    return {"n": n, "users": users, "ingest_per_s": round(n / ingest_s, 1), "search_ms": search}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aeterna-scale-"))
    os.chmod(root, 0o755)
    stack = DevStack(replicas=2, port=free_port(), root=root, fresh=True)
    print("starting a fresh local stack…", flush=True)
    stack.start(log=lambda *_: None)
    try:
        token = DevAuth(root / "auth").issue_token("scale", "bench", ttl_s=7200)
        result = asyncio.run(run(stack.endpoint, token, "scale", args.n, args.users, args.queries))
    finally:
        stack.stop()
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
