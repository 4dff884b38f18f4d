"""One trace per request across every hop, asserted from the exported spans.

A memory replica and a governance replica behind the gateway Envoy, as ``make run`` starts
them: Envoy's OpenTelemetry tracer and every replica export OTLP/gRPC to the stack's local
receiver, which appends each span to ``traces.jsonl``. A search by a user whose readable
scope needs the tenant's role bindings goes client → gateway → memory → (gateway →)
governance → governance's PostgreSQL, and memory re-reads its hits from its own PostgreSQL.
A memory write goes on through the outbox, the relay and Redis Streams to governance's audit
consumer in the same trace.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.otlp import read_spans
from aeterna_devstack.stack import DevStack, throwaway_stack

TENANT = "traced"
WAIT_S = 90.0
"""Longest wait for spans to reach the file (batches leave every 0.5 s; a loaded machine)."""

Span = dict[str, Any]


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack("aeterna-e2e-trace-", replicas=1, governance_replicas=1, traces=True) as s:
        yield s


def metadata(stack: DevStack, user: str, trace_id: str) -> tuple[tuple[str, str], ...]:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user)
    # A sampled W3C trace context from the client: the gateway continues it.
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    return (("authorization", f"Bearer {token}"), ("traceparent", traceparent))


async def wait_for_spans(
    stack: DevStack, trace_id: str, done: Callable[[list[Span]], bool]
) -> list[Span]:
    deadline = time.monotonic() + WAIT_S
    spans: list[Span] = []
    while time.monotonic() < deadline:
        spans = [s for s in read_spans(stack.trace_file) if s["trace_id"] == trace_id]
        if done(spans):
            return spans
        await asyncio.sleep(0.25)
    return spans


def services(spans: list[Span]) -> set[str]:
    return {s["service"] for s in spans}


def is_postgres(span: Span) -> bool:
    return span["attributes"].get("db.system") == "postgresql"


async def test_one_trace_from_the_gateway_through_two_services_to_postgresql(
    stack: DevStack,
) -> None:
    trace_id = secrets.token_hex(16)
    md = metadata(stack, "alice", trace_id)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        stub = svc_grpc.MemoryServiceStub(ch)
        await stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{TENANT}",
                memory=res.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="alice"),
                    content="the design review meets in room 4B",
                ),
            ),
            metadata=metadata(stack, "alice", secrets.token_hex(16)),
            timeout=60,
        )
        reply = await stub.SearchMemories(
            svc.SearchMemoriesRequest(parent=f"tenants/{TENANT}", query="where is the meeting"),
            metadata=md,
            timeout=60,
        )
    assert "room 4B" in reply.results[0].memory.content

    def complete(spans: list[Span]) -> bool:
        by = {(s["service"], s["kind"]) for s in spans}
        return (
            ("aeterna-gateway", "SERVER") in by
            and ("aeterna-memory", "SERVER") in by
            and ("aeterna-governance", "SERVER") in by
            and any(is_postgres(s) and s["service"] == "aeterna-governance" for s in spans)
            and any(s["name"] == "memory.search.reread" for s in spans)
        )

    spans = await wait_for_spans(stack, trace_id, complete)
    assert complete(spans), sorted((s["service"], s["kind"], s["name"]) for s in spans)
    ids = {s["span_id"] for s in spans}
    by_id = {s["span_id"]: s for s in spans}

    # Every span but the gateway's first has its parent in the trace: no hop broke it.
    roots = [s for s in spans if s["parent_span_id"] not in ids]
    assert [r["service"] for r in roots] == ["aeterna-gateway"], roots

    # Governance's server span descends from memory's (through memory's client span and the
    # gateway), and its PostgreSQL spans from it.
    def ancestors(span: Span) -> list[Span]:
        chain = []
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append(span)
        return chain

    gov_server = next(
        s for s in spans if s["service"] == "aeterna-governance" and s["kind"] == "SERVER"
    )
    assert any(
        a["service"] == "aeterna-memory" and a["kind"] == "CLIENT" for a in ancestors(gov_server)
    )
    gov_pg = [s for s in spans if is_postgres(s) and s["service"] == "aeterna-governance"]
    assert all(gov_server in ancestors(s) for s in gov_pg)

    # Memory's search: embedding, index search (per layer) and the PostgreSQL re-read are
    # separate spans; the tenant is an attribute, never part of a name.
    names = {s["name"] for s in spans if s["service"] == "aeterna-memory"}
    assert {"memory.search.embed", "memory.search.index"} <= names
    index_spans = [s for s in spans if s["name"] == "memory.search.index"]
    assert all(s["attributes"]["aeterna.tenant"] == TENANT for s in index_spans)
    assert {s["attributes"]["aeterna.layer"] for s in index_spans} >= {"USER"}
    assert all("aeterna.search.dense_candidates" in s["attributes"] for s in index_spans)
    assert all(TENANT not in s["name"] for s in spans)


async def test_a_write_is_traced_through_the_outbox_and_the_bus_to_the_consumer(
    stack: DevStack,
) -> None:
    trace_id = secrets.token_hex(16)
    md = metadata(stack, "bob", trace_id)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        await svc_grpc.MemoryServiceStub(ch).CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{TENANT}",
                memory=res.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="bob"),
                    content="the standup moved to 9:30",
                ),
            ),
            metadata=md,
            timeout=60,
        )

    def delivered(spans: list[Span]) -> bool:
        return any(s["kind"] == "CONSUMER" and s["service"] == "aeterna-governance" for s in spans)

    spans = await wait_for_spans(stack, trace_id, delivered)
    assert delivered(spans), sorted((s["service"], s["kind"], s["name"]) for s in spans)
    by_id = {s["span_id"]: s for s in spans}
    # Governance's audit (and any consumer of memory's events) handles the event as a child
    # of the relay's publish span, itself in the trace of the request that wrote it.
    consumers = [s for s in spans if s["kind"] == "CONSUMER"]
    for consumer in consumers:
        producer = by_id[consumer["parent_span_id"]]
        assert (producer["service"], producer["kind"]) == ("aeterna-memory", "PRODUCER")
        assert consumer["attributes"]["aeterna.tenant"] == TENANT
        assert consumer["attributes"]["aeterna.event.type"].startswith("memory.")
    assert {"aeterna-gateway", "aeterna-memory", "aeterna-governance"} <= services(spans)


async def test_logs_carry_the_trace_id(stack: DevStack) -> None:
    trace_id = secrets.token_hex(16)
    md = metadata(stack, "carol", trace_id)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            # Another user's memories: refused, and the refusal is logged.
            await svc_grpc.MemoryServiceStub(ch).ListMemories(
                svc.ListMemoriesRequest(
                    parent=f"tenants/{TENANT}", scope=layer_pb2.Scope(user_id="dave")
                ),
                metadata=md,
                timeout=60,
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    log = stack.replica_list[0].log_path
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if trace_id in log.read_text(errors="replace"):
            break
        await asyncio.sleep(0.2)
    lines = [line for line in log.read_text(errors="replace").splitlines() if trace_id in line]
    assert lines and all("span_id" in line for line in lines), lines
