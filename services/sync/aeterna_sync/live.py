"""Live events: one reader per tenant stream per replica, fanned out to its subscribers.

Each replica reads a tenant's stream ``events:{tenant}`` with one ``XREAD BLOCK`` loop (a
:class:`TenantFeed`) however many clients follow it, and hands each entry to every
subscription's bounded queue. A subscription that resumes from a cursor registers with the
feed first, then reads the backlog after its cursor with ``XRANGE``, then takes the queued
live entries, skipping those it already sent: every entry after the cursor is sent exactly
once, in stream order (= commit order of the relays, which publish in outbox order).

A subscription whose queue is full is marked overflowed and ends with
``RESOURCE_EXHAUSTED`` carrying its cursor; the replica never buffers more than
``subscriber_buffer`` entries per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from aeterna_common.events import stream_key
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception, stop_never, wait_exponential_jitter

log = structlog.get_logger("aeterna.sync.live")

# Stream subscribers and lag. No tenant label (unbounded cardinality, see
# aeterna_common.telemetry): per-tenant figures are in traces and logs.
SUBSCRIBERS = Gauge("aeterna_sync_subscribers", "Open Subscribe streams on this replica.")
FEEDS = Gauge("aeterna_sync_tenant_feeds", "Tenant streams this replica reads.")
OVERFLOWS = Counter(
    "aeterna_sync_subscriber_overflows_total",
    "Subscriptions ended for lag: they fell more than subscriber_buffer entries behind "
    "(RESOURCE_EXHAUSTED with a resume cursor).",
)
DELIVERED = Counter(
    "aeterna_sync_events_delivered_total",
    "Live events sent to subscribers, by phase (catchup: the backlog after a resume cursor; "
    "live: from the tenant feed).",
    ["phase"],
)
DELIVERY_LAG_SECONDS = Histogram(
    "aeterna_sync_delivery_lag_seconds",
    "Seconds from an event's commit (the outbox row's commit time) to its send to a "
    "subscriber, live phase only (a catch-up replays old events by design). Includes relay "
    "lag and clock skew between PostgreSQL and this replica (clamped at 0).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

Entry = tuple[str, Mapping[str, str]]

KEEPALIVE: Entry = ("", {})
"""Put in an idle subscription's queue (compared by identity) when its keepalive is due;
it may take one of the queue's places."""


@dataclass(eq=False)
class Subscription:
    """One subscriber's place in a tenant feed.

    Attributes:
        tenant: The tenant.
        start: The entry id the feed had reached when the subscription registered: every
            later entry reaches :attr:`queue`.
        queue: Live entries not yet taken (bounded).
        overflowed: Set when an entry did not fit in :attr:`queue`.
    """

    tenant: str
    start: str
    queue: asyncio.Queue[Entry]
    overflowed: bool = False


@dataclass(eq=False)
class TenantFeed:
    """The reader of one tenant stream and its subscriptions."""

    tenant: str
    last_id: str
    subscriptions: set[Subscription] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    closed: bool = False


class LiveEvents:
    """The replica's tenant feeds.

    Args:
        redis: Redis client (``decode_responses=True``); feeds block in ``XREAD`` on its
            pool, one connection per followed tenant.
        buffer: Entries queued per subscription before it is ended.
        block_ms: Longest ``XREAD BLOCK``, in milliseconds.
    """

    def __init__(self, redis: aioredis.Redis, *, buffer: int, block_ms: int) -> None:
        self.redis = redis
        self.buffer = buffer
        self.block_ms = block_ms
        self._feeds: dict[str, TenantFeed] = {}
        self._lock = asyncio.Lock()

    async def _head(self, key: str) -> str:
        """The id of the stream's last entry, or ``0-0`` for an empty or missing stream."""
        last = await self.redis.xrevrange(key, "+", "-", count=1)
        return str(last[0][0]) if last else "0-0"

    async def open(self, tenant: str) -> Subscription:
        """Register a subscription on the tenant's feed (starting the feed if needed).

        Raises:
            RedisError: Redis is unreachable (reported as ``UNAVAILABLE``).
        """
        async with self._lock:
            feed = self._feeds.get(tenant)
            if feed is None:
                # The feed's start is read before anyone registers: nothing added after it
                # can be missed by both the feed and a subscriber's backlog read.
                feed = TenantFeed(tenant, await self._head(stream_key(tenant)))
                feed.task = asyncio.create_task(self._run(feed), name=f"sync-feed-{tenant}")
                self._feeds[tenant] = feed
                FEEDS.set(len(self._feeds))
            sub = Subscription(tenant, feed.last_id, asyncio.Queue(maxsize=self.buffer))
            feed.subscriptions.add(sub)
        SUBSCRIBERS.inc()
        return sub

    async def close(self, sub: Subscription) -> None:
        """Unregister; the feed stops with its last subscription."""
        SUBSCRIBERS.dec()
        async with self._lock:
            feed = self._feeds.get(sub.tenant)
            if feed is None:
                return
            feed.subscriptions.discard(sub)
            if feed.subscriptions:
                return
            del self._feeds[sub.tenant]
            FEEDS.set(len(self._feeds))
            feed.closed = True
            task = feed.task
        if task is not None:
            await _stop(task)

    async def _run(self, feed: TenantFeed) -> None:
        key = stream_key(feed.tenant)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda exc: _transient(exc) and not feed.closed),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
            stop=stop_never,
            reraise=True,
        ):
            with attempt:
                while not feed.closed:
                    got: Any = await self.redis.xread(
                        {key: feed.last_id}, block=self.block_ms, count=1000
                    )
                    for _, entries in got or ():
                        for entry_id, fields in entries:
                            self._dispatch(feed, (str(entry_id), fields))
                            feed.last_id = str(entry_id)

    @staticmethod
    def _dispatch(feed: TenantFeed, entry: Entry) -> None:
        for sub in feed.subscriptions:
            if sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(entry)
            except asyncio.QueueFull:
                sub.overflowed = True
                OVERFLOWS.inc()

    async def backlog(self, tenant: str, after: str, page: int) -> list[Entry]:
        """Up to ``page`` entries after entry id ``after`` (exclusive), oldest first."""
        got: Any = await self.redis.xrange(stream_key(tenant), f"({after}", "+", count=page)
        return [(str(i), f) for i, f in got or ()]

    async def oldest(self, tenant: str) -> str | None:
        """The id of the stream's first entry when older entries were removed (trimmed or
        deleted), else None: every entry ever added is still there (or none was added).

        Redis 7.0 does not record the largest trimmed id (``max-deleted-entry-id`` moves
        only with ``XDEL``), so removal is seen as ``entries-added`` above ``length``.
        """
        try:
            info: Any = await self.redis.xinfo_stream(stream_key(tenant))
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        first = info.get("first-entry")
        if not first or int(info.get("entries-added", 0)) <= int(info.get("length", 0)):
            return None
        return str(first[0])

    async def stop(self) -> None:
        """Stop every feed (server shutdown)."""
        async with self._lock:
            for feed in self._feeds.values():
                feed.closed = True
            tasks = [f.task for f in self._feeds.values() if f.task is not None]
            self._feeds.clear()
        await asyncio.gather(*(_stop(t) for t in tasks))


def _transient(exc: BaseException) -> bool:
    """A Redis failure worth retrying, unless the task is being cancelled (a cancellation
    that reaches redis-py mid-command may come out as a connection error)."""
    task = asyncio.current_task()
    cancelling = task is not None and task.cancelling() > 0
    return isinstance(exc, RedisError | OSError) and not cancelling


async def _stop(task: asyncio.Task[None], timeout_s: float = 5.0) -> None:
    """Cancel a feed's reader and wait for it, at most ``timeout_s`` seconds (a reader
    that outlives it stops at its next read: its feed is closed)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    for finished in done:
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            finished.result()
