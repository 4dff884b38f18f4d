"""One gRPC server bootstrap for every service.

A service's composition root builds a :class:`ServiceApp` (its servicers and resources);
:func:`run_service` configures logs, traces and metrics, starts a :class:`GrpcServer` with the
shared interceptor chain, health per service name and server reflection, then waits for
SIGTERM/SIGINT and shuts down gracefully: health → NOT_SERVING, wait ``drain_s`` so the edge
stops routing here, ``server.stop(grace)`` so in-flight calls finish, then close resources
(the pattern of grpc/grpc's
``examples/python/helloworld/async_greeter_server_with_graceful_shutdown.py``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from aeterna_common.auth import TokenVerifier
from aeterna_common.config import CommonSettings
from aeterna_common.interceptors import RequestInterceptor
from aeterna_common.logging import configure_logging
from aeterna_common.telemetry import configure_tracing, server_interceptors, start_metrics_server

log = structlog.get_logger("aeterna.server")

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass
class ServiceApp:
    """What a service contributes to the server.

    Attributes:
        service_names: Full proto service names, e.g. ``aeterna.memory.v1.MemoryService``;
            each gets a health status and appears in reflection.
        register: Adds the servicers to a ``grpc.aio.Server``.
        close: Releases the app's resources (pools, indexes) after the server stopped.
        background: Long-running coroutines started with the server and cancelled on stop
            (e.g. index followers, reconcilers).
    """

    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    close: Callable[[], Awaitable[None]]
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)


class GrpcServer:
    """A ``grpc.aio`` server with the shared interceptors, health and reflection.

    Args:
        app: The service's servicers and resources.
        verifier: Verifies every call's bearer token (health and reflection stay open).
        listen: ``host:port``; port 0 binds a free port (see :attr:`port`).
        grace_period_s: Seconds in-flight calls get on stop.
        drain_s: Seconds between NOT_SERVING and closing the listener.
        options: Extra ``grpc.aio.server`` channel options.
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
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                *options,
            ],
        )
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Bind, register everything, start serving and mark every service SERVING.

        Returns:
            The bound port.
        """
        self.app.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self._register_reflection_v1()
        self.port = self.server.add_insecure_port(self.listen)
        await self.server.start()
        for job in self.app.background:
            self._tasks.append(asyncio.create_task(job()))
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        for name in self.app.service_names:
            await self.health.set(name, serving)
        log.info("server.started", listen=self.listen, port=self.port)
        return self.port

    def _register_reflection_v1(self) -> None:
        # grpcio-reflection serves only v1alpha; v1 has the same wire format, so the same
        # servicer answers under the v1 name too (newer grpcurl/grpcui ask for v1 first).
        from grpc_reflection.v1alpha import _async

        servicer = _async.ReflectionServicer(
            [*self.app.service_names, REFLECTION_V1, reflection.SERVICE_NAME]
        )
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
        if self.drain_s:
            await asyncio.sleep(self.drain_s)
        await self.server.stop(self.grace_period_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.app.close()
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
    """
    verifier = TokenVerifier.from_settings(settings)
    configure_logging(settings.log_level, settings.log_json)
    configure_tracing(f"aeterna-{service}", settings.otel_exporter)
    start_metrics_server(settings.metrics_port)
    app = await build()
    server = GrpcServer(
        app,
        verifier=verifier,
        listen=settings.listen,
        grace_period_s=settings.grace_period_s,
        drain_s=settings.drain_s,
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("server.stopping")
    await server.stop()
