"""gRPC-Web through the real gateway Envoy, as a browser sends it: hand-framed
``application/grpc-web+proto`` over HTTP/1.1 (httpx), a CORS preflight from an admitted and
a foreign origin, a unary call with and without a token, and the Subscribe stream receiving
a memory written meanwhile."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import resources_pb2 as sres
from aeterna.sync.v1 import sync_service_pb2 as ssvc
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack

TENANT = "gw"
ORIGIN = "http://localhost:5173"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-grpcweb-",
        replicas=1,
        governance_replicas=1,
        sync_replicas=1,
        env={"AETERNA_SYNC_KEEPALIVE_S": "2"},
    ) as s:
        yield s


def _token(stack: DevStack) -> str:
    return DevAuth(stack.root / "auth").issue_token(TENANT, "web", roles=("TENANT_ADMIN",))


def frame(message: bytes) -> bytes:
    """One gRPC-Web data frame: flag 0, big-endian 32-bit length, the message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class Frames:
    """Reads gRPC-Web frames from a response body: data messages, then the trailer frame
    (flag 0x80, ``name: value`` lines)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""
        self.trailers: dict[str, str] = {}

    async def _need(self, n: int) -> bool:
        while len(self.buffer) < n:
            try:
                self.buffer += await anext(self.chunks)
            except StopAsyncIteration:
                return False
        return True

    async def next(self) -> bytes | None:
        """The next message, or None after the trailer frame (or the end)."""
        if not await self._need(5):
            return None
        flag, length = self.buffer[0], struct.unpack(">I", self.buffer[1:5])[0]
        assert await self._need(5 + length), "truncated frame"
        body, self.buffer = self.buffer[5 : 5 + length], self.buffer[5 + length :]
        if flag & 0x80:
            for line in body.decode().split("\r\n"):
                if ":" in line:
                    k, v = line.split(":", 1)
                    self.trailers[k.strip().lower()] = v.strip()
            return None
        return body


def _headers(token: str | None) -> dict[str, str]:
    h = {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        "accept": "application/grpc-web+proto",
        "origin": ORIGIN,
    }
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return h


def _status(response: httpx.Response, frames: Frames) -> str:
    """grpc-status from the trailer frame, or from the headers of a trailers-only reply."""
    return frames.trailers.get("grpc-status") or response.headers.get("grpc-status", "")


async def test_cors_preflight_admits_configured_origins_only(stack: DevStack) -> None:
    url = f"http://{stack.endpoint}/aeterna.sync.v1.SyncService/Subscribe"
    ask = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web",
    }
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        ok = await client.options(url, headers={"origin": ORIGIN, **ask})
        foreign = await client.options(url, headers={"origin": "https://evil.example", **ask})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-grpc-web" in ok.headers["access-control-allow-headers"]
    assert "access-control-allow-origin" not in foreign.headers


async def test_unary_call_over_grpc_web(stack: DevStack) -> None:
    url = f"http://{stack.endpoint}/aeterna.memory.v1.MemoryService/CreateMemory"
    request = msvc.CreateMemoryRequest(
        parent=f"tenants/{TENANT}",
        memory=mres.Memory(
            layer=layer_pb2.MEMORY_LAYER_USER,
            scope=layer_pb2.Scope(user_id="web"),
            content="written from a browser",
        ),
    )
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        reply = await client.post(
            url, content=frame(request.SerializeToString()), headers=_headers(_token(stack))
        )
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/grpc-web")
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        frames = Frames(reply.aiter_bytes())
        body = await frames.next()
        assert body is not None
        assert await frames.next() is None
        assert _status(reply, frames) == "0"
        assert mres.Memory.FromString(body).content == "written from a browser"
        # Without a token the edge refuses it, as a gRPC-Web status a browser can read.
        refused = await client.post(
            url, content=frame(request.SerializeToString()), headers=_headers(None)
        )
        frames = Frames(refused.aiter_bytes())
        assert await frames.next() is None
        assert _status(refused, frames) == str(grpc.StatusCode.UNAUTHENTICATED.value[0])


async def test_subscribe_stream_over_grpc_web_receives_a_new_memory(stack: DevStack) -> None:
    token = _token(stack)
    url = f"http://{stack.endpoint}/aeterna.sync.v1.SyncService/Subscribe"
    request = ssvc.SubscribeRequest(parent=f"tenants/{TENANT}", rooms=["tenant"])
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(WAIT_S)) as client,
        client.stream(
            "POST", url, content=frame(request.SerializeToString()), headers=_headers(token)
        ) as reply,
    ):
        assert reply.status_code == 200
        frames = Frames(reply.aiter_bytes())
        first = await frames.next()
        assert first is not None, frames.trailers
        assert ssvc.SubscribeResponse.FromString(first).cursor  # live, with its cursor
        async with grpc.aio.insecure_channel(stack.endpoint) as ch:
            created = await msvc_grpc.MemoryServiceStub(ch).CreateMemory(
                msvc.CreateMemoryRequest(
                    parent=f"tenants/{TENANT}",
                    memory=mres.Memory(
                        layer=layer_pb2.MEMORY_LAYER_USER,
                        scope=layer_pb2.Scope(user_id="web"),
                        content="seen live by a browser",
                    ),
                ),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        # Keepalives (no event) come every 2 s in between.
        async with asyncio.timeout(WAIT_S):
            while True:
                body = await frames.next()
                assert body is not None, f"stream ended: {frames.trailers}"
                message = ssvc.SubscribeResponse.FromString(body)
                if message.event.resource == created.name:
                    assert message.event.type == sres.EVENT_TYPE_MEMORY_ADDED
                    break
