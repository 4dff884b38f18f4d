"""The outbox relay and consumer groups against real PostgreSQL (memory's schema and outbox
writes) and real Redis: ordering, the envelope, fenced cursor and lease, at-least-once across
a relay crash and a Redis restart, XAUTOCLAIM, dead letters."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aeterna_common import leases
from aeterna_common.db import Database, apply_migrations, role_of
from aeterna_common.events import (
    STREAMS_KEY,
    Event,
    EventConsumer,
    Handler,
    MalformedEventError,
    OutboxRelay,
    StreamTrim,
    dead_letter_key,
    stream_key,
)
from aeterna_common.events.envelope import rfc3339
from aeterna_devstack.servers import RedisServer, free_port, scratch_dir
from aeterna_memory.adapters.postgres import NOTIFY_CHANNEL, _append_outbox
from aeterna_memory.app import MIGRATIONS
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY

WAIT_S = 60.0
"""Upper bound of every wait for a background task (a bound, never an assertion)."""


@dataclass
class Stack:
    urls: Any
    db: Database
    indexer: Database
    redis: aioredis.Redis
    relays: list[OutboxRelay]

    def relay(self, **kw: Any) -> OutboxRelay:
        kw.setdefault("lease_ttl_s", 1.5)
        kw.setdefault("poll_s", 0.2)
        kw.setdefault("max_backoff_s", 0.3)
        relay = OutboxRelay(
            self.db,
            self.indexer,
            kw.pop("redis", self.redis),
            service="memory",
            listen_dsn=self.urls.indexer,
            notify_channel=NOTIFY_CHANNEL,
            **kw,
        )
        self.relays.append(relay)
        return relay


@pytest_asyncio.fixture
async def stack(make_database: Any, redis_server: Any) -> AsyncIterator[Stack]:
    urls = await make_database()
    await apply_migrations(urls.owner, MIGRATIONS, role_of(urls.app), role_of(urls.indexer))
    db, indexer = Database(urls.app, max_size=4), Database(urls.indexer, max_size=2)
    await db.open()
    await indexer.open()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield Stack(urls, db, indexer, client, [])
    await client.aclose()
    await indexer.close()
    await db.close()


def new_tenant() -> str:
    return f"ev-{uuid.uuid4().hex[:10]}"


async def write(stack: Stack, tenant: str, n: int, actor: str = "users/alice") -> list[int]:
    """``n`` committed changes of ``tenant``, each in its own transaction, as memory writes
    them (outbox row, advisory lock, NOTIFY)."""
    positions = []
    for _ in range(n):
        async with stack.db.transaction(tenant) as conn:
            positions.append(
                await _append_outbox(conn, tenant, "memory.created", [uuid.uuid4()], actor=actor)
            )
    return positions


async def entries(redis: aioredis.Redis, key: str) -> list[dict[str, str]]:
    return [fields for _, fields in await redis.xrange(key)]


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (bounded by WAIT_S) until ``check()`` is true."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not await check():  # noqa: ASYNC110 (state of Redis and other tasks)
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"gave up waiting for {what}")


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def acquire(relay: OutboxRelay) -> None:
    await relay.register()

    async def held() -> bool:
        return await relay.keeper.try_acquire()

    await until(held, "the relay's lease")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- relay -------------------------------------------------------------------------------


async def test_relay_publishes_each_tenant_in_position_order_with_the_envelope(
    stack: Stack,
) -> None:
    a, b = new_tenant(), new_tenant()
    expected: dict[str, list[int]] = {a: [], b: []}
    for _ in range(4):  # interleaved across tenants, more rows than one batch
        expected[a] += await write(stack, a, 2)
        expected[b] += await write(stack, b, 1, actor="users/bob/agents/helper")
    relay = stack.relay(batch_size=3)
    published = metric("aeterna_events_published_total", service="memory")
    task = asyncio.create_task(relay.run())

    async def all_there() -> bool:
        return (
            await stack.redis.xlen(stream_key(a)) == 8
            and await stack.redis.xlen(stream_key(b)) == 4
        )

    await until(all_there, "12 events")
    # Woken by NOTIFY: a change committed while the relay runs is published too, with the
    # trace context of the request that made it.
    with TracerProvider().get_tracer("test").start_as_current_span("CreateMemory") as span:
        expected[a] += await write(stack, a, 1)
    trace = span.get_span_context()
    traceparent = f"00-{trace.trace_id:032x}-{trace.span_id:016x}-{trace.trace_flags:02x}"

    async def one_more() -> bool:
        return await relay.load_cursor() == expected[a][-1]

    await until(one_more, "the 13th event")
    await stop(task)

    for tenant, actor in ((a, "users/alice"), (b, "users/bob/agents/helper")):
        got = await entries(stack.redis, stream_key(tenant))
        assert [int(f["position"]) for f in got] == expected[tenant]
        for fields in got:
            assert set(fields) == {
                "event_id", "service", "type", "tenant", "resource", "actor", "time",
                "position", "payload", "traceparent",
            }  # fmt: skip
            assert fields["event_id"] == f"memory:{fields['position']}"
            assert (fields["service"], fields["type"]) == ("memory", "memory.created")
            assert fields["tenant"] == tenant and fields["actor"] == actor
            assert fields["resource"].startswith(f"tenants/{tenant}/memories/")
            assert fields["time"].endswith("Z")
            assert datetime.fromisoformat(fields["time"]).utcoffset() is not None
            assert json.loads(fields["payload"]) == {}
            traced = fields["position"] == str(expected[a][-1])
            assert fields["traceparent"] == (traceparent if traced else "")
            assert Event.from_fields(fields).position == int(fields["position"])
    assert {stream_key(a), stream_key(b)} <= await stack.redis.smembers(STREAMS_KEY)
    assert await relay.load_cursor() == max(expected[a])
    assert metric("aeterna_events_published_total", service="memory") - published == 13
    assert metric("aeterna_events_relay_lag_positions", service="memory") == 0
    # The lease was released on cancellation.
    assert not relay.leader


async def test_the_outbox_trim_keeps_every_row_the_relay_has_not_published(
    stack: Stack,
) -> None:
    t = new_tenant()
    positions = await write(stack, t, 3)
    relay = stack.relay()
    await acquire(relay)
    # An index follower has applied everything; the relay has published nothing yet.
    await stack.db.pool.execute(
        "INSERT INTO outbox_followers (name, position, expires_at) "
        "VALUES ('index', $1, now() + interval '1 hour')",
        positions[-1],
    )
    assert await stack.db.pool.fetchval("SELECT trim_outbox(100)") == 0
    assert await relay.publish_once() == 3
    assert await stack.db.pool.fetchval("SELECT trim_outbox(100)") == 3
    # Its row never expires: a relay that is down still holds the trim back.
    assert await stack.db.pool.fetchval(
        "SELECT expires_at = 'infinity' FROM outbox_followers WHERE name = 'relay:memory'"
    )


class RelayCrash(Exception):
    """Stands for the process dying between the XADDs and the cursor write."""


class CrashingRelay(OutboxRelay):
    """Dies (lease not released, cursor not written) on its ``crash_at``-th cursor write."""

    crash_at = 2
    writes = 0

    async def save_cursor(self, position: int, lease: leases.Lease) -> None:
        self.writes += 1
        if self.writes == self.crash_at:
            raise RelayCrash(position)
        await super().save_cursor(position, lease)


async def test_a_relay_crash_between_xadd_and_cursor_write_republishes_the_same_events(
    stack: Stack,
) -> None:
    t = new_tenant()
    positions = await write(stack, t, 10)
    crashing = CrashingRelay(
        stack.db, stack.indexer, stack.redis, service="memory", batch_size=4, lease_ttl_s=1.0
    )
    await acquire(crashing)
    dead_lease = crashing.keeper.current()
    with pytest.raises(RelayCrash):
        await crashing.publish_once()
    # Rows 1-8 are in the stream, but the cursor says 4.
    assert await stack.redis.xlen(stream_key(t)) == 8
    assert await crashing.load_cursor() == positions[3]

    # Another replica takes over once the dead holder's lease expires.
    successor = stack.relay(batch_size=4, lease_ttl_s=1.0)
    await acquire(successor)
    assert successor.keeper.current().epoch == dead_lease.epoch + 1
    assert await successor.publish_once() == 6
    # The deposed holder cannot move the cursor back or forward.
    with pytest.raises(leases.LeaseLostError):
        await OutboxRelay.save_cursor(crashing, positions[-1] + 100, dead_lease)

    got = await entries(stack.redis, stream_key(t))
    ids = [f["event_id"] for f in got]
    assert set(ids) == {f"memory:{p}" for p in positions}
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert duplicates == sorted(f"memory:{p}" for p in positions[4:8])
    by_id: dict[str, dict[str, str]] = {}
    for fields in got:  # a re-publication is the same event, field for field
        assert by_id.setdefault(fields["event_id"], fields) == fields
    first_seen = list(dict.fromkeys(int(f["position"]) for f in got))
    assert first_seen == positions
    assert await successor.load_cursor() == positions[-1]


class PausingRelay(OutboxRelay):
    """Waits between the XADDs and the cursor write until ``resume`` is set."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.paused, self.resume = asyncio.Event(), asyncio.Event()

    async def save_cursor(self, position: int, lease: leases.Lease) -> None:
        self.paused.set()
        await self.resume.wait()
        await super().save_cursor(position, lease)


async def test_a_relay_stopped_mid_batch_records_its_cursor_before_it_stops(
    stack: Stack,
) -> None:
    t = new_tenant()
    positions = await write(stack, t, 3)
    relay = PausingRelay(stack.db, stack.indexer, stack.redis, service="memory", poll_s=0.2)
    task = asyncio.create_task(relay.run())
    async with asyncio.timeout(WAIT_S):
        await relay.paused.wait()
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches run() while the batch is in flight
    assert not task.done()
    relay.resume.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await relay.load_cursor() == positions[-1]
    assert await stack.redis.xlen(stream_key(t)) == 3
    assert not relay.leader  # and the lease was released


async def test_two_relays_only_the_lease_holder_publishes_and_the_other_takes_over(
    stack: Stack,
) -> None:
    t = new_tenant()
    one, two = stack.relay(), stack.relay()
    tasks = {one: asyncio.create_task(one.run()), two: asyncio.create_task(two.run())}

    async def a_leader() -> bool:
        return one.leader or two.leader

    await until(a_leader, "a relay to hold the lease")
    first = await write(stack, t, 5)

    async def five() -> bool:
        return await stack.redis.xlen(stream_key(t)) == 5

    await until(five, "5 events")
    holder, other = (one, two) if one.leader else (two, one)
    assert not other.leader and other.position == 0  # it never published
    await stop(tasks[holder])  # a clean stop: the batch in flight records its cursor

    async def took_over() -> bool:
        return other.leader

    await until(took_over, "the takeover")
    second = await write(stack, t, 5)

    async def ten() -> bool:
        return await stack.redis.xlen(stream_key(t)) >= 10

    await until(ten, "10 events")
    await stop(tasks[other])
    got = await entries(stack.redis, stream_key(t))
    # Resumed from the fenced cursor: nothing twice, nothing missing, in order.
    assert [int(f["position"]) for f in got] == first + second
    assert await other.load_cursor() == second[-1]


GOOD = Event(
    event_id="governance:7",
    service="governance",
    type="governance.role_binding.deleted",
    tenant="acme",
    resource="tenants/acme/roleBindings/b1",
    actor="users/root",
    time="2026-01-02T03:04:05.000006Z",
    position=7,
    payload={"role": "ADMIN"},
).to_fields()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"actor": None}, "missing fields: actor"),
        ({"position": "seven"}, "invalid position or payload"),
        ({"payload": "[1]"}, "payload is not a JSON object"),
        ({"payload": "{"}, "invalid position or payload"),
        ({"event_id": "governance:8"}, "event_id is not {service}:{position}"),
    ],
)
def test_envelopes_that_are_not_the_contract_are_refused(
    change: dict[str, str | None], reason: str
) -> None:
    fields = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(MalformedEventError, match=re.escape(reason)):
        Event.from_fields(fields)


def test_an_envelope_round_trips_and_names_authorization_invalidations() -> None:
    event = Event.from_fields(GOOD)
    assert event.to_fields() == GOOD
    assert event.invalidates_authorization
    assert not Event.from_fields(
        {**GOOD, "type": "governance.policy.created"}
    ).invalidates_authorization
    assert (
        rfc3339(datetime(2026, 1, 2, 4, 4, 5, 6, tzinfo=timezone(timedelta(hours=1))))
        == GOOD["time"]
    )
    with pytest.raises(ValueError):
        rfc3339(datetime(2026, 1, 2))


def test_stream_trim_uses_minid_by_age_or_maxlen() -> None:
    assert StreamTrim(max_age_s=60).xadd_options(1000.0) == {
        "minid": "940000",
        "approximate": True,
    }
    assert StreamTrim(max_len=1000).xadd_options(1000.0) == {"maxlen": 1000, "approximate": True}
    with pytest.raises(ValueError):
        StreamTrim(max_len=0)


async def test_xadd_trims_entries_older_than_the_age_bound(stack: Stack) -> None:
    t = new_tenant()
    key = stream_key(t)
    # A macro node (stream-node-max-entries: 100) of entries from 1970: "~" trims whole
    # nodes only, each once its newest entry is older than the bound.
    async with stack.redis.pipeline(transaction=False) as pipe:
        for ms in range(1, 101):
            pipe.xadd(key, {"old": "1"}, id=f"{ms}-0")
        await pipe.execute()
    await write(stack, t, 120)
    relay = stack.relay(batch_size=500, trim=StreamTrim(max_age_s=7 * 86_400))
    await acquire(relay)
    await relay.publish_once()
    assert await stack.redis.xlen(key) == 120
    assert all("event_id" in f for f in await entries(stack.redis, key))


# ---- consumers ---------------------------------------------------------------------------


async def publish(stack: Stack, tenant: str, n: int) -> list[str]:
    """Publish ``n`` new events of ``tenant`` through a relay; returns their event ids."""
    positions = await write(stack, tenant, n)
    relay = stack.relay()
    await acquire(relay)
    await relay.publish_once()
    await relay.keeper.release()
    return [f"memory:{p}" for p in positions]


def consumer(stack: Stack, group: str, handler: Any, **kw: Any) -> EventConsumer:
    kw.setdefault("block_s", 0.05)
    kw.setdefault("claim_idle_s", 0)
    kw.setdefault("refresh_s", 0)
    return EventConsumer(stack.redis, group, handler, **kw)


def recorder(tenant: str) -> tuple[list[Event], Handler]:
    """A handler recording ``tenant``'s events (others' are ignored), and its record."""
    seen: list[Event] = []

    async def record(event: Event) -> None:
        if event.tenant == tenant:
            seen.append(event)

    return seen, record


def hanging(tenant: str, started: asyncio.Event, seen: list[str]) -> Handler:
    """A handler that never returns from ``tenant``'s first event (its consumer dies there
    when cancelled)."""

    async def hang(event: Event) -> None:
        if event.tenant == tenant:
            seen.append(event.event_id)
            started.set()
            await asyncio.Event().wait()

    return hang


async def die_while_handling(stack: Stack, group: str, name: str, handler: Handler) -> None:
    """Run a consumer until its handler is stuck, then cancel it (pending entries stay)."""
    started = asyncio.Event()
    task = asyncio.create_task(consumer(stack, group, handler(started), consumer=name).run())
    async with asyncio.timeout(WAIT_S):
        await started.wait()
    await stop(task)


async def test_a_consumer_that_dies_with_pending_entries_is_taken_over_by_xautoclaim(
    stack: Stack,
) -> None:
    t = new_tenant()
    ids = await publish(stack, t, 6)
    group = f"g-{uuid.uuid4().hex[:6]}"
    seen_a: list[str] = []
    await die_while_handling(stack, group, "a", lambda started: hanging(t, started, seen_a))
    key = stream_key(t)
    pending = await stack.redis.xpending(key, group)
    assert pending["pending"] == 6 and {c["name"] for c in pending["consumers"]} == {"a"}

    seen_b, records = recorder(t)
    b = consumer(stack, group, records, consumer="b")
    await b.poll_once()
    assert [e.event_id for e in seen_b] == ids  # every event, in order
    assert seen_a == ids[:1]
    assert (await stack.redis.xpending(key, group))["pending"] == 0
    await b.poll_once()
    assert len(seen_b) == 6  # acknowledged: not delivered again


async def test_an_entry_failing_three_deliveries_goes_to_the_dead_letter_stream(
    stack: Stack,
) -> None:
    t = new_tenant()
    ids = await publish(stack, t, 3)
    group = f"g-{uuid.uuid4().hex[:6]}"
    calls: list[str] = []

    async def fails_on_second(event: Event) -> None:
        if event.tenant != t:
            return
        calls.append(event.event_id)
        if event.event_id == ids[1]:
            raise ValueError("cannot audit this one")

    dead_before = metric("aeterna_events_dead_letters_total", group=group)
    c = consumer(stack, group, fails_on_second)
    for _ in range(5):
        await c.poll_once()
    assert calls.count(ids[1]) == 3
    assert calls.count(ids[0]) == 1 and calls.count(ids[2]) == 1
    dead = await entries(stack.redis, dead_letter_key(stream_key(t)))
    assert len(dead) == 1
    assert dead[0]["event_id"] == ids[1]
    assert "cannot audit this one" in dead[0]["dead_reason"]
    assert dead[0]["dead_deliveries"] == "3" and dead[0]["dead_group"] == group
    assert Event.from_fields(dead[0]).event_id == ids[1]  # the envelope is kept whole
    assert (await stack.redis.xpending(stream_key(t), group))["pending"] == 0
    assert metric("aeterna_events_dead_letters_total", group=group) - dead_before == 1


async def test_a_batch_handler_takes_each_read_whole_and_a_failed_batch_goes_one_by_one(
    stack: Stack,
) -> None:
    t = new_tenant()
    ids = await publish(stack, t, 7)
    group = f"g-{uuid.uuid4().hex[:6]}"
    batches: list[list[str]] = []
    singles: list[str] = []

    async def batch(events: Sequence[Event]) -> None:
        mine = [e.event_id for e in events if e.tenant == t]
        if mine:
            batches.append(mine)
        if ids[4] in mine:
            raise ValueError("cannot audit this one")

    async def single(event: Event) -> None:
        if event.tenant == t:
            singles.append(event.event_id)
            if event.event_id == ids[4]:
                raise ValueError("cannot audit this one")

    c = consumer(stack, group, single, batch_handler=batch, count=4)
    for _ in range(6):
        await c.poll_once()
    # Reads of four in stream order; the second batch failed and went one by one.
    assert batches[:2] == [ids[:4], ids[4:]]
    assert singles[:3] == ids[4:]
    # The bad one alone was delivered again, as a batch of one, up to the limit.
    assert all(b == [ids[4]] for b in batches[2:]) and len(batches) == 4
    assert singles.count(ids[4]) == 3 and singles.count(ids[5]) == 1
    dead = await entries(stack.redis, dead_letter_key(stream_key(t)))
    assert [d["event_id"] for d in dead] == [ids[4]]
    assert (await stack.redis.xpending(stream_key(t), group))["pending"] == 0


async def test_an_entry_never_acknowledged_three_times_is_dead_lettered_when_claimed(
    stack: Stack,
) -> None:
    t = new_tenant()
    ids = await publish(stack, t, 1)
    group = f"g-{uuid.uuid4().hex[:6]}"
    key = stream_key(t)
    for attempt in range(3):  # three consumers die while handling it
        await die_while_handling(stack, group, f"c{attempt}", lambda st: hanging(t, st, []))
    handled, records = recorder(t)
    await consumer(stack, group, records, consumer="last").poll_once()
    assert not handled
    dead = await entries(stack.redis, dead_letter_key(key))
    assert [d["event_id"] for d in dead] == ids
    assert dead[0]["dead_reason"] == "not acknowledged after 3 deliveries"


async def test_a_malformed_entry_is_dead_lettered_without_calling_the_handler(
    stack: Stack,
) -> None:
    t = new_tenant()
    key = stream_key(t)
    await stack.redis.sadd(STREAMS_KEY, key)
    await stack.redis.xadd(key, {"event_id": "memory:1", "type": "memory.created"})
    handled, records = recorder(t)
    await consumer(stack, f"g-{uuid.uuid4().hex[:6]}", records).poll_once()
    assert not handled
    dead = await entries(stack.redis, dead_letter_key(key))
    assert dead[0]["dead_reason"].startswith("malformed: missing fields")


async def test_a_group_starting_at_dollar_skips_entries_already_in_the_stream(
    stack: Stack,
) -> None:
    t = new_tenant()
    await publish(stack, t, 2)
    handled, records = recorder(t)
    c = consumer(stack, f"g-{uuid.uuid4().hex[:6]}", records, start="$")
    await c.poll_once()
    later = await publish(stack, t, 1)
    await c.poll_once()
    assert [e.event_id for e in handled] == later


# ---- Redis restart -----------------------------------------------------------------------


async def test_nothing_is_lost_across_a_redis_restart_while_events_are_written(
    stack: Stack,
) -> None:
    server = RedisServer(port=free_port(), data_dir=str(scratch_dir("aeterna-redis-data-"))).start()
    client = aioredis.Redis.from_url(
        server.url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=1.0
    )
    t = new_tenant()
    handled: dict[str, Event] = {}

    async def audit(event: Event) -> None:
        if event.tenant == t:
            assert handled.setdefault(event.event_id, event) == event

    relay = stack.relay(redis=client)
    worker = EventConsumer(
        client, "audit", audit, block_s=0.2, claim_idle_s=1.0, refresh_s=0.2, max_backoff_s=0.3
    )
    errors_before = metric("aeterna_events_relay_errors_total", service="memory")
    consumer_errors_before = metric("aeterna_events_consumer_errors_total", group="audit")
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(worker.run())]
    try:
        written = await write(stack, t, 15)

        async def some_consumed() -> bool:
            return len(handled) >= 5

        await until(some_consumed, "events before the restart")
        server.kill()  # SIGKILL: a crash; the append-only file (fsynced per write) stays
        written += await write(stack, t, 15)  # committed while Redis is down
        await asyncio.sleep(0.5)  # let the relay and the consumer hit the outage
        server.start()
        written += await write(stack, t, 15)

        async def all_consumed() -> bool:
            return len(handled) == len(written)

        await until(all_consumed, "every event after the restart")
        assert not any(task.done() for task in tasks)  # neither crashed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        server.stop()
    assert set(handled) == {f"memory:{p}" for p in written}
    # Both saw the outage and retried.
    assert metric("aeterna_events_relay_errors_total", service="memory") > errors_before
    assert metric("aeterna_events_consumer_errors_total", group="audit") > consumer_errors_before
    assert not await stack.redis.exists(dead_letter_key(stream_key(t)))
