"""LoCoMo retrieval benchmark of the running service, with BM25 and dense baselines.

Ingests a LoCoMo file through Envoy with the batch API (starting a fresh local stack when
none answers on ``--endpoint``), asks every category 1-4 question scoped to its conversation,
and scores recall@1/5/10 and MRR@10 of the evidence dia_ids. In the same run it scores
BM25 (``bm25s``) and dense-only (same MiniLM model) over the same turns, so the ratios hold on
a noisy machine. Writes ``bench/results/locomo.json``.

    make bench-locomo DATA=path/to/locomo.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import locomo_eval as ev
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.type.v1 import layer_pb2
from aeterna_cli import client
from aeterna_cli.main import import_locomo_async
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack, health_check, state_dir

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


RANKERS = ("none", "hand-tuned", "lambdamart")
"""Second-stage rankers compared in one run (``AETERNA_MEMORY_RANKER``); ``none`` is the
fused first-stage order, i.e. today's ranking before the ranker existed."""


async def ingest(data: Path, endpoint: str, token: str, tenant: str) -> tuple[float, int]:
    """Import the file through Envoy; returns (memories/s, memories written)."""
    channel, stub = client.memory_stub(endpoint)
    async with channel:
        t0 = time.perf_counter()
        written = await import_locomo_async(stub, data, tenant, token, concurrency=4)
        return written / (time.perf_counter() - t0), written


CHUNKS = 4
"""Parts of the question list each ranker answers in turn (ABC CBA ABC CBA)."""

WARM_UP = 20
"""Unmeasured questions after each replica restart: with two replicas behind Envoy, each
answers about ten (connections, first calls of a fresh process) before the measurement."""


async def ask(
    endpoint: str, token: str, tenant: str, qs: list[ev.Question], *, warm_up: int = WARM_UP
) -> tuple[list[list[str]], list[float]]:
    """Every question once through Envoy, scoped to its conversation; returns the dia_id
    rankings and the per-query latencies in ms (the first ``warm_up`` questions are asked
    once more before, unmeasured)."""
    channel, stub = client.memory_stub(endpoint)
    md = client.metadata(token)
    rankings: list[list[str]] = []
    latencies: list[float] = []

    def request(q: ev.Question) -> svc.SearchMemoriesRequest:
        return svc.SearchMemoriesRequest(
            parent=f"tenants/{tenant}",
            query=q.question,
            scope=layer_pb2.Scope(user_id=q.sample_id),
            layers=[layer_pb2.MEMORY_LAYER_SESSION],
            top_k=10,
        )

    async with channel:
        # Warm-up outside the measurement (connections, a restarted replica's first calls).
        for q in qs[:warm_up]:
            await stub.SearchMemories(request(q), metadata=md)
        for q in qs:
            t = time.perf_counter()
            reply = await stub.SearchMemories(request(q), metadata=md)
            latencies.append((time.perf_counter() - t) * 1000)
            rankings.append([r.memory.metadata["dia_id"] for r in reply.results])
    return rankings, latencies


def event_date_share(samples: list[Any], ingest_per_s: float) -> dict[str, float]:
    """The write-time cost the ranking adds to ingest, measured in this run: resolving every
    turn's relative dates against its session time (what the write path does per memory,
    ``ranking.with_event_dates``), timed in process with cold caches, against the ingest
    time per memory just measured through Envoy. Everything else a write does is unchanged
    by the ranker, so this share is the ingest slow-down it causes (at most, since the
    service overlaps it with I/O)."""
    from aeterna_common.search import temporal
    from aeterna_memory.domain import ranking as rk

    turns = [t for s in samples for t in ev.conversation(s).turns]
    # Cold caches: the in-process study has resolved these very texts already.
    for memo in (temporal.resolve_relative, temporal.anchor_date, temporal.explicit_dates):
        memo.cache_clear()
    t0 = time.perf_counter()
    for t in turns:
        rk.event_date_metadata(t.content, {"session_time": t.session_time})
    per = (time.perf_counter() - t0) * 1000 / max(len(turns), 1)
    return {
        "ms_per_memory": round(per, 4),
        "ingest_ms_per_memory": round(1000 / ingest_per_s, 3),
        "share_of_ingest": round(per * ingest_per_s / 1000, 4),
    }


def latency(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 in ms."""
    return {
        "p50": round(statistics.median(values), 2),
        "p95": round(percentile(values, 95), 2),
        "p99": round(percentile(values, 99), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parent / "data" / "locomo-dev.json"
    )
    parser.add_argument("--endpoint", default=os.environ.get("AETERNA_ENDPOINT", "127.0.0.1:8080"))
    parser.add_argument("--out", type=Path, default=RESULTS / "locomo.json")
    args = parser.parse_args()

    samples = ev.load_locomo(args.data)
    stats = ev.EvidenceStats()
    qs = ev.questions(samples, stats)
    stack: DevStack | None = None
    endpoint = args.endpoint
    if health_check(endpoint):
        auth = DevAuth(state_dir() / "auth")
        print(f"using the running stack on {endpoint}")
    else:
        root = Path(tempfile.mkdtemp(prefix="aeterna-bench-"))
        os.chmod(root, 0o755)
        stack = DevStack(replicas=2, port=free_port(), root=root, fresh=True)
        print("starting a fresh local stack…")
        stack.start(log=lambda *_: None)
        endpoint = stack.endpoint
        auth = DevAuth(root / "auth")
    tenant = f"bench-{int(time.time())}"
    # The importer writes every conversation's user scope: a tenant admin may.
    token = auth.issue_token(tenant, "bench", roles=("TENANT_ADMIN",), ttl_s=7200)
    runs: dict[str, tuple[list[list[str]], list[float]]] = {}
    load_before = os.getloadavg()
    try:
        ingest_per_s, written = asyncio.run(ingest(args.data, endpoint, token, tenant))
        print(f"ingested {written} memories at {ingest_per_s:.0f}/s; asking {len(qs)} questions")
        if stack is None:
            # A running stack: its replicas' configured ranker only.
            name = os.environ.get("AETERNA_MEMORY_RANKER", "lambdamart")
            runs[name] = asyncio.run(ask(endpoint, token, tenant, qs))
        else:
            # Every question once before any measurement, unmeasured: query embeddings are
            # cached in Redis across restarts, so without this the first ranker to ask a
            # question paid its embedding (in the former ABCCBA over halves, ``none`` for the
            # first half and ``lambdamart`` for the second, never ``hand-tuned``).
            asyncio.run(ask(endpoint, token, tenant, qs, warm_up=0))
            # ABCCBAABCCBA over quarters of the questions: every ranker answers every quarter,
            # in an order that alternates, so a load that drifts during the run weighs on
            # every ranker alike (the latency comparison is a same-run one).
            bounds = [round(k * len(qs) / CHUNKS) for k in range(CHUNKS + 1)]
            parts: dict[str, list[tuple[list[list[str]], list[float]]]] = {}
            current = None
            for c in range(CHUNKS):
                part = qs[bounds[c] : bounds[c + 1]]
                for name in RANKERS if c % 2 == 0 else tuple(reversed(RANKERS)):
                    if name != current:
                        for i in range(stack.replicas):
                            stack.restart_replica(i, AETERNA_MEMORY_RANKER=name)
                        current = name
                    parts.setdefault(name, []).append(
                        asyncio.run(ask(endpoint, token, tenant, part))
                    )
            for name, chunks in parts.items():
                runs[name] = (
                    [r for rankings, _ in chunks for r in rankings],
                    [ms for _, lat in chunks for ms in lat],
                )
                print(f"  {name}: {latency(runs[name][1])}", flush=True)
    finally:
        load_after = os.getloadavg()
        if stack is not None:
            stack.stop()
    systems: dict[str, dict[str, float]] = {
        f"aeterna ({name})": ev.score(r, qs) for name, (r, _) in runs.items()
    }
    by_category = {
        f"aeterna ({name})": {c: m["recall@10"] for c, m in ev.per_category(r, qs).items()}
        for name, (r, _) in runs.items()
    }
    print("scoring baselines over the same turns…")
    systems["bm25"] = ev.score(ev.bm25_baseline(samples, qs), qs)
    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder
    from aeterna_memory.settings import MemorySettings

    # The dense baseline uses the service's own embedding configuration (int8 by default).
    settings = MemorySettings()
    embedder = MiniLMEmbedder(settings.model_dir, quantize=settings.embedding_int8)
    systems["dense"] = ev.score(ev.dense_baseline(samples, qs, embedder.embed_sync), qs)
    print("cross-validating both rankers in process (leave one conversation out)…")
    import locomo_rank

    cache = Path(tempfile.gettempdir()) / "aeterna-locomo-emb-int8.npz"
    embed = ev.EmbeddingCache(cache, embedder)
    study = locomo_rank.study(locomo_rank.candidate_sets(samples, qs, embed))
    embed.save()
    search_ms = {name: latency(lat) for name, (_, lat) in runs.items()}
    ingest_share = event_date_share(samples, ingest_per_s)
    base = search_ms.get("none")
    added = (
        {
            name: {q: round(v[q] - base[q], 2) for q in ("p50", "p95", "p99")}
            for name, v in search_ms.items()
            if name != "none"
        }
        if base
        else {}
    )
    result: dict[str, Any] = {
        "systems": {
            k: {m: v[m] for m in ("recall@1", "recall@5", "recall@10", "mrr@10")}
            for k, v in systems.items()
        },
        "recall@10_by_category": by_category,
        "in_process_study": study,
        "evidence": {
            "kept": stats.kept,
            "repaired": stats.repaired,
            "dropped": stats.dropped,
            "questions_without_evidence": stats.questions_without_evidence,
        },
        "ingest_per_s": round(ingest_per_s, 1),
        "ingest_event_dates": ingest_share,
        "search_ms": search_ms,
        "search_ms_added_vs_none": added,
        "loadavg": {
            "before": [round(v, 2) for v in load_before],
            "after_search": [round(v, 2) for v in load_after],
        },
        "n_questions": len(qs),
        "n_memories": written,
        "data": str(args.data),
    }
    print(f"\n{'system':<24}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MRR@10':>9}")
    for name, m in result["systems"].items():
        print(
            f"{name:<24}{m['recall@1']:>8.3f}{m['recall@5']:>8.3f}{m['recall@10']:>8.3f}"
            f"{m['mrr@10']:>9.3f}"
        )
    cats = {"1": "multi-hop", "2": "temporal", "3": "open-domain", "4": "single-hop"}
    print(f"\n{'R@10 by category':<24}" + "".join(f"{n:>13}" for n in cats.values()))
    for name, row in by_category.items():
        print(f"{name:<24}" + "".join(f"{row[c]:>13.3f}" for c in cats))
    print("\nin process, same first stage as the service:")
    locomo_rank.print_study(study)
    print(
        f"\nevidence ids: {stats.kept} kept, {stats.repaired} repaired, "
        f"{len(stats.dropped)} dropped {stats.dropped}"
    )
    print(
        f"\ningest {result['ingest_per_s']} memories/s; resolving event dates at write time "
        f"costs {ingest_share['ms_per_memory']} ms a memory in process, "
        f"{100 * ingest_share['share_of_ingest']:.1f} % of the measured ingest time"
    )
    print("search through Envoy (ms):")
    for name, v in search_ms.items():
        extra = added.get(name)
        more = (
            f"  ({extra['p50']:+} p50, {extra['p95']:+} p95, {extra['p99']:+} p99 vs none)"
            if extra
            else ""
        )
        print(f"  {name:<12} p50 {v['p50']}  p95 {v['p95']}  p99 {v['p99']}{more}")
    print(
        f"load average (1, 5, 15 min) before {result['loadavg']['before']}, after the searches "
        f"{result['loadavg']['after_search']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
