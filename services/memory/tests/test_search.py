"""Search: layers, precedence, filters, duplicates, staleness, access counting, faults."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.type.v1 import layer_pb2
from google.protobuf import struct_pb2
from memory_testkit import MemoryEnv, create, md, memory, new_tenant, start_memory


async def search(
    env: MemoryEnv, tenant: str, query: str, stub=None, **kw
) -> svc.SearchMemoriesResponse:  # type: ignore[no-untyped-def]
    return await (stub or env.stub).SearchMemories(
        svc.SearchMemoriesRequest(parent=f"tenants/{tenant}", query=query, **kw),
        metadata=md(tenant),
    )


async def test_layers_precedence_scope_widening_and_duplicates(env: MemoryEnv) -> None:
    t = new_tenant()
    await create(
        env, t, memory("The deploy pipeline uses blue green releases", "USER", user_id="u")
    )
    await create(
        env,
        t,
        memory("Deploys happen on Tuesdays after standup", "SESSION", user_id="u", session_id="s1"),
    )
    await create(
        env,
        t,
        memory("Rollback a deploy with the revert button", "SESSION", user_id="u", session_id="s2"),
    )
    await create(
        env,
        t,
        memory(
            "The deploy pipeline uses blue green releases", "SESSION", user_id="u", session_id="s2"
        ),
    )
    await create(env, t, memory("Deploy freeze in December", "PROJECT", project_id="p1"))
    await create(env, t, memory("Deploys of another user", "USER", user_id="someone-else"))

    r = await search(env, t, "how do deploys work", scope=layer_pb2.Scope(user_id="u"))
    layers = [h.memory.layer for h in r.results]
    contents = [h.memory.content for h in r.results]
    # USER and SESSION layers are reached by user_id; without session_id both sessions count.
    assert set(layers) == {layer_pb2.MEMORY_LAYER_USER, layer_pb2.MEMORY_LAYER_SESSION}
    # One ranking across layers: relevance first, not layer first.
    assert [h.score for h in r.results] == sorted((h.score for h in r.results), reverse=True)
    assert "Deploys happen on Tuesdays after standup" in contents
    assert "Rollback a deploy with the revert button" in contents
    assert "Deploy freeze in December" not in contents and "Deploys of another user" not in contents
    # The exact duplicate collapses to the more specific (USER) copy.
    assert contents.count("The deploy pipeline uses blue green releases") == 1
    pipeline = [h for h in r.results if h.memory.content.startswith("The deploy pipeline")]
    assert pipeline[0].memory.layer == layer_pb2.MEMORY_LAYER_USER

    narrowed = await search(
        env,
        t,
        "deploy",
        scope=layer_pb2.Scope(user_id="u", session_id="s1"),
        layers=[layer_pb2.MEMORY_LAYER_SESSION],
    )
    assert [h.memory.content for h in narrowed.results] == [
        "Deploys happen on Tuesdays after standup"
    ]

    both = await search(env, t, "deploy", scope=layer_pb2.Scope(user_id="u", project_id="p1"))
    assert "Deploy freeze in December" in [h.memory.content for h in both.results]


async def test_scores_min_score_and_top_k(env: MemoryEnv) -> None:
    t = new_tenant()
    topics = [
        "pruning",
        "watering",
        "seedlings",
        "compost",
        "blight",
        "staking",
        "harvest",
        "greenhouse",
        "soil pH",
        "mulch",
        "aphids",
        "cherry varieties",
        "fertiliser",
        "companion planting",
        "frost",
    ]
    for topic in topics:
        await create(env, t, memory(f"Gardening tomatoes: my notes on {topic}", user_id="u"))
    r = await search(env, t, "gardening tomatoes", scope=layer_pb2.Scope(user_id="u"), top_k=5)
    assert len(r.results) == 5
    scores = [h.score for h in r.results]
    # The second-stage ranker orders the hits and each keeps its fused score, so on these
    # near-identical memories the scores need not fall monotonically.
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(-1.0 <= h.dense_score <= 1.0 and h.lexical_score >= 0 for h in r.results)
    cut = await search(
        env,
        t,
        "gardening tomatoes",
        scope=layer_pb2.Scope(user_id="u"),
        top_k=15,
        min_score=scores[2],
    )
    assert 0 < len(cut.results) < 15 and all(h.score >= scores[2] for h in cut.results)


async def test_tag_and_metadata_filters(env: MemoryEnv) -> None:
    t = new_tenant()
    specs = [
        (
            "apple pie recipe",
            ["food"],
            {"kind": "recipe", "stars": 5, "labels": ["sweet", "baked"]},
        ),
        ("apple cider recipe", ["drink"], {"kind": "recipe", "stars": 3, "labels": ["sweet"]}),
        ("apple stock price", ["finance"], {"kind": "note", "stars": 1, "labels": []}),
    ]
    for content, tags, meta in specs:
        m = memory(content, user_id="u")
        m.tags.extend(tags)
        m.metadata.update(meta)
        await create(env, t, m)

    def names(r: svc.SearchMemoriesResponse) -> set[str]:
        return {h.memory.content for h in r.results}

    scope = layer_pb2.Scope(user_id="u")
    assert names(await search(env, t, "apple", scope=scope, tags=["food", "drink"])) == {
        "apple pie recipe",
        "apple cider recipe",
    }
    eq = svc.MetadataFilter(key="kind", equals=struct_pb2.Value(string_value="note"))
    assert names(await search(env, t, "apple", scope=scope, metadata_filters=[eq])) == {
        "apple stock price"
    }
    rng = svc.MetadataFilter(key="stars", range=svc.NumericRange(gte=3))
    assert names(await search(env, t, "apple", scope=scope, metadata_filters=[rng])) == {
        "apple pie recipe",
        "apple cider recipe",
    }
    num_eq = svc.MetadataFilter(key="stars", equals=struct_pb2.Value(number_value=5))
    assert names(await search(env, t, "apple", scope=scope, metadata_filters=[num_eq])) == {
        "apple pie recipe"
    }
    contains = svc.MetadataFilter(key="labels", contains="baked")
    assert names(await search(env, t, "apple", scope=scope, metadata_filters=[contains])) == {
        "apple pie recipe"
    }
    any_of = svc.MetadataFilter(
        key="kind", any_of=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="note")])
    )
    assert (
        names(await search(env, t, "apple", scope=scope, metadata_filters=[rng, any_of])) == set()
    )


async def test_search_validation(env: MemoryEnv) -> None:
    t = new_tenant()
    cases = [
        (svc.SearchMemoriesRequest(parent=f"tenants/{t}", query=""), "query"),
        (svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="x", top_k=500), "top_k"),
        (svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="x", min_score=1.5), "min_score"),
        (svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="x", layers=[99]), "layers[0]"),  # type: ignore[list-item]
        (
            svc.SearchMemoriesRequest(
                parent=f"tenants/{t}", query="x", metadata_filters=[svc.MetadataFilter(key="k")]
            ),
            "metadata_filters[0]",
        ),
        (
            svc.SearchMemoriesRequest(
                parent=f"tenants/{t}",
                query="x",
                metadata_filters=[svc.MetadataFilter(key="bad key!", contains="v")],
            ),
            "metadata_filters[0].key",
        ),
    ]
    for req, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.SearchMemories(req, metadata=md(t))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in info.value.details()


async def test_tenants_never_see_each_other(env: MemoryEnv) -> None:
    a, b = new_tenant(), new_tenant()
    await create(env, a, memory("the launch code is swordfish", user_id="u"))
    await create(env, b, memory("the launch code is swordfish", user_id="u"))
    ra = await search(env, a, "launch code", scope=layer_pb2.Scope(user_id="u"))
    assert len(ra.results) == 1 and ra.results[0].memory.name.startswith(f"tenants/{a}/")


async def test_stale_index_never_returns_deleted_or_expired_rows(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("ephemeral secret plan", user_id="u"))
    r = await search(env, t, "secret plan", scope=layer_pb2.Scope(user_id="u"))
    assert [h.memory.name for h in r.results] == [m.name]
    mid = uuid.UUID(m.name.rsplit("/", 1)[1])
    # Delete behind the index's back (no outbox event): the index still holds the point.
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        await conn.execute("UPDATE memories SET deleted_at = now() WHERE id = $1", mid)
    finally:
        await conn.close()
    assert str(mid) in await env.follower.index.all_ids(t)
    r = await search(env, t, "secret plan", scope=layer_pb2.Scope(user_id="u"))
    assert r.results == []
    # The reconciler then removes the stale point.
    assert (await env.follower.reconcile())["removed"] >= 1
    assert str(mid) not in await env.follower.index.all_ids(t)


async def test_search_counts_access(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("count my accesses please", user_id="u"))
    for _ in range(2):
        await search(env, t, "count accesses", scope=layer_pb2.Scope(user_id="u"))
    # The count is written after each answer is sent: wait for it (and never past 2).
    async with asyncio.timeout(30):
        while True:
            got = await env.stub.GetMemory(svc.GetMemoryRequest(name=m.name), metadata=md(t))
            if got.access_count >= 2:
                break
            await asyncio.sleep(0.05)
    await env.domain.drain_touches()
    got = await env.stub.GetMemory(svc.GetMemoryRequest(name=m.name), metadata=md(t))
    assert got.access_count == 2 and got.HasField("last_access_time")


async def test_read_your_writes_across_replicas(env: MemoryEnv, scratch) -> None:  # type: ignore[no-untyped-def]
    # A second replica on the same database with its own embedded index.
    server, _app = await start_memory(
        env.urls, env.redis_url, scratch / f"replica-{uuid.uuid4().hex[:6]}"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            other = svc_grpc.MemoryServiceStub(ch)
            t = new_tenant()
            for i in range(5):
                m = await create(env, t, memory(f"fresh write {i} about zeppelins", user_id="u"))
                r = await search(
                    env,
                    t,
                    f"fresh write {i} zeppelins",
                    stub=other,
                    scope=layer_pb2.Scope(user_id="u"),
                )
                assert m.name in [h.memory.name for h in r.results]
                await env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=m.name), metadata=md(t))
                r = await search(
                    env,
                    t,
                    f"fresh write {i} zeppelins",
                    stub=other,
                    scope=layer_pb2.Scope(user_id="u"),
                )
                assert m.name not in [h.memory.name for h in r.results]
    finally:
        await server.stop()


async def test_missing_index_is_rebuilt_from_postgres(env: MemoryEnv, scratch, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder

    t = new_tenant()
    names = set()
    for i in range(4):
        names.add((await create(env, t, memory(f"rebuild me {i}", user_id="u"))).name)

    async def no_embedding(self, texts):  # type: ignore[no-untyped-def]
        raise AssertionError("a rebuild must reuse the stored vectors")

    # Vectors are stored with the rows: a new replica rebuilds without embedding anything.
    monkeypatch.setattr(MiniLMEmbedder, "embed", no_embedding)
    server, app = await start_memory(
        env.urls, env.redis_url, scratch / f"fresh-{uuid.uuid4().hex[:6]}"
    )
    monkeypatch.undo()
    try:
        ids = await app.follower.index.all_ids(t)
        assert {f"tenants/{t}/memories/{i}" for i in ids} == names
        rebuilt = await app.follower.index.retrieve_dense(sorted(ids))
        original = await env.follower.index.retrieve_dense(sorted(ids))
        for i in ids:
            assert rebuilt[i] == pytest.approx(original[i], abs=1e-6)
    finally:
        await server.stop()


async def test_failed_write_leaves_nothing(env: MemoryEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from aeterna_memory.adapters import postgres

    async def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected failure after the inserts")

    t = new_tenant()
    monkeypatch.setattr(postgres, "_append_outbox", broken)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create(env, t, memory("should not survive", user_id="u"), request_id="fail-1")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "injected" not in (info.value.details() or "")  # internals do not leak
    monkeypatch.undo()
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        for table in ("memories", "memory_revisions", "idempotency_keys", "outbox"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", t) == 0
    finally:
        await conn.close()
    # The same request id works afterwards: nothing half-claimed it.
    ok = await create(env, t, memory("should not survive", user_id="u"), request_id="fail-1")
    assert ok.content == "should not survive"


async def test_unavailable_redis_degrades_to_no_cache(env: MemoryEnv, scratch) -> None:  # type: ignore[no-untyped-def]
    from aeterna_devstack.servers import free_port
    from aeterna_memory.adapters.redis_cache import RedisEmbeddingCache

    dead = f"redis://127.0.0.1:{free_port()}/0"
    cache = RedisEmbeddingCache(dead)
    assert await cache.get_many("t", "m", ["a", "b"]) == [None, None]
    await cache.put_many("t", "m", [("a", [0.1, 0.2])])  # no error
    await cache.close()
    server, _app = await start_memory(env.urls, dead, scratch / f"noredis-{uuid.uuid4().hex[:6]}")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = svc_grpc.MemoryServiceStub(ch)
            t = new_tenant()
            m = await stub.CreateMemory(
                svc.CreateMemoryRequest(
                    parent=f"tenants/{t}", memory=memory("works without redis", user_id="u")
                ),
                metadata=md(t),
            )
            r = await search(env, t, "without redis", stub=stub, scope=layer_pb2.Scope(user_id="u"))
            assert [h.memory.name for h in r.results] == [m.name]
    finally:
        await server.stop()


async def test_embedding_cache_hits_on_repeated_text(env: MemoryEnv) -> None:
    import redis.asyncio as aioredis
    from aeterna_memory.adapters.redis_cache import cache_key

    t = new_tenant()
    await create(env, t, memory("cache this exact text", user_id="u"))
    client = aioredis.Redis.from_url(env.redis_url)
    try:
        # The key carries the model id: name with precision, and dimension.
        key = cache_key(t, "all-MiniLM-L6-v2-int8/384", "cache this exact text")
        assert await client.exists(key) == 1
        ttl = await client.ttl(key)
        assert 23 * 3600 < ttl <= 24 * 3600
    finally:
        await client.aclose()


async def test_cached_vector_of_wrong_length_is_ignored_and_overwritten(env: MemoryEnv) -> None:
    import numpy as np
    import redis.asyncio as aioredis
    from aeterna_memory.adapters.redis_cache import cache_key

    t = new_tenant()
    text = "a text whose cached vector was written by another model"
    # The model id: name with precision, and dimension.
    key = cache_key(t, "all-MiniLM-L6-v2-int8/384", text)
    client = aioredis.Redis.from_url(env.redis_url)
    try:
        await client.set(key, np.ones(768, dtype="<f4").tobytes(), ex=60)
        [vector] = await env.domain.embed(t, [text])
        assert len(vector) == 384
        raw = await client.get(key)
        assert raw is not None and len(np.frombuffer(raw, dtype="<f4")) == 384
    finally:
        await client.aclose()


async def test_shared_qdrant_mode_end_to_end(env: MemoryEnv, scratch) -> None:  # type: ignore[no-untyped-def]
    # vector_store=qdrant with qdrant-client's local mode: the same service code path as a
    # Qdrant server shared by replicas (cursor in PostgreSQL, lease by advisory lock).
    from memory_testkit import new_tenant as fresh

    collection = f"c{uuid.uuid4().hex[:6]}"
    server, _app = await start_memory(
        env.urls,
        env.redis_url,
        scratch / "unused",
        vector_store="qdrant",
        qdrant_url=":memory:",
        qdrant_collection=collection,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = svc_grpc.MemoryServiceStub(ch)
            t = fresh()
            m = await stub.CreateMemory(
                svc.CreateMemoryRequest(
                    parent=f"tenants/{t}", memory=memory("shared index holds this", user_id="u")
                ),
                metadata=md(t),
            )
            r = await search(env, t, "shared index", stub=stub, scope=layer_pb2.Scope(user_id="u"))
            assert [h.memory.name for h in r.results] == [m.name]
            await stub.DeleteMemory(svc.DeleteMemoryRequest(name=m.name), metadata=md(t))
            r = await search(env, t, "shared index", stub=stub, scope=layer_pb2.Scope(user_id="u"))
            assert r.results == []
        conn = await asyncpg.connect(env.urls.superuser)
        try:
            position = await conn.fetchval(
                "SELECT position FROM index_cursors WHERE name LIKE 'qdrant:%'"
            )
            assert position is not None and position >= 2
            # The shared collection records the model id of its vectors.
            model = await conn.fetchval(
                "SELECT model FROM index_cursors WHERE name = $1", f"qdrant:{collection}"
            )
            assert model == "all-MiniLM-L6-v2-int8/384"
        finally:
            await conn.close()
    finally:
        await server.stop()


async def test_reconciler_restores_points_missing_after_a_partial_write(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("restore me after a partial write", user_id="u"))
    mid = m.name.rsplit("/", 1)[1]
    assert await env.follower.wait_for(await env.domain.store.latest_position(t), 5.0)
    await env.follower.index.delete([mid])  # the index lost the point
    r = await search(env, t, "restore partial write", scope=layer_pb2.Scope(user_id="u"))
    assert r.results == []
    assert (await env.follower.reconcile())["added"] >= 1
    # Idempotent.
    assert (await env.follower.reconcile()) == {"added": 0, "updated": 0, "removed": 0}
    r = await search(env, t, "restore partial write", scope=layer_pb2.Scope(user_id="u"))
    assert [h.memory.name for h in r.results] == [m.name]


async def test_session_context_is_indexed_across_batches(env: MemoryEnv) -> None:
    t = new_tenant()

    def turn(text: str) -> svc.CreateMemoryRequest:
        m = memory(text, "SESSION", user_id="u", session_id="s")
        m.metadata.update({"session_time": "8 May 2023"})
        return svc.CreateMemoryRequest(memory=m)

    await env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(
            parent=f"tenants/{t}", requests=[turn("A: one"), turn("B: two")]
        ),
        metadata=md(t),
    )
    await env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(
            parent=f"tenants/{t}", requests=[turn("A: three"), turn("B: four")]
        ),
        metadata=md(t),
    )
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        rows = await conn.fetch(
            "SELECT content, index_context FROM memories WHERE tenant_id = $1 ORDER BY created_at",
            t,
        )
    finally:
        await conn.close()
    contexts = {r["content"]: list(r["index_context"]) for r in rows}
    assert contexts["A: one"] == ["8 May 2023"]
    assert contexts["B: two"] == ["8 May 2023", "A: one"]
    assert contexts["A: three"] == ["8 May 2023", "A: one", "B: two"]
    assert contexts["B: four"] == ["8 May 2023", "B: two", "A: three"]
    # The context makes a turn findable by its neighbours' words ("three" is only in context).
    r = await search(env, t, "three", scope=layer_pb2.Scope(user_id="u"))
    assert {h.memory.content for h in r.results} >= {"A: three", "B: four"}


async def test_expired_memories_are_neither_listed_nor_found(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("short-lived reminder about the dentist", user_id="u"))
    mid = uuid.UUID(m.name.rsplit("/", 1)[1])
    conn = await asyncpg.connect(env.urls.superuser)
    try:  # let it expire (the API refuses an expire_time in the past)
        await conn.execute(
            "UPDATE memories SET expire_at = now() - interval '1 second' WHERE id = $1", mid
        )
    finally:
        await conn.close()
    r = await search(env, t, "dentist reminder", scope=layer_pb2.Scope(user_id="u"))
    assert r.results == []
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert len(listed.memories) == 0
    everything = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", show_deleted=True), metadata=md(t)
    )
    assert [x.name for x in everything.memories] == [m.name]


async def test_index_from_another_database_is_rebuilt_not_resumed(
    env: MemoryEnv, make_database, scratch
) -> None:  # type: ignore[no-untyped-def]
    index_dir = scratch / f"moved-{uuid.uuid4().hex[:6]}"
    t = new_tenant()
    first = await create(env, t, memory("lives in the first database", user_id="u"))
    server, app = await start_memory(env.urls, env.redis_url, index_dir)
    assert first.name.rsplit("/", 1)[1] in await app.follower.index.all_ids(t)
    await server.stop()
    other = await make_database()  # same index directory, another database
    server, app = await start_memory(other, env.redis_url, index_dir)
    try:
        assert await app.follower.index.all_ids() == set()
    finally:
        await server.stop()


WEAK_USER_NOTES = [
    f"Weekly note {i}: the printer on floor {i % 5} needs toner and the kitchen needs mugs"
    for i in range(30)
]


async def test_company_exact_match_ranks_beside_30_weak_user_memories(env: MemoryEnv) -> None:
    t = new_tenant()
    for text in WEAK_USER_NOTES:
        await create(env, t, memory(text, "USER", user_id="u"))
    answer = "Expense reports are approved by the finance controller within five working days"
    await create(env, t, memory(answer, "COMPANY", company_id="acme"))
    scope = layer_pb2.Scope(user_id="u", company_id="acme")
    query = "who approves expense reports and within how many working days"

    r = await search(env, t, query, scope=scope, top_k=10)
    assert r.results[0].memory.content == answer
    assert r.results[0].memory.layer == layer_pb2.MEMORY_LAYER_COMPANY
    # Normalised across layers: the user layer's best hit does not score 1.0.
    user_scores = [h.score for h in r.results if h.memory.layer == layer_pb2.MEMORY_LAYER_USER]
    assert user_scores and max(user_scores) < 0.9 * r.results[0].score

    # min_score applies to the one ranking: the weak user hits fall under it, the answer stays.
    strict = await search(env, t, query, scope=scope, top_k=10, min_score=0.9)
    assert [h.memory.content for h in strict.results] == [answer]


async def test_near_duplicates_collapse_across_layers_only(env: MemoryEnv) -> None:
    t = new_tenant()
    await create(env, t, memory("The team meeting moved to Tuesday", "USER", user_id="u"))
    await create(env, t, memory("The team meeting moved to Thursday", "USER", user_id="u"))
    # A near-duplicate (not identical) in a less specific layer: collapses to the USER copy.
    await create(env, t, memory("The team meeting moved to Tuesday.", "PROJECT", project_id="p"))
    r = await search(
        env,
        t,
        "team meeting moved to Tuesday.",
        scope=layer_pb2.Scope(user_id="u", project_id="p"),
    )
    contents = [h.memory.content for h in r.results]
    assert sorted(contents) == [
        "The team meeting moved to Thursday",
        "The team meeting moved to Tuesday",
    ]
    assert all(h.memory.layer == layer_pb2.MEMORY_LAYER_USER for h in r.results)
