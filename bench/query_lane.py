"""Search latency while a large batch embeds: the query lane against one shared queue.

For each mode, in the same run, a fresh local stack (one replica, so that the import and the
searches meet in one process; through Envoy) is started with
``AETERNA_MEMORY_EMBEDDING_QUERY_LANE`` set to ``false`` (baseline: query embeddings queue
behind document batches on one ONNX session, the code path before the lane) and to ``true``
(queries have their own session and thread). Each mode measures SearchMemories latency idle,
then while another tenant imports batches of 1,000 memories back to back. Every query and
every memory text is unique, so the embedding cache never answers. Writes
``bench/results/query_lane.json``.

    make bench-query-lane
    python bench/query_lane.py --queries 100 --seconds 60
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
from typing import Any

from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_cli import client
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack
from scale import OBJECTS, SUBJECTS, VERBS, pct

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 1000


def text(rng: random.Random, i: int) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} (note {i})"


def batch(tenant: str, rng: random.Random, start: int) -> svc.BatchCreateMemoriesRequest:
    return svc.BatchCreateMemoriesRequest(
        parent=f"tenants/{tenant}",
        request_id=f"import-{start}",
        requests=[
            svc.CreateMemoryRequest(
                memory=res.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id=f"user-{i % 50}"),
                    content=text(rng, i),
                )
            )
            for i in range(start, start + BATCH)
        ],
    )


def summary(lat: list[float]) -> dict[str, float]:
    return {
        "n": len(lat),
        "p50": round(statistics.median(lat), 1),
        "p95": round(pct(lat, 95), 1),
        "p99": round(pct(lat, 99), 1),
        "max": round(max(lat), 1),
    }


async def measure(stack: DevStack, root: Path, queries: int, seconds: float) -> dict[str, Any]:
    auth = DevAuth(root / "auth")
    reader, writer = "reader", "importer"
    md_r = client.metadata(auth.issue_token(reader, "bench", ttl_s=7200))
    md_w = client.metadata(auth.issue_token(writer, "bench", ttl_s=7200))
    rng = random.Random(11)
    channel, stub = client.memory_stub(stack.endpoint)
    async with channel:
        # The searched tenant: a few hundred memories.
        seed = batch(reader, rng, 0)
        del seed.requests[300:]
        await stub.BatchCreateMemories(seed, metadata=md_r, timeout=600)
        counter = 0

        async def search() -> float:
            nonlocal counter
            counter += 1
            req = svc.SearchMemoriesRequest(
                parent=f"tenants/{reader}",
                query=f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {counter}",
                scope=layer_pb2.Scope(user_id=f"user-{counter % 50}"),
                top_k=10,
            )
            t = time.perf_counter()
            await stub.SearchMemories(req, metadata=md_r, timeout=120)
            return (time.perf_counter() - t) * 1000

        for _ in range(10):  # warm-up
            await search()
        idle = [await search() for _ in range(queries)]

        imported = 0
        stop = asyncio.Event()

        async def importer() -> None:
            nonlocal imported
            start = 1_000_000
            while not stop.is_set():
                await stub.BatchCreateMemories(
                    batch(writer, rng, start), metadata=md_w, timeout=600
                )
                imported += BATCH
                start += BATCH

        task = asyncio.create_task(importer())
        await asyncio.sleep(1.0)  # the first batch is embedding
        busy: list[float] = []
        t0 = time.perf_counter()
        while len(busy) < queries and time.perf_counter() - t0 < seconds:
            busy.append(await search())
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
    return {
        "idle_ms": summary(idle),
        "during_import_ms": summary(busy),
        "imported_memories_per_s": round(imported / (elapsed + 1.0), 1),
    }


def run_mode(query_lane: bool, queries: int, seconds: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="aeterna-lane-"))
    os.chmod(root, 0o755)
    stack = DevStack(
        replicas=1,
        port=free_port(),
        root=root,
        fresh=True,
        env={
            "AETERNA_MEMORY_EMBEDDING_QUERY_LANE": "true" if query_lane else "false",
            # What is measured is the embedding lanes under back-to-back 1,000-memory
            # batches: no per-tenant admission limit in between.
            "AETERNA_MEMORY_BATCH_ITEMS_PER_S": "0",
        },
    )
    stack.start(log=lambda *_: None)
    try:
        return asyncio.run(measure(stack, root, queries, seconds))
    finally:
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100, help="searches per phase")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="longest search phase during the import"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "query_lane.json")
    args = parser.parse_args()
    result: dict[str, Any] = {"batch_size": BATCH}
    for name, lane in (("shared_queue_baseline", False), ("query_lane", True)):
        print(f"{name}: starting a fresh stack…", flush=True)
        result[name] = run_mode(lane, args.queries, args.seconds)
        print(json.dumps(result[name]), flush=True)
    base = result["shared_queue_baseline"]["during_import_ms"]["p95"]
    lane = result["query_lane"]["during_import_ms"]["p95"]
    result["p95_during_import_speedup"] = round(base / lane, 1)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
