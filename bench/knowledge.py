"""Knowledge search benchmark: ingest rate, SearchKnowledge latency and recall@3, with a
BM25-only baseline in the same run.

Starts a throwaway PostgreSQL cluster and one knowledge server in process (the real model,
the embedded index, its follower), then:

* ingests the test ADRs of ``bench/data/knowledge_adrs`` (12 decision records written for this
  benchmark) and ``--items`` synthetic Markdown items with sections (default 50,000) through
  ``CreateKnowledgeItem`` (``--concurrency`` calls in flight); the ingest rate counts until the
  index has applied the last write (chunked, embedded, stored with the rows, indexed), and the
  create rate until the last create returned;
* before that, measures the index follower's apply rate alone on ``--compare-items`` items
  created while it is held: applying one batch after the other with one embedding call per
  batch (the baseline), then pipelined (the next batch embedded while the previous one is
  written to the index) with each batch split across ``--sessions`` embedding sessions;
* at each of ``--checkpoints`` (synthetic item counts) and at the end, measures search latency
  p50/p95 over the queries of ``bench/data/knowledge_queries.json`` plus synthetic ones:
  through gRPC (hybrid, authorization included), and in process for the hybrid ranking and
  the BM25-only baseline (the same index, dense weight 0), on the exact scan, with recall@3
  of the answering ADR over the written queries (hybrid, BM25 only, dense only);
* at the first checkpoint past ``--hnsw-at`` items (else at the end), builds the HNSW graphs
  on a copy, swaps it in and reports recall@10 of the dense nearest chunks against the exact
  scan's, with latency and recall@3 on the graph; at the end the graphs are built again
  over every point and measured.

Writes ``bench/results/knowledge.json`` at each checkpoint (``"complete": false`` until the
end), so a run stopped early leaves the figures of the largest size it reached. On a shared
2-core machine the 50k ingest takes long (every item's sections are embedded); ``--items N``
runs a shorter configuration.

    make bench-knowledge
    python bench/knowledge.py --items 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.auth import TokenVerifier
from aeterna_common.authz import OrgUnit, Snapshot, StaticDirectory, UnitKind
from aeterna_common.config import CommonSettings
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, decode_token
from aeterna_common.db import SchemaSettings, provision
from aeterna_common.server import GrpcServer
from aeterna_common.vectors.port import IndexFilter
from aeterna_devstack.pytest_plugin import auth_settings, session_auth
from aeterna_devstack.servers import PostgresServer
from aeterna_devstack.stack import require_model
from aeterna_knowledge.app import build
from aeterna_knowledge.search import KnowledgeSearch, Query, SearchTuning
from aeterna_knowledge.settings import KnowledgeSettings

HERE = Path(__file__).resolve().parent
ADRS = HERE / "data" / "knowledge_adrs"
QUERIES = HERE / "data" / "knowledge_queries.json"
RESULTS = HERE / "results"
TENANT = "bench"
UNITS = (
    OrgUnit("acme", UnitKind.COMPANY),
    OrgUnit("eng", UnitKind.ORGANIZATION, "acme"),
    *(OrgUnit(f"team-{i}", UnitKind.TEAM, "eng") for i in range(8)),
)

SUBJECTS = [
    "the billing pipeline",
    "search indexing",
    "the mobile app",
    "payment retries",
    "the reporting warehouse",
    "customer onboarding",
    "the admin console",
    "order history",
    "inventory sync",
    "email delivery",
    "the pricing engine",
    "session storage",
    "audit exports",
    "image thumbnails",
    "the partner API",
    "invoice numbering",
]
CHOICES = [
    "a nightly batch job",
    "a message queue",
    "a read replica",
    "an in-memory cache",
    "a managed service",
    "a shared library",
    "a sidecar process",
    "a scheduled lambda",
    "a columnar store",
    "a circuit breaker",
    "an outbox table",
    "a blue-green rollout",
]
REASONS = [
    "latency grew with traffic",
    "on-call pages doubled",
    "costs rose every month",
    "two teams duplicated the work",
    "the vendor ended support",
    "audits found gaps",
    "releases were blocked for days",
    "data was lost during a failover",
]
EFFECTS = [
    "dashboards must be updated",
    "the runbook gets a new section",
    "older clients keep working",
    "the team owns one more component",
    "tests run against a real instance",
    "monitoring alerts are tuned",
    "documentation moves to the wiki",
    "budgets are reviewed",
]


def synthetic(i: int, rng: random.Random) -> tuple[str, str]:
    """A synthetic ADR (title, Markdown with context, decision, options, consequences)."""
    subject, choice = rng.choice(SUBJECTS), rng.choice(CHOICES)
    title = f"Use {choice} for {subject} ({i})"
    other = rng.sample(CHOICES, 2)
    content = (
        f"# {title}\n\n## Context\nFor {subject}, {rng.choice(REASONS)} and "
        f"{rng.choice(REASONS)}.\n\n## Decision\nWe adopt {choice} for {subject}.\n\n"
        f"## Options considered\n{other[0].capitalize()} and {other[1]} were rejected.\n\n"
        f"## Consequences\n{rng.choice(EFFECTS).capitalize()}; {rng.choice(EFFECTS)}.\n"
    )
    return title, content


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds."""
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49] * 1e3, 2), "p95_ms": round(q[94] * 1e3, 2), "n": len(samples)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    base = tempfile.mkdtemp(prefix="aeterna-bench-pg-")
    os.chmod(base, 0o755)
    pg = PostgresServer(os.path.join(base, "data")).start()
    try:
        return await _run(args, pg, load_start)
    finally:
        pg.stop()


async def _run(
    args: argparse.Namespace, pg: PostgresServer, load_start: tuple[float, ...]
) -> dict[str, Any]:
    await provision(pg.dsn(), "bench", "aeterna_owner", "aeterna_app", "aeterna_indexer")
    directory = StaticDirectory()
    directory.put(Snapshot(TENANT, 1, UNITS, ()))
    auth = session_auth()
    common = CommonSettings(
        database_url=pg.dsn("aeterna_app", "bench"),
        database_owner_url=pg.dsn("aeterna_owner", "bench"),
        database_indexer_url=pg.dsn("aeterna_indexer", "bench"),
        auth_trust_token_roles=True,
        db_pool_max=args.concurrency + 4,
        **auth_settings(auth),
    )
    settings = KnowledgeSettings(
        idempotency_gc_interval_s=0,
        events_relay=False,
        index_dir=Path(tempfile.mkdtemp(prefix="aeterna-bench-index-")),
        model_dir=require_model(),
        embedding_sessions=args.sessions,
        # The benchmark builds the HNSW graphs itself once ingested, and measures both.
        graph_build_min_points=0,
        reconcile_interval_s=0,
    )
    app = await build(common, settings, SchemaSettings(migrate_on_start=True), directory)
    server = GrpcServer(app, verifier=TokenVerifier.from_settings(common), listen="127.0.0.1:0")
    await server.start(wait_ready=True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = svc_grpc.KnowledgeServiceStub(channel)
    token = auth.issue_token(TENANT, "root", roles=["TENANT_ADMIN"])
    md = (("authorization", f"Bearer {token}"),)
    try:
        return await _measure(args, app, stub, md, load_start)
    finally:
        await channel.close()
        await server.stop()
        shutil.rmtree(settings.index_dir, ignore_errors=True)


async def _measure(
    args: argparse.Namespace,
    app: Any,
    stub: svc_grpc.KnowledgeServiceStub,
    md: tuple[tuple[str, str], ...],
    load_start: tuple[float, ...],
) -> dict[str, Any]:
    rng = random.Random(7)
    follower = app.deps.search.follower
    docs: list[tuple[str, str, str, str]] = []  # path, title, content, unit
    for path in sorted(ADRS.glob("*.md")):
        text = path.read_text()
        docs.append((f"adr/{path.stem}", text.splitlines()[0].lstrip("# "), text, "eng"))
    for i in range(args.items):
        title, content = synthetic(i, rng)
        docs.append((f"adr/synthetic-{i:06d}", title, content, f"team-{i % 8}"))

    # The follower's apply rate alone: items created while it is held (its apply lock
    # taken), then timed until searchable. First applying one batch after the other with
    # one embedding call per batch (the baseline), then pipelined with its batches split
    # across the embedding sessions; each on its own items, before the main ingest.
    comparison: dict[str, dict[str, float]] = {}
    parallel = follower.embed_parallel
    for name, pipelined, split in (("baseline", False, 1), ("batched", True, parallel)):
        follower.pipelined, follower.embed_parallel = pipelined, split
        extra = []
        for i in range(args.compare_items):
            title, content = synthetic(10**6 + len(comparison) * 10**5 + i, rng)
            extra.append((f"adr/compare-{name}-{i:05d}", title, content, f"team-{i % 8}"))
        async with follower._lock:
            last = await _create(stub, md, extra, args.concurrency)
        started = time.perf_counter()
        while not await follower.wait_for(last, 60.0):
            print(f"  index at {follower.applied} of {last}", flush=True)
        seconds = time.perf_counter() - started
        comparison[name] = {
            "applied_per_s": round(len(extra) / seconds, 1),
            "seconds": round(seconds, 1),
        }
        print(f"follower {name:<9} {len(extra)} items: {len(extra) / seconds:.1f} items/s")
    follower.pipelined, follower.embed_parallel = True, parallel
    written = json.loads(QUERIES.read_text())
    queries = [q["query"] for q in written] + [
        f"{rng.choice(CHOICES)} for {rng.choice(SUBJECTS)}" for _ in range(len(written))
    ]
    hybrid: KnowledgeSearch = app.deps.search

    def variant(dense: float, lexical: float) -> KnowledgeSearch:
        return KnowledgeSearch(
            hybrid.db,
            hybrid.index,
            hybrid.follower,
            hybrid.embedder,
            hybrid.encode_query,
            None,
            SearchTuning(
                candidates=hybrid.tuning.candidates, dense_weight=dense, lexical_weight=lexical
            ),
        )

    searches = {"hybrid": hybrid, "bm25_only": variant(0.0, 1.0), "dense_only": variant(1.0, 0.0)}
    result: dict[str, Any] = {
        "complete": False,
        "synthetic_items": args.items,
        "test_adrs": len(docs) - args.items,
        "concurrency": args.concurrency,
        "embedding_model": hybrid.embedder.model,
        "embedding_sessions": parallel,
        "ingest_comparison": {"items": args.compare_items, **comparison},
        "checkpoints": [],
        "recall_queries": len(written),
        "loadavg_start": load_start,
    }
    # The ingest in segments, each ending at a checkpoint where search is measured on the
    # exact scan; the results file is rewritten at each, so a run stopped early still
    # leaves the figures of the largest size it reached.
    marks = sorted({m + len(docs) - args.items for m in args.checkpoints if m < args.items})
    marks.append(len(docs))
    done, ingest_s, created_s = 0, 0.0, 0.0
    exact: dict[str, Any] = {}
    hnsw: dict[str, Any] | None = None
    for mark in marks:
        figures = await _ingest(stub, md, follower, docs[done:mark], args.concurrency)
        ingest_s += figures["seconds"]
        created_s += (mark - done) / figures["created_per_s"]
        done = mark
        exact = await _measure_search(args, stub, md, searches, queries, written)
        ingest = {
            "created_per_s": round(done / created_s, 1),
            "searchable_per_s": round(done / ingest_s, 1),
            "seconds": round(ingest_s, 1),
        }
        result["items"] = done
        result["ingest"] = ingest
        result["checkpoints"].append(
            {
                "items": done,
                "ingest": ingest,
                "search_latency_exact_scan": {
                    k: percentiles(v) for k, v in exact["latency"].items()
                },
                "recall_at_3_exact_scan": exact["recall"],
                "loadavg": os.getloadavg(),
            }
        )
        print(
            f"checkpoint {done} items: {ingest['searchable_per_s']:.1f} items/s until "
            f"searchable, hybrid p50 "
            f"{result['checkpoints'][-1]['search_latency_exact_scan']['hybrid']['p50_ms']} ms",
            flush=True,
        )
        if hnsw is None and done - (len(docs) - args.items) >= args.hnsw_at:
            hnsw = await _hnsw(args, stub, md, follower, hybrid, searches, queries, written)
            checkpoint = result["checkpoints"][-1]
            graph = hnsw.pop("search")
            checkpoint["hnsw"] = {**hnsw, "items": done}
            checkpoint["search_latency_hnsw"] = {
                k: percentiles(v) for k, v in graph["latency"].items()
            }
            checkpoint["recall_at_3_hnsw"] = graph["recall"]
            hnsw["items"] = done
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "knowledge.json").write_text(json.dumps(result, indent=2) + "\n")
    if hnsw is None:
        hnsw = await _hnsw(args, stub, md, follower, hybrid, searches, queries, written)
        graph = hnsw.pop("search")
    else:
        # Built at a checkpoint: the items ingested since are in segments without a graph;
        # build again so every point is in one, and measure (no exact reference now).
        started = time.perf_counter()
        await follower.build_graph(1)
        hnsw["final_build_s"] = round(time.perf_counter() - started, 1)
        graph = await _measure_search(args, stub, md, searches, queries, written)
    latency = graph["latency"]
    recall = graph["recall"]
    misses = graph["misses"]
    result.update(
        {
            "complete": True,
            "search_latency": {k: percentiles(v) for k, v in latency.items()},
            "search_latency_exact_scan": {k: percentiles(v) for k, v in exact["latency"].items()},
            "hnsw": hnsw,
            "recall_at_3": recall,
            "recall_at_3_exact_scan": exact["recall"],
            "misses": misses,
            "loadavg_end": os.getloadavg(),
        }
    )
    for key in ("search_latency_exact_scan", "search_latency"):
        for name, figures in result[key].items():
            print(
                f"{key:<26} {name:<12} p50 {figures['p50_ms']:7.2f} ms  "
                f"p95 {figures['p95_ms']:7.2f} ms"
            )
    for name, value in recall.items():
        print(f"recall@3 {name:<11} {value:.3f} ({len(written)} queries)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "knowledge.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


async def _create(
    stub: svc_grpc.KnowledgeServiceStub,
    md: tuple[tuple[str, str], ...],
    docs: list[tuple[str, str, str, str]],
    concurrency: int,
) -> int:
    """Create ``docs`` (``concurrency`` calls in flight); returns the highest consistency
    token position of the writes."""
    queue: asyncio.Queue[tuple[str, str, str, str]] = asyncio.Queue()
    for d in docs:
        queue.put_nowait(d)
    last = 0

    async def worker() -> None:
        nonlocal last
        while not queue.empty():
            path, title, content, unit = queue.get_nowait()
            layer = res.KNOWLEDGE_LAYER_ORG if unit == "eng" else res.KNOWLEDGE_LAYER_TEAM
            call = stub.CreateKnowledgeItem(
                svc.CreateKnowledgeItemRequest(
                    parent=f"tenants/{TENANT}",
                    knowledge_item=res.KnowledgeItem(
                        type=res.KNOWLEDGE_TYPE_ADR,
                        layer=layer,
                        org_unit=f"tenants/{TENANT}/orgUnits/{unit}",
                        path=path,
                        title=title,
                        content=content,
                    ),
                ),
                metadata=md,
            )
            await call
            for key, value in await call.initial_metadata() or ():
                if key == CONSISTENCY_TOKEN_KEY:
                    last = max(last, decode_token(str(value)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return last


async def _ingest(
    stub: svc_grpc.KnowledgeServiceStub,
    md: tuple[tuple[str, str], ...],
    follower: Any,
    docs: list[tuple[str, str, str, str]],
    concurrency: int,
) -> dict[str, float]:
    """Create ``docs`` (``concurrency`` calls in flight) and wait until the index has applied
    the last write; returns the create rate, the rate until searchable and the seconds."""
    started = time.perf_counter()
    last = await _create(stub, md, docs, concurrency)
    created_s = time.perf_counter() - started
    while not await follower.wait_for(last, 60.0):
        print(f"  index at {follower.applied} of {last}", flush=True)
    ingest_s = time.perf_counter() - started
    return {
        "created_per_s": round(len(docs) / created_s, 1),
        "searchable_per_s": round(len(docs) / ingest_s, 1),
        "seconds": round(ingest_s, 1),
    }


async def _measure_search(
    args: argparse.Namespace,
    stub: svc_grpc.KnowledgeServiceStub,
    md: tuple[tuple[str, str], ...],
    searches: dict[str, KnowledgeSearch],
    queries: list[str],
    written: list[dict[str, str]],
) -> dict[str, Any]:
    """Search latency (through gRPC and in process, hybrid and BM25 only) and recall@3 of
    the answering ADR for each ranking."""
    latency: dict[str, list[float]] = {"grpc_hybrid": [], "hybrid": [], "bm25_only": []}
    for _ in range(args.rounds):
        for text in queries:
            t = time.perf_counter()
            await stub.SearchKnowledge(
                svc.SearchKnowledgeRequest(parent=f"tenants/{TENANT}", query=text), metadata=md
            )
            latency["grpc_hybrid"].append(time.perf_counter() - t)
            for name in ("hybrid", "bm25_only"):
                t = time.perf_counter()
                await searches[name].search_units(TENANT, Query(text=text, limit=10), None)
                latency[name].append(time.perf_counter() - t)
    recall: dict[str, float] = {}
    misses: dict[str, list[str]] = {}
    for name, search in searches.items():
        hits = 0
        misses[name] = []
        for q in written:
            found = await search.search_units(TENANT, Query(text=q["query"], limit=3), None)
            top = [h.item.path for h in found.hits]
            if f"adr/{q['answer']}" in top:
                hits += 1
            else:
                misses[name].append(q["query"])
        recall[name] = round(hits / len(written), 3)
    return {"latency": latency, "recall": recall, "misses": misses}


async def _hnsw(
    args: argparse.Namespace,
    stub: svc_grpc.KnowledgeServiceStub,
    md: tuple[tuple[str, str], ...],
    follower: Any,
    hybrid: KnowledgeSearch,
    searches: dict[str, KnowledgeSearch],
    queries: list[str],
    written: list[dict[str, str]],
) -> dict[str, Any]:
    """Build the HNSW graphs on a copy and swap it in; recall@10 of the dense nearest chunks
    against the exact scan's (taken just before), and the searches measured on the graph
    (under ``search``)."""
    truth = await _dense_top(hybrid, queries, 10)
    started = time.perf_counter()
    built = await follower.build_graph(1)
    build_s = time.perf_counter() - started
    print(f"hnsw: built and swapped in: {built}, {build_s:.1f} s", flush=True)
    approx = await _dense_top(hybrid, queries, 10)
    recall_10 = statistics.fmean(
        len(set(approx[q]) & set(truth[q])) / max(1, len(truth[q])) for q in queries
    )
    print(f"recall@10 of the HNSW index against exact search: {recall_10:.3f}", flush=True)
    search = await _measure_search(args, stub, md, searches, queries, written)
    return {
        "built": built,
        "build_s": round(build_s, 1),
        "recall_at_10": round(recall_10, 3),
        "search": search,
    }


async def _dense_top(search: KnowledgeSearch, queries: list[str], k: int) -> dict[str, list[str]]:
    """The ``k`` nearest chunk point ids of each query's vector in the tenant's index."""
    out: dict[str, list[str]] = {}
    for text in queries:
        (vector,) = await search.embedder.embed_query([text])
        hits = await search.index.search_dense(vector, IndexFilter(tenant_id=TENANT), k)
        out[text] = [h.id for h in hits]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000, help="synthetic items")
    parser.add_argument("--concurrency", type=int, default=8, help="creates in flight")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the queries")
    parser.add_argument(
        "--compare-items", type=int, default=500, help="items per ingest comparison phase"
    )
    parser.add_argument(
        "--checkpoints",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[5_000, 10_000, 20_000, 30_000, 40_000],
        help="synthetic item counts (comma-separated) where search is measured during ingest",
    )
    parser.add_argument(
        "--hnsw-at",
        type=int,
        default=20_000,
        help="synthetic items after which the HNSW graphs are built (else at the end)",
    )
    parser.add_argument(
        "--sessions", type=int, default=2, help="embedding sessions (document embedding)"
    )
    asyncio.run(main(parser.parse_args()))
