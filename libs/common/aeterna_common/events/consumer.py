"""Consumer groups over the tenants' event streams.

An :class:`EventConsumer` reads every stream listed in ``events:streams`` (refreshed
periodically) in one consumer group, hands each entry to a handler and acknowledges it
(``XACK``) when the handler returns; with a batch handler, each read of a stream (up to
``count`` entries of one tenant) goes to it at once and is acknowledged with one ``XACK``.
Delivery is **at least once**: an entry whose consumer died, or whose handler failed, stays
pending and is claimed again with ``XAUTOCLAIM`` once it has been idle ``claim_idle_s``; the
relay may also publish an event twice (same ``event_id``). **Handlers must therefore be
idempotent by** ``event_id`` (for instance, an insert that does nothing when the
``event_id`` is already recorded, in the same transaction as the handler's effect).

After ``max_deliveries`` deliveries (Redis's delivery counter, from ``XPENDING`` and
incremented by each ``XAUTOCLAIM``) without an acknowledgement, the entry is copied to the
tenant's dead-letter stream ``events:{tenant}:dead`` with the failure reason and
acknowledged, atomically (``MULTI``). An entry that is not a valid envelope is dead-lettered
at once without calling the handler.

Redis being unreachable never stops the consumer: each round is retried with exponential
backoff (tenacity), and consumer groups lost with a non-persistent Redis are created again.
Cancelling :meth:`EventConsumer.run` stops it cleanly; unacknowledged entries stay pending
for another consumer to claim.

:class:`LeasedConsumer` runs a group's consumer on one replica at a time, the holder of a
lease, for groups whose handlers must not run concurrently or out of stream order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis
import structlog
from opentelemetry.trace import SpanKind
from prometheus_client import Counter
from redis.exceptions import ResponseError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential_jitter

from aeterna_common import leases
from aeterna_common.events.envelope import (
    STREAM_PREFIX,
    STREAMS_KEY,
    Event,
    MalformedEventError,
    dead_letter_key,
)
from aeterna_common.events.relay import REDIS_DOWN
from aeterna_common.redis_client import redis_client
from aeterna_common.telemetry import traceparent_context, tracer

log = structlog.get_logger("aeterna.events.consumer")
_TRACER = tracer("aeterna.events.consumer")

DEAD_LETTERS = Counter(
    "aeterna_events_dead_letters_total",
    "Entries moved to a dead-letter stream, by consumer group.",
    ["group"],
)
CONSUMER_ERRORS = Counter(
    "aeterna_events_consumer_errors_total",
    "Handler failures and failed consumer rounds, by consumer group.",
    ["group"],
)
HANDLED = Counter(
    "aeterna_events_handled_total",
    "Entries handled and acknowledged, by consumer group.",
    ["group"],
)
LOST = Counter(
    "aeterna_events_trimmed_while_pending_total",
    "Pending entries the stream trim deleted before they were acknowledged, by group.",
    ["group"],
)

Handler = Callable[[Event], Awaitable[None]]
"""Handles one event; must be idempotent by ``event.event_id``. Raising leaves the entry
pending (it is delivered again, up to the attempt limit)."""

BatchHandler = Callable[[Sequence[Event]], Awaitable[None]]
"""Handles the events of one read of one stream (one tenant), in stream order, all or
nothing (one transaction); must be idempotent by ``event_id`` like :data:`Handler`. Raising
hands each of the events to the per-event :data:`Handler` instead, so that one bad event is
delivered again, and dead-lettered, alone."""

DEFAULT_MAX_DELIVERIES = 3
"""Deliveries of an entry before it is dead-lettered."""

Entry = tuple[str, dict[str, str] | None]


class EventConsumer:
    """One consumer of a consumer group over every tenant stream.

    Args:
        redis: Redis client (``decode_responses=True``, RESP2: the default protocol); its
            socket timeout must exceed ``block_s``.
        group: Consumer group name (one per consuming purpose, e.g. ``governance-audit``).
        handler: Called once per delivery; see :data:`Handler`.
        batch_handler: When given, called once per stream and read with that read's
            events (see :data:`BatchHandler`), which are then acknowledged with one
            ``XACK``; ``handler`` takes the events one by one only after a batch failed.
            Per event, an append-style handler pays a transaction and an acknowledgement;
            per batch it pays them once (the audit chain's appends: about 7 round trips).
        consumer: This consumer's name within the group (unique per process; a fresh
            ``host:pid:random`` when omitted).
        start: Where a group created by this consumer starts: ``"0"`` (every entry still in
            the stream: audit) or ``"$"`` (only entries added after the group's creation on
            that stream: caches).
        block_s: Longest wait of one ``XREADGROUP BLOCK``, in seconds.
        count: Entries per read and per claim.
        claim_idle_s: Idle time in seconds after which a pending entry is claimed
            (``XAUTOCLAIM`` min-idle-time).
        max_deliveries: Deliveries before an entry goes to the dead-letter stream.
        refresh_s: Seconds between reads of the ``events:streams`` registry.
        max_backoff_s: Longest wait between retries while Redis is unreachable, seconds.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        group: str,
        handler: Handler,
        *,
        batch_handler: BatchHandler | None = None,
        consumer: str | None = None,
        start: str = "0",
        block_s: float = 1.0,
        count: int = 100,
        claim_idle_s: float = 30.0,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        refresh_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        if start not in ("0", "$"):
            raise ValueError(f"start must be '0' or '$', got {start!r}")
        if max_deliveries < 1 or count < 1:
            raise ValueError("max_deliveries and count must be positive")
        self.redis = redis
        self.group = group
        self.handler = handler
        self.batch_handler = batch_handler
        self.consumer = consumer or leases.new_owner_id()
        self.start = start
        self.block_ms = max(1, int(block_s * 1000))
        self.count = count
        self.claim_idle_ms = max(0, int(claim_idle_s * 1000))
        self.max_deliveries = max_deliveries
        self.refresh_s = refresh_s
        self.max_backoff_s = max_backoff_s
        self.streams: set[str] = set()
        """Streams this consumer's group exists on (as far as it knows)."""
        self.handler_failures = 0
        """Deliveries whose handler raised, since this consumer was made."""
        self._refreshed_at = float("-inf")
        self._reclaimed_at = float("-inf")

    # ---- streams and groups --------------------------------------------------------------

    async def refresh(self) -> set[str]:
        """Read the registry and create the group on streams not seen before.

        Returns:
            The streams newly joined.
        """
        # decode_responses=True: strings (redis-py's stubs cannot tell).
        members = cast(set[str], await self.redis.smembers(STREAMS_KEY))
        fresh = {m for m in members if m.startswith(STREAM_PREFIX) and m not in self.streams}
        for stream in sorted(fresh):
            try:
                await self.redis.xgroup_create(stream, self.group, id=self.start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self.streams |= fresh
        self._refreshed_at = time.monotonic()
        return fresh

    # ---- one round -----------------------------------------------------------------------

    async def poll_once(self) -> int:
        """One round: refresh the registry when due, claim stuck entries (every
        ``claim_idle_s / 2``), read new ones (blocking up to ``block_s``), handle and
        acknowledge.

        Returns:
            Entries handled successfully in this round.

        Raises:
            redis.exceptions.RedisError: Redis failed (``run`` retries with backoff).
        """
        if time.monotonic() - self._refreshed_at >= self.refresh_s:
            await self.refresh()
        if not self.streams:
            await asyncio.sleep(self.block_ms / 1000)
            return 0
        try:
            handled = 0
            # One XAUTOCLAIM per stream: every half idle time is often enough to claim an
            # entry soon after it becomes claimable.
            if time.monotonic() - self._reclaimed_at >= self.claim_idle_ms / 2000:
                for stream in sorted(self.streams):
                    handled += await self._reclaim(stream)
                self._reclaimed_at = time.monotonic()
            handled += await self._read_new()
            return handled
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group vanished (a Redis restart without persistence, a DEL):
            # join again from the registry.
            log.warning("events.consumer.group_missing", group=self.group, error=str(exc))
            self.streams.clear()
            self._refreshed_at = float("-inf")
            return 0

    async def _read_new(self) -> int:
        # RESP2 replies (the client's default protocol): [[stream, [[id, fields], ...]], ...].
        replies = cast(
            list[tuple[str, list[Entry]]],
            await self.redis.xreadgroup(
                self.group,
                self.consumer,
                dict.fromkeys(sorted(self.streams), ">"),
                count=self.count,
                block=self.block_ms,
            ),
        )
        handled = 0
        for stream, entries in replies or []:
            if self.batch_handler is not None:
                handled += await self._deliver_batch(stream, entries, {})
                continue
            for entry_id, fields in entries:
                handled += await self._deliver(stream, entry_id, fields or None, deliveries=1)
        return handled

    async def recover(self) -> int:
        """Claim every pending entry of the group, however short its idle time, and deliver
        each stream's in stream order: for a consumer that takes over as its group's only
        one (under a lease) after the previous one died or was deposed, before it reads
        anything new, so that nothing newer is handled before what the previous one left.

        Returns:
            Entries handled successfully.

        Raises:
            redis.exceptions.RedisError: Redis failed.
        """
        await self.refresh()
        handled = 0
        for stream in sorted(self.streams):
            handled += await self._reclaim(stream, min_idle_ms=0)
        self._reclaimed_at = time.monotonic()
        return handled

    async def _reclaim(self, stream: str, min_idle_ms: int | None = None) -> int:
        """Claim this stream's entries idle for ``min_idle_ms`` (default ``claim_idle_s``)
        and deliver them again."""
        idle_ms = self.claim_idle_ms if min_idle_ms is None else min_idle_ms
        handled = 0
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                stream, self.group, self.consumer, idle_ms, cursor, count=self.count
            )
            cursor, entries = reply[0], reply[1]
            deleted: Sequence[str] = reply[2] if len(reply) > 2 else []
            if deleted:
                # Trimmed while pending: XAUTOCLAIM has dropped them from the pending list.
                LOST.labels(self.group).inc(len(deleted))
                log.error(
                    "events.consumer.trimmed_while_pending",
                    group=self.group,
                    stream=stream,
                    entries=list(deleted),
                )
            if entries:
                counts = await self._delivery_counts(stream, [e[0] for e in entries])
                if self.batch_handler is not None:
                    handled += await self._deliver_batch(stream, entries, counts)
                    entries = []
                for entry_id, fields in entries:
                    handled += await self._deliver(
                        stream, entry_id, fields or None, deliveries=counts.get(entry_id, 1)
                    )
            # XAUTOCLAIM scans a bounded part of the pending list per call: go on to its end.
            if cursor == "0-0":
                return handled

    async def _delivery_counts(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        """Delivery counts of the pending ``ids`` (``XPENDING`` extended form, one exact
        range per id, pipelined: other pending entries may lie between them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
            replies: list[list[dict[str, Any]]] = await pipe.execute()
        return {r["message_id"]: int(r["times_delivered"]) for rows in replies for r in rows}

    async def _deliver(
        self, stream: str, entry_id: str, fields: dict[str, str] | None, *, deliveries: int
    ) -> int:
        event = await self._settle(stream, entry_id, fields, deliveries)
        if event is None or fields is None:
            return 0
        try:
            # The handler continues the trace of the request that wrote the event (the
            # envelope's traceparent): outbox → relay → stream → consumer is one trace.
            with self._span(event):
                await self.handler(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.handler_failures += 1
            CONSUMER_ERRORS.labels(self.group).inc()
            log.warning(
                "events.consumer.handler_failed",
                group=self.group,
                event_id=event.event_id,
                deliveries=deliveries,
                error=repr(exc),
            )
            if deliveries >= self.max_deliveries:
                await self._dead_letter(stream, entry_id, fields, deliveries, repr(exc))
            return 0
        await self.redis.xack(stream, self.group, entry_id)
        HANDLED.labels(self.group).inc()
        return 1

    async def _settle(
        self, stream: str, entry_id: str, fields: dict[str, str] | None, deliveries: int
    ) -> Event | None:
        """The entry's event when it is to be handled; else the entry is settled here and
        ``None`` returned: acknowledged when it is gone from the stream, dead-lettered when it
        is not an envelope or has used up its deliveries."""
        if fields is None:
            # Deleted from the stream after delivery: nothing left to handle.
            await self.redis.xack(stream, self.group, entry_id)
            return None
        try:
            event = Event.from_fields(fields)
        except MalformedEventError as exc:
            await self._dead_letter(stream, entry_id, fields, deliveries, f"malformed: {exc}")
            return None
        if deliveries > self.max_deliveries:
            # Claimed after max_deliveries attempts that never acknowledged it (the consumer
            # died or hung each time).
            await self._dead_letter(
                stream,
                entry_id,
                fields,
                deliveries - 1,
                f"not acknowledged after {deliveries - 1} deliveries",
            )
            return None
        return event

    def _span(self, event: Event, batch: int = 0) -> contextlib.AbstractContextManager[Any]:
        """The consumer span of handling ``event``, a child of the producer's span named by
        its ``traceparent`` (outbox → relay → stream → consumer is one trace); ``batch`` is
        the size of the batch it is handled in, when it is."""
        attributes: dict[str, str | int] = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.consumer.group.name": self.group,
            "messaging.message.id": event.event_id,
            "aeterna.event.type": event.type,
            "aeterna.tenant": event.tenant,
        }
        if batch:
            attributes["messaging.batch.message_count"] = batch
        return _TRACER.start_as_current_span(
            f"{self.group} process",
            context=traceparent_context(event.traceparent),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )

    async def _deliver_batch(
        self, stream: str, entries: Sequence[Entry], counts: dict[str, int]
    ) -> int:
        """Hand one read's entries of ``stream`` to :attr:`batch_handler` and acknowledge
        them with one ``XACK``; entries that are gone, malformed or over the delivery limit
        are settled first, as :meth:`_deliver` settles them. ``counts`` are the entries'
        delivery counts (absent: first delivery)."""
        assert self.batch_handler is not None
        batch: list[tuple[str, dict[str, str], Event]] = []
        for entry_id, fields in entries:
            event = await self._settle(stream, entry_id, fields or None, counts.get(entry_id, 1))
            if event is not None and fields:
                batch.append((entry_id, fields, event))
        if not batch:
            return 0
        events = [e for _, _, e in batch]
        try:
            # Each event's trace goes on through its own consumer span, as with one handler
            # per event: the batch's spans are open together around the one handler call
            # (cheap when unsampled: a non-recording span).
            with contextlib.ExitStack() as spans:
                for event in events:
                    spans.enter_context(self._span(event, batch=len(events)))
                await self.batch_handler(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            CONSUMER_ERRORS.labels(self.group).inc()
            log.warning(
                "events.consumer.batch_failed",
                group=self.group,
                stream=stream,
                events=len(events),
                error=repr(exc),
            )
            # One by one: the failing event is retried, and dead-lettered, alone.
            handled = 0
            for entry_id, fields, _ in batch:
                handled += await self._deliver(
                    stream, entry_id, fields, deliveries=counts.get(entry_id, 1)
                )
            return handled
        await self.redis.xack(stream, self.group, *[entry_id for entry_id, _, _ in batch])
        HANDLED.labels(self.group).inc(len(batch))
        return len(batch)

    async def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str], deliveries: int, reason: str
    ) -> None:
        """Copy the entry to ``{stream}:dead`` with why, and acknowledge it, atomically."""
        dead = {
            **fields,
            "dead_reason": reason[:2000],
            "dead_group": self.group,
            "dead_stream": stream,
            "dead_entry_id": entry_id,
            "dead_deliveries": str(deliveries),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(dead_letter_key(stream), dead)  # type: ignore[arg-type]
            pipe.xack(stream, self.group, entry_id)
            await pipe.execute()
        DEAD_LETTERS.labels(self.group).inc()
        log.error(
            "events.consumer.dead_lettered",
            group=self.group,
            stream=stream,
            entry_id=entry_id,
            event_id=fields.get("event_id", ""),
            reason=reason,
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled. A round failing because Redis is unreachable is retried
        with exponential backoff up to ``max_backoff_s``; any other failure is logged and the
        next round runs after a pause. Never raises but :class:`asyncio.CancelledError`."""
        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(REDIS_DOWN),
                wait=wait_exponential_jitter(multiplier=0.05, max=self.max_backoff_s, jitter=0.1),
                stop=stop_never,
                before_sleep=self._log_retry,
                reraise=True,
            )
            try:
                await retrying(self.poll_once)
            except Exception:
                CONSUMER_ERRORS.labels(self.group).inc()
                log.exception("events.consumer.round_failed", group=self.group)
                await asyncio.sleep(self.max_backoff_s)

    def _log_retry(self, state: Any) -> None:
        CONSUMER_ERRORS.labels(self.group).inc()
        log.warning(
            "events.consumer.redis_unavailable",
            group=self.group,
            attempt=state.attempt_number,
            error=repr(state.outcome.exception()) if state.outcome else None,
        )


def consumer_redis(url: str, *, block_s: float) -> aioredis.Redis:
    """A Redis client for an :class:`EventConsumer`: strings, RESP2, and a socket timeout
    that outlasts a blocked ``XREADGROUP`` of ``block_s`` seconds."""
    return redis_client(
        url, decode_responses=True, socket_timeout=block_s + 5.0, socket_connect_timeout=2.0
    )


class LeasedConsumer:
    """Runs an :class:`EventConsumer` on the one replica holding a lease.

    Two consumers of one group split each stream between them, and their handlers run
    concurrently and out of stream order. Where that matters (an audit chain appended in
    stream order, a promotion settled by one writer), every replica runs this and only the
    holder of ``lease`` consumes. A new holder, and a holder after a failed round or a
    failed handler, first takes over every pending entry of the group
    (:meth:`EventConsumer.recover`: ``XAUTOCLAIM`` with no idle time, in stream order) and
    only then reads new entries, so what a previous holder left is handled before anything
    newer. A deposed holder still finishing an entry may handle it once more: handlers are
    idempotent by ``event_id``. One case is not ordered: after a handler fails, the other
    entries read with it in the same round are still handled, before the failed one's next
    delivery.

    Args:
        consumer: This process's consumer of the group.
        lease: The lease name, one per group (e.g. ``governance:audit:consume``).
    """

    def __init__(self, consumer: EventConsumer, lease: str) -> None:
        self.consumer = consumer
        self.lease = lease
        self._recovered = False

    async def step(self) -> int:
        """One round: recover the group's pending entries if this holder has not since its
        term began or since a failure, then read new entries (waiting up to ``block_s``).

        Returns:
            Entries handled and acknowledged.

        Raises:
            redis.exceptions.RedisError: Redis failed (the next step recovers first).
        """
        failures = self.consumer.handler_failures
        try:
            done = 0
            if not self._recovered:
                self._recovered = True
                done += await self.consumer.recover()
            return done + await self.consumer.poll_once()
        except BaseException:
            self._recovered = False
            raise
        finally:
            if self.consumer.handler_failures != failures:
                self._recovered = False

    async def run(self, pool: asyncpg.Pool, *, ttl_s: float = leases.DEFAULT_TTL_S) -> None:
        """Consume while holding the lease, until cancelled; never raises but
        :class:`asyncio.CancelledError` (a failed round is logged and retried after a
        second).

        Args:
            pool: A pool of a role that may write ``leases`` (the application role).
            ttl_s: The lease's time to live in seconds.
        """
        group = self.consumer.group
        keeper = leases.LeaseKeeper(pool, self.lease, ttl_s=ttl_s)
        keeping = asyncio.create_task(keeper.run(), name=f"lease:{self.lease}")
        try:
            while True:
                if not keeper.held:
                    self._recovered = False
                    await asyncio.sleep(keeper.renew_every_s)
                    continue
                try:
                    await self.step()
                except REDIS_DOWN as exc:
                    CONSUMER_ERRORS.labels(group).inc()
                    log.warning("events.consumer.round_failed", group=group, error=repr(exc))
                    await asyncio.sleep(1.0)
                except Exception:
                    CONSUMER_ERRORS.labels(group).inc()
                    log.exception("events.consumer.round_failed", group=group)
                    await asyncio.sleep(1.0)
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            await keeper.release()
