"""The shared server bootstrap: health per service, graceful stop, error mapping."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aeterna_common import context as rc
from aeterna_common.auth import JwksFile, TokenVerifier
from aeterna_common.errors import NotFound
from aeterna_common.server import GrpcServer, ServiceApp
from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER
from aeterna_devstack.pytest_plugin import session_auth
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

SERVICE = "test.v1.SlowService"


def make_app(closed: list[bool]) -> ServiceApp:
    async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(0.5)
        return rc.current().principal.tenant_id.encode()

    async def missing(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise NotFound("nothing here", reason="THING_NOT_FOUND", metadata={"name": "x"})

    async def crash(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        raise RuntimeError("secret internal detail")

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in (("Slow", slow), ("Missing", missing), ("Crash", crash))
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    async def close() -> None:
        closed.append(True)

    return ServiceApp(service_names=[SERVICE], register=register, close=close)


MD = (("authorization", f"Bearer {session_auth().issue_token('acme', 'u')}"),)


def verifier() -> TokenVerifier:
    return TokenVerifier(
        JwksFile(session_auth().jwks_path), issuer=DEFAULT_ISSUER, audience=DEFAULT_AUDIENCE
    )


async def test_graceful_stop_drains_in_flight_calls() -> None:
    closed: list[bool] = []
    server = GrpcServer(make_app(closed), verifier=verifier(), grace_period_s=5, drain_s=0.2)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        slow = ch.unary_unary(f"/{SERVICE}/Slow")

        async def call() -> bytes:
            return await slow(b"", metadata=MD)

        in_flight = asyncio.create_task(call())
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.05)
        # Draining: health already says NOT_SERVING so the edge stops routing here.
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await in_flight == b"acme"  # the in-flight call finished
        await stopping
    assert closed == [True]


async def test_errors_map_to_rich_status_without_leaking() -> None:
    server = GrpcServer(make_app([]), verifier=verifier())
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Missing")(b"", metadata=MD)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            status = rpc_status.from_call(info.value)
            assert status is not None
            err = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(err)
            assert (err.reason, dict(err.metadata)) == ("THING_NOT_FOUND", {"name": "x"})
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Crash")(b"", metadata=MD)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Slow")(b"")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop()
