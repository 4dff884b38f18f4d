"""Envoy in front of two gRPC backends: JWT at the edge, token forwarding, surviving a kill.

The backends are this file run as a script (``python test_envoy.py PORT NAME``) so that one can
be killed with SIGKILL, like a crashed replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    CHART_ACCESS_LOG,
    CHART_JWKS_PATH,
    CHART_TLS_CERT,
    CHART_TLS_KEY,
    CONTRACT_HEADERS,
    DEV_CORS_ORIGINS,
    LOCAL_CLUSTER,
    RETRY_ON,
    RETRY_ON_WRITE,
    SERVICES,
    STRIPPED_HEADERS,
    TRACING_CLUSTER,
    EnvoyProcess,
    JwtSettings,
    MethodClass,
    TracingSettings,
    Upstream,
    chart_config_paths,
    chart_values_refs,
    example_chart_values,
    instantiate_chart_config,
    render_chart_configs,
    render_gateway_config,
    render_sidecar_config,
    service_upstreams,
    transcoder_descriptor_set,
    validate_chart_config,
    validate_config,
)
from aeterna_devstack.servers import free_port  # noqa: E402
from aeterna_devstack.stack import render_stack_envoy_config  # noqa: E402

ECHO_CLASS = (("Echo", MethodClass.READ),)
"""Echo changes nothing: it takes the broad retry policy, as reads do."""


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


@dataclass
class Backends:
    state: Path
    ports: list[int]
    procs: dict[str, subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """Two echo backends, ``b0`` and ``b1``; the last test of this module kills ``b1``."""
    state = tmp_path_factory.mktemp("envoy")
    ports = [free_port(), free_port()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for i, port in enumerate(ports):
            with (state / f"backend{i}.log").open("wb") as log:
                procs[f"b{i}"] = subprocess.Popen(
                    [sys.executable, __file__, str(port), f"b{i}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        for port, proc in zip(ports, procs.values(), strict=True):
            _wait_port(port, proc)
        yield Backends(state, ports, procs)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(backends: Backends) -> Iterator[Stack]:
    auth = DevAuth(backends.state / "auth")
    other_auth = DevAuth(backends.state / "other-auth")
    config = render_gateway_config(
        [Upstream(TEST_SERVICE, "echo", [("127.0.0.1", p) for p in backends.ports], ECHO_CLASS)],
        listen_port=free_port(),
        admin_port=free_port(),
        jwt=JwtSettings(jwks_path=auth.jwks_path),
    )
    envoy = EnvoyProcess(config, state_dir=backends.state / "envoy").start()
    print(f"envoy start-to-ready: {envoy.startup_seconds:.2f} s")
    try:
        yield Stack(envoy, auth, other_auth, backends.procs)
    finally:
        envoy.stop()


async def _echo(
    stack: Stack,
    token: str | None,
    extra: tuple[tuple[str, str], ...] = (),
    address: str | None = None,
) -> dict[str, Any]:
    metadata = list(extra)
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    async with grpc.aio.insecure_channel(address or stack.envoy.address) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
        reply = await echo(b"", metadata=metadata, timeout=10)
    result: dict[str, Any] = json.loads(reply)
    return result


def _hcm(config: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    chain = config["static_resources"]["listeners"][listener]["filter_chains"][0]
    hcm: dict[str, Any] = chain["filters"][0]["typed_config"]
    return hcm


def _filters(config: dict[str, Any], listener: int = 0) -> list[str]:
    return [f["name"] for f in _hcm(config, listener)["http_filters"]]


def _routes(config: dict[str, Any], listener: int = 0) -> dict[str, str]:
    """Prefix routes (packages and public paths) → cluster."""
    routes = _hcm(config, listener)["route_config"]["virtual_hosts"][0]["routes"]
    return {r["match"]["prefix"]: r["route"]["cluster"] for r in routes if "prefix" in r["match"]}


def _retry_on(config: dict[str, Any], listener: int = 0) -> dict[str, str]:
    """Route (``path``, ``path [header]`` or prefix) → its retry conditions."""
    out = {}
    for r in _hcm(config, listener)["route_config"]["virtual_hosts"][0]["routes"]:
        match = r["match"]
        key = match.get("path") or match["prefix"]
        if match.get("headers"):
            key += " [" + ",".join(h["name"] for h in match["headers"]) + "]"
        out[key] = r["route"]["retry_policy"]["retry_on"]
    return out


def test_retry_policy_follows_the_method_class() -> None:
    config = render_gateway_config(service_upstreams({"memory": [("127.0.0.1", 50051)]}))
    retry_on = _retry_on(config)
    m = "/aeterna.memory.v1.MemoryService/"
    broad, narrow = (
        "unavailable,reset,connect-failure,refused-stream",
        "connect-failure,refused-stream",
    )
    assert (RETRY_ON, RETRY_ON_WRITE) == (broad, narrow)
    for read in ("GetMemory", "ListMemories", "SearchMemories", "ListMemoryRevisions"):
        assert retry_on[m + read] == broad
    assert retry_on[m + "DeleteMemory"] == broad  # deleting twice changes nothing more
    for write in ("CreateMemory", "BatchCreateMemories", "RecordMemoryFeedback"):
        assert retry_on[f"{m}{write} [x-aeterna-request-id]"] == broad
        assert m + write not in retry_on  # without the header: the package's narrow policy
    assert m + "UpdateMemory" not in retry_on
    assert retry_on["/aeterna.memory.v1."] == narrow
    # The package route comes last, after every method route.
    assert list(retry_on)[-1] == "/aeterna.memory.v1."
    assert all("resource-exhausted" not in v for v in retry_on.values())
    for cluster in config["static_resources"]["clusters"]:
        for threshold in cluster["circuit_breakers"]["thresholds"]:
            assert threshold["retry_budget"]["budget_percent"]["value"] == 20.0
            assert threshold["retry_budget"]["min_retry_concurrency"] >= 3
            assert "max_retries" not in threshold
    # The sidecar's egress routes take the same table.
    sidecar = render_sidecar_config(
        service_upstreams({"memory": [("memory-headless", 8080)]}),
        jwt=JwtSettings(jwks_json="{}"),
    )
    assert _retry_on(sidecar, 1) == {
        k: v for k, v in retry_on.items() if not k.startswith("/grpc.")
    }


def test_contract_headers_survive_the_strip_and_nothing_else_does() -> None:
    pattern = re.compile(STRIPPED_HEADERS)
    for kept in CONTRACT_HEADERS:
        assert not pattern.fullmatch(kept)
    for dropped in (
        "x-aeterna-tenant",
        "x-aeterna-",
        "x-aeterna-consistency-tokens",
        "x-aeterna-consistency-toke",
        "x-aeterna-request-i",
        "x-aeterna-request-idx",
        "x-aeterna-c",
        "x-aeterna-roles",
    ):
        assert pattern.fullmatch(dropped), dropped
    assert not pattern.fullmatch("authorization")


def test_gateway_config_passes_envoy_validate(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path)
    config = render_gateway_config(
        [
            ("aeterna.memory.v1.MemoryService", "memory", [("127.0.0.1", 50051)]),
            ("aeterna.sync.v1.SyncService", "sync", [("localhost", 50052), ("localhost", 50053)]),
        ],
        jwt=JwtSettings(jwks_json=auth.jwks_json()),
    )
    validate_config(config)
    assert _filters(config) == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    # No origins configured: no CORS filter, no policy.
    assert "typed_per_filter_config" not in _hcm(config)["route_config"]["virtual_hosts"][0]
    # A whole package per service, so that every service of aeterna.<domain>.v1 is routed.
    assert _routes(config) == {
        "/grpc.health.v1.Health/": "memory",
        "/grpc.reflection.v1alpha.ServerReflection/": "memory",
        "/grpc.reflection.v1.ServerReflection/": "memory",
        "/aeterna.memory.v1.": "memory",
        "/aeterna.sync.v1.": "sync",
    }
    transcoder = _filter(config, "envoy.filters.http.grpc_json_transcoder")
    # The services of the routed upstreams are transcoded.
    assert transcoder["services"] == [
        "aeterna.memory.v1.MemoryService",
        "aeterna.sync.v1.SyncService",
    ]
    assert transcoder["request_validation_options"]["reject_unknown_method"] is True


def test_gateway_config_rejects_bad_upstreams() -> None:
    memory = ("aeterna.memory.v1.MemoryService", "memory", [("127.0.0.1", 1)])
    with pytest.raises(ValueError, match="at least one upstream"):
        render_gateway_config([])
    with pytest.raises(ValueError, match="no endpoints"):
        render_gateway_config([("aeterna.memory.v1.MemoryService", "memory", [])])
    with pytest.raises(ValueError, match="unique"):
        render_gateway_config([memory, ("aeterna.memory.v1.Other", "other", [("h", 1)])])
    with pytest.raises(ValueError, match="unknown health_cluster"):
        render_gateway_config([memory], health_cluster="nope")
    with pytest.raises(ValueError, match="unknown service domain"):
        service_upstreams({"memroy": [("127.0.0.1", 1)]})
    with pytest.raises(ValueError, match="reserved"):
        render_sidecar_config(
            [("aeterna.memory.v1.MemoryService", LOCAL_CLUSTER, [("h", 1)])],
            jwt=JwtSettings(jwks_json="{}"),
        )


def test_known_services_have_upstreams_and_descriptors() -> None:
    ups = service_upstreams({s.domain: [("127.0.0.1", 50051)] for s in SERVICES})
    assert [u.cluster for u in ups] == [s.cluster for s in SERVICES]
    assert all(u.package == s.package for u, s in zip(ups, SERVICES, strict=True))
    # Every known service and the error details are in the transcoder's descriptor set.
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(transcoder_descriptor_set()).file
    services = {f"{f.package}.{svc.name}" for f in files for svc in f.service}
    assert {s.service for s in SERVICES} <= services
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= {f.name for f in files}
    memory = next(f for f in files if f.name == "aeterna/memory/v1/memory_service.proto")
    assert memory.HasField("source_code_info")  # --include_source_info


def test_sidecar_config_passes_envoy_validate(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path)
    config = render_sidecar_config(
        service_upstreams({"memory": [("memory-headless", 8080)]}),
        jwt=JwtSettings(jwks_path=auth.jwks_path),
    )
    validate_config(config)
    inbound, egress = config["static_resources"]["listeners"]
    assert inbound["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert egress["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15001}
    assert _filters(config, 0) == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.router",
    ]
    # The sidecar verifies the token the gateway forwards; no claim becomes a header.
    provider = _hcm(config, 0)["http_filters"][1]["typed_config"]["providers"]["aeterna"]
    assert provider["forward"] is True and provider["require_expiration"] is True
    assert "claim_to_headers" not in provider
    assert _routes(config, 0) == {"/": LOCAL_CLUSTER}
    # Egress: no token check (callers send their own), the gateway's retries per package.
    assert _filters(config, 1) == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.router",
    ]
    assert _routes(config, 1) == {"/aeterna.memory.v1.": "memory"}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    local = clusters[LOCAL_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert local["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 50051,
    }
    gateway = render_gateway_config(service_upstreams({"memory": [("memory-headless", 8080)]}))
    gateway_memory = gateway["static_resources"]["clusters"][0]
    assert clusters["memory"] == gateway_memory  # same health checks, outlier detection, LB
    egress_routes = _hcm(config, 1)["route_config"]["virtual_hosts"][0]["routes"]
    gateway_routes = _hcm(gateway)["route_config"]["virtual_hosts"][0]["routes"]
    # The same routes and retry policies, per method class, after the gateway's public paths.
    assert egress_routes == gateway_routes[-len(egress_routes) :]


def test_stack_config_passes_envoy_validate(tmp_path: Path) -> None:
    config = render_stack_envoy_config(
        [50051, 50052], port=8080, admin_port=9901, jwks_path=DevAuth(tmp_path).jwks_path
    )
    validate_config(config)
    assert _routes(config)["/aeterna.memory.v1."] == "memory"


REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("relative", chart_config_paths())
def test_chart_config_passes_envoy_validate(relative: str) -> None:
    # The committed file, as the chart ships it; make check-gen keeps it fresh.
    text = (REPO / relative).read_text()
    validate_chart_config(text)
    clusters = sorted(s.cluster for s in SERVICES)
    refs = chart_values_refs(text)
    if relative.startswith("charts/gateway/"):
        assert refs == [
            "auth.audience",
            "auth.issuer",
            "cors.allowOriginRegex",
            "tracing.collectorHost",
            *(f"upstreams.{c}.host" for c in clusters),
        ]
    else:
        assert refs == [
            "auth.audience",
            "auth.issuer",
            *(f"sidecar.upstreams.{c}.host" for c in clusters),
        ]
    config = instantiate_chart_config(text, example_chart_values())
    assert CHART_JWKS_PATH in json.dumps(config)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    assert _hcm(config)["access_log"][0]["typed_config"]["path"] == CHART_ACCESS_LOG
    tls = listener["filter_chains"][0].get("transport_socket")
    if relative.endswith("envoy-tls.json"):
        context = tls["typed_config"]["common_tls_context"]
        assert context["alpn_protocols"] == ["h2", "http/1.1"]
        assert context["tls_certificates"] == [
            {
                "certificate_chain": {"filename": CHART_TLS_CERT},
                "private_key": {"filename": CHART_TLS_KEY},
            }
        ]
    else:
        assert tls is None


def test_chart_configs_cover_every_known_service() -> None:
    configs = render_chart_configs()
    assert sorted(configs) == chart_config_paths()
    assert {f"charts/{s.cluster}/files/envoy-sidecar.json" for s in SERVICES} <= set(configs)
    gateway = configs["charts/gateway/files/envoy.json"]
    assert {f"/{s.package}." for s in SERVICES} <= set(_routes(gateway))
    transcoder = _filter(gateway, "envoy.filters.http.grpc_json_transcoder")
    # Every service of each package is transcoded (governance serves several on one server).
    assert transcoder["services"] == [n for s in SERVICES for n in (s.service, *s.more_services)]
    # Methods of a package's other services are classed by their own paths.
    retry = _retry_on(gateway)
    read = retry["/aeterna.governance.v1.ApprovalService/GetApprovalRequest"]
    assert read == retry["/aeterna.governance.v1.OrganizationService/GetOrgUnit"]
    assert read != retry["/aeterna.governance.v1."]


def test_chart_placeholders_are_checked() -> None:
    text = json.dumps({"a": "{{ .Values.auth.issuer }}", "b": "x-{{ .Values.n }}"})
    filled = instantiate_chart_config(text, {"auth": {"issuer": 'say "hi"'}, "n": 3})
    assert filled == {"a": 'say "hi"', "b": "x-3"}
    assert instantiate_chart_config('{"p": "/etc/f"}', {}, {"/etc/f": "/tmp/f"}) == {"p": "/tmp/f"}
    with pytest.raises(ValueError, match="no value for"):
        instantiate_chart_config(text, {"auth": {}})
    with pytest.raises(ValueError, match="not a scalar"):
        instantiate_chart_config(text, {"auth": {"issuer": {"x": 1}}, "n": 1})
    with pytest.raises(ValueError, match="not JSON"):
        instantiate_chart_config('{"port": {{ .Values.port }}}', {"port": 1})
    with pytest.raises(ValueError, match="unsupported template expression"):
        instantiate_chart_config('{"a": "{{ .Values.x | quote }}"}', {"x": 1})


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


async def test_contract_headers_reach_the_service(stack: Stack) -> None:
    sent = (
        ("x-aeterna-consistency-token", "AQAAAAAAAAAq"),
        ("x-aeterna-request-id", "r-1"),
        ("x-aeterna-tenant", "evil"),
    )
    reply = await _echo(stack, stack.token(), sent)
    assert reply["aeterna"] == {
        "x-aeterna-consistency-token": "AQAAAAAAAAAq",
        "x-aeterna-request-id": "r-1",
    }


@dataclass
class Sidecar:
    envoy: EnvoyProcess
    egress: str


@pytest.fixture(scope="module")
def sidecar(backends: Backends, stack: Stack) -> Iterator[Sidecar]:
    """A sidecar whose local service is ``b0`` and whose egress reaches both backends."""
    egress_port = free_port()
    config = render_sidecar_config(
        [Upstream(TEST_SERVICE, "echo", [("127.0.0.1", p) for p in backends.ports], ECHO_CLASS)],
        jwt=JwtSettings(jwks_path=stack.auth.jwks_path),
        inbound_host="127.0.0.1",
        inbound_port=free_port(),
        local_port=backends.ports[0],
        egress_port=egress_port,
        admin_port=free_port(),
    )
    envoy = EnvoyProcess(config, state_dir=backends.state / "sidecar").start()
    try:
        yield Sidecar(envoy, f"127.0.0.1:{egress_port}")
    finally:
        envoy.stop()


async def test_sidecar_inbound_checks_the_token_and_serves_the_local_service(
    stack: Stack, sidecar: Sidecar
) -> None:
    inbound = sidecar.envoy.address
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _echo(stack, None, address=inbound)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _echo(stack, stack.token(audience="another-api"), address=inbound)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(inbound) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=TEST_SERVICE), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    spoofed = (("x-aeterna-tenant", "evil"),)
    replies = [await _echo(stack, stack.token(), spoofed, address=inbound) for _ in range(6)]
    assert {r["backend"] for r in replies} == {"b0"}  # only the pod's own service
    assert all(r["aeterna"].get("x-aeterna-tenant") != "evil" for r in replies)


async def test_sidecar_egress_balances_over_replicas_without_a_token_check(
    stack: Stack, sidecar: Sidecar
) -> None:
    spoofed = (("x-aeterna-user", "mallory"),)
    replies = [await _echo(stack, None, spoofed, address=sidecar.egress) for _ in range(8)]
    assert {r["backend"] for r in replies} == {"b0", "b1"}  # L7 round robin over replicas
    assert all(r["aeterna"] == {} for r in replies)  # identity headers never leave the pod
    # The caller's own token travels to the callee's sidecar, which verifies it.
    token = stack.token()
    reply = await _echo(stack, token, address=sidecar.egress)
    assert reply["authorization"] == f"Bearer {token}"
    async with grpc.aio.insecure_channel(sidecar.egress) as channel:
        unknown: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/aeterna.unknown.v1.Nothing/Call"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await unknown(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no route: HTTP 404


@pytest.fixture(scope="module")
def gateway_to_sidecar(
    backends: Backends, stack: Stack, sidecar: Sidecar
) -> Iterator[EnvoyProcess]:
    """The Kubernetes shape: the gateway's upstream is a pod's sidecar, not the service."""
    config = render_gateway_config(
        [(TEST_SERVICE, "echo", [("127.0.0.1", sidecar.envoy.listen_port)])],
        listen_port=free_port(),
        admin_port=free_port(),
        jwt=JwtSettings(jwks_path=stack.auth.jwks_path),
    )
    # start() waits until the gateway's health checks pass through the sidecar.
    envoy = EnvoyProcess(config, state_dir=backends.state / "gateway-to-sidecar").start()
    try:
        yield envoy
    finally:
        envoy.stop()


async def test_gateway_health_checks_pass_through_a_pod_sidecar(
    gateway_to_sidecar: EnvoyProcess,
) -> None:
    async with grpc.aio.insecure_channel(gateway_to_sidecar.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=TEST_SERVICE), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert gateway_to_sidecar.unhealthy_hosts() == []


async def test_a_call_passes_the_gateway_and_the_pod_sidecar(
    stack: Stack, gateway_to_sidecar: EnvoyProcess
) -> None:
    # The sidecar verifies the token again: the gateway forwards it (jwt_authn forward: true).
    reply = await _echo(stack, stack.token(), address=gateway_to_sidecar.address)
    assert reply["backend"] == "b0"


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


def test_transcoder_bodies_are_bounded_like_grpc_messages() -> None:
    from aeterna_common.limits import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES

    config = render_gateway_config(service_upstreams({"memory": [("127.0.0.1", 50051)]}))
    (transcoder,) = [
        f["typed_config"]
        for f in _hcm(config)["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert transcoder["max_request_body_size"] == MAX_REQUEST_BYTES
    # JSON is larger than the protobuf it stands for.
    assert transcoder["max_response_body_size"] == 2 * MAX_RESPONSE_BYTES


def test_the_gateway_traces_with_opentelemetry_to_the_collector() -> None:
    config = render_gateway_config(
        [Upstream("test.v1.Echo", "echo", [("127.0.0.1", 50051)], methods=ECHO_CLASS)],
        tracing=TracingSettings("127.0.0.1", 4317, sampling_percent=25.0, flush_interval_ms=500),
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    tracer = hcm["tracing"]["provider"]
    assert tracer["name"] == "envoy.tracers.opentelemetry"
    assert tracer["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == TRACING_CLUSTER
    assert tracer["typed_config"]["service_name"] == "aeterna-gateway"
    assert hcm["tracing"]["random_sampling"] == {"value": 25.0}
    (collector,) = [
        c for c in config["static_resources"]["clusters"] if c["name"] == TRACING_CLUSTER
    ]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4317}
    runtime = config["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["tracing.opentelemetry.flush_interval_ms"] == 500
    validate_config(config)
    untraced = render_gateway_config(
        [Upstream("test.v1.Echo", "echo", [("127.0.0.1", 50051)], methods=ECHO_CLASS)]
    )
    assert "tracing" not in json.dumps(untraced["static_resources"]["listeners"])


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``typed_config`` of the ingress HTTP filter ``name``."""
    found: dict[str, Any] = next(
        f["typed_config"] for f in _hcm(config)["http_filters"] if f["name"] == name
    )
    return found


def test_gateway_admits_browsers_of_configured_origins(tmp_path: Path) -> None:
    auth = DevAuth(tmp_path)
    config = render_gateway_config(
        service_upstreams({"sync": [("127.0.0.1", 50051)]}),
        jwt=JwtSettings(jwks_json=auth.jwks_json()),
        cors_origins=DEV_CORS_ORIGINS,
    )
    validate_config(config)
    # CORS answers a preflight (no token) before jwt_authn; gRPC-Web before jwt_authn too,
    # so its refusals reach a browser as gRPC-Web.
    assert _filters(config)[:4] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.jwt_authn",
    ]
    host = _hcm(config)["route_config"]["virtual_hosts"][0]
    policy = host["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert policy["allow_origin_string_match"] == [{"safe_regex": {"regex": DEV_CORS_ORIGINS[0]}}]
    assert "x-grpc-web" in policy["allow_headers"].split(",")
    assert "grpc-status" in policy["expose_headers"].split(",")
    assert "allow_credentials" not in policy
