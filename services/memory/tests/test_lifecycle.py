"""The memory lifecycle (issue 6, item 7): expiry events, purge after retention, jobs under
leases."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_common import leases
from aeterna_memory.adapters.redis_cache import cache_key
from aeterna_memory.settings import MemorySettings
from memory_testkit import MemoryEnv, create, md, memory, new_tenant, start_memory


def _id(name: str) -> uuid.UUID:
    return uuid.UUID(name.rsplit("/", 1)[1])


async def _caught_up(env: MemoryEnv, tenant: str) -> None:
    position = await env.domain.store.latest_position(tenant)
    assert await env.follower.wait_for(position, 10.0)


async def test_expiry_emits_an_event_once_and_leaves_the_index_at_once(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("the parking permit ends on Friday", user_id="u"))
    keep = await create(env, t, memory("the office moves in June", user_id="u"))
    mid = _id(m.name)
    await _caught_up(env, t)
    assert str(mid) in await env.follower.index.all_ids(t)
    conn = await asyncpg.connect(env.urls.superuser)
    try:  # the API refuses an expire_time in the past: let it pass
        await conn.execute(
            "UPDATE memories SET expire_at = now() - interval '1 second' WHERE id = $1", mid
        )
        # (other tests' memories past expire_at may be processed by the same run)
        assert await env.app.lifecycle.expire_due() >= 1
        assert await conn.fetchval("SELECT expired_at FROM memories WHERE id = $1", mid)
        events = await conn.fetch(
            "SELECT event_type FROM outbox WHERE tenant_id = $1 AND memory_id = $2 "
            "AND event_type = 'memory.expired'",
            t,
            mid,
        )
        assert len(events) == 1
        # Idempotent: processed once.
        await env.app.lifecycle.expire_due()
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE memory_id = $1 AND event_type = $2",
                mid,
                "memory.expired",
            )
            == 1
        )
    finally:
        await conn.close()
    # The follower applied the event: the point is gone without any reconcile.
    await _caught_up(env, t)
    ids = await env.follower.index.all_ids(t)
    assert str(mid) not in ids
    assert str(_id(keep.name)) in ids


async def test_purge_leaves_nothing_in_any_store(env: MemoryEnv) -> None:
    t = new_tenant()
    content = "my locker code is 4711"
    m = await create(env, t, memory(content, user_id="u"))
    other = await create(env, t, memory("recently deleted, kept for now", user_id="u"))
    mid = _id(m.name)
    await _caught_up(env, t)
    stored = await env.domain.store.get(t, str(mid))
    text = env.domain.dense_text(stored, [])
    key = cache_key(t, stored.embedding_model, text)
    cache = aioredis.Redis.from_url(env.redis_url)
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        assert await cache.exists(key) == 1
        for name in (m.name, other.name):
            await env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=name), metadata=md(t))
        await conn.execute(
            "UPDATE memories SET deleted_at = now() - interval '31 days' WHERE id = $1", mid
        )
        assert await env.app.lifecycle.purge_due() == 1
        assert await env.app.lifecycle.purge_due() == 0  # idempotent
        # PostgreSQL: no row, no content anywhere; revisions keep their metadata only.
        assert await conn.fetchval("SELECT count(*) FROM memories WHERE id = $1", mid) == 0
        revisions = await conn.fetch(
            "SELECT revision, action, actor, created_at, old_content, new_content "
            "FROM memory_revisions WHERE memory_id = $1 ORDER BY revision",
            mid,
        )
        assert [r["action"] for r in revisions] == [1, 3]
        assert all(r["old_content"] is None and r["new_content"] is None for r in revisions)
        assert all(r["actor"] and r["created_at"] for r in revisions)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE tenant_id = $1 "
                "AND payload::text LIKE '%locker code%'",  # ids are random hex: match words
                t,
            )
            == 0
        )
        # The other memory is still within the retention.
        assert (
            await conn.fetchval("SELECT count(*) FROM memories WHERE id = $1", _id(other.name)) == 1
        )
        # Redis: the cache entry of the content is gone.
        assert await cache.exists(key) == 0
    finally:
        await conn.close()
        await cache.aclose()
    # The index: no point (the purge event reached the follower).
    await _caught_up(env, t)
    assert str(mid) not in await env.follower.index.all_ids(t)
    # The API: the memory is gone, not soft-deleted.
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", show_deleted=True), metadata=md(t)
    )
    assert [x.name for x in listed.memories] == [other.name]


async def test_lifecycle_jobs_are_fenced_by_their_lease(env: MemoryEnv) -> None:
    t = new_tenant()
    m = await create(env, t, memory("a deposed job holder must not expire this", user_id="u"))
    mid = _id(m.name)
    pool = env.app.domain.store.db.pool
    name = f"test:lifecycle:{uuid.uuid4().hex[:8]}"
    first = await leases.acquire(pool, name, "first", 1.0)
    assert first is not None
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        await conn.execute(
            "UPDATE memories SET expire_at = now() - interval '1 second' WHERE id = $1", mid
        )
        await asyncio.sleep(1.2)
        second = await leases.acquire(pool, name, "second", 30.0)
        assert second is not None and second.epoch == first.epoch + 1
        with pytest.raises(leases.LeaseLostError):
            await env.app.lifecycle.expire_due(first)
        assert await conn.fetchval("SELECT expired_at FROM memories WHERE id = $1", mid) is None
        assert await env.app.lifecycle.expire_due(second) >= 1
        assert await conn.fetchval("SELECT expired_at FROM memories WHERE id = $1", mid)
    finally:
        await conn.close()


async def test_jobs_run_on_one_replica_under_their_leases(env: MemoryEnv, scratch: Path) -> None:
    assert MemorySettings().retention_s == 30 * 86_400  # DOMAIN.md's retention
    t = new_tenant()
    m = await create(env, t, memory("expires while two replicas run the job", user_id="u"))
    mid = _id(m.name)
    replicas = [
        await start_memory(
            env.urls,
            env.redis_url,
            scratch / f"lifecycle-{i}-{uuid.uuid4().hex[:6]}",
            expiry_interval_s=0.2,
            purge_interval_s=0.2,
            retention_s=3600,
        )
        for i in range(2)
    ]
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        await conn.execute(
            "UPDATE memories SET expire_at = now() - interval '1 second' WHERE id = $1", mid
        )
        for _ in range(100):
            if await conn.fetchval("SELECT expired_at FROM memories WHERE id = $1", mid):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the expiry job did not run")
        holders = await conn.fetch(
            "SELECT name, owner FROM leases WHERE name LIKE 'memory:lifecycle:%' "
            "AND expires_at > now()"
        )
        assert {h["name"] for h in holders} == {"memory:lifecycle:expire", "memory:lifecycle:purge"}
        await asyncio.sleep(1.0)  # more runs on both replicas: still one event
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE memory_id = $1 AND event_type = $2",
                mid,
                "memory.expired",
            )
            == 1
        )
        # Expired an hour ago: the purge job of one of the replicas removes it.
        await conn.execute(
            "UPDATE memories SET expire_at = now() - interval '2 hours' WHERE id = $1", mid
        )
        for _ in range(100):
            if not await conn.fetchval("SELECT count(*) FROM memories WHERE id = $1", mid):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the purge job did not run")
    finally:
        await conn.close()
        for server, _ in replicas:
            await server.stop()


async def test_decay_by_layer_rate_and_archive_below_001(env: MemoryEnv) -> None:
    t = new_tenant()
    kept = await create(env, t, memory("the team standup is at nine", user_id="u"))
    faded = await create(env, t, memory("the old wifi password was hunter2", user_id="u"))
    kid, fid = _id(kept.name), _id(faded.name)
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        await conn.execute(
            "UPDATE memories SET created_at = now() - interval '10 days', "
            "importance = CASE WHEN id = $2 THEN 0.012 ELSE 0.5 END WHERE id = ANY($1::uuid[])",
            [kid, fid],
            fid,
        )
        assert await env.app.lifecycle.decay_due() >= 2
        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT id, importance, decayed_at, archived_at FROM memories "
                "WHERE id = ANY($1::uuid[])",
                [kid, fid],
            )
        }
        # USER layer: 3 % a day (DOMAIN.md).
        assert rows[kid]["importance"] == pytest.approx(0.5 * 0.97**10, rel=1e-4)
        assert rows[kid]["archived_at"] is None
        assert rows[fid]["importance"] == pytest.approx(0.012 * 0.97**10, rel=1e-4)
        assert rows[fid]["archived_at"] is not None
        # Idempotent: a second run at once changes nothing.
        await env.app.lifecycle.decay_due()
        again = await conn.fetchval("SELECT importance FROM memories WHERE id = $1", kid)
        assert again == rows[kid]["importance"]
    finally:
        await conn.close()
    await _caught_up(env, t)
    ids = await env.follower.index.all_ids(t)
    assert str(kid) in ids and str(fid) not in ids
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert [x.name for x in listed.memories] == [kept.name]
    flagged = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", show_deleted=True), metadata=md(t)
    )
    assert {x.name for x in flagged.memories} == {kept.name, faded.name}


async def test_outbox_trim_below_live_followers_and_a_replica_behind_it_rebuilds(
    env: MemoryEnv, scratch: Path
) -> None:
    t = new_tenant()
    conn = await asyncpg.connect(env.urls.superuser)
    b_dir = scratch / f"trim-b-{uuid.uuid4().hex[:6]}"
    try:
        await conn.execute("DELETE FROM outbox_followers")
        m1 = await create(env, t, memory("first note before the trim", user_id="u"))
        # Replica B follows, then stops (it stops reporting).
        server, app = await start_memory(env.urls, env.redis_url, b_dir)
        assert str(_id(m1.name)) in await app.follower.index.all_ids(t)
        await server.stop()
        await conn.execute("DELETE FROM outbox_followers")
        m2 = await create(env, t, memory("second note, after B stopped", user_id="u"))
        await _caught_up(env, t)
        p = await env.domain.store.latest_position(t)
        assert await env.follower.report_position("a", 60.0)
        await conn.execute(
            "INSERT INTO outbox_followers VALUES ('stale', 0, now() - interval '1 second'), "
            "('lagging', $1, now() + interval '60 seconds')",
            p - 1,
        )
        # The shared replica's event relay reports its position too: a relay still behind p
        # rightly holds the trim back, so wait until it has passed p (a loaded machine).
        for _ in range(100):
            behind = await conn.fetchval(
                "SELECT count(*) FROM outbox_followers WHERE name NOT IN ('a', 'stale', "
                "'lagging') AND expires_at > now() AND position < $1",
                p,
            )
            if not behind:
                break
            await asyncio.sleep(0.1)
        await env.app.lifecycle.trim_outbox()
        # Below the lagging live follower only; the expired one does not hold it back.
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE position < $1", p) == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE position = $1", p) == 1
        assert await conn.fetchval("SELECT upto FROM outbox_trim") == p - 1
        await conn.execute("UPDATE outbox_followers SET position = $1 WHERE name = 'lagging'", p)
        await env.app.lifecycle.trim_outbox()
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE position <= $1", p) == 0
        # B comes back behind the trim: it rebuilds rather than skipping m2.
        server, app = await start_memory(env.urls, env.redis_url, b_dir)
        try:
            ids = await app.follower.index.all_ids(t)
            assert {str(_id(m1.name)), str(_id(m2.name))} <= ids
            # And it keeps following after the rebuild.
            m3 = await create(env, t, memory("third note, after the rebuild", user_id="u"))
            position = await env.domain.store.latest_position(t)
            assert await app.follower.wait_for(position, 10.0)
            assert str(_id(m3.name)) in await app.follower.index.all_ids(t)
        finally:
            await server.stop()
        # A fresh replica (rebuilding from PostgreSQL) still finds everything.
        server, app = await start_memory(
            env.urls, env.redis_url, scratch / f"trim-c-{uuid.uuid4().hex[:6]}"
        )
        try:
            assert {str(_id(m1.name)), str(_id(m2.name))} <= await app.follower.index.all_ids(t)
        finally:
            await server.stop()
    finally:
        await conn.execute("DELETE FROM outbox_followers WHERE name IN ('stale', 'lagging', 'a')")
        await conn.close()


async def test_promotion_agent_to_user_and_session_to_project_once_redacted(
    env: MemoryEnv,
) -> None:
    t = new_tenant()
    agent = await create(
        env,
        t,
        memory(
            "Reach Dana at dana.smith@example.com or +1 (415) 555-0134 about the release",
            layer="AGENT",
            agent_id="a1",
            user_id="u",
        ),
    )
    secret = await create(
        env, t, memory("the sensitive one", layer="AGENT", agent_id="a1", user_id="u")
    )
    weak = await create(env, t, memory("rarely used", layer="AGENT", agent_id="a1", user_id="u"))
    session = await create(
        env,
        t,
        memory("we chose PostgreSQL for the queue", layer="SESSION", user_id="u", session_id="s"),
    )
    lost = await create(
        env, t, memory("no project named", layer="SESSION", user_id="u", session_id="s")
    )
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        strong = [_id(x.name) for x in (agent, secret, session, lost)]
        await conn.execute(
            "UPDATE memories SET importance = 1, access_count = 10, last_accessed_at = now() "
            "WHERE id = ANY($1::uuid[])",
            strong,
        )
        await conn.execute(
            "UPDATE memories SET metadata = '{\"sensitive\": true}' WHERE id = $1",
            _id(secret.name),
        )
        await conn.execute(
            'UPDATE memories SET metadata = \'{"project_id": "p1"}\' WHERE id = $1',
            _id(session.name),
        )
        assert await env.app.lifecycle.promote_due() >= 2
        copies = await conn.fetch(
            "SELECT layer, user_id, project_id, content, metadata FROM memories "
            "WHERE tenant_id = $1 AND metadata ? 'original_memory' ORDER BY layer",
            t,
        )
        assert [(c["layer"], c["user_id"], c["project_id"]) for c in copies] == [
            (2, "u", None),
            (4, None, "p1"),
        ]
        user_copy = copies[0]
        assert "example.com" not in user_copy["content"]
        assert "555" not in user_copy["content"]
        assert "[email redacted]" in user_copy["content"]
        assert "[phone redacted]" in user_copy["content"]
        assert "about the release" in user_copy["content"]
        meta = json.loads(user_copy["metadata"])
        assert meta["original_memory"] == agent.name
        assert meta["promotion_score"] == pytest.approx(1.0)
        assert json.loads(copies[1]["metadata"])["original_memory"] == session.name
        # Once per revision.
        await env.app.lifecycle.promote_due()
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM memories WHERE tenant_id = $1 AND metadata ? 'original_memory'",
                t,
            )
            == 2
        )
        assert weak.name and lost.name  # below the threshold / no project: not promoted
    finally:
        await conn.close()


def test_redaction_patterns() -> None:
    from aeterna_memory.domain.promotion import redact

    assert redact("mail a.b+c@mail.example.org now") == "mail [email redacted] now"
    assert redact("call 030 1234567 or +44 20 7946 0958") == (
        "call [phone redacted] or [phone redacted]"
    )
    # Years, versions and short numbers stay.
    assert (
        redact("in 2023 we shipped v1.2.3 to 40 users") == "in 2023 we shipped v1.2.3 to 40 users"
    )
