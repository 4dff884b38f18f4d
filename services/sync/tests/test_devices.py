"""Device sync (:mod:`aeterna_sync.devices`) against a real memory server: push and pull
through memory's gRPC API with the caller's own token, last writer wins between two devices
editing the same memory concurrently, the losing version kept in memory's revisions,
idempotent retries, and every refusal of bad input."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.type.v1 import layer_pb2
from aeterna_common.authz import StaticDirectory
from aeterna_devstack.servers import RedisServer, scratch_dir
from aeterna_sync.devices import KEEP, MARKER, DeviceLimits, DeviceSync
from google.protobuf import field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2
from governance_testkit import md
from grpc_status import rpc_status
from memory_testkit import start_memory
from sync_testkit import SyncEnv, start_sync

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@dataclass
class Env:
    sync: SyncEnv
    memory: msvc_grpc.MemoryServiceStub
    memory_port: int


@pytest_asyncio.fixture(scope="module")
async def env(make_database: Any, redis_server: RedisServer) -> AsyncIterator[Env]:
    """A memory server and a sync server calling it (pulls settle at once, pushes of at
    most 1 MB, under gRPC's 4 MiB message limit)."""
    scratch = scratch_dir("aeterna-devices-")
    server, _ = await start_memory(await make_database(), redis_server.url, scratch / "index")
    sync = await start_sync(
        await make_database(),
        redis_server.url,
        StaticDirectory(),
        memory_url=f"127.0.0.1:{server.port}",
        device_settle_s=0,
        device_max_push_bytes=1_000_000,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield Env(sync, msvc_grpc.MemoryServiceStub(channel), server.port)
    await channel.close()
    await sync.close()
    await server.stop()


def entry(
    entry_id: str,
    content: str,
    at: datetime,
    revision: int = 1,
    memory: str = "",
    user: str = "dev",
    deleted: bool = False,
) -> res.DeviceMemory:
    e = res.DeviceMemory(
        entry_id=entry_id,
        memory=memory,
        revision=revision,
        layer=layer_pb2.MEMORY_LAYER_USER,
        scope=layer_pb2.Scope(user_id=user),
        content=content,
        tags=["device"],
        deleted=deleted,
    )
    e.update_time.FromDatetime(at)
    return e


async def push(
    env: Env, tenant: str, device: str, *entries: res.DeviceMemory, user: str = "dev", **kw: Any
) -> svc.PushMemoriesResponse:
    reply: svc.PushMemoriesResponse = await env.sync.stub.PushMemories(
        svc.PushMemoriesRequest(
            parent=f"tenants/{tenant}", device_id=device, entries=list(entries), **kw
        ),
        metadata=md(tenant, user),
    )
    return reply


async def pull_all(env: Env, tenant: str, user: str = "dev", **kw: Any) -> list[res.DeviceMemory]:
    """Every entry from the start, page by page (limit 2 to cross pages)."""
    out: list[res.DeviceMemory] = []
    cursor = ""
    while True:
        page = await env.sync.stub.PullMemories(
            svc.PullMemoriesRequest(parent=f"tenants/{tenant}", since_cursor=cursor, limit=2, **kw),
            metadata=md(tenant, user),
        )
        out.extend(page.entries)
        cursor = page.cursor
        if not page.has_more:
            return out


async def revisions(env: Env, tenant: str, name: str) -> list[str]:
    page = await env.memory.ListMemoryRevisions(
        msvc.ListMemoryRevisionsRequest(name=name, page_size=100), metadata=md(tenant, "dev")
    )
    return [r.new_content for r in page.revisions]


def violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


async def test_two_devices_edit_concurrently_and_the_last_writer_wins(env: Env) -> None:
    tenant = env.sync.tenant()
    first = await push(env, tenant, "laptop", entry("n1", "v1", T0))
    name = first.server_ids["n1"]
    assert name.startswith(f"tenants/{tenant}/memories/") and not first.conflicts
    # The phone learns the memory by pulling.
    pulled = await pull_all(env, tenant)
    assert [(e.memory, e.content) for e in pulled] == [(name, "v1")]

    # Both edit offline; the phone's edit is later. They push at the same time.
    laptop = entry("n1", "laptop edit", T0 + timedelta(minutes=5), revision=2, memory=name)
    phone = entry(pulled[0].entry_id, "phone edit", T0 + timedelta(minutes=9), memory=name)
    a, b = await asyncio.gather(
        push(env, tenant, "laptop", laptop), push(env, tenant, "phone", phone)
    )
    # Whatever order they landed in, the later edit is in force and the other lost.
    lost = [c for r in (a, b) for c in r.conflicts]
    assert [(c.entry_id, c.losing.content, c.winning.content) for c in lost] in (
        [("n1", "laptop edit", "phone edit")],  # laptop landed second and lost
        [],  # laptop landed first, then phone won over it
    )
    got = await env.memory.GetMemory(msvc.GetMemoryRequest(name=name), metadata=md(tenant, "dev"))
    assert got.content == "phone edit"
    # The losing version is kept among memory's revisions, whichever order they landed in.
    assert "laptop edit" in await revisions(env, tenant, name)

    # A late push of an older edit loses, and is reported back with the version in force.
    stale = entry("n1", "old laptop edit", T0 + timedelta(minutes=1), revision=3, memory=name)
    late = await push(env, tenant, "laptop", stale)
    assert [(c.losing.content, c.winning.content) for c in late.conflicts] == [
        ("old laptop edit", "phone edit")
    ]
    assert late.server_ids["n1"] == name
    assert "old laptop edit" in await revisions(env, tenant, name)
    # Both devices now pull the same winner.
    final = await pull_all(env, tenant)
    assert [(e.memory, e.content) for e in final] == [(name, "phone edit")]
    assert final[0].update_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(minutes=9)


async def test_retried_push_is_applied_once(env: Env) -> None:
    tenant = env.sync.tenant()
    e = entry("r1", "once", T0)
    one = await push(env, tenant, "tablet", e)
    two = await push(env, tenant, "tablet", e, last_push_cursor=one.cursor)
    assert one.server_ids == two.server_ids
    assert one.cursor != two.cursor
    assert await revisions(env, tenant, one.server_ids["r1"]) == ["once"]
    edit = entry("r1", "twice", T0 + timedelta(minutes=1), revision=2)
    for _ in range(2):  # the same revision again: no second update
        again = await push(env, tenant, "tablet", edit)
        assert again.server_ids == one.server_ids and not again.conflicts
    assert await revisions(env, tenant, one.server_ids["r1"]) == ["once", "twice"]


async def test_pull_is_in_update_order_and_resumes_from_its_cursor(env: Env) -> None:
    tenant = env.sync.tenant()
    names = []
    for i in range(3):
        got = await push(env, tenant, "d", entry(f"o{i}", f"c{i}", T0 + timedelta(seconds=i)))
        names.append(got.server_ids[f"o{i}"])
    # The first one changes last, so it is pulled last.
    await push(env, tenant, "d", entry("o0", "c0'", T0 + timedelta(hours=1), revision=2))
    page = await env.sync.stub.PullMemories(
        svc.PullMemoriesRequest(parent=f"tenants/{tenant}", limit=2), metadata=md(tenant, "dev")
    )
    assert [e.memory for e in page.entries] == names[1:3] and page.has_more
    rest = await env.sync.stub.PullMemories(
        svc.PullMemoriesRequest(parent=f"tenants/{tenant}", since_cursor=page.cursor),
        metadata=md(tenant, "dev"),
    )
    assert [(e.memory, e.content) for e in rest.entries] == [(names[0], "c0'")]
    assert not rest.has_more
    # A deletion is pulled as deleted.
    await push(env, tenant, "d", entry("o1", "", T0 + timedelta(hours=2), revision=2, deleted=True))
    tail = await env.sync.stub.PullMemories(
        svc.PullMemoriesRequest(parent=f"tenants/{tenant}", since_cursor=rest.cursor),
        metadata=md(tenant, "dev"),
    )
    assert [(e.memory, e.deleted) for e in tail.entries] == [(names[1], True)]
    # Only the layers asked for.
    none = await env.sync.stub.PullMemories(
        svc.PullMemoriesRequest(parent=f"tenants/{tenant}", layers=[layer_pb2.MEMORY_LAYER_TEAM]),
        metadata=md(tenant, "dev"),
    )
    assert not none.entries


async def test_memory_authorization_applies_unchanged(env: Env) -> None:
    tenant = env.sync.tenant()
    mine = await push(env, tenant, "d", entry("m", "mine", T0))
    # Writing into another user's memories is refused by memory, per entry.
    theirs = await push(env, tenant, "d", entry("x", "not mine", T0, user="viewer"))
    assert not theirs.server_ids
    assert [(c.entry_id, c.HasField("winning")) for c in theirs.conflicts] == [("x", False)]
    # Editing another user's memory by name is refused too, and changes nothing.
    name = mine.server_ids["m"]
    other = await push(
        env, tenant, "d", entry("y", "taken", T0 + timedelta(hours=1), memory=name), user="viewer"
    )
    assert [c.entry_id for c in other.conflicts] == ["y"]
    got = await env.memory.GetMemory(msvc.GetMemoryRequest(name=name), metadata=md(tenant, "dev"))
    assert got.content == "mine"
    # A pull returns only what memory lets the caller read.
    assert await pull_all(env, tenant, user="viewer") == []
    # Another tenant's parent is refused before anything is read.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sync.stub.PullMemories(
            svc.PullMemoriesRequest(parent="tenants/elsewhere"), metadata=md(tenant, "dev")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _cursor(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"entries": [entry(f"e{i}", "x", T0) for i in range(501)]}, "entries"),
        ({"entries": [entry(f"e{i}", "x" * 30_000, T0) for i in range(40)]}, "entries"),
        ({"entries": [entry("e", "x" * 40_000, T0)]}, "entries[0].content"),
        # A good entry first: nothing of the push is written.
        (
            {
                "entries": [
                    entry("ok", "fine", T0),
                    entry("e", "x", datetime.now(UTC) + timedelta(hours=25)),
                ]
            },
            "entries[1].update_time",
        ),
        ({"entries": [entry("e", "x", T0), entry("e", "y", T0)]}, "entries[1].entry_id"),
        (
            {"entries": [entry("e", "x", T0, memory="tenants/other/memories/x")]},
            "entries[0].memory",
        ),
        ({"last_push_cursor": "not a cursor"}, "last_push_cursor"),
        ({"last_push_cursor": _cursor({"d": "another", "s": 1})}, "last_push_cursor"),
        ({"device_id": "bad device id"}, "device_id"),
    ],
)
async def test_bad_pushes_are_refused_whole(
    env: Env, request_kw: dict[str, Any], field: str
) -> None:
    tenant = env.sync.tenant()
    kw: dict[str, Any] = {"parent": f"tenants/{tenant}", "device_id": "d"}
    kw.update(request_kw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sync.stub.PushMemories(svc.PushMemoriesRequest(**kw), metadata=md(tenant, "dev"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value)
    # Nothing was written (not even a good entry before the bad one).
    assert await pull_all(env, tenant) == []


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"since_cursor": "%%%"}, "since_cursor"),
        ({"since_cursor": _cursor({"t": "yesterday", "m": "x"})}, "since_cursor"),
        ({"limit": 1001}, "limit"),
        ({"layers": [99]}, "layers[0]"),
    ],
)
async def test_bad_pulls_are_refused(env: Env, request_kw: dict[str, Any], field: str) -> None:
    tenant = env.sync.tenant()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sync.stub.PullMemories(
            svc.PullMemoriesRequest(parent=f"tenants/{tenant}", **request_kw),
            metadata=md(tenant, "dev"),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(caught.value)


async def test_a_device_needs_a_member_token(env: Env) -> None:
    tenant = env.sync.tenant()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.sync.stub.PushMemories(
            svc.PushMemoriesRequest(parent=f"tenants/{tenant}", device_id="d"),
            metadata=md(None, "service:x"),
        )
    assert caught.value.code() in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_a_keep_left_half_done_is_finished_by_the_next_push(env: Env) -> None:
    tenant = env.sync.tenant()
    first = await push(env, tenant, "d", entry("k", "winner", T0 + timedelta(hours=1)))
    name = first.server_ids["k"]
    # As a crash between the two writes of a keep leaves it: the loser in force, marked.
    got = await env.memory.GetMemory(msvc.GetMemoryRequest(name=name), metadata=md(tenant, "dev"))
    marked = struct_pb2.Struct()
    marked.CopyFrom(got.metadata)
    marked.update({KEEP: {"device": "e", "entry": "k", "winner_marker": got.metadata[MARKER]}})
    await env.memory.UpdateMemory(
        msvc.UpdateMemoryRequest(
            memory=mres.Memory(name=name, content="loser", metadata=marked),
            update_mask=field_mask_pb2.FieldMask(paths=["content", "metadata"]),
        ),
        metadata=md(tenant, "dev"),
    )
    # A pull skips the transitional version.
    assert await pull_all(env, tenant) == []
    # The next push of the memory restores the winner first, then decides.
    late = await push(env, tenant, "e", entry("k2", "older", T0, memory=name))
    assert [(c.losing.content, c.winning.content) for c in late.conflicts] == [("older", "winner")]
    got = await env.memory.GetMemory(msvc.GetMemoryRequest(name=name), metadata=md(tenant, "dev"))
    assert got.content == "winner" and KEEP not in got.metadata
    assert [e.content for e in await pull_all(env, tenant)] == ["winner"]


async def test_the_pull_cursor_never_passes_unsettled_changes(env: Env) -> None:
    tenant = env.sync.tenant()
    await push(env, tenant, "d", entry("s", "fresh", T0))
    devices = env.sync.app.deps.devices
    assert devices is not None
    slow = DeviceSync(devices.db, f"127.0.0.1:{env.memory_port}", DeviceLimits(settle_s=3600))
    try:
        token = md(tenant, "dev")[0][1]
        first = await slow.pull(token, tenant, None, [], 10)
        # The change is sent, but the cursor stays before it: the next pull sends it again.
        assert [e.content for e in first.entries] == ["fresh"] and first.cursor == ""
        again = await slow.pull(token, tenant, None, [], 10)
        assert [e.memory for e in again.entries] == [e.memory for e in first.entries]
    finally:
        await slow.close()
