"""Benchmark of the vector index adapters at 100k points (target: filtered search p95 <= 20 ms).

Data: clustered, L2-normalised 384-d vectors in one tenant, payload like a memory's (layer,
user_id of 1000 users, session_id, tags, created_at), sparse vectors of ~10 terms drawn from a
Zipf vocabulary. Measures the edge adapter's upsert rate and search latency percentiles before
and after ``optimize()``, recall@10 of dense search against exact numpy, and, with
``--compare-local N``, qdrant-client local mode on the first N points as the baseline.

    .venv/bin/python bench/bench_vectors.py [--points 100000] [--no-optimize] [--compare-local 5000]

With ``--copy-build`` the graphs are built the way the service builds them, without blocking
queries: :meth:`EdgeVectorIndex.build_copy` (a copy optimised in a child process) and
:meth:`EdgeVectorIndex.swap_in`, while a loop keeps querying the live shard; it reports the
query latency during the build, and latency and recall@10 against exact numpy search of the
swapped-in index (the exact-scan figures before the build are the baseline, same run).
Written to ``bench/results/hnsw_copy_build.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np
from aeterna_common.vectors import (
    EdgeTuning,
    EdgeVectorIndex,
    FieldMatch,
    IndexFilter,
    IndexPoint,
    QdrantVectorIndex,
    SparseVector,
    VectorIndex,
)

TENANT = "t-bench"
DEFAULT = EdgeTuning()
LAYERS = ["AGENT", "USER", "SESSION", "PROJECT", "TEAM", "ORG", "COMPANY"]
KEYWORDS = ["layer", "user_id", "session_id", "agent_id", "project_id", "tags"]
DIM = 384
N_USERS = 1000
N_TAGS = 50
VOCAB = 30_000
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "vectors.json")
COPY_RESULTS = os.path.join(os.path.dirname(RESULTS), "hnsw_copy_build.json")


class Data:
    def __init__(self, n: int, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(200, DIM)).astype(np.float32)
        which = rng.integers(0, len(centers), n)
        x = centers[which] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
        self.dense = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        self.ids = [str(uuid.UUID(int=int(v))) for v in rng.integers(0, 2**63, n)]
        self.user = rng.integers(0, N_USERS, n)
        self.layer = rng.integers(0, len(LAYERS), n)
        self.created = 1.7e9 + rng.uniform(0, 90 * 86400, n)
        # Tag popularity is skewed: a few tags are on many memories.
        tag_p = 1.0 / np.arange(1, N_TAGS + 1)
        tag_p /= tag_p.sum()
        self.tags = [
            sorted({f"tag{t}" for t in rng.choice(N_TAGS, rng.integers(1, 4), p=tag_p)})
            for _ in range(n)
        ]
        term_p = 1.0 / np.arange(1, VOCAB + 1) ** 1.07
        term_p /= term_p.sum()
        self.sparse: list[SparseVector] = []
        for _ in range(n):
            terms = np.unique(rng.choice(VOCAB, rng.integers(6, 15), p=term_p))
            weights = rng.uniform(0.4, 2.0, len(terms))
            self.sparse.append(SparseVector(terms.tolist(), weights.round(4).tolist()))
        self.term_p = term_p
        self.rng = rng

    def point(self, i: int) -> IndexPoint:
        layer = LAYERS[int(self.layer[i])]
        user = f"u{int(self.user[i])}"
        return IndexPoint(
            id=self.ids[i],
            dense=self.dense[i].tolist(),
            sparse=self.sparse[i],
            payload={
                "tenant_id": TENANT,
                "layer": layer,
                "user_id": user,
                "session_id": f"{user}-s{i % 5}",
                "agent_id": f"a{i % 20}",
                "project_id": f"p{i % 50}",
                "tags": self.tags[i],
                "created_at": float(self.created[i]),
                "metadata": {"speaker": "user" if i % 2 else "assistant"},
            },
        )

    def queries(self, k: int) -> np.ndarray:
        q = self.dense[self.rng.integers(0, len(self.dense), k)]
        q = q + 0.3 * self.rng.normal(size=q.shape).astype(np.float32)
        out: np.ndarray = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        return out

    def sparse_queries(self, k: int) -> list[SparseVector]:
        out = []
        for _ in range(k):
            terms = np.unique(self.rng.choice(VOCAB, 3, p=self.term_p))
            out.append(SparseVector(terms.tolist(), [1.0] * len(terms)))
        return out


def disk_mb(path: str) -> int:
    return round(
        sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20
    )


def pct(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


async def timed(calls: Sequence[Callable[..., Awaitable[Any]]]) -> tuple[list[float], list[Any]]:
    times, results = [], []
    for call in calls:
        t0 = time.perf_counter()
        results.append(await call())
        times.append(time.perf_counter() - t0)
    return times, results


def filters(data: Data, n: int, k: int) -> dict[str, list[tuple[IndexFilter, np.ndarray]]]:
    """Filter kinds with, for each query, the boolean mask of matching points (for exactness)."""
    rng = np.random.default_rng(11)
    tags = np.array([set(t) for t in data.tags[:n]], dtype=object)
    out: dict[str, list[tuple[IndexFilter, np.ndarray]]] = {
        "unfiltered": [(IndexFilter(TENANT), np.ones(n, bool)) for _ in range(k)],
        "user_id": [],
        "layer+tags": [],
    }
    for _ in range(k):
        u = int(rng.integers(0, N_USERS))
        out["user_id"].append(
            (IndexFilter(TENANT, must=[FieldMatch("user_id", value=f"u{u}")]), data.user[:n] == u)
        )
        layer = int(rng.integers(0, len(LAYERS)))
        tag_set = [f"tag{int(t)}" for t in rng.choice(10, 2, replace=False)]
        mask = (data.layer[:n] == layer) & np.array([bool(t & set(tag_set)) for t in tags])
        out["layer+tags"].append(
            (
                IndexFilter(
                    TENANT,
                    must=[
                        FieldMatch("layer", value=LAYERS[layer]),
                        FieldMatch("tags", any_of=tag_set),
                    ],
                ),
                mask,
            )
        )
    return out


async def measure_search(
    index: VectorIndex, data: Data, n: int, k: int, label: str
) -> dict[str, Any]:
    qs = data.queries(k)
    sq = data.sparse_queries(k)
    res: dict[str, Any] = {}
    for name, items in filters(data, n, k).items():
        calls = [
            partial(index.search_dense, q.tolist(), f, 10)
            for q, (f, _) in zip(qs, items, strict=True)
        ]
        await timed(calls[: min(10, k)])  # warm-up (page cache, thread pool)
        times, hits = await timed(calls)
        recalls = []
        for q, (_, mask), h in zip(qs, items, hits, strict=True):
            idx = np.nonzero(mask)[0]
            if len(idx) == 0:
                continue
            scores = data.dense[idx] @ q
            exact = {data.ids[i] for i in idx[np.argsort(-scores)[:10]]}
            got = {s.id for s in h}
            recalls.append(len(exact & got) / len(exact))
        res[f"dense_{name}"] = {**pct(times), "recall@10": round(float(np.mean(recalls)), 4)}
        print(f"  [{label}] dense {name:<11} {res[f'dense_{name}']}", flush=True)
    flt = IndexFilter(TENANT)
    calls = [partial(index.search_sparse, s, flt, 10) for s in sq]
    await timed(calls[: min(10, k)])
    times, _ = await timed(calls)
    res["sparse_unfiltered"] = pct(times)
    user_items = filters(data, n, k)["user_id"]
    calls = [
        partial(index.search_sparse, s, f, 10) for s, (f, _) in zip(sq, user_items, strict=True)
    ]
    times, _ = await timed(calls)
    res["sparse_user_id"] = pct(times)
    print(f"  [{label}] sparse           {res['sparse_unfiltered']}", flush=True)
    print(f"  [{label}] sparse user_id   {res['sparse_user_id']}", flush=True)
    return res


async def load(index: VectorIndex, data: Data, n: int, batch: int) -> float:
    await index.ensure_collection(DIM)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        await index.upsert([data.point(i) for i in range(start, min(n, start + batch))])
    return time.perf_counter() - t0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = Data(args.points)
    print(f"data: {args.points} points generated in {time.perf_counter() - t0:.1f} s", flush=True)
    tuning = EdgeTuning(
        hnsw_m=args.m,
        hnsw_ef_construct=args.ef_construct,
        hnsw_ef=args.hnsw_ef,
        full_scan_threshold_kb=args.full_scan_threshold_kb,
        indexing_threshold_kb=args.indexing_threshold_kb,
        field_hnsw=args.field_hnsw,
    )
    out: dict[str, Any] = {
        "points": args.points,
        "dimension": DIM,
        "queries_per_kind": args.queries,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "edge_tuning": asdict(tuning),
    }
    tmp = tempfile.mkdtemp(prefix="bench-edge-")
    try:
        edge = EdgeVectorIndex(os.path.join(tmp, "shard"), KEYWORDS, ["created_at"], tuning=tuning)
        secs = await load(edge, data, args.points, args.batch)
        info = await edge.info()
        out["edge_upsert"] = {"seconds": round(secs, 2), "points_per_s": round(args.points / secs)}
        out["edge_info_before_optimize"] = info
        print(f"edge upsert: {out['edge_upsert']} info={info}", flush=True)
        out["edge_before_optimize"] = await measure_search(
            edge, data, args.points, args.queries, "edge"
        )
        if args.copy_build:
            out["copy_build"] = await copy_build(edge, data)
            out["edge_info_after_swap"] = await edge.info()
            out["edge_after_swap"] = await measure_search(
                edge, data, args.points, args.queries, "edge+swap"
            )
        elif not args.no_optimize:
            t1 = time.perf_counter()
            await edge.optimize()
            out["edge_optimize_s"] = round(time.perf_counter() - t1, 1)
            out["edge_info_after_optimize"] = await edge.info()
            print(
                f"edge optimize: {out['edge_optimize_s']} s info={out['edge_info_after_optimize']}",
                flush=True,
            )
            out["edge_after_optimize"] = await measure_search(
                edge, data, args.points, args.queries, "edge+opt"
            )
        await edge.close()
        t1 = time.perf_counter()
        reopened = EdgeVectorIndex(
            os.path.join(tmp, "shard"), KEYWORDS, ["created_at"], tuning=tuning
        )
        await reopened.ensure_collection(DIM)
        out["edge_reopen_s"] = round(time.perf_counter() - t1, 2)
        await reopened.close()
        out["edge_disk_mb"] = await asyncio.to_thread(disk_mb, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.compare_local:
        from qdrant_client import AsyncQdrantClient

        n = min(args.compare_local, args.points)
        local = QdrantVectorIndex(
            AsyncQdrantClient(location=":memory:"), "bench", KEYWORDS, ["created_at"]
        )
        secs = await load(local, data, n, args.batch)
        out["local_points"] = n
        out["local_upsert"] = {"seconds": round(secs, 2), "points_per_s": round(n / secs)}
        print(f"local mode upsert ({n}): {out['local_upsert']}", flush=True)
        out["local"] = await measure_search(local, data, n, min(args.queries, 50), "local")
        await local.close()
    return out


async def copy_build(edge: EdgeVectorIndex, data: Data) -> dict[str, Any]:
    """Build the graphs on a copy and swap it in while a loop queries the live shard."""
    queries = data.queries(50)
    flt = IndexFilter(TENANT)
    done = asyncio.Event()
    during: list[float] = []

    async def query_loop() -> None:
        i = 0
        while not done.is_set():
            t0 = time.perf_counter()
            await edge.search_dense(queries[i % len(queries)].tolist(), flt, 10)
            during.append(time.perf_counter() - t0)
            i += 1
            await asyncio.sleep(0.01)

    loop = asyncio.create_task(query_loop())
    t0 = time.perf_counter()
    copy = await edge.build_copy()
    built = time.perf_counter() - t0
    t1 = time.perf_counter()
    await edge.swap_in(copy)
    swapped = time.perf_counter() - t1
    done.set()
    await loop
    result = {
        "build_s": round(built, 1),
        "swap_s": round(swapped, 3),
        "queries_during_build": len(during),
        "dense_unfiltered_during_build": {
            **pct(during),
            "max_ms": round(max(during) * 1000, 1) if during else None,
        },
    }
    print(f"copy build: {result}", flush=True)
    return result


def table(out: dict[str, Any]) -> str:
    names = ("edge_before_optimize", "edge_after_optimize", "edge_after_swap", "local")
    cols = [k for k in names if k in out]
    rows = sorted({r for c in cols for r in out[c]}, key=lambda r: (not r.startswith("dense"), r))
    head = f"{'query (p50/p95/p99 ms, recall)':<34}" + "".join(f"{c:>30}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c in cols:
            v = out[c].get(r)
            if v is None:
                cells.append(f"{'-':>30}")
                continue
            s = f"{v['p50_ms']:.2f}/{v['p95_ms']:.2f}/{v['p99_ms']:.2f}"
            if "recall@10" in v:
                s += f" r={v['recall@10']:.3f}"
            cells.append(f"{s:>30}")
        lines.append(f"{r:<34}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--points", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--no-optimize", action="store_true")
    p.add_argument("--compare-local", type=int, default=0, metavar="N")
    p.add_argument("--m", type=int, default=DEFAULT.hnsw_m)
    p.add_argument("--ef-construct", type=int, default=DEFAULT.hnsw_ef_construct)
    p.add_argument("--hnsw-ef", type=int, default=DEFAULT.hnsw_ef)
    p.add_argument("--full-scan-threshold-kb", type=int, default=DEFAULT.full_scan_threshold_kb)
    p.add_argument("--indexing-threshold-kb", type=int, default=DEFAULT.indexing_threshold_kb)
    p.add_argument("--field-hnsw", action="store_true")
    p.add_argument("--copy-build", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.out = args.out or (COPY_RESULTS if args.copy_build else RESULTS)
    out = asyncio.run(run(args))
    print()
    print(table(out))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
