"""pytest fixtures shared by every service's tests (``pytest_plugins``).

They start real servers from the installed binaries (see :mod:`aeterna_devstack.servers`):
a throwaway PostgreSQL cluster and a Redis server per test session. Each service's tests get
their own database with the three roles of production: an owner, an application role and an
indexer role (both ``NOSUPERUSER NOBYPASSRLS``), so row-level security is exercised exactly as
in production. Services under test verify real
tokens: :func:`session_auth` is one development key per test process, and
:func:`auth_settings` the ``CommonSettings`` fields that make a service trust it.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from aeterna_common.db import provision

from aeterna_devstack.auth import DEFAULT_AUDIENCE, DEFAULT_ISSUER, DevAuth
from aeterna_devstack.servers import PostgresServer, RedisServer, scratch_dir

T = TypeVar("T")


async def while_aborted(call: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
    """``call()`` again every 0.2 s while it fails with ``ABORTED`` (a conflict that a retry of
    the whole call resolves, https://google.aip.dev/194), for up to ``timeout_s`` seconds.

    Raises:
        grpc.aio.AioRpcError: Any other code, or ``ABORTED`` past the deadline.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


@functools.cache
def session_auth() -> DevAuth:
    """The test process's development key (in a fresh temporary directory), created once.

    Plain function as well as the :func:`dev_auth` fixture, so that test helpers can sign
    tokens without a fixture argument.
    """
    return DevAuth(tempfile.mkdtemp(prefix="aeterna-auth-"))


def auth_settings(auth: DevAuth | None = None) -> dict[str, Any]:
    """``CommonSettings`` fields that make a service trust ``auth``'s key (default
    :func:`session_auth`): JWKS file, issuer and audience."""
    auth = auth or session_auth()
    return {
        "auth_jwks_file": auth.jwks_path,
        "auth_issuer": DEFAULT_ISSUER,
        "auth_audience": DEFAULT_AUDIENCE,
    }


@pytest.fixture(scope="session")
def dev_auth() -> DevAuth:
    """The session's development key: sign tokens with ``dev_auth.issue_token(...)``."""
    return session_auth()


@dataclass(frozen=True)
class DatabaseUrls:
    """DSNs of one provisioned test database.

    Attributes:
        superuser: The cluster's superuser on this database.
        owner: The schema owner (applies migrations).
        app: The application role (row-level security applies).
        indexer: The indexer role (SELECT across tenants on what index maintenance reads).
    """

    superuser: str
    owner: str
    app: str
    indexer: str


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the whole test session."""
    server = PostgresServer(str(scratch_dir("aeterna-pg-") / "data")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis server for the whole test session."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def make_database(pg_server: PostgresServer) -> AsyncIterator[object]:
    """A factory of fresh databases: ``await make_database()`` → :class:`DatabaseUrls`."""

    async def factory() -> DatabaseUrls:
        name = f"t_{uuid.uuid4().hex[:12]}"
        await provision(pg_server.dsn(), name, "aeterna_owner", "aeterna_app", "aeterna_indexer")
        return DatabaseUrls(
            superuser=pg_server.dsn("postgres", name),
            owner=pg_server.dsn("aeterna_owner", name),
            app=pg_server.dsn("aeterna_app", name),
            indexer=pg_server.dsn("aeterna_indexer", name),
        )

    yield factory
