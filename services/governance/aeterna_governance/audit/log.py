"""The audit log in PostgreSQL: appends, listing, verification and checkpoints.

Appends of one tenant are serialised by a transaction-level advisory lock on
(:data:`AUDIT_LOCK_CLASS`, ``hashtext(tenant)``): under it the append looks the event id
up (a repeated event returns the entry it already has), reads the head and inserts the next
entry, so sequences have no gaps and no two entries share a predecessor. The UNIQUE
(tenant, event_id) constraint backs the lookup up. Tenants never wait for one another
(except on a hash collision of two tenant ids, which only serialises them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import cast

import asyncpg
from aeterna_common import leases
from aeterna_common.db import Database

from aeterna_governance.audit.chain import GENESIS_HASH, AuditRecord, Event, entry_hash
from aeterna_governance.audit.verify import Checkpoint, Verification, verify

AUDIT_LOCK_CLASS = 731_105
"""First key of the per-tenant append lock (the second is ``hashtext(tenant)``); 731104 is
the tenant binding's."""

VERIFY_FETCH = 1000
"""Entries fetched per round trip while verifying."""

_COLUMNS = (
    "tenant_id, sequence, event_id, event_type, service, resource, actor, event_time, "
    "append_time, payload, previous_hash, hash"
)


_INSERT = (
    f"INSERT INTO audit_entries ({_COLUMNS}) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)


def _values(
    event: Event, sequence: int, append_time: datetime, previous: str, digest: str
) -> tuple[object, ...]:
    """The parameters of :data:`_INSERT` for ``event`` as entry ``sequence``."""
    return (
        event.tenant,
        sequence,
        event.event_id,
        event.event_type,
        event.service,
        event.resource,
        event.actor,
        event.event_time,
        append_time,
        event.payload,
        previous,
        digest,
    )


def _record(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        tenant=row["tenant_id"],
        sequence=int(row["sequence"]),
        event_id=row["event_id"],
        event_type=row["event_type"],
        service=row["service"],
        resource=row["resource"],
        actor=row["actor"],
        event_time=row["event_time"],
        append_time=row["append_time"],
        payload=row["payload"],
        previous_hash=row["previous_hash"],
        hash=row["hash"],
    )


async def append_in(conn: asyncpg.Connection, event: Event) -> tuple[AuditRecord, bool]:
    """Append ``event`` to its tenant's chain in the caller's transaction, once.

    Args:
        conn: A connection in a transaction bound to ``event.tenant``.
        event: The event.

    Returns:
        The entry, and whether it was appended now (False: the event id was there already,
        and the existing entry is returned).
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))", AUDIT_LOCK_CLASS, event.tenant
    )
    existing = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = $1 AND event_id = $2",
        event.tenant,
        event.event_id,
    )
    if existing is not None:
        return _record(existing), False
    head = await conn.fetchrow(
        "SELECT sequence, hash FROM audit_entries WHERE tenant_id = $1 "
        "ORDER BY sequence DESC LIMIT 1",
        event.tenant,
    )
    sequence = int(head["sequence"]) + 1 if head else 1
    previous = head["hash"] if head else GENESIS_HASH
    append_time: datetime = await conn.fetchval("SELECT clock_timestamp()")
    digest = entry_hash(event, sequence, append_time, previous)
    row = await conn.fetchrow(
        f"{_INSERT} RETURNING {_COLUMNS}", *_values(event, sequence, append_time, previous, digest)
    )
    assert row is not None
    return _record(row), True


async def append_many_in(conn: asyncpg.Connection, events: Sequence[Event]) -> int:
    """Append ``events`` of one tenant to its chain in the caller's transaction, in order,
    each once: the effect of :func:`append_in` on each in turn, in six round trips
    whatever their number (one lock, one lookup, one head, one clock, one insert).

    Args:
        conn: A connection in a transaction bound to the events' tenant.
        events: Events of one tenant in the order their entries take; an event id already
            in the chain, or earlier in ``events``, is skipped.

    Returns:
        How many entries were appended now.

    Raises:
        ValueError: ``events`` span more than one tenant.
    """
    if not events:
        return 0
    tenant = events[0].tenant
    if any(e.tenant != tenant for e in events):
        raise ValueError("append_many_in takes the events of one tenant")
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", AUDIT_LOCK_CLASS, tenant)
    seen = {
        r["event_id"]
        for r in await conn.fetch(
            "SELECT event_id FROM audit_entries WHERE tenant_id = $1 AND event_id = ANY($2)",
            tenant,
            list({e.event_id for e in events}),
        )
    }
    fresh: list[Event] = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append(event)
    if not fresh:
        return 0
    head = await conn.fetchrow(
        "SELECT sequence, hash FROM audit_entries WHERE tenant_id = $1 "
        "ORDER BY sequence DESC LIMIT 1",
        tenant,
    )
    sequence = int(head["sequence"]) if head else 0
    previous = head["hash"] if head else GENESIS_HASH
    # One append time for the batch: entries appended in one transaction share it, as the
    # single appends' clock_timestamp() readings would within the transaction's span.
    append_time: datetime = await conn.fetchval("SELECT clock_timestamp()")
    rows: list[tuple[object, ...]] = []
    for event in fresh:
        sequence += 1
        digest = entry_hash(event, sequence, append_time, previous)
        rows.append(_values(event, sequence, append_time, previous, digest))
        previous = digest
    await conn.executemany(_INSERT, rows)
    return len(rows)


class AuditLog:
    """The tenants' audit chains.

    Args:
        db: The application role's pool (INSERT and SELECT on ``audit_entries``).
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def append(self, event: Event) -> tuple[AuditRecord, bool]:
        """Append ``event`` once (see :func:`append_in`), in its own tenant transaction.

        A retry after a transient error is safe: the event id makes it a no-op once
        committed.

        Returns:
            The entry and whether it was appended now.
        """

        async def work(conn: asyncpg.Connection) -> tuple[AuditRecord, bool]:
            return await append_in(conn, event)

        return await self.db.run(event.tenant, work)

    async def append_many(self, events: Sequence[Event]) -> int:
        """Append ``events`` in order, each once (see :func:`append_many_in`): one
        transaction per tenant, tenants in the order they first appear.

        Returns:
            How many entries were appended now.
        """
        by_tenant: dict[str, list[Event]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant, []).append(event)
        appended = 0
        for tenant, group in by_tenant.items():

            async def work(conn: asyncpg.Connection, group: list[Event] = group) -> int:
                return await append_many_in(conn, group)

            appended += await self.db.run(tenant, work)
        return appended

    async def page(
        self,
        tenant: str,
        *,
        after: int,
        limit: int,
        resource: str = "",
        actor: str = "",
    ) -> list[AuditRecord]:
        """Entries after sequence ``after`` in chain order, optionally filtered.

        Args:
            tenant: The tenant.
            after: Sequence to start after (0 from the start).
            limit: Most entries returned.
            resource: Only entries about this resource, when set.
            actor: Only entries caused by this actor, when set.
        """

        async def work(conn: asyncpg.Connection) -> list[AuditRecord]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = $1 AND sequence > $2 "
                "AND ($3 = '' OR resource = $3) AND ($4 = '' OR actor = $4) "
                "ORDER BY sequence LIMIT $5",
                tenant,
                after,
                resource,
                actor,
                limit,
            )
            return [_record(r) for r in rows]

        return await self.db.run(tenant, work, readonly=True)

    async def verify(self, tenant: str) -> Verification:
        """Recompute ``tenant``'s chain and compare it with its checkpoints.

        Checkpoints are read before the entries (both in one transaction), so every
        checkpoint read precedes the entries' snapshot.

        Returns:
            The outcome (:func:`aeterna_governance.audit.verify.verify`).
        """

        async def work(conn: asyncpg.Connection) -> Verification:
            marks = [
                Checkpoint(int(r["sequence"]), r["hash"], r["created_at"])
                for r in await conn.fetch(
                    "SELECT sequence, hash, created_at FROM audit_checkpoints WHERE tenant_id = $1",
                    tenant,
                )
            ]

            async def entries() -> AsyncIterator[AuditRecord]:
                async for row in conn.cursor(
                    f"SELECT {_COLUMNS} FROM audit_entries WHERE tenant_id = $1 ORDER BY sequence",
                    tenant,
                    prefetch=VERIFY_FETCH,
                ):
                    yield _record(row)

            return await verify(entries(), marks)

        return await self.db.run(tenant, work, readonly=True)

    async def checkpoint(self, lease: leases.Lease) -> int:
        """Record every tenant's chain head that moved since its last checkpoint.

        Runs the owner's ``audit_checkpoint_heads()`` in a transaction fenced by ``lease``
        (:func:`aeterna_common.leases.check`), so a deposed job holder records nothing.

        Returns:
            Checkpoints recorded.

        Raises:
            LeaseLostError: The lease is no longer held.
        """
        async with self.db.pool.acquire() as pooled, pooled.transaction():
            conn = cast(asyncpg.Connection, pooled)
            await leases.check(conn, lease)
            return int(await conn.fetchval("SELECT audit_checkpoint_heads()"))
