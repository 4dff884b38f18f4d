"""Writes under failures and retries: commits with an unknown outcome, caller-scoped expiring
idempotency keys, the request-id header, and consistency tokens (issue 6, items 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlparse, urlunparse

import asyncpg
import grpc
import pytest
import pytest_asyncio
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_common.consistency import (
    CONSISTENCY_TOKEN_KEY,
    INDEX_POSITION_KEY,
    INDEX_STALE_KEY,
    decode_token,
    encode_token,
)
from aeterna_common.db import COMMIT_OUTCOME_UNKNOWN, CommitOutcomeUnknown, Database
from aeterna_common.errors import InvalidArgument
from aeterna_memory.adapters.postgres import PostgresMemoryStore
from aeterna_memory.domain.model import (
    Embedded,
    FeedbackType,
    Layer,
    MemoryPatch,
    NewMemory,
    Scope,
)
from aeterna_memory.domain.service import model_id
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memory_testkit import MemoryEnv, md, memory, new_tenant

# ---------------------------------------------------------------------------------------------
# a TCP proxy that cuts the connection carrying a COMMIT


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that, when armed, cuts the next connection that
    sends ``marker`` (``COMMIT`` by default): ``"before"`` drops it without forwarding
    (nothing commits), ``"after"`` forwards it and drops the server's answer (for a COMMIT:
    the transaction committed, and the client cannot know). Real PostgreSQL, a real lost
    connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.mode: str | None = None
        self.marker = b"COMMIT"
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        committed = asyncio.Event()

        def cut() -> None:
            self.cuts += 1
            for w in (writer, up_writer):
                w.transport.abort()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.mode is not None and self.marker in data:
                    mode, self.mode, self.marker = self.mode, None, b"COMMIT"
                    if mode == "before":
                        cut()
                        return
                    committed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if committed.is_set():
                    cut()  # the server has answered the COMMIT: it committed
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        self._tasks.update(tasks)
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
            self._tasks.discard(t)
        for w in (writer, up_writer):
            w.transport.abort()


@pytest_asyncio.fixture
async def cut_store(env: MemoryEnv) -> AsyncIterator[tuple[PostgresMemoryStore, CommitCutter]]:
    url = urlparse(env.urls.app)
    cutter = CommitCutter(url.hostname or "127.0.0.1", url.port or 5432)
    port = await cutter.start()
    netloc = f"{url.username}@127.0.0.1:{port}"
    db = Database(urlunparse(url._replace(netloc=netloc)), min_size=1, max_size=2)
    await db.open()
    yield PostgresMemoryStore(db), cutter
    await db.close()
    await cutter.close()


def _item(content: str, user: str = "u1") -> Embedded:
    return Embedded(
        memory=NewMemory(layer=Layer.USER, scope=Scope(user_id=user), content=content),
        lexical_context=(),
        embedding=[1.0] + [0.0] * 383,
    )


async def _count(env: MemoryEnv, tenant: str, content: str) -> int:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM memories WHERE tenant_id = $1 AND content = $2",
                tenant,
                content,
            )
        )
    finally:
        await conn.close()


# The session replica's model: rows of any other model would make its model guard refuse
# every later search in the shared test database.
SESSION_MODEL = model_id("all-MiniLM-L6-v2-int8", 384)


async def _create(
    store: PostgresMemoryStore, tenant: str, content: str, request_id: str
) -> tuple[list[object], int]:
    result = await store.create(
        tenant,
        [_item(content)],
        model=SESSION_MODEL,
        actor="users/u1",
        method="CreateMemory",
        request_id=request_id,
        request_hash=f"hash-of-{content}",
    )
    return list(result[0]), result[1]


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_a_create_with_request_id_survives_a_lost_commit_once(
    env: MemoryEnv, cut_store: tuple[PostgresMemoryStore, CommitCutter], moment: str
) -> None:
    store, cutter = cut_store
    tenant = new_tenant()
    cutter.mode = moment
    created, position = await _create(store, tenant, "lost at commit", "rid-1")
    assert cutter.cuts == 1
    assert len(created) == 1 and position > 0
    # Neither lost nor duplicated, whether the cut commit went through or not.
    assert await _count(env, tenant, "lost at commit") == 1
    again, _ = await _create(store, tenant, "lost at commit", "rid-1")
    assert [m.id for m in again] == [m.id for m in created]


async def test_a_create_without_request_id_is_never_rerun_after_a_lost_commit(
    env: MemoryEnv, cut_store: tuple[PostgresMemoryStore, CommitCutter]
) -> None:
    store, cutter = cut_store
    tenant = new_tenant()
    cutter.mode = "after"
    with pytest.raises(CommitOutcomeUnknown) as info:
        await _create(store, tenant, "no key", "")
    assert info.value.reason == COMMIT_OUTCOME_UNKNOWN
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert await _count(env, tenant, "no key") == 1  # it did commit, and only once
    # Lost before COMMIT (here: at the INSERT): a plain transient error, retried as before.
    cutter.mode, cutter.marker = "before", b"INSERT INTO memories"
    await _create(store, tenant, "no key, cut early", "")
    assert cutter.cuts == 2
    assert await _count(env, tenant, "no key, cut early") == 1


async def test_feedback_survives_a_lost_commit_and_is_applied_once(
    env: MemoryEnv, cut_store: tuple[PostgresMemoryStore, CommitCutter]
) -> None:
    store, cutter = cut_store
    tenant = new_tenant()
    created, _ = await _create(store, tenant, "rate me", "rid-fb-create")
    mid = created[0].id
    cutter.mode = "after"
    rated, _ = await store.record_feedback(
        tenant,
        mid,
        FeedbackType.HELPFUL,
        1.0,
        actor="users/u1",
        request_id="fb-1",
        request_hash="fb-hash",
    )
    assert cutter.cuts == 1
    assert rated.importance == pytest.approx(0.75)  # (0.5 + 1) / 2, applied once
    assert rated.revision == 2
    again, _ = await store.record_feedback(
        tenant,
        mid,
        FeedbackType.HELPFUL,
        1.0,
        actor="users/u1",
        request_id="fb-1",
        request_hash="fb-hash",
    )
    assert again.importance == pytest.approx(0.75) and again.revision == 2
    # Without a request id an unknown commit is reported, never re-applied.
    cutter.mode = "after"
    with pytest.raises(CommitOutcomeUnknown):
        await store.record_feedback(
            tenant,
            mid,
            FeedbackType.HELPFUL,
            1.0,
            actor="users/u1",
            request_id="",
            request_hash="fb-hash-2",
        )
    current = await store.get(tenant, mid)
    assert current.revision == 3 and current.importance == pytest.approx(0.875)


async def test_update_after_a_lost_commit_is_unavailable_not_rerun(
    env: MemoryEnv, cut_store: tuple[PostgresMemoryStore, CommitCutter]
) -> None:
    store, cutter = cut_store
    tenant = new_tenant()
    created, _ = await _create(store, tenant, "to update", "rid-up")
    mid = created[0].id
    cutter.mode = "after"
    with pytest.raises(CommitOutcomeUnknown):
        await store.update(
            tenant,
            mid,
            MemoryPatch(fields=frozenset({"tags"}), tags=["x"]),
            expected_revision=1,
            lexical_context=None,
            embedding=None,
            actor="users/u1",
        )
    assert (await store.get(tenant, mid)).revision == 2


# ---------------------------------------------------------------------------------------------
# idempotency keys: scope, expiry, collection, header


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None, exc.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


async def test_request_ids_are_scoped_to_the_caller(env: MemoryEnv) -> None:
    tenant = new_tenant()
    req = svc.CreateMemoryRequest(
        parent=f"tenants/{tenant}",
        memory=memory("my note 42", user_id="shared"),
        request_id="note-42",
    )
    alice = await env.stub.CreateMemory(req, metadata=md(tenant, "alice"))
    bob = await env.stub.CreateMemory(req, metadata=md(tenant, "bob"))
    assert alice.name != bob.name
    assert (await env.stub.CreateMemory(req, metadata=md(tenant, "alice"))).name == alice.name
    # An agent acting for alice is another principal.
    agent = await env.stub.CreateMemory(req, metadata=md(tenant, "alice", agent="a1"))
    assert agent.name not in {alice.name, bob.name}


async def test_idempotency_keys_expire_and_are_collected(env: MemoryEnv) -> None:
    tenant = new_tenant()
    req = svc.CreateMemoryRequest(
        parent=f"tenants/{tenant}", memory=memory("expiring", user_id="u1"), request_id="old"
    )
    first = await env.stub.CreateMemory(req, metadata=md(tenant))
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
            "WHERE tenant_id = $1",
            tenant,
        )
        # Expired: the same id is a new request now.
        second = await env.stub.CreateMemory(req, metadata=md(tenant))
        assert second.name != first.name
        await conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
            "WHERE tenant_id = $1",
            tenant,
        )
        fresh = svc.CreateMemoryRequest(
            parent=f"tenants/{tenant}", memory=memory("fresh", user_id="u1"), request_id="new"
        )
        await env.stub.CreateMemory(fresh, metadata=md(tenant))
        deleted = await env.app.domain.store.gc_idempotency_keys(batch=1)
        assert deleted >= 1
        left = await conn.fetch(
            "SELECT request_id FROM idempotency_keys WHERE tenant_id = $1", tenant
        )
        assert [r["request_id"] for r in left] == ["new"]
        # Idle runs delete nothing more.
        assert await env.app.domain.store.gc_idempotency_keys() == 0
    finally:
        await conn.close()


async def test_a_request_id_header_without_the_body_field_is_refused(env: MemoryEnv) -> None:
    tenant = new_tenant()
    req = svc.CreateMemoryRequest(parent=f"tenants/{tenant}", memory=memory("x", user_id="u"))
    for body_id in ("", "other"):
        req.request_id = body_id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.CreateMemory(
                req, metadata=(*md(tenant), ("x-aeterna-request-id", "r-1"))
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(info.value) == "REQUEST_ID_MISMATCH"
    req.request_id = "r-1"
    await env.stub.CreateMemory(req, metadata=(*md(tenant), ("x-aeterna-request-id", "r-1")))


# ---------------------------------------------------------------------------------------------
# consistency tokens


async def test_every_write_returns_a_consistency_token(env: MemoryEnv) -> None:
    tenant = new_tenant()
    call = env.stub.CreateMemory(
        svc.CreateMemoryRequest(parent=f"tenants/{tenant}", memory=memory("t1", user_id="u")),
        metadata=md(tenant),
    )
    created = await call
    token = dict(await call.initial_metadata())[CONSISTENCY_TOKEN_KEY]
    first = decode_token(token)
    assert first > 0
    positions = []
    for make in (
        lambda: env.stub.RecordMemoryFeedback(
            svc.RecordMemoryFeedbackRequest(
                name=created.name, type=res.FEEDBACK_TYPE_HELPFUL, score=0.5, request_id="f"
            ),
            metadata=md(tenant),
        ),
        lambda: env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=res.Memory(name=created.name, tags=["t"]),
                update_mask=field_mask_pb2.FieldMask(paths=["tags"]),
            ),
            metadata=md(tenant),
        ),
        lambda: env.stub.DeleteMemory(
            svc.DeleteMemoryRequest(name=created.name), metadata=md(tenant)
        ),
    ):
        c = make()  # a call starts when it is made: one at a time
        await c
        positions.append(decode_token(dict(await c.initial_metadata())[CONSISTENCY_TOKEN_KEY]))
    assert first < positions[0] < positions[1] < positions[2]


async def test_reads_validate_the_token(env: MemoryEnv) -> None:
    tenant = new_tenant()
    bad = (*md(tenant), (CONSISTENCY_TOKEN_KEY, "not-a-token"))
    reads = [
        env.stub.SearchMemories(
            svc.SearchMemoriesRequest(parent=f"tenants/{tenant}", query="q"), metadata=bad
        ),
        env.stub.ListMemories(svc.ListMemoriesRequest(parent=f"tenants/{tenant}"), metadata=bad),
        env.stub.GetMemory(
            svc.GetMemoryRequest(name=f"tenants/{tenant}/memories/{uuid.uuid4()}"), metadata=bad
        ),
    ]
    for call in reads:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(info.value) == "INVALID_CONSISTENCY_TOKEN"
    good = (*md(tenant), (CONSISTENCY_TOKEN_KEY, encode_token(1)))
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{tenant}"), metadata=good
    )
    assert list(listed.memories) == []


async def test_a_token_the_index_has_not_reached_is_unavailable_never_stale(
    env: MemoryEnv,
) -> None:
    tenant = new_tenant()
    parent = f"tenants/{tenant}"
    search = svc.SearchMemoriesRequest(
        parent=parent, query="parked zebra", scope=layer_pb2.Scope(user_id="u")
    )
    # Hold the follower (its apply lock) so that the index stays behind this write.
    async with env.follower._lock:
        call = env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=parent, memory=memory("parked zebra", user_id="u")),
            metadata=md(tenant),
        )
        await call
        token = dict(await call.initial_metadata())[CONSISTENCY_TOKEN_KEY]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.SearchMemories(
                search, metadata=(*md(tenant), (CONSISTENCY_TOKEN_KEY, token))
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(info.value) == "CONSISTENCY_TOKEN_NOT_REACHED"
        # Without a token (a channel that does not attach one): served, but marked stale.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{env.server.port}") as plain:
            stale_call = svc_grpc.MemoryServiceStub(plain).SearchMemories(
                search, metadata=md(tenant)
            )
            stale = await stale_call
            head = dict(await stale_call.initial_metadata())
        assert head[INDEX_STALE_KEY] == "true"
        assert int(head[INDEX_POSITION_KEY]) < decode_token(token)
        assert [r.memory.content for r in stale.results] == []
    fresh = await env.stub.SearchMemories(
        search, metadata=(*md(tenant), (CONSISTENCY_TOKEN_KEY, token))
    )
    assert [r.memory.content for r in fresh.results] == ["parked zebra"]


async def test_the_session_interceptor_sends_the_latest_token(env: MemoryEnv) -> None:
    # env.stub's channel carries ReadYourWrites: its reads wait for its own writes.
    tenant = new_tenant()
    parent = f"tenants/{tenant}"
    async with env.follower._lock:
        await env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=parent, memory=memory("held back", user_id="u")),
            metadata=md(tenant),
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.SearchMemories(
                svc.SearchMemoriesRequest(parent=parent, query="held back"), metadata=md(tenant)
            )
        assert _reason(info.value) == "CONSISTENCY_TOKEN_NOT_REACHED"
    found = await env.stub.SearchMemories(
        svc.SearchMemoriesRequest(parent=parent, query="held back"), metadata=md(tenant)
    )
    assert [r.memory.content for r in found.results] == ["held back"]


def test_tokens_round_trip_and_refuse_garbage() -> None:
    for position in (0, 1, 2**63):
        assert decode_token(encode_token(position)) == position
    for bad in ("", "AQ", "x" * 12, encode_token(5)[:-1], "AgAAAAAAAAAF"):  # last: version 2
        with pytest.raises(InvalidArgument):
            decode_token(bad)
    with pytest.raises(ValueError):
        encode_token(-1)


async def test_the_collector_policy_shows_the_app_role_no_foreign_keys(env: MemoryEnv) -> None:
    mine, theirs = new_tenant(), new_tenant()
    for tenant in (mine, theirs):
        await env.stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{tenant}", memory=memory("k", user_id="u"), request_id="k-1"
            ),
            metadata=md(tenant),
        )
    admin = await asyncpg.connect(env.urls.superuser)
    app = await asyncpg.connect(env.urls.app)
    try:
        await admin.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 hours' "
            "WHERE tenant_id = $1",
            theirs,
        )
        async with app.transaction():
            await app.execute("SELECT aeterna_bind_tenant($1)", mine)
            seen = await app.fetch("SELECT tenant_id FROM idempotency_keys")
        assert {r["tenant_id"] for r in seen} == {mine}
        # The collector never deletes keys younger than an hour, whatever it is asked.
        await admin.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '30 minutes' "
            "WHERE tenant_id = $1",
            theirs,
        )
        await app.fetchval("SELECT gc_idempotency_keys(0, 1000)")
        assert (
            await admin.fetchval(
                "SELECT count(*) FROM idempotency_keys WHERE tenant_id = ANY($1::text[])",
                [mine, theirs],
            )
            == 2
        )
    finally:
        await app.close()
        await admin.close()
