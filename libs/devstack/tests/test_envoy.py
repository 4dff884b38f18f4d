"""Envoy in front of two gRPC backends: JWT at the edge, token forwarding, surviving a kill.

The backends are this file run as a script (``python test_envoy.py PORT NAME``) so that one can
be killed with SIGKILL, like a crashed replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

TEST_SERVICE = "aeterna.test.v1.EchoService"
ECHO = f"/{TEST_SERVICE}/Echo"
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


# --------------------------------------------------------------------------------------------
# backend (runs in a child process)


class _EchoHandler(grpc.GenericRpcHandler):
    """Answers Echo with the backend name, the x-aeterna-* metadata and the token it received."""

    def __init__(self, name: str) -> None:
        self._name = name

    def service(
        self, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        if details.method != ECHO:
            return None
        name = self._name

        async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await asyncio.sleep(0.002)  # keep a few calls in flight when a backend dies
            md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            body = {
                "backend": name,
                "aeterna": {k: v for k, v in md.items() if k.startswith("x-aeterna-")},
                "authorization": md.get("authorization"),
            }
            return json.dumps(body).encode()

        return grpc.unary_unary_rpc_method_handler(echo)


async def _serve(port: int, name: str) -> None:
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(TEST_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    names = [TEST_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection_servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection_servicer, server)
    # grpcio-reflection serves only v1alpha; v1 has the same wire format.
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                reflection_servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1, _EchoHandler(name)))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# tests

from aeterna_devstack.auth import DevAuth  # noqa: E402
from aeterna_devstack.envoy import (  # noqa: E402
    EnvoyProcess,
    JwtSettings,
    render_envoy_config,
    validate_config,
)
from aeterna_devstack.servers import free_port  # noqa: E402


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"backend on port {port} did not listen")


class Stack:
    def __init__(
        self,
        envoy: EnvoyProcess,
        auth: DevAuth,
        other_auth: DevAuth,
        backends: dict[str, subprocess.Popen[bytes]],
    ) -> None:
        self.envoy = envoy
        self.auth = auth
        self.other_auth = other_auth
        self.backends = backends

    def token(self, **kwargs: Any) -> str:
        args: dict[str, Any] = {
            "tenant": "acme",
            "user": "alice",
            "agent": "planner",
            "roles": ("reader", "writer"),
        }
        args.update(kwargs)
        return self.auth.issue_token(**args)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("envoy")
    auth = DevAuth(state / "auth")
    other_auth = DevAuth(state / "other-auth")
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    backends: dict[str, subprocess.Popen[bytes]] = {}
    envoy: EnvoyProcess | None = None
    try:
        for i, port in enumerate(ports):
            with (state / f"backend{i}.log").open("wb") as log:
                backends[f"b{i}"] = subprocess.Popen(
                    [sys.executable, __file__, str(port), f"b{i}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        for port, proc in zip(ports, backends.values(), strict=True):
            _wait_port(port, proc)
        config = render_envoy_config(
            [(TEST_SERVICE, "echo", [("127.0.0.1", p) for p in ports])],
            listen_port=free_port(),
            admin_port=free_port(),
            jwt=JwtSettings(jwks_path=auth.jwks_path),
        )
        envoy = EnvoyProcess(config, state_dir=state / "envoy").start()
        print(f"envoy start-to-ready: {envoy.startup_seconds:.2f} s")
        yield Stack(envoy, auth, other_auth, backends)
    finally:
        if envoy is not None:
            envoy.stop()
        for proc in backends.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def _echo(
    stack: Stack, token: str | None, extra: tuple[tuple[str, str], ...] = ()
) -> dict[str, Any]:
    metadata = list(extra)
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    async with grpc.aio.insecure_channel(stack.envoy.address) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        reply = await echo(b"", metadata=metadata, timeout=10)
    result: dict[str, Any] = json.loads(reply)
    return result


def test_config_passes_envoy_validate(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path)
    config = render_envoy_config(
        [
            ("aeterna.memory.v1.MemoryService", "memory", [("127.0.0.1", 50051)]),
            ("aeterna.sync.v1.SyncService", "sync", [("localhost", 50052), ("localhost", 50053)]),
        ],
        jwt=JwtSettings(jwks_json=auth.jwks_json()),
    )
    validate_config(config)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert filters == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.router",
    ]
    provider = hcm["typed_config"]["http_filters"][1]["typed_config"]["providers"]["aeterna"]
    assert provider["forward"] is True and provider["require_expiration"] is True
    assert "claim_to_headers" not in provider


def test_dev_tokens_carry_string_roles(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path)
    assert DevAuth(tmp_path).kid == auth.kid  # the key is created once and reused
    token = auth.issue_token("acme", "alice", agent="planner", roles=["reader", "writer"])
    assert jwt.get_unverified_header(token)["kid"] == auth.kid
    key = jwt.PyJWKSet.from_dict(json.loads(auth.jwks_path.read_text()))[auth.kid]
    claims = jwt.decode(token, key, algorithms=["RS256"], audience="aeterna", issuer="aeterna-dev")
    assert claims["tenant"] == "acme"
    assert claims["sub"] == "alice"
    assert claims["agent"] == "planner"
    assert claims["roles"] == "reader,writer"
    assert claims["exp"] > claims["iat"]


async def test_health_and_reflection_need_no_token(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.envoy.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=TEST_SERVICE), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for service in (reflection.SERVICE_NAME, REFLECTION_V1):
            call = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            response = await call.read()
            assert isinstance(response, reflection_pb2.ServerReflectionResponse)
            names = {s.name for s in response.list_services_response.service}
            assert TEST_SERVICE in names
            call.cancel()


async def test_lookalike_of_public_prefix_needs_token(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.envoy.address) as channel:
        check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/grpc.health.v1.HealthX/Check"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "case",
    ["missing", "garbage", "expired", "no_exp", "wrong_issuer", "other_key", "wrong_audience"],
)
async def test_bad_token_is_unauthenticated(stack: Stack, case: str) -> None:
    tokens: dict[str, str | None] = {
        "missing": None,
        "garbage": "not-a-jwt",
        # Beyond Envoy's default 60 s clock skew.
        "expired": stack.token(ttl_s=-300),
        "no_exp": stack.token(ttl_s=None),
        "wrong_issuer": stack.token(issuer="someone-else"),
        "other_key": stack.other_auth.issue_token("acme", "alice"),
        "wrong_audience": stack.token(audience="another-api"),
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _echo(stack, tokens[case])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_valid_token_is_forwarded_without_claim_headers(stack: Stack) -> None:
    token = stack.token()
    reply = await _echo(stack, token)
    # The services verify the token themselves; Envoy writes no identity headers.
    assert reply["aeterna"] == {}
    assert reply["authorization"] == f"Bearer {token}"


async def test_client_sent_identity_headers_are_dropped(stack: Stack) -> None:
    spoofed = (
        ("x-aeterna-tenant", "evil"),
        ("x-aeterna-user", "mallory"),
        ("x-aeterna-agent", "forged"),
        ("x-aeterna-anything", "x"),
    )
    reply = await _echo(stack, stack.token(agent=None, roles=()), spoofed)
    assert reply["aeterna"] == {}


async def test_killing_a_replica_mid_run_loses_no_call(stack: Stack) -> None:
    total, concurrency, kill_after = 300, 8, 100
    token = stack.token()
    metadata = (("authorization", f"Bearer {token}"),)
    served: dict[str, int] = {}
    failures: list[str] = []
    done = 0
    killed = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async with grpc.aio.insecure_channel(stack.envoy.address) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                queue.get_nowait()
                try:
                    reply = json.loads(await echo(b"", metadata=metadata, timeout=10))
                    served[reply["backend"]] = served.get(reply["backend"], 0) + 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                done += 1
                if done >= kill_after and not killed.is_set():
                    killed.set()
                    stack.backends["b1"].send_signal(signal.SIGKILL)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    print(f"kill a replica: {total} calls, {len(failures)} failures, served {served}")
    assert killed.is_set()
    assert failures == []
    assert set(served) == {"b0", "b1"}  # both replicas took load before the kill
    assert sum(served.values()) == total
