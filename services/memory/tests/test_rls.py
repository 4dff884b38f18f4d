"""Row-level security as the application role (NOSUPERUSER NOBYPASSRLS)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from aeterna_common.db import Database
from memory_testkit import MemoryEnv, create, memory, new_tenant


async def test_app_role_cannot_bypass_rls(env: MemoryEnv) -> None:
    conn = await asyncpg.connect(env.urls.app)
    try:
        row = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        assert row is not None and not row["rolsuper"] and not row["rolbypassrls"]
        forced = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relforcerowsecurity AND relrowsecurity "
            "AND relname IN ('memories', 'memory_revisions', 'idempotency_keys', 'outbox')"
        )
        assert len(forced) == 4
    finally:
        await conn.close()


async def test_cross_tenant_read_returns_nothing_and_write_fails(env: MemoryEnv) -> None:
    a, b = new_tenant(), new_tenant()
    mem = await create(env, a, memory("tenant A only", user_id="u"))
    mid = uuid.UUID(mem.name.rsplit("/", 1)[1])
    db = Database(env.urls.app)
    await db.open()
    try:
        async with db.transaction(b) as conn:
            # Even without a WHERE on tenant_id, B sees none of A's rows.
            assert await conn.fetchval("SELECT count(*) FROM memories WHERE id = $1", mid) == 0
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE tenant_id = $1", a) == 0
            # Updating A's row from B's transaction touches nothing.
            status = await conn.execute("UPDATE memories SET content = 'hijack' WHERE id = $1", mid)
            assert status == "UPDATE 0"
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            async with db.transaction(b) as conn:
                # Writing a row labelled with A's tenant violates the policy's WITH CHECK.
                await conn.execute(
                    "INSERT INTO memory_revisions (tenant_id, memory_id, revision, action, actor) "
                    "VALUES ($1, $2, 99, 2, 'x')",
                    a,
                    mid,
                )
        async with db.transaction(a) as conn:
            assert (
                await conn.fetchval("SELECT content FROM memories WHERE id = $1", mid)
                == "tenant A only"
            )
    finally:
        await db.close()


async def test_pooled_connection_carries_no_tenant(env: MemoryEnv) -> None:
    a = new_tenant()
    await create(env, a, memory("pooled", user_id="u"))
    db = Database(env.urls.app, min_size=1, max_size=1)
    await db.open()
    try:
        async with db.transaction(a) as conn:
            assert await conn.fetchval("SELECT count(*) FROM memories") == 1
        # Same (only) pooled connection, outside any tenant transaction.
        async with db.pool.acquire() as conn:
            assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") in (
                "",
                None,
            )
            assert await conn.fetchval("SELECT count(*) FROM memories") == 0
    finally:
        await db.close()


async def test_all_tenant_snapshot_is_read_only(env: MemoryEnv) -> None:
    a = new_tenant()
    await create(env, a, memory("indexer reads", user_id="u"))
    indexer = Database(env.urls.indexer)
    app = Database(env.urls.app)
    await indexer.open()
    await app.open()
    try:
        async with indexer.all_tenants_snapshot() as conn:
            assert await conn.fetchval("SELECT count(*) FROM memories WHERE tenant_id = $1", a) == 1
        with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
            async with indexer.all_tenants_snapshot() as conn:
                await conn.execute("UPDATE memories SET content = 'x' WHERE tenant_id = $1", a)
        # The same snapshot on the application role's pool sees no tenant at all.
        async with app.all_tenants_snapshot() as conn:
            assert await conn.fetchval("SELECT count(*) FROM memories") == 0
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await indexer.close()
        await app.close()


async def test_invalid_tenant_never_reaches_sql(env: MemoryEnv) -> None:
    db = Database(env.urls.app)
    await db.open()
    try:
        with pytest.raises(ValueError):
            async with db.transaction("x' OR '1'='1"):
                pass
    finally:
        await db.close()


@pytest.mark.parametrize("vectors", [True, False])
async def test_search_pool_read_probes_the_primary_key_under_rls(
    env: MemoryEnv, vectors: bool
) -> None:
    # Under RLS only leakproof conditions become index conditions; a pool read whose id
    # condition is not (``id = ANY($2 || ARRAY(...))``: array_cat) is a scan of the tenant's
    # rows as the application role, 314 ms at 100k memories. With enough rows that a probe
    # is clearly cheapest, both id conditions must be index conditions.
    from aeterna_memory.adapters.postgres import pool_sql

    tenant = new_tenant()
    first = await create(env, tenant, memory("pool probe", user_id="u", session_id="s"))
    admin = await asyncpg.connect(env.urls.superuser)
    try:
        await admin.execute(
            "INSERT INTO memories SELECT (jsonb_populate_record(m, "
            "jsonb_build_object('id', gen_random_uuid()))).* FROM memories m, "
            "generate_series(1, 3000) WHERE m.tenant_id = $1",
            tenant,
        )
        await admin.execute("ANALYZE memories")
    finally:
        await admin.close()
    ids = [uuid.UUID(first.name.rsplit("/", 1)[1]), uuid.uuid4()]
    db = Database(env.urls.app, min_size=1, max_size=1)
    await db.open()
    try:
        async with db.transaction(tenant) as conn:
            plan = await conn.fetch(
                f"EXPLAIN {pool_sql(vectors=vectors)}", tenant, ids, ids[:1], 2, 1
            )
    finally:
        await db.close()
    text = "\n".join(r[0] for r in plan)
    probes = [line for line in text.splitlines() if "Index Cond" in line and "id = ANY" in line]
    assert len(probes) >= 3, text  # the candidates, the expanded ones, the neighbours
    assert "Seq Scan" not in text, text
