"""Metrics (Prometheus) and traces (OpenTelemetry) for every service.

Metric names follow go-grpc-prometheus, the de facto standard for gRPC servers:
``grpc_server_handled_total`` and ``grpc_server_handling_seconds``; Aeterna's own are
``aeterna_*``. No metric has a tenant label (unbounded cardinality): per-tenant figures live
in the usage store, and traces carry the tenant as the span attribute ``aeterna.tenant``.

Traces: :func:`configure_tracing` installs the provider (OTLP/gRPC export to a configurable
endpoint), the gRPC server interceptor continues the caller's W3C trace, asyncpg and redis-py
are instrumented, calls to other services carry the trace (:func:`client_interceptors`),
events carry it in their envelope (``traceparent``), and logs carry ``trace_id`` and
``span_id`` (:func:`add_trace_context`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC on the server, in seconds.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTHZ_DECISIONS = Counter(
    "aeterna_authz_decisions_total",
    "Authorization decisions per resource, by decision (allow, deny) and by what decided it "
    "(token: the token alone; directory: the tenant's bindings were needed).",
    ["decision", "source"],
)
AUTHZ_CACHE_LOOKUPS = Counter(
    "aeterna_authz_cache_lookups_total",
    "Lookups of a tenant's cached authorization snapshot, by result (hit, miss, stale, "
    "error: the directory could not be reached).",
    ["result"],
)
JWKS_FETCH_FAILURES = Counter(
    "aeterna_auth_jwks_fetch_failures_total",
    "Failed reads of the JWKS that verifies bearer tokens (URL fetch or file read).",
)
JOB_RUNS = Counter(
    "aeterna_job_runs_total",
    "Runs of periodic background jobs, by task (the job's lease name) and result (success, "
    "failure); not ``job``, which Prometheus gives the scrape target.",
    ["task", "result"],
)
JOB_LAST_SUCCESS = Gauge(
    "aeterna_job_last_success_timestamp_seconds",
    "Unix time of the job's last successful run on this replica, by task.",
    ["task"],
)
INDEX_LAG_POSITIONS = Gauge(
    "aeterna_index_lag_positions",
    "Outbox positions committed but not yet applied to this replica's index.",
    ["index"],
)
INDEX_LAG_SECONDS = Gauge(
    "aeterna_index_lag_seconds",
    "Age in seconds of the oldest outbox change not yet applied to the index (0: caught up).",
    ["index"],
)


@contextlib.contextmanager
def job_run(job: str) -> Iterator[None]:
    """Count one run of a periodic job (``aeterna_job_runs_total``) and, when it succeeds,
    stamp ``aeterna_job_last_success_timestamp_seconds``.

    Args:
        job: Bounded job name, e.g. ``memory:purge`` (its lease name).

    Raises:
        Exception: Whatever the job raised, after counting it as a failure.
    """
    try:
        yield
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            JOB_RUNS.labels(job, "failure").inc()
        raise
    JOB_RUNS.labels(job, "success").inc()
    JOB_LAST_SUCCESS.labels(job).set(time.time())


class SizedPool(Protocol):
    """What :class:`PoolCollector` reads of a pool (``asyncpg.Pool`` has it)."""

    def get_size(self) -> int: ...  # noqa: D102
    def get_idle_size(self) -> int: ...  # noqa: D102
    def get_max_size(self) -> int: ...  # noqa: D102
    def is_closing(self) -> bool: ...  # noqa: D102


class PoolCollector(Collector):
    """Reports the connection pools registered with :func:`watch_pool` at scrape time:
    ``aeterna_db_pool_connections{role, state}`` (``in_use``, ``idle``) and
    ``aeterna_db_pool_max_connections{role}``; saturation is in_use / max. A closing pool is
    dropped (asyncpg pools cannot be weakly referenced)."""

    def __init__(self) -> None:
        self._pools: dict[int, tuple[SizedPool, str]] = {}
        self._lock = threading.Lock()

    def add(self, pool: SizedPool, role: str) -> None:
        """Report ``pool`` under the database role label ``role``."""
        with self._lock:
            self._pools[id(pool)] = (pool, role)

    def remove(self, pool: SizedPool) -> None:
        """Stop reporting ``pool``."""
        with self._lock:
            self._pools.pop(id(pool), None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The pools' gauges, summed per role."""
        conns = GaugeMetricFamily(
            "aeterna_db_pool_connections",
            "PostgreSQL pool connections by database role and state (in_use, idle).",
            labels=["role", "state"],
        )
        maximum = GaugeMetricFamily(
            "aeterna_db_pool_max_connections",
            "Largest size of the PostgreSQL pools, by database role.",
            labels=["role"],
        )
        totals: dict[str, list[int]] = {}
        with self._lock:
            for key, (pool, role) in list(self._pools.items()):
                if pool.is_closing():
                    del self._pools[key]
                    continue
                size, idle, top = pool.get_size(), pool.get_idle_size(), pool.get_max_size()
                t = totals.setdefault(role, [0, 0, 0])
                t[0] += size - idle
                t[1] += idle
                t[2] += top
        for role, (in_use, idle, top) in sorted(totals.items()):
            conns.add_metric([role, "in_use"], in_use)
            conns.add_metric([role, "idle"], idle)
            maximum.add_metric([role], top)
        yield conns
        yield maximum


POOLS = PoolCollector()
REGISTRY.register(POOLS)


def watch_pool(pool: SizedPool, role: str) -> None:
    """Report a PostgreSQL pool's saturation (see :class:`PoolCollector`).

    Args:
        pool: The pool.
        role: Its database role (``aeterna_app``, ``aeterna_indexer``): a bounded label.
    """
    POOLS.add(pool, role)


def unwatch_pool(pool: SizedPool) -> None:
    """Stop reporting a pool (it is being closed)."""
    POOLS.remove(pool)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> tuple[str, int] | None:
    """Serve Prometheus ``/metrics`` on ``host:port`` in a daemon thread.

    Args:
        port: TCP port; 0 disables the endpoint.
        host: Address to bind: loopback by default, so nothing outside the machine (or pod)
            reaches it unless the deployment says so (the Helm chart binds ``0.0.0.0``, as
            Prometheus scrapes the pod IP, and its NetworkPolicy limits who may).

    Returns:
        The bound ``(address, port)``, or ``None`` when disabled.

    Raises:
        OSError: The address cannot be bound.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    address, bound = server.server_address[:2]
    return str(address), int(bound)


TRACE_EXPORTERS = ("none", "console", "otlp")
"""Values of ``AETERNA_OTEL_EXPORTER``."""


class RequestRootSampler(Sampler):
    """Sample every span of a trace that a request or an event started, and no other.

    Root spans of kind ``SERVER`` (an RPC arriving) and ``CONSUMER`` (an event handled) start
    a sampled trace; a root span of any other kind (a background loop's own PostgreSQL or
    Redis call, polled every second) is dropped, so traces hold requests, not polling. Child
    spans follow their parent's decision (``ParentBased``).
    """

    _ROOTS = frozenset({SpanKind.SERVER, SpanKind.CONSUMER})
    # A PRODUCER root (an event published with no trace of its own) is dropped too.

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Record and sample root spans of kind SERVER or CONSUMER only."""
        decision = Decision.RECORD_AND_SAMPLE if kind in self._ROOTS else Decision.DROP
        sampled = decision is Decision.RECORD_AND_SAMPLE
        return SamplingResult(decision, attributes if sampled else None)

    def get_description(self) -> str:
        """The sampler's name, as OpenTelemetry reports it."""
        return "RequestRootSampler"


def configure_tracing(
    service_name: str,
    exporter: str,
    endpoint: str = "",
    *,
    instrument_clients: bool = True,
) -> TracerProvider:
    """Install an OpenTelemetry tracer provider and instrument asyncpg and redis.

    Args:
        service_name: ``service.name`` resource attribute, e.g. ``aeterna-memory``.
        exporter: ``none`` (spans are created for propagation, not exported), ``console`` or
            ``otlp`` (OTLP/gRPC).
        endpoint: OTLP/gRPC endpoint, e.g. ``http://otel-collector:4317`` (``http://``:
            plaintext); empty falls back to the standard ``OTEL_EXPORTER_OTLP_*`` variables.
        instrument_clients: Also instrument asyncpg and redis-py (idempotent), so every
            query and Redis command of a traced request is a child span.

    Returns:
        The installed provider (flush it with ``force_flush`` before exit).

    Raises:
        ValueError: ``exporter`` is not one of :data:`TRACE_EXPORTERS`.
    """
    if exporter not in TRACE_EXPORTERS:
        raise ValueError(f"unknown trace exporter {exporter!r}")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(root=RequestRootSampler()),
    )
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint or None, insecure=_plaintext(endpoint))
            )
        )
    trace.set_tracer_provider(provider)
    if instrument_clients:
        instrument_database_and_cache()
    return provider


def _plaintext(endpoint: str) -> bool | None:
    # None lets the exporter read OTEL_EXPORTER_OTLP_INSECURE when no endpoint is given.
    return endpoint.startswith("http://") if endpoint else None


def instrument_database_and_cache() -> None:
    """Instrument asyncpg and redis-py once per process (PyPI
    ``opentelemetry-instrumentation-asyncpg`` and ``-redis``): a span per query and command.
    Statements are recorded without their parameters (asyncpg's default)."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentors: list[Any] = [
        AsyncPGInstrumentor(),  # type: ignore[no-untyped-call]
        RedisInstrumentor(),
    ]
    for instrumentor in instrumentors:
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def add_trace_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: add ``trace_id`` and ``span_id`` (lower-case hex, as in W3C
    ``traceparent``) of the current span, when one is recording."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def tracer(name: str) -> trace.Tracer:
    """The tracer of an instrumentation scope (a module name, e.g. ``aeterna.memory``)."""
    return trace.get_tracer(name)


def traceparent_context(traceparent: str) -> Context:
    """The context a W3C ``traceparent`` header value continues (empty: a new trace)."""
    if not traceparent:
        return Context()
    return propagate.extract({"traceparent": traceparent})


def span_traceparent(span: trace.Span) -> str:
    """The W3C ``traceparent`` naming ``span`` (empty when it is not sampled)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def server_interceptors() -> Sequence[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry server interceptor: a span per RPC that continues the caller's W3C
    trace (``traceparent`` metadata). Health checks are left out: the edge sends one per
    replica every second, and they would bury the requests."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    interceptor: Any = aio_server_interceptor(  # type: ignore[no-untyped-call]
        filter_=filters.negate(filters.health_check())
    )
    return [interceptor]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """OpenTelemetry client interceptors: a CLIENT span per call that sends the trace
    context (``traceparent``) to the callee."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors: Any = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return list(interceptors)
