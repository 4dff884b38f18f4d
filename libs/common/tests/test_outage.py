"""Which unexpected exceptions count as a dependency outage (UNAVAILABLE) and which stay
INTERNAL."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from aeterna_common.embedding import EmbeddingError, EmbeddingUnavailableError
from aeterna_common.errors import outage
from aeterna_devstack.servers import free_port


async def test_refused_database_connection_is_database_unavailable() -> None:
    with pytest.raises(OSError) as info:
        await asyncpg.connect(f"postgresql://x@127.0.0.1:{free_port()}/x", timeout=5)
    down = outage(info.value)
    assert down is not None
    assert (down.code, down.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.CannotConnectNowError("starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    ],
)
def test_server_side_outages(exc: BaseException) -> None:
    down = outage(exc)
    assert down is not None and down.reason == "DATABASE_UNAVAILABLE"


def test_embedding_outage_also_as_a_cause() -> None:
    try:
        try:
            raise EmbeddingUnavailableError("connect refused")
        except EmbeddingUnavailableError as inner:
            raise RuntimeError("while preparing") from inner
    except RuntimeError as outer:
        down = outage(outer)
    assert down is not None and down.reason == "EMBEDDING_UNAVAILABLE"


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.UndefinedColumnError("no such column"),
        ConnectionRefusedError("not raised by the database driver"),
        EmbeddingError("vector of size 5, expected 3"),
        ValueError("a bug"),
    ],
)
def test_request_errors_and_bugs_are_not_outages(exc: BaseException) -> None:
    assert outage(exc) is None
