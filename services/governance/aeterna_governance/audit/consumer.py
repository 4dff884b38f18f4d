"""The audit consumer: every tenant's event stream into its audit chain, once, in order.

Reads the streams ``events:{tenant}`` listed in the Redis SET ``events:streams`` (the event
envelope contract) with the consumer group :data:`GROUP`, with plain redis-py
``XREADGROUP``. Each entry is appended with :meth:`AuditLog.append` (a no-op for an event id
the chain has) and acknowledged (``XACK``) only after its append committed, so a crash
between the two re-delivers it and the append makes that harmless: every event lands in the
chain exactly once.

Order: one replica consumes at a time, the holder of the lease :data:`LEASE` (two consumers
of one group would split a stream between them, and their appends could commit out of
stream order). A new holder first takes over every pending entry of the group
(``XAUTOCLAIM`` from ``0-0``: the previous holder crashed or was deposed before acking them)
and appends them in stream order, then reads new entries (``>``). Within a stream, entries are
processed one after the other and a failure stops the stream's batch and makes the holder
recover again before reading on, so nothing after a failed entry is appended before it. A
deposed holder still finishing an entry appends nothing new: it and its successor both go in
stream order, and the second append of an event id is a no-op.

An entry that can never become an audit entry (:class:`InvalidEventError`) is copied to the
stream's dead-letter stream ``events:{tenant}:dead`` with the reason and acknowledged.
Anything else (PostgreSQL down) leaves the entry pending for the next round.

This loop stands in for ``aeterna_common.events.EventConsumer``; only :meth:`handle` is
specific to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import cast

import asyncpg
import redis.asyncio as aioredis
import structlog
from aeterna_common import leases
from redis.exceptions import RedisError, ResponseError

from aeterna_governance.audit.chain import InvalidEventError, parse_envelope
from aeterna_governance.audit.log import AuditLog

log = structlog.get_logger("aeterna.governance.audit")

GROUP = "governance-audit"
"""Consumer group of the audit log on every tenant's stream."""

REGISTRY = "events:streams"
"""Redis SET of the stream keys (the envelope contract)."""

LEASE = "governance:audit:consume"
"""Lease held by the one replica that consumes."""

STREAM_KEY = re.compile(r"events:([A-Za-z0-9_-]{1,100})")
"""A tenant's stream key; the tenant id is the envelope's ``tenant`` too."""

Entry = tuple[str, Mapping[str, str]]


class AuditConsumer:
    """Consumes the event streams into the audit log (see the module docstring).

    Args:
        redis: A client with ``decode_responses=True``.
        audit: The audit log.
        name: This consumer's name in the group (one per process).
        registry: The SET of stream keys.
        group: The consumer group.
        batch: Entries read per stream and round.
        block_ms: Longest wait for new entries per round, in milliseconds.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        audit: AuditLog,
        *,
        name: str | None = None,
        registry: str = REGISTRY,
        group: str = GROUP,
        batch: int = 100,
        block_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.audit = audit
        self.name = name or leases.new_owner_id()
        self.registry = registry
        self.group = group
        self.batch = batch
        self.block_ms = block_ms
        self._grouped: set[str] = set()
        self._recovered: set[str] = set()

    async def streams(self) -> list[str]:
        """The registered tenant streams, each with the group created (from the start of the
        stream, so a new group misses nothing already there)."""
        members = await self.redis.smembers(self.registry)
        keys = sorted(str(k) for k in members if STREAM_KEY.fullmatch(str(k)))
        for key in keys:
            if key in self._grouped:
                continue
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(key, self.group, id="0", mkstream=True)
            self._grouped.add(key)
        return keys

    async def handle(self, stream: str, entry_id: str, fields: Mapping[str, str]) -> None:
        """Append one entry to the audit log, or dead-letter it; then acknowledge it.

        Raises:
            Exception: The append failed for a reason that may pass (the entry stays
                pending).
        """
        tenant = STREAM_KEY.fullmatch(stream)
        try:
            event = parse_envelope(fields)
            if tenant is None or event.tenant != tenant.group(1):
                raise InvalidEventError(f"event of tenant {event.tenant!r} on stream {stream}")
            await self.audit.append(event)
        except InvalidEventError as exc:
            log.warning("audit.dead_letter", stream=stream, entry=entry_id, reason=str(exc))
            dead: dict[str, str] = {
                **fields,
                "dead_reason": str(exc),
                "dead_entry": entry_id,
                "dead_group": self.group,
            }
            await self.redis.xadd(f"{stream}:dead", dead)  # type: ignore[arg-type]
        await self.redis.xack(stream, self.group, entry_id)

    async def _process(self, stream: str, entries: Sequence[Entry]) -> int:
        for entry_id, fields in entries:
            await self.handle(stream, entry_id, fields)
        return len(entries)

    async def recover(self, stream: str) -> int:
        """Take over and process every pending entry of the group on ``stream``, in stream
        order (after a crash or a change of lease holder).

        Returns:
            Entries processed.
        """
        done, start = 0, "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                stream, self.group, self.name, min_idle_time=0, start_id=start, count=self.batch
            )
            start = str(reply[0])
            claimed = cast(list[tuple[str, Mapping[str, str] | None]], reply[1])
            done += await self._process(stream, [(i, f) for i, f in claimed if f is not None])
            if start == "0-0":
                return done

    async def step(self) -> int:
        """One round: recover streams not yet recovered by this holder, then read new
        entries (waiting up to ``block_ms``) and process them.

        Returns:
            Entries processed.
        """
        keys = await self.streams()
        done = 0
        for key in keys:
            if key not in self._recovered:
                done += await self.recover(key)
                self._recovered.add(key)
        if not keys:
            await asyncio.sleep(self.block_ms / 1000)
            return 0
        reply = await self.redis.xreadgroup(
            self.group, self.name, dict.fromkeys(keys, ">"), count=self.batch, block=self.block_ms
        )
        for stream, entries in cast(list[tuple[str, list[Entry]]], reply or []):
            done += await self._process(stream, entries)
        return done

    def lost(self) -> None:
        """Forget what this holder recovered: a later holder term recovers again."""
        self._recovered.clear()

    async def run(self, pool: asyncpg.Pool, *, ttl_s: float = leases.DEFAULT_TTL_S) -> None:
        """Consume while holding :data:`LEASE`, until cancelled.

        Args:
            pool: The application role's ``asyncpg.Pool`` (for the lease).
            ttl_s: The lease's time to live in seconds.
        """
        keeper = leases.LeaseKeeper(pool, LEASE, ttl_s=ttl_s)
        keeping = asyncio.create_task(keeper.run(), name=f"lease:{LEASE}")
        try:
            while True:
                if not keeper.held:
                    self.lost()
                    await asyncio.sleep(keeper.renew_every_s)
                    continue
                try:
                    await self.step()
                except (RedisError, OSError) as exc:
                    # Entries delivered but not appended stay pending: recover them (in stream
                    # order) before reading anything newer.
                    self.lost()
                    log.warning("audit.consume_failed", error=repr(exc))
                    await asyncio.sleep(1.0)
                except Exception:
                    self.lost()
                    log.exception("audit.consume_failed")
                    await asyncio.sleep(1.0)
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            await keeper.release()
