"""What tracing costs a memory search: sampled and exported against not sampled, same run.

One memory replica as ``make run`` starts it (OTLP export to the stack's local receiver,
batches every 0.5 s), ``--memories`` memories of one user, then ``--queries`` searches sent
straight to the replica, alternating a sampled W3C ``traceparent`` (flag 01: the replica
records its server span, the embedding, index and re-read spans and every PostgreSQL and Redis
call, and exports them) and an unsampled one (flag 00, the baseline: the same code path with
non-recording spans). Reports p50/p95 of each, their difference and the spans recorded per
traced search.

Writes ``bench/results/tracing.json``. Figures depend on the machine's load: note it.

    .venv/bin/python bench/tracing.py [--memories 200] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.otlp import read_spans
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack

OUT = Path(__file__).parent / "results" / "tracing.json"
TOPICS = ["standup", "lunch", "deploy", "review", "oncall", "budget", "hiring", "offsite"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memories", type=int, default=200)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aeterna-bench-tracing-"))
    os.chmod(root, 0o755)
    stack = DevStack(
        replicas=1, governance_replicas=0, port=free_port(), root=root, fresh=True, traces=True
    )
    stack.start(log=lambda *_: None)
    try:
        token = DevAuth(root / "auth").issue_token("bench", "u1")
        md = (("authorization", f"Bearer {token}"),)
        target = stack.replica_list[0].target
        with grpc.insecure_channel(target) as channel:
            stub = svc_grpc.MemoryServiceStub(channel)
            for i in range(args.memories):
                topic = TOPICS[i % len(TOPICS)]
                stub.CreateMemory(
                    svc.CreateMemoryRequest(
                        parent="tenants/bench",
                        memory=res.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="u1"),
                            content=f"note {i}: the {topic} moved to slot {i % 13}",
                        ),
                    ),
                    metadata=md,
                    timeout=60,
                )
            latency: dict[str, list[float]] = {"sampled": [], "unsampled": []}
            traced: list[str] = []
            untraced: set[str] = set()
            for i in range(args.queries + 20):
                kind = "sampled" if i % 2 == 0 else "unsampled"
                trace_id = secrets.token_hex(16)
                flag = "01" if kind == "sampled" else "00"
                request = svc.SearchMemoriesRequest(
                    parent="tenants/bench", query=f"when is the {TOPICS[i % len(TOPICS)]}"
                )
                t0 = time.perf_counter()
                stub.SearchMemories(
                    request,
                    metadata=(*md, ("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-{flag}")),
                    timeout=60,
                )
                elapsed = (time.perf_counter() - t0) * 1000
                if kind == "unsampled":
                    untraced.add(trace_id)
                if i >= 20:  # warm-up excluded
                    latency[kind].append(elapsed)
                    if kind == "sampled":
                        traced.append(trace_id)
        time.sleep(2.0)  # the last batches leave every 0.5 s
        per_trace: dict[str, int] = dict.fromkeys(traced, 0)
        for span in read_spans(stack.trace_file):
            if span["trace_id"] in per_trace:
                per_trace[span["trace_id"]] += 1
        # Spans of unsampled requests must not be recorded (ParentBased sampling).
        unsampled_leaked = sum(1 for s in read_spans(stack.trace_file) if s["trace_id"] in untraced)
    finally:
        stack.stop()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
            "python": platform.python_version(),
        },
        "memories": args.memories,
        "queries_each": len(latency["sampled"]),
        "sampled_ms": {
            "p50": statistics.median(latency["sampled"]),
            "p95": pct(latency["sampled"], 0.95),
        },
        "unsampled_ms": {
            "p50": statistics.median(latency["unsampled"]),
            "p95": pct(latency["unsampled"], 0.95),
        },
        "spans_per_traced_search": statistics.median(per_trace.values()),
        "traced_searches_found": sum(1 for n in per_trace.values() if n),
        "unsampled_spans_exported": unsampled_leaked,
    }
    result["overhead_ms"] = {
        k: result["sampled_ms"][k] - result["unsampled_ms"][k] for k in ("p50", "p95")
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
