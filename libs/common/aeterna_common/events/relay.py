"""The outbox relay: publishes a service's transactional outbox to Redis Streams.

Every change a service commits writes an outbox row in the same transaction (see memory's
migration 0001). The relay reads those rows across tenants, in position order, and appends
each to its tenant's stream ``events:{tenant}`` with the envelope of
:mod:`aeterna_common.events.envelope`; then it records the last published position (its
cursor). Positions become visible in commit order (they are drawn under an advisory lock at
the end of each writing transaction), so "position > cursor" misses nothing.

Delivery is **at least once**: the cursor is written only after Redis accepted the batch,
so a relay that dies between the XADDs and the cursor write publishes the same rows again
when it (or another replica) resumes. Re-published entries carry the same ``event_id``
(``{service}:{position}``); consumers deduplicate on it. No row is ever skipped: a Redis
outage blocks the relay (retrying with backoff) instead of advancing the cursor. Redis itself
must keep what it acknowledged (``appendonly yes`` with ``appendfsync always``): with a
weaker setting a Redis crash can lose entries the cursor has already passed.

One replica at a time relays, under a lease (:mod:`aeterna_common.leases`). The cursor is
the relay's row in ``outbox_followers`` with an ``epoch`` column: each write is fenced (the
lease row locked ``FOR SHARE`` at the holder's epoch in the transaction that writes the
cursor, and refused over a cursor written by a later epoch), so a deposed relay can at most
publish duplicates, never move the cursor. The row never expires (``expires_at`` is
``infinity``), so the outbox trim, which deletes only rows at or below every live
follower's position, never drops a row the relay has not published. A service that stops
relaying for good must delete that row, or its outbox is never trimmed again.

Stream trim: each XADD trims its stream approximately (``~``, whole macro nodes only, so
trimming costs O(1) amortised), by default with ``MINID`` at 7 days of age rather than
``MAXLEN``. Consumer groups keep their pending entries (delivered, not yet acknowledged) in a
separate list that trimming does not touch; an entry trimmed while still pending is reported
by ``XAUTOCLAIM`` among its deleted ids (and dropped from the pending list), so a consumer
loses an event only if it neither acknowledged nor dead-lettered it within the age bound. An
age bound states that guarantee in time, whatever the write rate; a length bound could trim
the unread entries of a lagging consumer during a burst. ``MAXLEN`` is available for memory
pressure (:class:`StreamTrim`), at that cost.

Table shapes the relay needs in the service's database (memory's migrations 0001, 0004,
0007 and 0008 create them):

* the outbox: ``position``, ``tenant_id``, ``event_type``, ``resource``, ``payload``
  (jsonb), ``created_at``, ``actor``, ``traceparent`` (fill it with
  :func:`~aeterna_common.events.envelope.current_traceparent`); readable by the reader pool
  (the indexer role);
* ``outbox_followers (name, position, expires_at, epoch)`` and ``leases``, writable by the
  application role.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import redis.asyncio as aioredis
import structlog
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception, stop_never, wait_exponential_jitter

from aeterna_common import leases
from aeterna_common.db import Database
from aeterna_common.events.envelope import STREAMS_KEY, Event, rfc3339, stream_key
from aeterna_common.redis_client import redis_client
from aeterna_common.telemetry import span_traceparent, traceparent_context, tracer

log = structlog.get_logger("aeterna.events.relay")
_TRACER = tracer("aeterna.events.relay")

RELAY_LAG_POSITIONS = Gauge(
    "aeterna_events_relay_lag_positions",
    "Outbox positions committed but not yet published (on the relaying replica).",
    ["service"],
)
RELAY_LAG_SECONDS = Gauge(
    "aeterna_events_relay_lag_seconds",
    "Age in seconds of the oldest outbox row not yet published (0 when caught up).",
    ["service"],
)
PUBLISHED = Counter(
    "aeterna_events_published_total",
    "Outbox rows appended to Redis Streams (re-publications included).",
    ["service"],
)
RELAY_ERRORS = Counter(
    "aeterna_events_relay_errors_total",
    "Relay rounds that failed (Redis or PostgreSQL unreachable, lease lost).",
    ["service"],
)
RELAY_LEADER = Gauge(
    "aeterna_events_relay_leader", "1 while this replica holds the relay's lease.", ["service"]
)

REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError)
"""Errors of an unreachable or restarting Redis (redis-py raises its own ConnectionError and
TimeoutError, both RedisError; a refused socket may surface as OSError)."""

POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

DEFAULT_MAX_AGE_S = 7 * 86_400.0
"""Stream entries older than this are trimmed (seconds)."""

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_OUTBOX_COLUMNS = (
    "position, tenant_id, event_type, resource, payload::text AS payload, created_at, actor, "
    "traceparent"
)


def _identifier(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class StreamTrim:
    """How each XADD trims its stream (approximately, ``~``).

    Attributes:
        max_age_s: Trim entries older than this many seconds (``MINID`` of now minus the
            age, on the entry ids' millisecond clock); used when ``max_len`` is ``None``.
        max_len: Keep about this many entries per stream (``MAXLEN``) instead.
    """

    max_age_s: float = DEFAULT_MAX_AGE_S
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be positive, got {self.max_len}")
        if not self.max_age_s > 0:
            raise ValueError(f"max_age_s must be positive, got {self.max_age_s}")

    def xadd_options(self, now_s: float) -> dict[str, Any]:
        """Keyword arguments of redis-py's ``xadd`` for an append at ``now_s`` (epoch s)."""
        if self.max_len is not None:
            return {"maxlen": self.max_len, "approximate": True}
        return {"minid": str(int((now_s - self.max_age_s) * 1000)), "approximate": True}


def to_event(service: str, row: asyncpg.Record) -> Event:
    """The envelope of one outbox row (selected with the relay's columns)."""
    position = int(row["position"])
    payload = json.loads(row["payload"]) if row["payload"] else {}
    return Event(
        event_id=f"{service}:{position}",
        service=service,
        type=row["event_type"],
        tenant=row["tenant_id"],
        resource=row["resource"],
        actor=row["actor"] or "",
        time=rfc3339(row["created_at"]),
        position=position,
        payload=payload if isinstance(payload, dict) else {"value": payload},
        traceparent=row["traceparent"] or "",
    )


class OutboxRelay:
    """Publishes one service's outbox to ``events:{tenant}`` streams, at least once.

    Every replica runs :meth:`run`; the holder of the lease relays, the others wait to take
    over. Requires open pools.

    Args:
        db: Application-role database: the lease and the cursor row.
        reader: Database whose role reads the outbox of every tenant (the indexer role),
            in read-only snapshots.
        redis: Redis client (``decode_responses=True``, RESP2: the default protocol).
        service: Producing service (``memory``): the envelope's ``service`` and the prefix
            of ``event_id``.
        listen_dsn: DSN of a connection that LISTENs on ``notify_channel``; ``None`` polls
            only.
        notify_channel: Channel the service NOTIFYs with the committed position.
        outbox_table: The outbox table.
        followers_table: The table of outbox followers (the cursor row).
        name: The cursor row's name (default ``relay:{service}``).
        lease_name: Lease name (default ``{service}:events:relay``).
        lease_ttl_s: Lease time to live in seconds.
        batch_size: Outbox rows per pipeline of XADDs.
        poll_s: Seconds between rounds when no notification arrives.
        trim: Stream trim policy.
        max_backoff_s: Longest wait between retries while Redis is unreachable, seconds.
        stop_grace_s: On cancellation, how long the batch in flight may take to record its
            cursor, in seconds (past it, the batch is published again by the next holder).

    Raises:
        ValueError: A table name is not a plain identifier, or a size is not positive.
    """

    def __init__(
        self,
        db: Database,
        reader: Database,
        redis: aioredis.Redis,
        *,
        service: str,
        listen_dsn: str | None = None,
        notify_channel: str | None = None,
        outbox_table: str = "outbox",
        followers_table: str = "outbox_followers",
        name: str | None = None,
        lease_name: str | None = None,
        lease_ttl_s: float = leases.DEFAULT_TTL_S,
        batch_size: int = 500,
        poll_s: float = 1.0,
        trim: StreamTrim | None = None,
        max_backoff_s: float = 5.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        if batch_size < 1 or not poll_s > 0:
            raise ValueError("batch_size and poll_s must be positive")
        self.db = db
        self.reader = reader
        self.redis = redis
        self.service = service
        self.listen_dsn = listen_dsn
        self.notify_channel = notify_channel
        self.outbox = _identifier(outbox_table)
        self.followers = _identifier(followers_table)
        self.name = name or f"relay:{service}"
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.trim = trim or StreamTrim()
        self.max_backoff_s = max_backoff_s
        self.stop_grace_s = stop_grace_s
        self._stopping = False
        self.position = 0
        """Last position this replica knows published (the cursor as last read or written)."""
        self.keeper = leases.LeaseKeeper(
            db.pool,
            lease_name or f"{service}:events:relay",
            ttl_s=lease_ttl_s,
            on_change=self._on_lease_change,
        )
        RELAY_LEADER.labels(service).set(0)
        self._epoch = 0
        self._wake = asyncio.Event()
        self._listen: asyncpg.Connection | None = None
        self._known_streams: set[str] = set()

    @property
    def leader(self) -> bool:
        """Whether this replica relays (holds the lease with time to spare)."""
        return self.keeper.held

    # ---- cursor --------------------------------------------------------------------------

    async def register(self) -> None:
        """Create the cursor row (position 0) unless it exists, so the outbox trim keeps
        every row from now on until the relay has published it."""
        await self.db.pool.execute(
            f"INSERT INTO {self.followers} (name, position, expires_at, epoch) "
            "VALUES ($1, 0, 'infinity', 0) ON CONFLICT (name) DO NOTHING",
            self.name,
        )

    async def load_cursor(self) -> int:
        """The last published position recorded (0 when never relayed)."""
        value = await self.db.pool.fetchval(
            f"SELECT position FROM {self.followers} WHERE name = $1", self.name
        )
        return int(value or 0)

    async def save_cursor(self, position: int, lease: leases.Lease) -> None:
        """Record ``position`` as published, fenced by ``lease`` (monotonic).

        Args:
            position: Last outbox position appended to Redis.
            lease: The relay's lease, held by the caller.

        Raises:
            leases.LeaseLostError: The lease is lost, or a later epoch wrote the cursor.
        """
        async with self.db.pool.acquire() as proxy, proxy.transaction():
            conn = cast(asyncpg.Connection, proxy)
            await leases.check(conn, lease)
            status = await conn.execute(
                f"INSERT INTO {self.followers} AS f (name, position, expires_at, epoch) "
                "VALUES ($1, $2, 'infinity', $3) ON CONFLICT (name) DO UPDATE SET "
                "position = greatest(f.position, EXCLUDED.position), epoch = EXCLUDED.epoch, "
                "expires_at = 'infinity' WHERE f.epoch <= EXCLUDED.epoch",
                self.name,
                position,
                lease.epoch,
            )
        if status != "INSERT 0 1":
            raise leases.LeaseLostError(
                f"relay cursor {self.name!r} was written by a later epoch than {lease.epoch}"
            )

    # ---- publishing ----------------------------------------------------------------------

    async def publish_once(self) -> int:
        """Publish everything committed after the cursor (only while holding the lease).

        Returns:
            The number of outbox rows appended (0 on a replica without the lease).

        Raises:
            leases.LeaseLostError: The lease was lost mid-way (nothing is skipped: the next
                holder resumes from the recorded cursor).
        """
        if not self.keeper.held:
            return 0
        lease = self.keeper.current()
        if lease.epoch != self._epoch:
            # A new term: resume from what the previous holder recorded.
            self.position = await self.load_cursor()
            self._epoch = lease.epoch
        total = 0
        while True:
            async with self.reader.all_tenants_snapshot() as conn:
                rows = await conn.fetch(
                    f"SELECT {_OUTBOX_COLUMNS} FROM {self.outbox} WHERE position > $1 "
                    "ORDER BY position LIMIT $2",
                    self.position,
                    self.batch_size,
                )
                head = await conn.fetchval(f"SELECT max(position) FROM {self.outbox}")
            self._observe_lag(int(head or 0), rows[0]["created_at"].timestamp() if rows else None)
            if not rows:
                return total
            events = [to_event(self.service, r) for r in rows]
            await self._append(events)
            await self.save_cursor(events[-1].position, self.keeper.current())
            self.position = events[-1].position
            PUBLISHED.labels(self.service).inc(len(events))
            total += len(events)
            if len(rows) < self.batch_size or self._stopping:
                self._observe_lag(int(head or 0), None)
                return total

    async def _append(self, events: Sequence[Event]) -> None:
        """XADD ``events`` in order, pipelined, retrying with backoff while Redis is
        unreachable and the lease is held (a retry may append some entries twice: same
        ``event_id``)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(
                lambda e: isinstance(e, REDIS_DOWN) and self.keeper.held and not self._stopping
            ),
            wait=wait_exponential_jitter(multiplier=0.05, max=self.max_backoff_s, jitter=0.1),
            stop=stop_never,
            before_sleep=self._log_retry,
            reraise=True,
        )
        await retrying(self._xadd, events)

    async def _xadd(self, events: Sequence[Event]) -> None:
        options = self.trim.xadd_options(time.time())
        async with self.redis.pipeline(transaction=False) as pipe:
            keys = {stream_key(e.tenant) for e in events}
            fresh = keys - self._known_streams
            if fresh:
                # Registered before the first entry, so a consumer never misses a stream.
                pipe.sadd(STREAMS_KEY, *sorted(fresh))
            spans = []
            for event in events:
                fields = event.to_fields()
                if event.traceparent:
                    # A publish span in the writing request's trace; the entry carries it, so
                    # the consumer's span is its child.
                    span = _TRACER.start_span(
                        "events publish",
                        context=traceparent_context(event.traceparent),
                        kind=SpanKind.PRODUCER,
                        attributes={
                            "messaging.system": "redis",
                            "messaging.operation.type": "send",
                            "messaging.message.id": event.event_id,
                            "aeterna.event.type": event.type,
                            "aeterna.tenant": event.tenant,
                        },
                    )
                    spans.append(span)
                    fields["traceparent"] = span_traceparent(span) or event.traceparent
                pipe.xadd(stream_key(event.tenant), fields, **options)  # type: ignore[arg-type]
            try:
                await pipe.execute()
            finally:
                for span in spans:
                    span.end()
        self._known_streams |= keys

    def _log_retry(self, state: Any) -> None:
        RELAY_ERRORS.labels(self.service).inc()
        # After a Redis restart without persistence the registry may be gone: re-add.
        self._known_streams.clear()
        log.warning(
            "events.relay.redis_unavailable",
            attempt=state.attempt_number,
            error=repr(state.outcome.exception()) if state.outcome else None,
            position=self.position,
        )

    def _observe_lag(self, head: int, oldest_unpublished_s: float | None) -> None:
        RELAY_LAG_POSITIONS.labels(self.service).set(max(0, head - self.position))
        RELAY_LAG_SECONDS.labels(self.service).set(
            0.0 if oldest_unpublished_s is None else max(0.0, time.time() - oldest_unpublished_s)
        )

    # ---- lifecycle -----------------------------------------------------------------------

    def _on_lease_change(self, lease: leases.Lease | None) -> None:
        RELAY_LEADER.labels(self.service).set(1 if lease is not None else 0)
        if lease is None:
            # Only the holder measures lag: a former holder's figures would go stale.
            RELAY_LAG_POSITIONS.labels(self.service).set(0)
            RELAY_LAG_SECONDS.labels(self.service).set(0)
        self._wake.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        # The service notifies the committed position; other payloads (an index's cursor
        # notices on the same channel) announce no new row.
        if isinstance(payload, str) and payload.isdigit() and self.keeper.held:
            self._wake.set()

    def _on_listener_lost(self, conn: Any) -> None:
        log.warning("events.relay.listener_lost")
        self._wake.set()

    async def _listen_if_needed(self) -> None:
        if self.listen_dsn is None or self.notify_channel is None:
            return
        if self._listen is not None and not self._listen.is_closed():
            return
        conn: asyncpg.Connection = await asyncpg.connect(self.listen_dsn)
        await conn.add_listener(self.notify_channel, self._on_notify)
        conn.add_termination_listener(self._on_listener_lost)
        self._listen = conn

    async def _publish_until_stopped(self) -> None:
        """:meth:`publish_once`, shielded from cancellation until its batch in flight has
        recorded its cursor (or ``stop_grace_s`` passed)."""
        publishing = asyncio.create_task(self.publish_once(), name="events-relay-batch")
        try:
            await asyncio.shield(publishing)
        except asyncio.CancelledError:
            self._stopping = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(self.stop_grace_s):
                    await publishing
            raise

    async def run(self) -> None:
        """Relay until cancelled: on each notification, else every ``poll_s`` seconds.

        Never raises for an outage: a round that fails (PostgreSQL or Redis unreachable,
        lease lost) is logged and the next round resumes from the recorded cursor. On
        cancellation the batch in flight records its cursor (within ``stop_grace_s``), so a
        clean stop publishes nothing twice; then the lease is released, so another replica
        takes over at once.
        """
        keeping: asyncio.Task[None] | None = None
        registered = False
        try:
            while True:
                try:
                    if not registered:
                        await self.register()
                        registered = True
                        keeping = asyncio.create_task(self.keeper.run(), name="events-relay-lease")
                    await self._listen_if_needed()
                    await self._publish_until_stopped()
                except leases.LeaseLostError as exc:
                    self.keeper.lost(str(exc))
                    RELAY_ERRORS.labels(self.service).inc()
                except (*POSTGRES_DOWN, *REDIS_DOWN) as exc:
                    RELAY_ERRORS.labels(self.service).inc()
                    log.warning(
                        "events.relay.round_failed", error=repr(exc), position=self.position
                    )
                except Exception:
                    RELAY_ERRORS.labels(self.service).inc()
                    log.exception("events.relay.round_failed", position=self.position)
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with the wake-up, and this loop would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if keeping is not None:
                keeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeping
            await self.keeper.release()
            if self._listen is not None:
                self._listen.remove_termination_listener(self._on_listener_lost)
                with contextlib.suppress(Exception):
                    await self._listen.close()
                self._listen = None


class RelaySettings(BaseModel):
    """The relay's settings, mixed into a service's settings class (so they read
    ``AETERNA_{SERVICE}_EVENTS_*`` with that class's prefix).

    Attributes:
        events_relay: Publish the outbox to Redis Streams (``events:{tenant}``) on the one
            replica holding the lease ``{service}:events:relay``; needs ``AETERNA_REDIS_URL``
            (without it the relay is off and a warning is logged).
        events_batch_size: Outbox rows per pipeline of XADDs.
        events_poll_s: Seconds between relay rounds when no NOTIFY wakes it.
        events_lease_ttl_s: Time to live in seconds of the relay's lease: a relay that died
            is replaced after about this long.
        events_max_age_s: Stream entries older than this many seconds are trimmed (``XADD
            MINID ~``; 7 days). Consumers must acknowledge within it.
        events_max_len: When positive, trim each stream to about this many entries
            (``MAXLEN ~``) instead of by age.
    """

    events_relay: bool = True
    events_batch_size: int = Field(default=500, ge=1, le=10_000)
    events_poll_s: float = Field(default=1.0, gt=0)
    events_lease_ttl_s: float = Field(default=15.0, ge=1.0, le=600.0)
    events_max_age_s: float = Field(default=DEFAULT_MAX_AGE_S, ge=60.0)
    events_max_len: int = Field(default=0, ge=0)


def relay_from_settings(
    settings: RelaySettings,
    *,
    redis_url: str,
    db: Database,
    reader: Database,
    service: str,
    listen_dsn: str,
    notify_channel: str,
) -> tuple[OutboxRelay, aioredis.Redis] | None:
    """The relay a service runs, with its own Redis client (close it on shutdown).

    Args:
        settings: The service's relay settings.
        redis_url: ``AETERNA_REDIS_URL``; empty turns the relay off (with a warning).
        db: Application-role database (lease and cursor).
        reader: Indexer-role database (reads the outbox of every tenant).
        service: Producing service (``memory``, ``governance``).
        listen_dsn: DSN the relay LISTENs with.
        notify_channel: The service's NOTIFY channel of committed positions.

    Returns:
        The relay and its Redis client, or ``None`` when the relay is off.
    """
    if not settings.events_relay:
        return None
    if not redis_url:
        log.warning("events.relay_disabled", service=service, reason="AETERNA_REDIS_URL is not set")
        return None
    # Its own client: a cache's client gives up after 0.25 s, the relay waits out a slow Redis.
    client = redis_client(
        redis_url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=2.0
    )
    relay = OutboxRelay(
        db,
        reader,
        client,
        service=service,
        listen_dsn=listen_dsn,
        notify_channel=notify_channel,
        lease_ttl_s=settings.events_lease_ttl_s,
        batch_size=settings.events_batch_size,
        poll_s=settings.events_poll_s,
        trim=StreamTrim(
            max_age_s=settings.events_max_age_s, max_len=settings.events_max_len or None
        ),
    )
    return relay, client
