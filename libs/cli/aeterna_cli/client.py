"""gRPC client setup for the CLI and benchmarks: a channel to Envoy with a bearer token."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import grpc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_common.limits import CLIENT_OPTIONS as CLIENT_OPTIONS
from aeterna_common.telemetry import client_interceptors

DEFAULT_ENDPOINT = "127.0.0.1:8080"

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


def memory_stub(
    target: str | None = None,
) -> tuple[grpc.aio.Channel, Stub]:
    """An aio channel to ``target`` (default :func:`endpoint`) and a MemoryService stub.

    The channel's message size limits are the server's, mirrored
    (:data:`aeterna_common.limits.CLIENT_OPTIONS`).
    """
    channel = grpc.aio.insecure_channel(
        target or endpoint(),
        options=list(CLIENT_OPTIONS),
        interceptors=client_interceptors(),
    )
    return channel, svc_grpc.MemoryServiceStub(channel)
