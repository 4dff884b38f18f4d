"""One gRPC server bootstrap for every service.

A service's composition root builds a :class:`ServiceApp` (its servicers and resources);
:func:`run_service` configures logs, traces and metrics, starts a :class:`GrpcServer` with the
shared interceptor chain, health per service name and server reflection, then waits for
SIGTERM/SIGINT and shuts down gracefully: health → NOT_SERVING, wait ``drain_s`` so the edge
stops routing here, ``server.stop(grace)`` so in-flight calls finish, then close resources
(the pattern of grpc/grpc's
``examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py``).

Readiness: the server listens at once with every health status NOT_SERVING, runs the app's
``prepare`` step (e.g. bringing an embedded index up to date), and only then says SERVING, so
the edge's health checks and a Kubernetes readiness probe route nothing to a replica that is
not ready.

Reflection describes the whole SDK (``aeterna/descriptor_set.pb``, shipped in the
``aeterna-sdk`` package), not just this service: behind a gateway that sends reflection to any
one service, a client still lists every Aeterna service.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from aeterna_common.auth import AuthConfigError, TokenVerifier
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings, apply_migrations, migration_files, role_of
from aeterna_common.errors import InvalidArgument
from aeterna_common.interceptors import RequestInterceptor
from aeterna_common.limits import SERVER_OPTIONS
from aeterna_common.logging import configure_logging
from aeterna_common.telemetry import configure_tracing, server_interceptors, start_metrics_server

log = structlog.get_logger("aeterna.server")

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SDK_DESCRIPTOR_SET = "descriptor_set.pb"
"""File of the ``aeterna`` package: every SDK proto with its imports (``protoc
--include_imports``, written by ``make gen``)."""


class StartupError(RuntimeError):
    """A service cannot start; the message tells the operator what to fix."""


def migrate_as_owner(migrations: Path) -> list[str]:
    """Apply a service's pending migrations with the owner DSN (its ``migrate`` command).

    The application role named in ``AETERNA_DATABASE_URL`` and the indexer role named in
    ``AETERNA_DATABASE_INDEXER_URL`` are granted access by the migrations;
    ``AETERNA_DATABASE_OWNER_URL`` (default: the application DSN) applies them.

    Args:
        migrations: The service's directory of numbered ``NNNN_name.sql`` files.

    Returns:
        Names of the migrations applied now.

    Raises:
        ValidationError: A setting is invalid.
        StartupError: The database cannot be reached or a migration failed.
    """
    common = CommonSettings()
    configure_logging(common.log_level, common.log_json)
    owner = common.database_owner_url or common.database_url
    try:
        return asyncio.run(
            apply_migrations(
                owner,
                migrations,
                role_of(common.database_url),
                role_of(common.database_indexer_url),
            )
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, ValueError) as exc:
        raise StartupError(
            f"migrations failed with AETERNA_DATABASE_OWNER_URL: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class SdkDescriptors:
    """The SDK's protos, loaded for server reflection.

    Attributes:
        pool: A descriptor pool with every SDK file, its imports, and the health and
            reflection protos.
        services: Full names of every ``aeterna.*`` service in the SDK.
    """

    pool: descriptor_pool.DescriptorPool
    services: tuple[str, ...]


@functools.cache
def sdk_descriptors() -> SdkDescriptors:
    """Load the SDK descriptor set shipped in the ``aeterna-sdk`` package (once per process).

    Returns:
        The pool and the SDK's service names.

    Raises:
        FileNotFoundError: The installed ``aeterna-sdk`` has no descriptor set.
        google.protobuf.message.DecodeError: The file is not a ``FileDescriptorSet``.
    """
    data = resources.files("aeterna").joinpath(SDK_DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    pool = descriptor_pool.DescriptorPool()
    # protoc writes the set in dependency order, so each file's imports are already added.
    for proto in files:
        pool.AddSerializedFile(proto.SerializeToString())
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    services = tuple(
        sorted(
            f"{proto.package}.{service.name}"
            for proto in files
            if proto.package.startswith("aeterna.")
            for service in proto.service
        )
    )
    return SdkDescriptors(pool=pool, services=services)


@dataclass
class ServiceApp:
    """What a service contributes to the server.

    Attributes:
        service_names: Full proto service names, e.g. ``aeterna.memory.v1.MemoryService``;
            each gets a health status and appears in reflection.
        register: Adds the servicers to a ``grpc.aio.Server``.
        close: Releases the app's resources (pools, indexes) after the server stopped.
        prepare: Work that must finish before the service is ready (e.g. an index catching
            up); runs after the server listens, while every health status is NOT_SERVING.
            If it raises, the service never becomes ready.
        background: Long-running coroutines started once ``prepare`` finished and cancelled
            on stop (e.g. index followers, reconcilers).
    """

    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    close: Callable[[], Awaitable[None]]
    prepare: Callable[[], Awaitable[None]] | None = None
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)


CLOSE_TIMEOUT_S = 10.0
"""Seconds a stopping server gives its background tasks and its app's ``close`` after the
grace period (with ``drain_s`` 3 and ``grace_period_s`` 10, within Kubernetes' default 30 s
``terminationGracePeriodSeconds``)."""


class GrpcServer:
    """A ``grpc.aio`` server with the shared interceptors, health and reflection.

    Args:
        app: The service's servicers and resources.
        verifier: Verifies every call's bearer token (health and reflection stay open).
        listen: ``host:port``; port 0 binds a free port (see :attr:`port`).
        grace_period_s: Seconds in-flight calls get on stop.
        drain_s: Seconds between NOT_SERVING and closing the listener.
        options: Extra ``grpc.aio.server`` channel options (message size limits are
            :data:`aeterna_common.limits.SERVER_OPTIONS`).
    """

    def __init__(
        self,
        app: ServiceApp,
        *,
        verifier: TokenVerifier,
        listen: str = "127.0.0.1:0",
        grace_period_s: float = 10.0,
        drain_s: float = 0.0,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        self.app = app
        self.listen = listen
        self.grace_period_s = grace_period_s
        self.drain_s = drain_s
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[*server_interceptors(), RequestInterceptor(verifier)],
            options=[
                *SERVER_OPTIONS,
                ("grpc.so_reuseport", 0),
                *options,
            ],
        )
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Task[None] | None = None

    @property
    def names(self) -> list[str]:
        """Every service name this server reports health for (``""`` is the server)."""
        return ["", *self.app.service_names]

    async def start(self, *, wait_ready: bool = True) -> int:
        """Bind, register everything, start serving, then become ready.

        Health is NOT_SERVING for every name until the app's ``prepare`` step has finished
        and its background jobs are started; then SERVING.

        Args:
            wait_ready: Return only once ready (and raise what ``prepare`` raised); when
                false, return right after binding and use :meth:`wait_ready`.

        Returns:
            The bound port.
        """
        self.app.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._register_reflection()
        for name in self.names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(self.listen)
        await self.server.start()
        log.info("server.started", listen=self.listen, port=self.port)
        self._ready = asyncio.create_task(self._become_ready())
        if wait_ready:
            await self.wait_ready()
        return self.port

    async def _become_ready(self) -> None:
        if self.app.prepare is not None:
            log.info("server.preparing")
            await self.app.prepare()
        for job in self.app.background:
            self._tasks.append(asyncio.create_task(job()))
        for name in self.names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server.ready", port=self.port)

    async def wait_ready(self) -> None:
        """Wait until the server says SERVING.

        Raises:
            RuntimeError: :meth:`start` was not called.
            Exception: Whatever the app's ``prepare`` step raised.
        """
        if self._ready is None:
            raise RuntimeError("GrpcServer.start() was not called")
        await asyncio.shield(self._ready)

    @property
    def ready_task(self) -> asyncio.Task[None] | None:
        """The task that runs ``prepare`` and then reports SERVING (``None`` before start)."""
        return self._ready

    def _register_reflection(self) -> None:
        sdk = sdk_descriptors()
        names = sorted(
            {
                *sdk.services,
                *self.app.service_names,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
                REFLECTION_V1,
            }
        )
        servicer = reflection.aio.ReflectionServicer(names, pool=sdk.pool)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, self.server)
        # grpcio-reflection serves only v1alpha; v1 has the same wire format, so the same
        # servicer answers under the v1 name too (newer grpcurl/grpcui ask for v1 first).
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    REFLECTION_V1, {"ServerReflectionInfo": handler}
                ),
            )
        )

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, drain, stop with grace, cancel background jobs, close
        the app."""
        await self.health.enter_graceful_shutdown()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            await asyncio.gather(self._ready, return_exceptions=True)
        if self.drain_s:
            await asyncio.sleep(self.drain_s)
        await self.server.stop(self.grace_period_s)
        for task in self._tasks:
            task.cancel()
        # Bounded: a background task that swallows its cancellation (asyncio.wait_for on
        # Python 3.11 can) or a pool waiting for a connection never released would otherwise
        # keep a SIGTERMed replica alive until the orchestrator kills it.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*self._tasks, return_exceptions=True)
                await self.app.close()
        except TimeoutError:
            log.error("server.close_timed_out", seconds=CLOSE_TIMEOUT_S)
        log.info("server.stopped")


async def run_service(
    service: str,
    settings: CommonSettings,
    build: Callable[[], Awaitable[ServiceApp]],
) -> None:
    """Run one service until SIGTERM or SIGINT, then shut down gracefully.

    Args:
        service: Short service name (``memory``); traces use ``aeterna-{service}``.
        settings: The service's settings (already validated).
        build: The composition root: builds adapters, domain and servicers.

    Raises:
        AuthConfigError: token verification is not configured (checked before anything
            starts).
        StartupError: The app's ``prepare`` step failed, so the service never became ready
            (``build`` raises its own errors, :class:`StartupError` for operator mistakes).
    """
    verifier = TokenVerifier.from_settings(settings)
    configure_logging(settings.log_level, settings.log_json)
    provider = configure_tracing(
        f"aeterna-{service}", settings.otel_exporter, settings.otel_endpoint
    )
    start_metrics_server(settings.metrics_port, settings.metrics_host)
    app = await build()
    server = GrpcServer(
        app,
        verifier=verifier,
        listen=settings.listen,
        grace_period_s=settings.grace_period_s,
        drain_s=settings.drain_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)
    ready = server.ready_task
    assert ready is not None
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stopping.cancel()
        log.error("server.prepare_failed", error=repr(ready.exception()))
        await server.stop()
        raise StartupError(f"the service did not become ready: {ready.exception()!r}")
    await stopping
    log.info("server.stopping")
    await server.stop()
    # Spans still batched would be lost with the process.
    await asyncio.to_thread(provider.force_flush, 5_000)


@dataclass(frozen=True, slots=True)
class Command:
    """A one-shot command of a service's entry point beside ``serve`` and ``migrate``.

    Attributes:
        help: One line for ``--help``.
        add_arguments: Declares the command's arguments on its sub-parser.
        run: Runs it with the parsed arguments and returns the line to print on success; a
            :class:`StartupError` or :class:`~aeterna_common.errors.InvalidArgument` it
            raises exits 1 with one readable line.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], str]


def service_main(
    service: str,
    migrations: Path,
    build: Callable[[CommonSettings, SchemaSettings], Awaitable[ServiceApp]],
    argv: Sequence[str] | None = None,
    commands: Mapping[str, Command] | None = None,
) -> None:
    """The command line of a service's ``aeterna-{service}`` entry point.

    ``aeterna-{service}`` / ``aeterna-{service} serve`` validates the settings and serves until
    SIGTERM (:func:`run_service`); ``aeterna-{service} migrate`` applies pending migrations as
    the schema owner (``AETERNA_DATABASE_OWNER_URL``; the Helm pre-install/pre-upgrade hook
    Job) and exits 0. A setting or start-up problem exits 1 with one readable line on stderr,
    not a traceback.

    Args:
        service: Short service name (``memory``).
        migrations: The service's migrations directory.
        build: The composition root, given the validated common and schema settings (it
            reads its own service settings; their :class:`pydantic.ValidationError` is
            reported like the common ones).
        argv: Arguments (default ``sys.argv[1:]``).
        commands: The service's own one-shot commands by name (governance's ``bootstrap``).
    """
    prog = f"aeterna-{service}"
    extra = dict(commands or {})
    parser = argparse.ArgumentParser(prog=prog, description=f"Aeterna's {service} service.")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve gRPC until SIGTERM (the default)")
    sub.add_parser("migrate", help="apply the migrations as the schema owner, then exit")
    for name, command in extra.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    args = parser.parse_args(argv)
    try:
        if args.command in extra:
            print(f"{prog}: {extra[args.command].run(args)}")
        elif args.command == "migrate":
            applied = migrate_as_owner(migrations)
            latest = max(migration_files(migrations))
            print(
                f"{prog}: schema at version {latest}; applied now: "
                + (", ".join(applied) or "nothing")
            )
        else:
            common = CommonSettings()
            schema = SchemaSettings()
            asyncio.run(run_service(service, common, lambda: build(common, schema)))
            # Stopped gracefully. The interpreter's exit would still join every non-daemon
            # thread and executor worker (an engine flush or a model batch a cancelled call
            # left running) for as long as they take; nothing of theirs is needed any more.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except ValidationError as exc:
        sys.exit(f"{prog}: invalid settings:\n{exc}")
    except InvalidArgument as exc:
        sys.exit(f"{prog}: invalid arguments: {exc}")
    except (StartupError, AuthConfigError) as exc:
        doing = "cannot start" if args.command in (None, "serve") else f"{args.command} failed"
        sys.exit(f"{prog}: {doing}: {exc}")
