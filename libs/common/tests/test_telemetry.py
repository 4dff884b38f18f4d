"""Telemetry: the metrics endpoint (where it binds by default and how to open it), the
sampler, trace context in events and logs, OTLP export to the local JSON-lines receiver, and
the job and pool metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aeterna_common.config import CommonSettings
from aeterna_common.telemetry import (
    RequestRootSampler,
    add_trace_context,
    job_run,
    span_traceparent,
    start_metrics_server,
    traceparent_context,
    watch_pool,
)
from aeterna_devstack.otlp import OtlpFileReceiver, read_spans
from aeterna_devstack.servers import PostgresServer, free_port
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY


def test_metrics_bind_loopback_by_default() -> None:
    settings = CommonSettings(metrics_port=free_port())
    assert settings.metrics_host == "127.0.0.1"
    bound = start_metrics_server(settings.metrics_port, settings.metrics_host)
    assert bound == ("127.0.0.1", settings.metrics_port)
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics") as r:
        assert b"grpc_server_handled_total" in r.read()


def test_metrics_host_setting_opens_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AETERNA_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("AETERNA_METRICS_PORT", str(port))
    settings = CommonSettings()
    assert start_metrics_server(settings.metrics_port, settings.metrics_host) == ("0.0.0.0", port)


def test_metrics_disabled_with_port_zero() -> None:
    assert start_metrics_server(0) is None


# ---- traces --------------------------------------------------------------------------------


def _provider() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(root=RequestRootSampler()))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_requests_and_events_start_traces_and_background_calls_do_not() -> None:
    provider, exporter = _provider()
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("poll", kind=SpanKind.CLIENT):
        pass  # a follower's query outside any request
    with tracer.start_as_current_span("rpc", kind=SpanKind.SERVER):
        with tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT):
            pass
    with tracer.start_as_current_span("handle", kind=SpanKind.CONSUMER):
        pass
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["SELECT", "handle", "rpc"]


def test_a_traceparent_is_continued_and_logs_carry_the_ids() -> None:
    provider, exporter = _provider()
    tracer = provider.get_tracer("t")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span(
        "consume", context=traceparent_context(parent), kind=SpanKind.CONSUMER
    ) as span:
        fields = add_trace_context(None, "info", {})
        assert span_traceparent(span).startswith("00-0af7651916cd43dd8448eb211c80319c-")
    (done,) = exporter.get_finished_spans()
    assert fields["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert fields["span_id"] == format(done.context.span_id, "016x")
    assert done.parent is not None and done.parent.span_id == 0xB7AD6B7169203331
    assert add_trace_context(None, "info", {}) == {}  # no span, no ids
    assert traceparent_context("") == Context()


def test_spans_reach_the_json_lines_file_over_otlp(tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    path = tmp_path / "traces.jsonl"
    with OtlpFileReceiver(path) as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "aeterna-test"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
        )
        with provider.get_tracer("t").start_as_current_span(
            "memory.search.index", kind=SpanKind.INTERNAL, attributes={"aeterna.tenant": "t1"}
        ):
            pass
        provider.shutdown()
    (span,) = read_spans(path)
    assert span["service"] == "aeterna-test"
    assert span["name"] == "memory.search.index"
    assert span["kind"] == "INTERNAL"
    assert span["attributes"] == {"aeterna.tenant": "t1"}
    assert len(span["trace_id"]) == 32 and span["parent_span_id"] == ""


# ---- metrics -------------------------------------------------------------------------------


def test_job_runs_count_successes_and_failures() -> None:
    def runs(result: str) -> float:
        return (
            REGISTRY.get_sample_value(
                "aeterna_job_runs_total", {"task": "test:job", "result": result}
            )
            or 0.0
        )

    before = runs("success"), runs("failure")
    with job_run("test:job"):
        pass
    with pytest.raises(RuntimeError), job_run("test:job"):
        raise RuntimeError("boom")
    assert (runs("success"), runs("failure")) == (before[0] + 1, before[1] + 1)
    assert REGISTRY.get_sample_value(
        "aeterna_job_last_success_timestamp_seconds", {"task": "test:job"}
    )


async def test_pool_saturation_is_reported_per_role(pg_server: PostgresServer) -> None:
    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"role": "telemetry_probe", **labels})

    pool = await asyncpg.create_pool(pg_server.dsn(), min_size=1, max_size=3)
    try:
        watch_pool(pool, "telemetry_probe")
        async with pool.acquire():
            assert gauge("aeterna_db_pool_connections", state="in_use") == 1
            assert gauge("aeterna_db_pool_max_connections") == 3
        assert gauge("aeterna_db_pool_connections", state="in_use") == 0
    finally:
        await pool.close()
    assert gauge("aeterna_db_pool_max_connections") is None  # a closed pool is dropped
