"""Transactions of a service with its own database: the outbox, idempotency keys and the write
runner (governance's and knowledge's; each service's migrations create the tables).

Every write is one tenant transaction (:meth:`aeterna_common.db.Database.run`) that changes
its rows and appends its outbox events (with the actor), so a change and its event commit
together or not at all. Outbox positions are drawn at the end of the transaction under an
advisory lock, so they become visible in commit order, as in memory's outbox
(``aeterna_memory.adapters.postgres``).

Idempotency follows memory's approach: a key is scoped to (tenant, principal, method,
request_id), claimed in the transaction of the write it protects and kept for
``ttl_s`` seconds; a concurrent call with the same key blocks on the key's primary key until
the first commits. Unlike memory, the key stores the first call's serialized response and
outbox position, so one runner serves every method. After a COMMIT that lost its
connection, the key tells whether the write committed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from google.protobuf.message import Message

from aeterna_common.db import Database
from aeterna_common.errors import FailedPrecondition
from aeterna_common.events import current_traceparent

M = TypeVar("M", bound=Message)

OUTBOX_LOCK = 7_311_000_002
"""Advisory lock serialising outbox position allocation (held until commit); the key of
memory's outbox, in each service's own database."""

IDEMPOTENCY_GC_BATCH = 1000
"""Expired idempotency keys deleted per transaction by :func:`gc_idempotency_keys`."""


def request_hash(request: Message) -> str:
    """Fingerprint of a request for its idempotency key: hex SHA-256 of its deterministic
    serialization with ``request_id`` cleared.

    Args:
        request: The request message.

    Returns:
        64 hex digits.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


async def append_event(
    conn: asyncpg.Connection,
    channel: str,
    tenant_id: str,
    event_type: str,
    resource: str,
    actor: str,
    payload: dict[str, Any] | None = None,
) -> int:
    """Append one outbox event in the caller's transaction and wake listeners (the relay).

    The row records the actor and the W3C trace context of the current span
    (:func:`~aeterna_common.events.current_traceparent`), for the event envelope.

    Args:
        conn: A connection inside the write's tenant transaction.
        channel: The service's LISTEN/NOTIFY channel, woken with the position.
        tenant_id: The tenant.
        event_type: Dotted type, e.g. ``governance.org_unit.created`` (envelope contract).
        resource: Resource name the event is about.
        actor: ``users/{u}``, ``users/{u}/agents/{a}`` or ``services/{name}``.
        payload: JSON object of the event (never content).

    Returns:
        The event's outbox position.
    """
    # Held until commit: positions are drawn, and become visible, in commit order.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK)
    position = await conn.fetchval(
        "INSERT INTO outbox (position, tenant_id, event_type, resource, actor, payload, "
        "traceparent) VALUES (nextval('outbox_position'), $1, $2, $3, $4, $5::jsonb, $6) "
        "RETURNING position",
        tenant_id,
        event_type,
        resource,
        actor,
        json.dumps(payload or {}),
        current_traceparent(),
    )
    await conn.execute("SELECT pg_notify($1, $2)", channel, str(position))
    return int(position)


async def latest_position(conn: asyncpg.Connection, tenant_id: str) -> int:
    """The tenant's latest outbox position (0 before its first change)."""
    value = await conn.fetchval(
        "SELECT position FROM outbox WHERE tenant_id = $1 ORDER BY position DESC LIMIT 1",
        tenant_id,
    )
    return int(value or 0)


@dataclass(frozen=True, slots=True)
class WriteKey:
    """An idempotency key: its scope, the client's ``request_id`` and the hash of the request.

    Attributes:
        tenant_id: The tenant.
        principal: The caller (``Principal.actor``).
        method: The RPC method name, e.g. ``CreateOrgUnit``.
        request_id: The client's key; empty means the write is not idempotent.
        request_hash: :func:`request_hash` of the request.
        ttl_s: Seconds the key counts.
    """

    tenant_id: str
    principal: str
    method: str
    request_id: str
    request_hash: str
    ttl_s: float


Work = Callable[[asyncpg.Connection], Awaitable[tuple[M, int]]]
"""A unit of write work: changes rows, appends outbox events, returns the resource and the
last outbox position."""


async def _replay(conn: asyncpg.Connection, key: WriteKey, kind: type[M]) -> tuple[M, int] | None:
    row = await conn.fetchrow(
        "SELECT request_hash, response, position FROM idempotency_keys WHERE tenant_id = $1 "
        "AND principal = $2 AND method = $3 AND request_id = $4 "
        "AND created_at >= clock_timestamp() - make_interval(secs => $5)",
        key.tenant_id,
        key.principal,
        key.method,
        key.request_id,
        key.ttl_s,
    )
    if row is None or row["response"] is None:
        return None
    if row["request_hash"] != key.request_hash:
        raise FailedPrecondition(
            "request_id was already used for a different request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": key.request_id},
        )
    return kind.FromString(row["response"]), int(row["position"])


async def _claim(conn: asyncpg.Connection, key: WriteKey) -> bool:
    """Claim ``key``; False when a live key exists (the caller replays it). An expired key is
    taken over as if it did not exist."""
    claimed = await conn.fetchval(
        "INSERT INTO idempotency_keys (tenant_id, principal, method, request_id, request_hash)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (tenant_id, principal, method, request_id) DO UPDATE SET"
        " request_hash = EXCLUDED.request_hash, response = NULL, position = NULL,"
        " created_at = clock_timestamp()"
        " WHERE idempotency_keys.created_at < clock_timestamp() - make_interval(secs => $6)"
        " RETURNING 1",
        key.tenant_id,
        key.principal,
        key.method,
        key.request_id,
        key.request_hash,
        key.ttl_s,
    )
    return bool(claimed)


async def run_write(db: Database, key: WriteKey, kind: type[M], work: Work[M]) -> tuple[M, int]:
    """Run a write once per idempotency key, in one tenant transaction with its outbox events.

    Without a ``request_id`` the work simply runs (a COMMIT that lost its connection is then
    ``UNAVAILABLE`` ``COMMIT_OUTCOME_UNKNOWN``). With one, a repeated call returns the first
    call's resource and position, and a COMMIT with an unknown outcome is resolved through
    the key.

    Args:
        db: The application role's pool.
        key: The idempotency key.
        kind: The response message type (to decode a replayed response).
        work: The unit of work.

    Returns:
        The resource and the outbox position of the commit (the consistency token's content).

    Raises:
        FailedPrecondition: The ``request_id`` was used for a different request (reason
            ``REQUEST_ID_REUSED``).
    """
    if not key.request_id:
        return await db.run(key.tenant_id, work)

    async def claimed_work(conn: asyncpg.Connection) -> tuple[M, int]:
        if not await _claim(conn, key):
            replay = await _replay(conn, key, kind)
            if replay is not None:
                return replay
        result, position = await work(conn)
        await conn.execute(
            "UPDATE idempotency_keys SET response = $5, position = $6 WHERE tenant_id = $1 "
            "AND principal = $2 AND method = $3 AND request_id = $4",
            key.tenant_id,
            key.principal,
            key.method,
            key.request_id,
            result.SerializeToString(deterministic=True),
            position,
        )
        return result, position

    async def resolve(conn: asyncpg.Connection) -> tuple[M, int] | None:
        return await _replay(conn, key, kind)

    return await db.run(key.tenant_id, claimed_work, resolve=resolve)


async def gc_idempotency_keys(db: Database, ttl_s: float, batch: int = IDEMPOTENCY_GC_BATCH) -> int:
    """Delete expired idempotency keys of every tenant, ``batch`` rows per transaction.

    Runs the owner's ``gc_idempotency_keys`` function (SECURITY DEFINER), which deletes only
    keys older than ``max(ttl_s, 1 hour)``.

    Returns:
        Keys deleted.
    """
    total = 0
    while True:
        async with db.pool.acquire() as conn:
            deleted = int(await conn.fetchval("SELECT gc_idempotency_keys($1, $2)", ttl_s, batch))
        total += deleted
        if deleted < batch:
            return total
