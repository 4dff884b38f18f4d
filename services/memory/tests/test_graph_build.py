"""Background HNSW build of the embedded index: a copy of the shard is optimised while the
live shard serves, the changes made meanwhile are replayed into it, and it is swapped in."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_common.db import Database
from aeterna_common.search.lexical import encode_document
from aeterna_common.vectors import EdgeTuning, EdgeVectorIndex, FieldMatch, IndexFilter
from aeterna_memory.adapters.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    FileCursor,
    IndexFollower,
)
from memory_testkit import MemoryEnv, md, memory, new_tenant

DIM = 384
# 10 KB of vectors: segments of more than ~6 points get an HNSW graph when optimised.
TUNING = EdgeTuning(indexing_threshold_kb=10)


class GatedIndex(EdgeVectorIndex):
    """Holds the finished copy until the test opens the gate (writes happen meanwhile)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.copy_built = asyncio.Event()
        self.gate = asyncio.Event()

    async def build_copy(self, **kw: Any) -> EdgeVectorIndex:
        copy = await super().build_copy(**kw)
        self.copy_built.set()
        await self.gate.wait()
        return copy


async def live_ids(env: MemoryEnv, tenant: str) -> set[str]:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        rows = await conn.fetch(
            "SELECT id FROM memories WHERE tenant_id = $1 AND deleted_at IS NULL", tenant
        )
    finally:
        await conn.close()
    return {str(r["id"]) for r in rows}


async def latest_position(env: MemoryEnv) -> int:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
    finally:
        await conn.close()


async def reported(env: MemoryEnv, name: str) -> int:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        return int(
            await conn.fetchval("SELECT position FROM outbox_followers WHERE name = $1", name)
        )
    finally:
        await conn.close()


async def test_background_build_keeps_points_serves_and_replays(
    env: MemoryEnv, tmp_path: Path
) -> None:
    tenant = new_tenant()
    parent = f"tenants/{tenant}"
    reqs = [
        svc.CreateMemoryRequest(
            memory=memory(f"note {i} about the garden and the deploy", user_id="u")
        )
        for i in range(120)
    ]
    await env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(parent=parent, requests=reqs, request_id="graph-seed"),
        metadata=md(tenant),
    )
    before = await live_ids(env, tenant)
    assert len(before) == 120

    indexer = Database(env.urls.indexer, min_size=1, max_size=2)
    db = Database(env.urls.app, min_size=1, max_size=2)
    await indexer.open()
    await db.open()
    path = tmp_path / "shard"
    index = GatedIndex(str(path), KEYWORD_FIELDS, FLOAT_FIELDS, tuning=TUNING)
    await index.ensure_collection(DIM)
    follower = IndexFollower(
        db,
        indexer,
        index,
        FileCursor(tmp_path / "applied_position"),
        encode_document,
        dsn=env.urls.indexer,
        dimension=DIM,
        poll_s=0.2,
    )
    await follower.start()
    running = asyncio.create_task(follower.run())
    flt = IndexFilter(tenant_id=tenant, must=[FieldMatch("user_id", value="u")])
    probe = (await index.retrieve_dense(sorted(before)[:1]))[sorted(before)[0]]
    try:
        assert await index.unindexed_points() >= 120
        assert set(await index.all_ids(tenant)) == before
        # Below the threshold nothing is built.
        assert not await follower.build_graph(10**9)

        answered: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def query_forever() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                hits = await index.search_dense(probe, flt, 10)
                answered.append((time.perf_counter() - t, len(hits)))
                await asyncio.sleep(0.005)

        start = await latest_position(env)
        assert await follower.wait_for(start, 10)
        querying = asyncio.create_task(query_forever())
        building = asyncio.create_task(follower.build_graph(1))
        await asyncio.wait_for(index.copy_built.wait(), 60)
        during_build = len(answered)
        old_path = index.active_path
        # Writes while the copy waits: they reach the live shard, the copy must replay them.
        added = await env.stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=parent, memory=memory("written during the build", user_id="u")
            ),
            metadata=md(tenant),
        )
        gone = sorted(before)[5]
        await env.stub.DeleteMemory(
            svc.DeleteMemoryRequest(name=f"{parent}/memories/{gone}"), metadata=md(tenant)
        )
        assert await follower.wait_for(await latest_position(env), 10)
        # The copy replays from where it began: the outbox trim must keep those rows, so the
        # follower reports that position, not the one it has applied, until the swap.
        assert follower.applied > start
        assert await follower.report_position("graph-build-test", 60)
        # The copy began at the position applied when the build started: ``start`` or, when
        # other writers of the shared database moved the outbox meanwhile, a little after.
        assert start <= await reported(env, "graph-build-test") < follower.applied
        index.gate.set()
        assert await asyncio.wait_for(building, 60) is True
        assert await follower.report_position("graph-build-test", 60)
        assert await reported(env, "graph-build-test") == follower.applied
        stop.set()
        await querying

        # Searches answered throughout the build, none failed, none slow.
        assert during_build > 0
        assert all(n == 10 for _, n in answered)
        assert max(lat for lat, _ in answered) < 2.0
        # The copy is live, has its graphs, and holds exactly the live memories.
        assert index.active_path != old_path and not await asyncio.to_thread(Path(old_path).exists)
        info = await index.info()
        assert info["indexed_vectors"] > 0
        expected = (before - {gone}) | {added.name.rsplit("/", 1)[1]}
        assert set(await index.all_ids(tenant)) == expected
        # Changes after the swap still reach it.
        later = await env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=parent, memory=memory("after the swap", user_id="u")),
            metadata=md(tenant),
        )
        assert await follower.wait_for(await latest_position(env), 10)
        expected.add(later.name.rsplit("/", 1)[1])
        assert set(await index.all_ids(tenant)) == expected
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await follower.close()
        await index.close()
        await indexer.close()
        await db.close()

    # A restart opens the swapped-in shard.
    reopened = EdgeVectorIndex(str(path), KEYWORD_FIELDS, FLOAT_FIELDS, tuning=TUNING)
    await reopened.ensure_collection(DIM)
    try:
        assert reopened.active_path == index.active_path
        assert set(await reopened.all_ids(tenant)) == expected
    finally:
        await reopened.close()
