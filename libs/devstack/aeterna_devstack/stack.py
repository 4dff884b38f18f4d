"""The local stack behind ``make run``: PostgreSQL, Redis, memory, governance, knowledge and
sync replicas and Envoy.

PostgreSQL and Redis are throwaway local servers started from the installed binaries unless
``AETERNA_DATABASE_URL`` / ``AETERNA_REDIS_URL`` point at existing ones. Each service has its
own database (memory ``aeterna``, governance ``aeterna_governance``, knowledge
``aeterna_knowledge``, sync ``aeterna_sync``) with the same three roles; with an existing
server, governance's DSNs are ``AETERNA_GOVERNANCE_DATABASE_URL``, ``..._OWNER_URL`` and
``..._INDEXER_URL`` (knowledge's ``AETERNA_KNOWLEDGE_DATABASE_URL``, sync's
``AETERNA_SYNC_DATABASE_URL`` and so on; without them that service does not start).
Memory replicas migrate at start; governance's and knowledge's migrations are applied by the
owner role first (``aeterna-governance migrate``, as the chart's hook Job does), then their
replicas start without migrating. Every service honours the roles of development tokens
(``AETERNA_AUTH_TRUST_TOKEN_ROLES``), so ``aeterna token --roles TENANT_ADMIN`` works
locally; memory and knowledge read role bindings from governance through Envoy
(``AETERNA_AUTHZ_DIRECTORY_URL``) with its service token. Replicas listen on loopback
only; Envoy on ``127.0.0.1:8080``
(``AETERNA_STACK_PORT``) verifies development JWTs, forwards them and routes to the
replicas, which verify them again against the same JWKS file. Each replica gets a
development service token (``AETERNA_SERVICE_TOKEN_FILE``). State (PostgreSQL data, Redis's
append-only file, indexes, keys, logs) lives in ``.var/``.

Traces: a local OTLP/gRPC receiver (:class:`~aeterna_devstack.otlp.OtlpFileReceiver`) appends
every span of Envoy and of the replicas to ``.var/traces.jsonl``; Prometheus, when its binary
is installed, scrapes every replica and Envoy on loopback (:mod:`aeterna_devstack.prom`).

The local Redis persists as the charts' does (``appendonly yes``, ``appendfsync always``): it
carries the event streams, and the outbox relays advance their cursors once Redis has
acknowledged an entry, so a Redis that restarts must still have it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from aeterna_common.db import provision
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aeterna_devstack.auth import DevAuth, repo_root
from aeterna_devstack.envoy import (
    DEV_CORS_ORIGINS,
    EnvoyProcess,
    JwtSettings,
    TracingSettings,
    render_gateway_config,
    service_upstreams,
)
from aeterna_devstack.otlp import OtlpFileReceiver
from aeterna_devstack.prom import (
    PrometheusProcess,
    chart_rule_files,
    find_prometheus,
    scrape_config,
)
from aeterna_devstack.servers import PostgresServer, RedisServer, free_port, scratch_dir

MEMORY_SERVICE = "aeterna.memory.v1.MemoryService"
GOVERNANCE_SERVICE = "aeterna.governance.v1.OrganizationService"
KNOWLEDGE_SERVICE = "aeterna.knowledge.v1.KnowledgeService"
SYNC_SERVICE = "aeterna.sync.v1.SyncService"
HEALTH_SERVICES = {
    "memory": MEMORY_SERVICE,
    "governance": GOVERNANCE_SERVICE,
    "knowledge": KNOWLEDGE_SERVICE,
    "sync": SYNC_SERVICE,
}
"""The service each replica's health check asks for, by service domain."""
DATABASE = "aeterna"
GOVERNANCE_DATABASE = "aeterna_governance"
KNOWLEDGE_DATABASE = "aeterna_knowledge"
SYNC_DATABASE = "aeterna_sync"
OWNER_ROLE = "aeterna_owner"
APP_ROLE = "aeterna_app"
INDEXER_ROLE = "aeterna_indexer"
TRACE_FILE = "traces.jsonl"
"""Spans of the local stack, one JSON object a line, under the state directory."""
TRACE_FLUSH_MS = 500
"""How often the replicas and Envoy export buffered spans locally, in milliseconds."""


def _service_urls(service: str) -> dict[str, str]:
    """The DSNs of an existing server for ``service`` (``GOVERNANCE``, ``KNOWLEDGE``), from
    ``AETERNA_<SERVICE>_DATABASE_URL``, ``..._OWNER_URL`` and ``..._INDEXER_URL``."""
    return {
        f"AETERNA_DATABASE{suffix}": os.environ.get(f"AETERNA_{service}_DATABASE{suffix}", "")
        for suffix in ("_URL", "_OWNER_URL", "_INDEXER_URL")
    }


def state_dir() -> Path:
    """``$AETERNA_STATE_DIR`` or ``<repo>/.var``."""
    return Path(os.environ.get("AETERNA_STATE_DIR") or repo_root() / ".var")


def model_dir() -> Path:
    """The embedding model directory: ``$AETERNA_MEMORY_MODEL_DIR`` or ``<repo>/.var/models``
    (where ``make model`` writes it)."""
    return Path(os.environ.get("AETERNA_MEMORY_MODEL_DIR") or repo_root() / ".var" / "models")


def require_model(directory: Path | None = None) -> Path:
    """Check that the model directory holds a complete export, before replicas start.

    Args:
        directory: The model directory (default :func:`model_dir`).

    Returns:
        The directory, absolute.

    Raises:
        RuntimeError: It is missing or incomplete; the message says to run ``make model``.
    """
    from aeterna_common.embedding.onnx_minilm import ModelUnavailableError, read_manifest

    directory = (directory or model_dir()).absolute()
    try:
        read_manifest(directory)
    except ModelUnavailableError as exc:
        raise RuntimeError(
            f"{exc}. Run `make model` (or set AETERNA_MEMORY_MODEL_DIR to a model directory)."
        ) from exc
    return directory


def health_check(target: str, service: str = MEMORY_SERVICE, timeout_s: float = 1.0) -> bool:
    """Whether ``grpc.health.v1.Health/Check`` for ``service`` answers SERVING at ``target``."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def render_stack_envoy_config(
    replica_ports: list[int],
    *,
    port: int,
    admin_port: int,
    jwks_path: str | os.PathLike[str],
    governance_ports: list[int] | None = None,
    knowledge_ports: list[int] | None = None,
    trace_port: int = 0,
    sync_ports: list[int] | None = None,
) -> dict[str, Any]:
    """The gateway config ``make run`` runs: the replicas on loopback behind JWT.

    Args:
        replica_ports: Loopback ports of the memory replicas (none: no memory route).
        port: Envoy's listener port on 127.0.0.1.
        admin_port: Envoy's admin port on 127.0.0.1.
        jwks_path: JWKS file of the development signing key.
        governance_ports: Loopback ports of the governance replicas (none: no route).
        knowledge_ports: Loopback ports of the knowledge replicas (none: no route).
        trace_port: Loopback port of the OTLP/gRPC trace receiver; 0: no tracing.
        sync_ports: Loopback ports of the sync replicas (none: no route).

    Returns:
        The bootstrap, from :func:`aeterna_devstack.envoy.render_gateway_config`.
    """
    ports = {
        "memory": replica_ports,
        "governance": governance_ports or [],
        "knowledge": knowledge_ports or [],
        "sync": sync_ports or [],
    }
    return render_gateway_config(
        service_upstreams({d: [("127.0.0.1", p) for p in ps] for d, ps in ports.items() if ps}),
        listen_port=port,
        admin_port=admin_port,
        jwt=JwtSettings(jwks_path=str(jwks_path)),
        cors_origins=DEV_CORS_ORIGINS,
        tracing=(
            TracingSettings("127.0.0.1", trace_port, flush_interval_ms=TRACE_FLUSH_MS)
            if trace_port
            else None
        ),
    )


@dataclass
class Replica:
    """One service process.

    Attributes:
        service: Service domain, ``memory``, ``governance`` or ``knowledge`` (runs
            ``aeterna_<service>``).
        env: Its environment (kept for restarts).
    """

    index: int
    port: int
    index_dir: Path
    log_path: Path
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    service: str = "memory"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        """``memory-0``, ``governance-1``, ..."""
        return f"{self.service}-{self.index}"


@dataclass
class DevStack:
    """Starts and stops the whole local stack.

    Attributes:
        replicas: Number of memory replicas.
        governance_replicas: Number of governance replicas.
        knowledge_replicas: Number of knowledge replicas (``make run`` starts two; tests that
            do not use knowledge start none).
        sync_replicas: Number of sync replicas (as knowledge's).
        port: Envoy listener port.
        root: State directory.
        fresh: Use a temporary PostgreSQL cluster and fresh indexes (benchmarks, tests)
            instead of the kept ones in ``root``.
        traces: Run a local OTLP/gRPC receiver; Envoy and every replica export their spans
            to it and it appends them to :attr:`trace_file` (JSON lines). ``make run`` turns
            it on; tests that do not look at traces leave it off (no export work).
    """

    replicas: int = 2
    governance_replicas: int = 2
    knowledge_replicas: int = 0
    sync_replicas: int = 0
    port: int = 8080
    root: Path = field(default_factory=state_dir)
    fresh: bool = False
    env: dict[str, str] = field(default_factory=dict)
    traces: bool = False
    _pg: PostgresServer | None = None
    _otlp: OtlpFileReceiver | None = None
    _redis: RedisServer | None = None
    _envoy: EnvoyProcess | None = None
    _replicas: list[Replica] = field(default_factory=list)
    _governance: list[Replica] = field(default_factory=list)
    _knowledge: list[Replica] = field(default_factory=list)
    _sync: list[Replica] = field(default_factory=list)
    _replica_env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """Envoy's ``host:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def trace_file(self) -> Path:
        """The JSON-lines file of every exported span (``{root}/traces.jsonl``)."""
        return self.root / TRACE_FILE

    @property
    def envoy_admin(self) -> str | None:
        """``host:port`` of Envoy's admin interface (None before start)."""
        if self._envoy is None:
            return None
        return f"{self._envoy.admin_host}:{self._envoy.admin_port}"

    @property
    def superuser_url(self) -> str | None:
        """DSN of the local cluster's superuser on the stack's database (tests use it to
        reach below row-level security); None when the stack uses an external database."""
        return self._pg.dsn("postgres", DATABASE) if self._pg is not None else None

    def start(self, log: object = print) -> Self:
        """Start everything and wait until Envoy routes to healthy replicas.

        A start that fails stops what it had started before raising, so that no replica or
        server outlives it.

        Raises:
            RuntimeError: a replica did not become healthy; the message has its log tail.
        """
        try:
            return self._start(log)
        except BaseException:
            self.stop()
            raise

    def _start(self, log: object) -> Self:
        say = log if callable(log) else print
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        db_url = os.environ.get("AETERNA_DATABASE_URL", "")
        owner_url = os.environ.get("AETERNA_DATABASE_OWNER_URL", "") or db_url
        indexer_url = os.environ.get("AETERNA_DATABASE_INDEXER_URL", "")
        gov_urls = _service_urls("GOVERNANCE")
        knowledge_urls = _service_urls("KNOWLEDGE")
        sync_urls = _service_urls("SYNC")
        if not db_url:
            pg_dir = None if self.fresh else self.root / "postgres"
            self._pg = PostgresServer(pg_dir, keep=not self.fresh).start()
            asyncio.run(provision(self._pg.dsn(), DATABASE, OWNER_ROLE, APP_ROLE, INDEXER_ROLE))
            db_url = self._pg.dsn(APP_ROLE, DATABASE)
            owner_url = self._pg.dsn(OWNER_ROLE, DATABASE)
            indexer_url = self._pg.dsn(INDEXER_ROLE, DATABASE)
            say(f"PostgreSQL    {self._pg.dsn('postgres', DATABASE)}")
            if self.governance_replicas:
                gov_urls = self._provision(GOVERNANCE_DATABASE)
            if self.knowledge_replicas:
                knowledge_urls = self._provision(KNOWLEDGE_DATABASE)
            if self.sync_replicas:
                sync_urls = self._provision(SYNC_DATABASE)
        redis_url = os.environ.get("AETERNA_REDIS_URL", "")
        if not redis_url:
            redis_dir = self.root / ("redis-fresh" if self.fresh else "redis")
            if self.fresh:
                import shutil

                shutil.rmtree(redis_dir, ignore_errors=True)
            redis_dir.mkdir(exist_ok=True)
            self._redis = RedisServer(data_dir=redis_dir).start()
            redis_url = self._redis.url
            say(f"Redis         {redis_url}")
        # The model is a build artifact (`make model`); replicas only read it.
        models = require_model() if self.replicas else model_dir()
        index_root = self.root / ("memory-fresh" if self.fresh else "memory")
        if self.fresh:
            import shutil

            shutil.rmtree(index_root, ignore_errors=True)
        auth = DevAuth(self.root / "auth")
        tracing_env: dict[str, str] = {}
        if self.traces:
            self._otlp = OtlpFileReceiver(self.trace_file).start()
            tracing_env = {
                "AETERNA_OTEL_EXPORTER": "otlp",
                "AETERNA_OTEL_ENDPOINT": self._otlp.endpoint,
                # Batches leave every half second, so a trace is in the file soon after.
                "OTEL_BSP_SCHEDULE_DELAY": str(TRACE_FLUSH_MS),
            }
            say(f"Traces        {self.trace_file}  (OTLP/gRPC {self._otlp.endpoint})")
        base_env = {
            **tracing_env,
            # Replicas apply migrations at start (one at a time, under an advisory lock).
            "AETERNA_MIGRATE_ON_START": "true",
            # A grant typed at the CLI reaches memory's decisions within 5 s even where no
            # event drops the cached bindings (the charts keep the 60 s default).
            "AETERNA_AUTHZ_CACHE_TTL_S": "5",
            **os.environ,
            "AETERNA_DATABASE_URL": db_url,
            "AETERNA_DATABASE_OWNER_URL": owner_url,
            **({"AETERNA_DATABASE_INDEXER_URL": indexer_url} if indexer_url else {}),
            "AETERNA_REDIS_URL": redis_url,
            **auth.server_env(),
            **auth.service_env("memory"),
            # Development shortcut: `aeterna token --roles TENANT_ADMIN` works locally.
            "AETERNA_AUTH_TRUST_TOKEN_ROLES": "true",
            # Memory reads bindings from governance as in production: through the gateway
            # (its route, JWT check and retries), with its service token. Envoy starts
            # last; the cache fetches on the first decision that needs bindings.
            **(
                {"AETERNA_AUTHZ_DIRECTORY_URL": self.endpoint}
                if self.governance_replicas and gov_urls["AETERNA_DATABASE_URL"]
                else {}
            ),
            "AETERNA_MEMORY_MODEL_DIR": str(models),
            **self.env,
        }
        for i in range(self.replicas):
            replica = Replica(
                index=i,
                port=free_port(),
                index_dir=index_root / f"replica-{i}",
                log_path=self.root / "logs" / f"memory-{i}.log",
                metrics_port=free_port(),
            )
            self._replicas.append(replica)
            self.start_replica(replica, base_env)
        self._governance = self._start_migrated(
            "governance", self.governance_replicas, base_env, gov_urls, auth, say
        )
        self._knowledge = self._start_migrated(
            "knowledge", self.knowledge_replicas, base_env, knowledge_urls, auth, say
        )
        self._sync = self._start_migrated(
            "sync", self.sync_replicas, base_env, sync_urls, auth, say
        )
        for replica in self.all_replicas():
            self.wait_healthy(replica)
            say(
                f"{replica.label:<14}{replica.target}  (metrics "
                f"http://127.0.0.1:{replica.metrics_port}/metrics, log {replica.log_path})"
            )
        config = render_stack_envoy_config(
            [r.port for r in self._replicas],
            port=self.port,
            admin_port=free_port(),
            jwks_path=auth.jwks_path,
            governance_ports=[r.port for r in self._governance],
            knowledge_ports=[r.port for r in self._knowledge],
            trace_port=self._otlp.port if self._otlp is not None else 0,
            sync_ports=[r.port for r in self._sync],
        )
        self._envoy = EnvoyProcess(config, state_dir=self.root / "envoy").start()
        (self.root / "stack.json").write_text(
            json.dumps({"endpoint": self.endpoint, "pid": os.getpid()})
        )
        say(f"Envoy         {self.endpoint}  (admin {self._envoy.admin_url})")
        return self

    def _provision(self, database: str) -> dict[str, str]:
        """Create ``database`` with the three roles on the local cluster; its DSNs."""
        assert self._pg is not None
        asyncio.run(provision(self._pg.dsn(), database, OWNER_ROLE, APP_ROLE, INDEXER_ROLE))
        return {
            "AETERNA_DATABASE_URL": self._pg.dsn(APP_ROLE, database),
            "AETERNA_DATABASE_OWNER_URL": self._pg.dsn(OWNER_ROLE, database),
            "AETERNA_DATABASE_INDEXER_URL": self._pg.dsn(INDEXER_ROLE, database),
        }

    def _start_migrated(
        self,
        service: str,
        count: int,
        base_env: dict[str, str],
        urls: dict[str, str],
        auth: DevAuth,
        say: Any,
    ) -> list[Replica]:
        """Migrate ``service``'s own database as the owner (``aeterna-<service> migrate``,
        as the chart's hook Job does), then start ``count`` replicas of it."""
        if not count:
            return []
        if not urls["AETERNA_DATABASE_URL"]:
            prefix = f"AETERNA_{service.upper()}_DATABASE_URL"
            say(f"{service:<14}not started: set {prefix} (and _OWNER_URL)")
            return []
        env = {
            **base_env,
            **{k: v for k, v in urls.items() if v},
            **auth.service_env(service),
            "AETERNA_MIGRATE_ON_START": "false",
            **self.env,
        }
        models = env.pop("AETERNA_MEMORY_MODEL_DIR", None)
        if service == "knowledge" and models:
            env["AETERNA_KNOWLEDGE_MODEL_DIR"] = models
        log_path = self.root / "logs" / f"{service}-migrate.log"
        with log_path.open("ab") as out:
            done = subprocess.run(
                [sys.executable, "-m", f"aeterna_{service}", "migrate"],
                env={
                    **env,
                    "AETERNA_DATABASE_OWNER_URL": urls["AETERNA_DATABASE_OWNER_URL"]
                    or urls["AETERNA_DATABASE_URL"],
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        if done.returncode:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{service} migrations failed:\n{tail}")
        replicas = []
        for i in range(count):
            replica = Replica(
                index=i,
                port=free_port(),
                # Each knowledge replica owns its embedded search index (one process each).
                index_dir=self.root / service / f"replica-{i}",
                log_path=self.root / "logs" / f"{service}-{i}.log",
                metrics_port=free_port(),
                service=service,
            )
            replicas.append(replica)
            self.start_replica(replica, env)
        return replicas

    def start_replica(self, replica: Replica, env: dict[str, str] | None = None) -> None:
        """Start (or restart) one replica process."""
        replica.index_dir.mkdir(parents=True, exist_ok=True)
        env = dict(env or replica.env or self._replica_env)
        env["AETERNA_LISTEN"] = replica.target
        if replica.service == "memory":
            env["AETERNA_MEMORY_INDEX_DIR"] = str(replica.index_dir)
        elif replica.service == "knowledge":
            env["AETERNA_KNOWLEDGE_INDEX_DIR"] = str(replica.index_dir)
        env["AETERNA_METRICS_PORT"] = str(replica.metrics_port)
        with replica.log_path.open("ab") as out:
            replica.proc = subprocess.Popen(
                [sys.executable, "-m", f"aeterna_{replica.service}"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        replica.env = env
        if replica.service == "memory":
            self._replica_env = env

    def wait_healthy(self, replica: Replica, timeout_s: float = 180.0) -> None:
        """Wait until the replica answers SERVING.

        Raises:
            RuntimeError: it exited or did not answer in time.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if replica.proc is not None and replica.proc.poll() is not None:
                break
            if health_check(replica.target, HEALTH_SERVICES[replica.service]):
                return
            time.sleep(0.2)
        tail = replica.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{replica.label} did not become healthy:\n{tail}")

    @property
    def replica_list(self) -> list[Replica]:
        """The memory replicas."""
        return self._replicas

    @property
    def governance_list(self) -> list[Replica]:
        """The governance replicas."""
        return self._governance

    @property
    def knowledge_list(self) -> list[Replica]:
        """The knowledge replicas."""
        return self._knowledge

    @property
    def sync_list(self) -> list[Replica]:
        """The sync replicas."""
        return self._sync

    def all_replicas(self) -> list[Replica]:
        """Every replica of every service."""
        return [*self._replicas, *self._governance, *self._knowledge, *self._sync]

    def kill_replica(self, i: int, sig: int = signal.SIGKILL, *, service: str = "memory") -> None:
        """Send ``sig`` to replica ``i`` of ``service`` (``memory``, ``governance``,
        ``knowledge`` or ``sync``) and wait for it to exit.

        Raises:
            subprocess.TimeoutExpired: it had not exited 30 s after ``sig``; it is then killed
                (SIGKILL) before the error is raised, so the stack's later users find the
                replica gone rather than half stopped.
        """
        replicas = {
            "memory": self._replicas,
            "governance": self._governance,
            "knowledge": self._knowledge,
            "sync": self._sync,
        }[service]
        proc = replicas[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise

    def restart_replica(self, i: int, **env: str) -> None:
        """Stop replica ``i`` gracefully (SIGTERM) and start it again with ``env`` added to
        its environment (kept for later restarts); returns once it says SERVING.

        Raises:
            RuntimeError: it did not become healthy again.
        """
        replica = self._replicas[i]
        self.kill_replica(i, signal.SIGTERM)
        self.start_replica(replica, {**self._replica_env, **env})
        self.wait_healthy(replica)

    def crash_redis(self) -> None:
        """Kill the stack's Redis (SIGKILL, as in a crash) and start it again on the same
        port and data directory: it comes back with what it had fsynced.

        Raises:
            RuntimeError: The stack uses an external Redis (``AETERNA_REDIS_URL``).
        """
        if self._redis is None:
            raise RuntimeError("the stack did not start Redis")
        port, data_dir = self._redis.port, self._redis.data_dir
        self._redis.kill()
        self._redis = RedisServer(port=port, data_dir=data_dir).start()

    def stop(self) -> None:
        """Stop replicas (SIGTERM: graceful), then Envoy, Redis and PostgreSQL."""
        replicas = self.all_replicas()
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in replicas:
            if r.proc is not None:
                try:
                    r.proc.wait(20)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
        if self._envoy is not None:
            self._envoy.stop()
        if self._otlp is not None:
            self._otlp.stop()
        if self._redis is not None:
            self._redis.stop()
        if self._pg is not None:
            self._pg.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "stack.json").unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_prometheus(stack: DevStack) -> PrometheusProcess | None:
    """Start Prometheus on loopback scraping every replica and Envoy, with the charts' rules,
    when the binary is installed.

    Returns:
        The running server, or None without a ``prometheus`` binary.
    """
    if find_prometheus() is None:
        return None
    targets: dict[str, list[str]] = {}
    for r in [*stack.replica_list, *stack.governance_list, *stack.knowledge_list]:
        targets.setdefault(f"aeterna-{r.service}", []).append(f"127.0.0.1:{r.metrics_port}")
    admin = stack.envoy_admin
    config = scrape_config(targets, envoy_admin=admin, rule_files=chart_rule_files())
    return PrometheusProcess(config, stack.root / "prometheus").start()


def main() -> None:
    """``make run``: start the stack and keep it up until Ctrl-C (SIGINT) or SIGTERM."""
    port = int(os.environ.get("AETERNA_STACK_PORT", "8080"))
    stack = DevStack(port=port, knowledge_replicas=2, sync_replicas=2, traces=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    prometheus: PrometheusProcess | None = None
    try:
        stack.start()
        prometheus = start_prometheus(stack)
        print(
            f"\nAeterna is up on {stack.endpoint}. Try:\n"
            "  ADMIN=$(.venv/bin/aeterna token --tenant demo --user admin "
            "--roles TENANT_ADMIN)\n"
            "  .venv/bin/aeterna import locomo bench/data/locomo-dev.json "
            '--tenant demo --token "$ADMIN"\n'
            '  .venv/bin/aeterna memory search "when did Caroline go to the LGBTQ support '
            'group?" --tenant demo --user conv-26\n'
            "  .venv/bin/aeterna org create acme --kind company --tenant demo "
            "--roles TENANT_ADMIN\n"
            f"Traces of every request: {stack.trace_file}\n"
            + (
                f"Prometheus: {prometheus.url}\n"
                if prometheus is not None
                else "Prometheus: not installed (make deps-system)\n"
            )
            + "Ctrl-C stops everything.",
            flush=True,
        )
        while not stop:
            time.sleep(0.5)
            for r in stack.all_replicas():
                if r.proc is not None and r.proc.poll() is not None:
                    print(f"{r.label} exited ({r.proc.returncode}); restarting", flush=True)
                    stack.start_replica(r)
    finally:
        print("\nstopping…", flush=True)
        if prometheus is not None:
            prometheus.stop()
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def throwaway_stack(prefix: str, *, port: int | None = None, **options: Any) -> Iterator[DevStack]:
    """A fresh :class:`DevStack` in a new scratch root (:func:`~aeterna_devstack.servers.
    scratch_dir`), started quietly and stopped on exit: the end-to-end tests' stack.

    Args:
        prefix: Start of the root directory's name (e.g. ``aeterna-e2e-sync-``).
        port: The edge's port (default: a free one), for settings that must name it before
            the stack starts.
        **options: Other :class:`DevStack` fields (``replicas``, ``env``, ...).

    Yields:
        The started stack.

    Raises:
        RuntimeError: The stack did not start (what it had started is stopped).
    """
    stack = DevStack(
        port=free_port() if port is None else port, root=scratch_dir(prefix), fresh=True, **options
    )
    stack.start(log=lambda *_: None)
    try:
        yield stack
    finally:
        stack.stop()
