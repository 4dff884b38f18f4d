"""Subscribe and Heartbeat against a real server, Redis and PostgreSQL: room routing, resume
from a cursor with no gap and no duplicate, every refusal, a binding revoked mid-stream, a
slow subscriber bounded, and presence joining and expiring."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna_common.authz import RoleBinding, Snapshot, StaticDirectory
from aeterna_common.events import stream_key
from aeterna_devstack.servers import RedisServer
from aeterna_sync.rooms import decode_cursor, entry_key
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from sync_testkit import BINDINGS, UNITS, Publisher, SyncEnv, start_sync, who

WAIT_S = 30.0
"""Longest wait for any expected message (a loaded machine)."""


def _info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


class Follower:
    """One Subscribe call read message by message."""

    def __init__(self, env: SyncEnv, tenant: str, user: str, rooms: list[str], after: str = ""):
        self.call: Any = env.stub.Subscribe(
            svc.SubscribeRequest(parent=f"tenants/{tenant}", rooms=rooms, after_cursor=after),
            metadata=who(tenant, user),
        )
        self.cursor = after

    async def message(self) -> svc.SubscribeResponse:
        async with asyncio.timeout(WAIT_S):
            got = await self.call.read()
        assert got is not grpc.aio.EOF, "the stream ended"
        if got.cursor:
            self.cursor = got.cursor
        return got  # type: ignore[no-any-return]

    async def started(self) -> str:
        """Wait for the first message (the subscription is live); its cursor."""
        first = await self.message()
        assert not first.HasField("event") and first.cursor
        return str(first.cursor)

    async def events(self, n: int) -> list[res.LiveEvent]:
        """The next ``n`` events (keepalives skipped)."""
        out: list[res.LiveEvent] = []
        while len(out) < n:
            got = await self.message()
            if got.HasField("event"):
                out.append(got.event)
        return out

    async def error(self) -> grpc.aio.AioRpcError:
        """Read until the stream fails; the error."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(WAIT_S):
                while True:
                    if await self.call.read() is grpc.aio.EOF:
                        break
        return caught.value


class Metrics:
    """The sync stream metrics of this process (the server runs in it), read as deltas."""

    NAMES = (
        ("aeterna_sync_subscribers", {}),
        ("aeterna_sync_events_delivered_total", {"phase": "live"}),
        ("aeterna_sync_events_delivered_total", {"phase": "catchup"}),
        ("aeterna_sync_delivery_lag_seconds_count", {}),
        ("aeterna_sync_delivery_lag_seconds_sum", {}),
    )

    def __init__(self) -> None:
        self.start = self.now()

    @classmethod
    def now(cls) -> dict[str, float]:
        return {
            f"{n}{labels}": REGISTRY.get_sample_value(n, labels) or 0.0 for n, labels in cls.NAMES
        }

    def delta(self) -> dict[str, float]:
        now = self.now()
        return {k: now[k] - self.start[k] for k in now}

    async def subscribers_back(self) -> None:
        """Wait until the server has closed the streams opened since the start (a cancelled
        call ends on the server a little later, and may still send until then)."""
        async with asyncio.timeout(WAIT_S):
            while self.delta()["aeterna_sync_subscribers{}"] != 0:  # noqa: ASYNC110 (server)
                await asyncio.sleep(0.05)


def project(ident: str) -> dict[str, Any]:
    return {"layer": 4, "project_id": ident}


async def test_room_events_in_commit_order_then_resume_with_no_gap_and_no_duplicate(
    sync_env: SyncEnv,
) -> None:
    tenant = sync_env.tenant()
    pub = Publisher(sync_env.redis, tenant)
    metrics = Metrics()
    follower = Follower(sync_env, tenant, "dev", ["project:checkout"])
    await follower.started()
    assert metrics.delta()["aeterna_sync_subscribers{}"] == 1
    await pub.publish("memory.created", project("checkout"))
    await pub.publish("memory.created", project("elsewhere"))  # another room
    await pub.publish("memory.created", {"layer": 2, "user_id": "dev"})  # not subscribed
    await pub.publish("governance.org_unit.created", {})  # not a live type
    await pub.publish("memory.updated", project("checkout"))
    await pub.publish("memory.deleted", project("checkout"))
    await pub.publish(
        "knowledge.status_changed",
        {"layer": "KNOWLEDGE_LAYER_PROJECT", "org_unit": f"tenants/{tenant}/orgUnits/checkout"},
    )
    got = await follower.events(4)
    assert [e.type for e in got] == [
        res.EVENT_TYPE_MEMORY_ADDED,
        res.EVENT_TYPE_MEMORY_UPDATED,
        res.EVENT_TYPE_MEMORY_DELETED,
        res.EVENT_TYPE_KNOWLEDGE_UPDATED,
    ]
    assert [e.event_id for e in got] == ["memory:1", "memory:5", "memory:6", "memory:7"]
    assert all(list(e.rooms) == ["project:checkout"] for e in got)
    assert got[0].payload["project_id"] == "checkout" and got[0].actor == "users/dev"
    # Only the 4 sent events count (not the 3 filtered out), each with its lag observed.
    moved = metrics.delta()
    assert moved["aeterna_sync_events_delivered_total{'phase': 'live'}"] == 4
    assert moved["aeterna_sync_events_delivered_total{'phase': 'catchup'}"] == 0
    assert moved["aeterna_sync_delivery_lag_seconds_count{}"] == 4
    assert moved["aeterna_sync_delivery_lag_seconds_sum{}"] >= 0
    follower.call.cancel()
    await metrics.subscribers_back()
    # While nobody follows: 50 more, some in the room.
    for _ in range(25):
        await pub.publish("memory.created", project("checkout"))
        await pub.publish("memory.created", project("elsewhere"))
    resumed = Follower(sync_env, tenant, "dev", ["project:checkout"], after=got[-1].cursor)
    await resumed.started()
    await pub.publish("memory.updated", project("checkout"))  # live, after the backlog
    again = await resumed.events(26)
    ids = [e.event_id for e in again]
    assert ids == [f"memory:{p}" for p in range(8, 58, 2)] + ["memory:58"]
    # No duplicate afterwards either: the next live event is the next one.
    await pub.publish("memory.deleted", project("checkout"))
    assert [e.event_id for e in await resumed.events(1)] == ["memory:59"]
    # The resumed backlog counts as catch-up (memory:58 may be read there or live), with no
    # lag observed for it.
    moved = metrics.delta()
    live = moved["aeterna_sync_events_delivered_total{'phase': 'live'}"]
    assert moved["aeterna_sync_events_delivered_total{'phase': 'catchup'}"] + live == 4 + 27
    assert live in (5, 6)
    assert moved["aeterna_sync_delivery_lag_seconds_count{}"] == live
    resumed.call.cancel()
    await metrics.subscribers_back()


async def test_an_idle_subscriber_gets_keepalives_carrying_the_cursor_past_other_rooms(
    sync_env: SyncEnv,
) -> None:
    tenant = sync_env.tenant()
    pub = Publisher(sync_env.redis, tenant)
    follower = Follower(sync_env, tenant, "dev", ["project:checkout"])
    start = decode_cursor(await follower.started())
    ids = await pub.publish("memory.created", project("elsewhere"), count=3)
    # Keepalives (every second here) only: their cursors never go back and reach the last
    # entry, though none of the entries is for the subscriber's room.
    reached = start
    while reached != ids[-1]:
        got = await follower.message()
        assert not got.HasField("event")
        cursor = decode_cursor(got.cursor)
        assert entry_key(cursor) >= entry_key(reached)
        reached = cursor
    # Still idle: another keepalive, at the same place.
    again = await follower.message()
    assert not again.HasField("event") and decode_cursor(again.cursor) == ids[-1]
    # The next event for the room comes next, with its own cursor.
    [entry] = await pub.publish("memory.created", project("checkout"))
    [event] = await follower.events(1)
    assert decode_cursor(event.cursor) == entry and event.event_id == "memory:4"
    follower.call.cancel()


async def test_tenant_admin_follows_the_tenant_room_and_users_their_own(
    sync_env: SyncEnv,
) -> None:
    tenant = sync_env.tenant()
    pub = Publisher(sync_env.redis, tenant)
    admin = Follower(sync_env, tenant, "root", ["tenant"])
    own = Follower(sync_env, tenant, "dev", ["user:dev"])
    await admin.started()
    await own.started()
    await pub.publish("memory.created", {"layer": 2, "user_id": "dev"})
    await pub.publish("governance.policy.updated", {})
    assert [e.type for e in await admin.events(2)] == [
        res.EVENT_TYPE_MEMORY_ADDED,
        res.EVENT_TYPE_POLICY_CHANGED,
    ]
    assert [e.event_id for e in await own.events(1)] == ["memory:1"]
    admin.call.cancel()
    own.call.cancel()


@pytest.mark.parametrize(
    ("user", "rooms", "after", "code", "reason"),
    [
        ("dev", ["galaxy:1"], "", grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_ROOM"),
        ("dev", [], "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (
            "dev",
            ["project:checkout"],
            "bm90LWEtY3Vyc29y",
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_CURSOR",
        ),
        ("dev", ["project:checkout"], "%%%", grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_CURSOR"),
        # Not readable: another team's room, another user's room, the whole tenant.
        ("dev", ["team:search"], "", grpc.StatusCode.PERMISSION_DENIED, "ACTION_NOT_ALLOWED"),
        ("dev", ["user:viewer"], "", grpc.StatusCode.PERMISSION_DENIED, "ACTION_NOT_ALLOWED"),
        ("dev", ["tenant"], "", grpc.StatusCode.PERMISSION_DENIED, "ACTION_NOT_ALLOWED"),
        # All or nothing: one unreadable room refuses the subscription.
        (
            "viewer",
            ["team:payments", "team:search"],
            "",
            grpc.StatusCode.PERMISSION_DENIED,
            "ACTION_NOT_ALLOWED",
        ),
    ],
)
async def test_subscribe_refusals(
    sync_env: SyncEnv, user: str, rooms: list[str], after: str, code: grpc.StatusCode, reason: str
) -> None:
    tenant = sync_env.tenant()
    exc = await Follower(sync_env, tenant, user, rooms, after).error()
    assert exc.code() == code
    assert _info(exc).reason == reason


async def test_another_tenant_is_refused_before_any_read(sync_env: SyncEnv) -> None:
    tenant, other = sync_env.tenant(), sync_env.tenant()
    call = sync_env.stub.Subscribe(
        svc.SubscribeRequest(parent=f"tenants/{other}", rooms=["tenant"]),
        metadata=who(tenant, "root"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _info(caught.value).reason == "TENANT_MISMATCH"


async def test_a_cursor_older_than_the_retention_is_out_of_range_with_the_oldest_cursor(
    sync_env: SyncEnv,
) -> None:
    tenant = sync_env.tenant()
    pub = Publisher(sync_env.redis, tenant)
    ids = await pub.publish("memory.created", project("checkout"), count=10)
    await sync_env.redis.xtrim(stream_key(tenant), maxlen=3, approximate=False)
    old = base64.urlsafe_b64encode(f"v1:{ids[2]}".encode()).decode().rstrip("=")
    exc = await Follower(sync_env, tenant, "dev", ["project:checkout"], after=old).error()
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE
    oldest = _info(exc).metadata["oldest_cursor"]
    # Resuming from the oldest cursor gives exactly the events still kept.
    resumed = Follower(sync_env, tenant, "dev", ["project:checkout"], after=oldest)
    await resumed.started()
    assert [e.event_id for e in await resumed.events(3)] == ["memory:8", "memory:9", "memory:10"]
    resumed.call.cancel()


async def test_losing_the_binding_ends_the_stream(sync_env: SyncEnv) -> None:
    tenant = sync_env.tenant()
    pub = Publisher(sync_env.redis, tenant)
    follower = Follower(sync_env, tenant, "viewer", ["team:payments"])
    await follower.started()
    await pub.publish("memory.created", {"layer": 5, "team_id": "payments"})
    assert len(await follower.events(1)) == 1
    kept = tuple(b for b in BINDINGS if b.subject != "users/viewer")
    sync_env.directory.put(Snapshot(tenant, 2, UNITS, kept))
    gov = Publisher(sync_env.redis, tenant, service="governance")
    await gov.publish(
        "governance.role_binding.deleted", {}, resource=f"tenants/{tenant}/roleBindings/x"
    )
    await pub.publish("memory.created", {"layer": 5, "team_id": "payments"})
    exc = await follower.error()
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    # And a binding granted again (announced by governance's event) lets the user back in.
    granted = (*kept, RoleBinding("users/viewer", "VIEWER", "eng"))
    sync_env.directory.put(Snapshot(tenant, 3, UNITS, granted))
    await gov.publish("governance.role_binding.created", {})
    async with asyncio.timeout(WAIT_S):
        while True:
            again = Follower(sync_env, tenant, "viewer", ["team:payments"])
            try:
                await again.started()
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
                await asyncio.sleep(0.2)
    again.call.cancel()


async def test_a_slow_subscriber_ends_with_resource_exhausted_and_resumes_losing_nothing(
    make_database: Any, redis_server: RedisServer
) -> None:
    small = await start_sync(
        await make_database(),
        redis_server.url,
        StaticDirectory(),
        subscriber_buffer=10,
        block_ms=100,
    )
    try:
        tenant = small.tenant()
        pub = Publisher(small.redis, tenant)
        follower = Follower(small, tenant, "dev", ["project:checkout"])
        await follower.started()
        # ~9 MB, more than HTTP/2 flow control lets through unread: the server must wait.
        total = 1500
        padded = {**project("checkout"), "pad": "x" * 6000}
        await pub.publish("memory.created", padded, count=total)
        seen: list[str] = []
        exhausted = 0
        call = follower.call
        while len(seen) < total:
            try:
                async with asyncio.timeout(WAIT_S):
                    got = await call.read()
                assert got is not grpc.aio.EOF
                if got.HasField("event"):
                    seen.append(got.event.event_id)
                    follower.cursor = got.cursor
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                exhausted += 1
                resume = _info(exc).metadata["resume_cursor"]
                follower = Follower(small, tenant, "dev", ["project:checkout"], after=resume)
                call = follower.call
        assert exhausted >= 1
        assert seen == [f"memory:{p}" for p in range(1, total + 1)]
        call.cancel()
    finally:
        await small.close()


async def test_presence_join_and_expiry_reach_followers(sync_env: SyncEnv) -> None:
    tenant = sync_env.tenant()
    # The viewer of team payments follows its project checkout, where dev works.
    follower = Follower(sync_env, tenant, "viewer", ["project:checkout"])
    await follower.started()
    reply = await sync_env.stub.Heartbeat(
        svc.HeartbeatRequest(
            parent=f"tenants/{tenant}", rooms=["project:checkout"], client_id="tab-1"
        ),
        metadata=who(tenant, "dev"),
    )
    assert [(p.user, p.client_id, p.room) for p in reply.present] == [
        ("users/dev", "tab-1", "project:checkout")
    ]
    joined, left = await follower.events(2)  # no further heartbeat: gone after the TTL
    assert joined.type == left.type == res.EVENT_TYPE_PRESENCE
    assert (joined.source_type, left.source_type) == ("sync.presence.joined", "sync.presence.left")
    assert joined.payload["user"] == "users/dev" and left.payload["client_id"] == "tab-1"
    follower.call.cancel()


async def test_heartbeat_refusals(sync_env: SyncEnv) -> None:
    tenant = sync_env.tenant()
    for rooms, client_id, code in [
        (["team:search"], "tab", grpc.StatusCode.PERMISSION_DENIED),
        (["nowhere"], "tab", grpc.StatusCode.INVALID_ARGUMENT),
        (["team:payments"], "", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sync_env.stub.Heartbeat(
                svc.HeartbeatRequest(parent=f"tenants/{tenant}", rooms=rooms, client_id=client_id),
                metadata=who(tenant, "dev"),
            )
        assert caught.value.code() == code


async def test_unbuilt_methods_authorize_first(sync_env: SyncEnv) -> None:
    tenant = sync_env.tenant()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sync_env.stub.GetSyncStatus(
            svc.GetSyncStatusRequest(name=f"tenants/{tenant}/syncStatus"),
            metadata=who(tenant, "dev"),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Built: an admin reads the (empty) status; without service credentials pointer sync
    # is not configured, and says so.
    status = await sync_env.stub.GetSyncStatus(
        svc.GetSyncStatusRequest(name=f"tenants/{tenant}/syncStatus"),
        metadata=who(tenant, "root"),
    )
    assert status.pointer_count == 0 and not status.HasField("last_cycle_end_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sync_env.stub.TriggerSync(
            svc.TriggerSyncRequest(parent=f"tenants/{tenant}"), metadata=who(tenant, "root")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await sync_env.stub.ResolveSyncConflict(
            svc.ResolveSyncConflictRequest(
                name=f"tenants/{tenant}/syncConflicts/00000000-0000-0000-0000-000000000001",
                resolution=res.CONFLICT_RESOLUTION_IGNORE,
            ),
            metadata=who(tenant, "root"),
        )
    # Resolving is built too, and needs pointer sync configured.
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
