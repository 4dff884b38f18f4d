"""The audit consumer: every tenant's event stream into its audit chain, once, in order.

A consumer group :data:`GROUP` of :class:`aeterna_common.events.EventConsumer` over the
streams ``events:{tenant}`` (the event envelope contract), created from the start of each
stream (``0``), so a new group misses nothing still there. The events of one read of a
stream are appended in one transaction with :meth:`AuditLog.append_many` (each a no-op for
an event id the chain has; one by one with :meth:`AuditLog.append` after a failed batch) and
acknowledged only after their append committed, so a crash between the two re-delivers
them and the append makes that harmless: every event lands in the chain exactly once. A
failed append leaves the entry pending; after
:data:`~aeterna_common.events.consumer.DEFAULT_MAX_DELIVERIES` deliveries it goes to the
stream's dead-letter stream ``events:{tenant}:dead`` with the reason (as does at once an
entry that is not an envelope). The append's own retries of transient PostgreSQL errors
(:meth:`aeterna_common.db.Database.run`) come first, so a short outage costs no delivery.

Order: one replica consumes at a time, the holder of the lease :data:`LEASE` (two consumers
of one group would split a stream between them, and their appends could commit out of
stream order): :class:`aeterna_common.events.LeasedConsumer`, whose new holder, and holder
after a failed round or a failed append, first appends every pending entry of the group in
stream order, then reads new entries. A deposed holder still finishing an entry appends
nothing out of order: it and its successor both go in stream order, and the second append
of an event id is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis
from aeterna_common import leases
from aeterna_common.events import Event, EventConsumer, LeasedConsumer

from aeterna_governance.audit.chain import parse_envelope
from aeterna_governance.audit.log import AuditLog

GROUP = "governance-audit"
"""Consumer group of the audit log on every tenant's stream."""

LEASE = "governance:audit:consume"
"""Lease held by the one replica that consumes."""


class AuditConsumer:
    """Consumes the event streams into the audit log (see the module docstring).

    Args:
        redis: A client with ``decode_responses=True`` whose socket timeout exceeds
            ``block_s``.
        audit: The audit log.
        name: This consumer's name in the group (one per process).
        group: The consumer group.
        batch: Entries read or claimed per stream and round.
        block_s: Longest wait for new entries per round, in seconds.
        claim_idle_s: Idle time in seconds after which the holder delivers a pending entry
            again (an append that failed).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        audit: AuditLog,
        *,
        name: str | None = None,
        group: str = GROUP,
        batch: int = 100,
        block_s: float = 1.0,
        claim_idle_s: float = 5.0,
    ) -> None:
        self.audit = audit
        self.events = EventConsumer(
            redis,
            group,
            self.handle,
            batch_handler=self.handle_batch,
            consumer=name,
            start="0",
            block_s=block_s,
            count=batch,
            claim_idle_s=claim_idle_s,
        )
        self.leased = LeasedConsumer(self.events, LEASE)

    async def handle(self, event: Event) -> None:
        """Append one event to its tenant's chain (once: idempotent by ``event_id``).

        Raises:
            aeterna_governance.audit.chain.InvalidEventError: The envelope cannot be an
                audit entry (it is dead-lettered after the delivery limit).
            Exception: The append failed; the entry stays pending and this holder recovers
                the pending entries before reading on.
        """
        await self.audit.append(parse_envelope(event.to_fields()))

    async def handle_batch(self, events: Sequence[Event]) -> None:
        """Append one read's events to their tenants' chains in stream order, each once, one
        transaction per tenant (:meth:`AuditLog.append_many`).

        Raises:
            aeterna_governance.audit.chain.InvalidEventError: An envelope cannot be an
                audit entry (the consumer then appends the events one by one, and
                dead-letters that one after the delivery limit).
            Exception: The append failed (likewise).
        """
        await self.audit.append_many([parse_envelope(e.to_fields()) for e in events])

    async def step(self) -> int:
        """One round (:meth:`aeterna_common.events.LeasedConsumer.step`).

        Returns:
            Entries appended (or found already appended) and acknowledged.
        """
        return await self.leased.step()

    async def run(self, pool: asyncpg.Pool, *, ttl_s: float = leases.DEFAULT_TTL_S) -> None:
        """Consume while holding :data:`LEASE`, until cancelled.

        Args:
            pool: The application role's ``asyncpg.Pool`` (for the lease).
            ttl_s: The lease's time to live in seconds.
        """
        await self.leased.run(pool, ttl_s=ttl_s)
