"""Metrics (Prometheus) and traces (OpenTelemetry) for every service.

Metric names follow go-grpc-prometheus, the de facto standard for gRPC servers:
``grpc_server_handled_total`` and ``grpc_server_handling_seconds``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from prometheus_client import Counter, Histogram, start_http_server

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


def configure_tracing(service_name: str, exporter: str) -> None:
    """Install an OpenTelemetry tracer provider.

    Args:
        service_name: ``service.name`` resource attribute, e.g. ``aeterna-memory``.
        exporter: ``none`` (spans are created for propagation, not exported), ``console`` or
            ``otlp`` (needs ``opentelemetry-exporter-otlp``; endpoint from the standard
            ``OTEL_EXPORTER_OTLP_*`` variables).
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def server_interceptors() -> Sequence[grpc.aio.ServerInterceptor]:
    """The OpenTelemetry server interceptor (opens a span per RPC, continues the caller's
    trace)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    interceptor: Any = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return [interceptor]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """OpenTelemetry client interceptors: propagate the trace context to the callee."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors: Any = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return list(interceptors)
