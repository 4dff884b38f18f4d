"""gRPC client setup for the CLI and benchmarks: a channel to Envoy with a bearer token.

Writes always carry a ``request_id`` (:func:`new_request_id`, or a stable id per item for
imports) and say so in metadata (:func:`write_metadata`), so the edge may retry them on any
transient failure without applying them twice. A write's response carries a consistency
token (:func:`call_with_token`); pass it to later reads (:func:`read_metadata`) to read your
own writes on any replica. A write refused by a tenant's rate limit (``RESOURCE_EXHAUSTED``
with ``RetryInfo``) is sent again after the delay it names (:func:`honour_retry_info`).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, ReadYourWrites
from aeterna_common.limits import CLIENT_OPTIONS as CLIENT_OPTIONS
from aeterna_common.telemetry import client_interceptors
from google.rpc import error_details_pb2
from grpc_status import rpc_status

REQUEST_ID_KEY = "x-aeterna-request-id"
"""Metadata that repeats a write's ``request_id`` so that the edge may retry it broadly."""

DEFAULT_ENDPOINT = "127.0.0.1:8080"

T = TypeVar("T")

if TYPE_CHECKING:
    # Only the generated .pyi knows the async stub type; at run time it is the same class.
    Stub: TypeAlias = svc_grpc.MemoryServiceAsyncStub
else:
    Stub = svc_grpc.MemoryServiceStub


def endpoint() -> str:
    """``$AETERNA_ENDPOINT`` or ``127.0.0.1:8080``."""
    return os.environ.get("AETERNA_ENDPOINT", DEFAULT_ENDPOINT)


def dev_token(
    tenant: str,
    user: str,
    agent: str | None = None,
    roles: Sequence[str] = (),
    ttl_s: float = 3600,
) -> str:
    """A development token signed with the local key (``.var/auth``), as ``make run`` trusts.

    Raises:
        RuntimeError: the ``aeterna-devstack`` package (``aeterna-cli[dev]``) is not installed.
    """
    try:
        from aeterna_devstack.auth import issue_token
    except ImportError as exc:
        raise RuntimeError(
            "no token: pass --token or set AETERNA_TOKEN (development tokens need the "
            "aeterna-devstack package: pip install 'aeterna-cli[dev]')"
        ) from exc
    return issue_token(tenant, user, agent, roles, ttl_s=ttl_s)


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the bearer token."""
    return (("authorization", f"Bearer {token}"),)


def new_request_id() -> str:
    """A fresh ``request_id`` for a write (a random UUID)."""
    return str(uuid.uuid4())


def write_metadata(token: str, request_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a write whose body carries ``request_id``: the bearer token and
    ``x-aeterna-request-id`` with the same value (the service refuses a mismatch).

    Raises:
        ValueError: ``request_id`` is empty.
    """
    if not request_id:
        raise ValueError("a write needs a request_id")
    return (*metadata(token), (REQUEST_ID_KEY, request_id))


def read_metadata(token: str, consistency_token: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata of a read: the bearer token and, when given, the consistency token of an
    earlier write (the read then sees that write on any replica, or fails UNAVAILABLE)."""
    md = metadata(token)
    return (*md, (CONSISTENCY_TOKEN_KEY, consistency_token)) if consistency_token else md


async def call_with_token(call: Any) -> tuple[Any, str | None]:
    """Await a unary call and return its response with the consistency token it carried.

    Args:
        call: A ``grpc.aio`` unary call, e.g. ``stub.CreateMemory(request, metadata=...)``.

    Returns:
        ``(response, token)``; the token is ``None`` for calls that send none (reads).
    """
    response = await call
    initial = await call.initial_metadata()
    token = next((str(v) for k, v in initial or () if k == CONSISTENCY_TOKEN_KEY), None)
    return response, token


def retry_delay_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The delay a ``RESOURCE_EXHAUSTED`` error asks for in its ``RetryInfo`` detail.

    Args:
        exc: A failed call.

    Returns:
        Seconds to wait before sending the request again, or ``None`` when ``exc`` is not a
        ``RESOURCE_EXHAUSTED`` with ``RetryInfo`` (e.g. a message over the size limit, which
        no retry can fix).
    """
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


async def honour_retry_info(
    call: Callable[[], Awaitable[T]],
    *,
    max_wait_s: float = 600.0,
    on_wait: Callable[[float], None] | None = None,
) -> T:
    """Run ``call``; while it is refused with ``RetryInfo``, wait the delay and run it again.

    For writes that carry a ``request_id`` (a retry is never applied twice). Each wait is the
    server's delay plus up to 20 % random jitter, so that clients refused together do not
    come back together (exponential backoff with jitter is for errors that name no delay).

    Args:
        call: Makes one attempt (a new call each time), e.g.
            ``lambda: stub.BatchCreateMemories(req, metadata=md, timeout=300)``.
        max_wait_s: Total seconds of waiting after which the refusal is raised.
        on_wait: Told each wait's seconds before it (progress displays, benchmarks).

    Returns:
        The first successful response.

    Raises:
        grpc.aio.AioRpcError: Any other failure, or the refusal once ``max_wait_s`` is spent.
    """
    waited = 0.0
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            delay = retry_delay_s(exc)
            if delay is None or waited + delay > max_wait_s:
                raise
            delay *= 1 + 0.2 * random.random()
            if on_wait is not None:
                on_wait(delay)
            await asyncio.sleep(delay)
            waited += delay


def channel(target: str | None = None, *, read_your_writes: bool = False) -> grpc.aio.Channel:
    """An aio channel to ``target`` (default :func:`endpoint`).

    The channel's message size limits are the server's, mirrored
    (:data:`aeterna_common.limits.CLIENT_OPTIONS`).

    Args:
        target: ``host:port``; default :func:`endpoint`.
        read_your_writes: Attach :class:`~aeterna_common.consistency.ReadYourWrites`: every
            call on the channel carries the consistency token of the channel's latest write,
            so its reads see its writes on any replica.

    Returns:
        The channel (close it).
    """
    interceptors: list[Any] = list(client_interceptors())
    if read_your_writes:
        interceptors.append(ReadYourWrites())
    return grpc.aio.insecure_channel(
        target or endpoint(),
        options=list(CLIENT_OPTIONS),
        interceptors=interceptors,
    )


def memory_stub(
    target: str | None = None, *, read_your_writes: bool = False
) -> tuple[grpc.aio.Channel, Stub]:
    """An aio channel (see :func:`channel`) and a MemoryService stub on it.

    Returns:
        The channel (close it) and the stub.
    """
    opened = channel(target, read_your_writes=read_your_writes)
    return opened, svc_grpc.MemoryServiceStub(opened)
