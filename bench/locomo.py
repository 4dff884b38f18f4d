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


async def run_service(
    data: Path, endpoint: str, token: str, tenant: str, qs: list[ev.Question]
) -> tuple[list[list[str]], float, list[float], int]:
    channel, stub = client.memory_stub(endpoint)
    md = client.metadata(token)
    rankings: list[list[str]] = []
    latencies: list[float] = []
    async with channel:
        t0 = time.perf_counter()
        written = await import_locomo_async(stub, data, tenant, token, concurrency=4)
        ingest_s = time.perf_counter() - t0
        # Warm-up outside the measurement (connections, first query embedding).
        for q in qs[:5]:
            await stub.SearchMemories(
                svc.SearchMemoriesRequest(
                    parent=f"tenants/{tenant}",
                    query=q.question,
                    scope=layer_pb2.Scope(user_id=q.sample_id),
                    top_k=10,
                ),
                metadata=md,
            )
        for q in qs:
            t = time.perf_counter()
            reply = await stub.SearchMemories(
                svc.SearchMemoriesRequest(
                    parent=f"tenants/{tenant}",
                    query=q.question,
                    scope=layer_pb2.Scope(user_id=q.sample_id),
                    layers=[layer_pb2.MEMORY_LAYER_SESSION],
                    top_k=10,
                ),
                metadata=md,
            )
            latencies.append((time.perf_counter() - t) * 1000)
            rankings.append([r.memory.metadata["dia_id"] for r in reply.results])
    return rankings, written / ingest_s, latencies, written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parent / "data" / "locomo-dev.json"
    )
    parser.add_argument("--endpoint", default=os.environ.get("AETERNA_ENDPOINT", "127.0.0.1:8080"))
    parser.add_argument("--out", type=Path, default=RESULTS / "locomo.json")
    args = parser.parse_args()

    samples = ev.load_locomo(args.data)
    qs = ev.questions(samples)
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
    token = auth.issue_token(tenant, "bench", ttl_s=7200)
    try:
        rankings, ingest_per_s, latencies, written = asyncio.run(
            run_service(args.data, endpoint, token, tenant, qs)
        )
    finally:
        if stack is not None:
            stack.stop()
    print(f"ingested {written} memories at {ingest_per_s:.0f}/s; asked {len(qs)} questions")
    systems: dict[str, dict[str, float]] = {"aeterna": ev.score(rankings, qs)}
    print("scoring baselines over the same turns…")
    systems["bm25"] = ev.score(ev.bm25_baseline(samples, qs), qs)
    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder
    from aeterna_memory.settings import MemorySettings

    # The dense baseline uses the service's own embedding configuration (int8 by default).
    settings = MemorySettings()
    embedder = MiniLMEmbedder(settings.model_dir, quantize=settings.embedding_int8)
    systems["dense"] = ev.score(ev.dense_baseline(samples, qs, embedder.embed_sync), qs)
    search_ms = {
        "p50": round(statistics.median(latencies), 2),
        "p95": round(percentile(latencies, 95), 2),
        "p99": round(percentile(latencies, 99), 2),
    }
    result: dict[str, Any] = {
        "systems": {
            k: {m: v[m] for m in ("recall@1", "recall@5", "recall@10", "mrr@10")}
            for k, v in systems.items()
        },
        "ingest_per_s": round(ingest_per_s, 1),
        "search_ms": search_ms,
        "n_questions": len(qs),
        "n_memories": written,
        "data": str(args.data),
    }
    print(f"\n{'system':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MRR@10':>9}")
    for name, m in result["systems"].items():
        print(
            f"{name:<10}{m['recall@1']:>8.3f}{m['recall@5']:>8.3f}{m['recall@10']:>8.3f}{m['mrr@10']:>9.3f}"
        )
    print(
        f"\ningest {result['ingest_per_s']} memories/s; search through Envoy "
        f"p50 {search_ms['p50']} ms, p95 {search_ms['p95']} ms, p99 {search_ms['p99']} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
