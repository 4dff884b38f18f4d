"""The three database roles: RLS cannot be talked out of as the application role, the
application role cannot change the schema, and the indexer role can write nothing."""

from __future__ import annotations

import re
import uuid

import asyncpg
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna_common.db import Database
from memory_testkit import MemoryEnv, md, memory, new_tenant

TENANT_TABLES = (
    "memories",
    "memory_revisions",
    "idempotency_keys",
    "outbox",
    "memory_promotions",
)


async def _tables_with_tenant(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.attname = 'tenant_id' AND c.relkind IN ('r', 'p') AND n.nspname = 'public' "
        "AND NOT a.attisdropped ORDER BY 1"
    )
    return [r["relname"] for r in rows]


async def _policy_settings(superuser_dsn: str) -> set[str]:
    """Every setting named in any policy, or in any function a policy calls."""
    conn = await asyncpg.connect(superuser_dsn)
    try:
        texts = [
            r["t"]
            for r in await conn.fetch(
                "SELECT coalesce(qual, '') || ' ' || coalesce(with_check, '') AS t FROM pg_policies"
            )
        ]
        texts += [
            r["prosrc"]
            for r in await conn.fetch(
                "SELECT prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname IN ('public', 'aeterna_private')"
            )
        ]
    finally:
        await conn.close()
    names = set()
    for t in texts:
        names.update(re.findall(r"current_setting\(\s*'+([a-z_.]+)'+", t))
    return names


@pytest.fixture
async def two_tenants(env: MemoryEnv) -> tuple[str, str]:
    """Tenants A and B, each with rows in every tenant table."""
    a, b = new_tenant(), new_tenant()
    for t in (a, b):
        created = await env.stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent=f"tenants/{t}",
                memory=memory(f"secret of {t}", user_id="u"),
                request_id=f"rid-{t}",
            ),
            metadata=md(t),
        )
        await env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=type(created)(name=created.name, content=f"new secret of {t}"),
                update_mask={"paths": ["content"]},
            ),
            metadata=md(t),
        )

        # A promotion waiting for its approval, written as the app role bound to t.
        async def asked(conn: asyncpg.Connection, t: str = t, name: str = created.name) -> None:
            await conn.execute(
                "INSERT INTO memory_promotions (tenant_id, memory_id, revision, "
                "approval_request, target_layer, target_unit, promotion_score, content_sha256) "
                "VALUES ($1, $2, 2, $3, 'TEAM', 'team', 0.9, $4)",
                t,
                uuid.UUID(name.rsplit("/", 1)[1]),
                f"tenants/{t}/approvalRequests/{uuid.uuid4()}",
                "0" * 64,
            )

        await env.app.lifecycle.db.run(t, asked)
    return a, b


async def _foreign_rows(conn: asyncpg.Connection, tables: list[str], foreign: str) -> int:
    total = 0
    for table in tables:
        total += await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", foreign)
    return int(total)


async def test_every_tenant_table_has_rows_of_both(
    env: MemoryEnv, two_tenants: tuple[str, str]
) -> None:
    """The fixture is meaningful: as the superuser, each table holds rows of both tenants."""
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        tables = await _tables_with_tenant(conn)
        assert set(TENANT_TABLES) <= set(tables)
        for table in tables:
            for t in two_tenants:
                n = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", t)
                assert n > 0, (table, t)
    finally:
        await conn.close()


async def test_no_setting_reveals_another_tenant(
    env: MemoryEnv, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    settings = await _policy_settings(env.urls.superuser) | {
        "app.tenant_id",
        "app.all_tenants",
        "aeterna.tenant_binding",
    }
    forged = f"{b}/{'0' * 64}"
    attempts: list[str] = []
    for name in sorted(settings):
        for value in (b, "on", forged):
            attempts += [
                f"SET {name} = '{value}'",
                f"SET LOCAL {name} = '{value}'",
                f"SELECT set_config('{name}', '{value}', false)",
                f"SELECT set_config('{name}', '{value}', true)",
            ]
    attempts += [
        "RESET ALL",
        "RESET ROLE",
        "SET ROLE aeterna_owner",
        "SET ROLE aeterna_indexer",
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION aeterna_owner",
        "SET row_security = off",
        f"SELECT aeterna_bind_tenant('{b}')",
        f"SELECT set_config('aeterna.tenant_binding', '', true), aeterna_bind_tenant('{b}')",
    ]
    db = Database(env.urls.app, min_size=1, max_size=1)
    await db.open()
    try:
        tables = list(TENANT_TABLES)
        async with db.transaction(a) as conn:  # what the binding itself shows
            for table in tables:
                assert await _foreign_rows(conn, [table], a) > 0, table
        for attempt in attempts:
            # Inside a transaction bound to A ...
            async with db.transaction(a) as conn:
                try:
                    async with conn.transaction():  # a savepoint: the attempt may fail
                        await conn.execute(attempt)
                        seen = await _foreign_rows(conn, tables, b)
                except asyncpg.PostgresError:
                    seen = 0
                assert seen == 0, attempt
                # ... and for every later statement of that transaction, whatever happened.
                assert await _foreign_rows(conn, tables, b) == 0, attempt
            # ... and on a connection bound to no tenant (session-level settings persist).
            async with db.pool.acquire() as conn:
                try:
                    await conn.execute(attempt)
                except asyncpg.PostgresError:
                    pass
                for t in (a, b):
                    try:
                        assert await _foreign_rows(conn, tables, t) == 0, attempt
                    except asyncpg.exceptions.InsufficientPrivilegeError:
                        pass  # row_security = off: the query is refused
                await conn.execute("RESET ALL")
    finally:
        await db.close()


async def test_a_binding_is_sealed_to_its_transaction(
    env: MemoryEnv, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    db = Database(env.urls.app, min_size=1, max_size=1)
    await db.open()
    try:
        async with db.transaction(b) as conn:
            sealed_b = await conn.fetchval("SELECT current_setting('aeterna.tenant_binding')")
            assert await conn.fetchval("SELECT aeterna_tenant()") == b
        assert sealed_b.startswith(f"{b}/")
        # Replayed on the same connection in a later transaction: no tenant.
        async with db.transaction(a) as conn:
            await conn.execute("SELECT set_config('aeterna.tenant_binding', $1, true)", sealed_b)
            assert await conn.fetchval("SELECT aeterna_tenant()") is None
            assert await _foreign_rows(conn, list(TENANT_TABLES), b) == 0
            assert await _foreign_rows(conn, list(TENANT_TABLES), a) == 0
        # A second binding in one transaction is refused, also after the setting is reset.
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            async with db.transaction(a) as conn:
                await conn.execute("RESET ALL")
                await conn.execute("SELECT aeterna_bind_tenant($1)", b)
        # The key is out of the application role's reach.
        async with db.pool.acquire() as conn:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch("SELECT * FROM aeterna_private.tenant_binding_key")
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetchval("SELECT aeterna_private.tenant_seal($1)", b)
    finally:
        await db.close()


DDL_ATTEMPTS = [
    "ALTER TABLE {t} DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY",
    "ALTER TABLE {t} ADD COLUMN x integer",
    "ALTER TABLE {t} OWNER TO CURRENT_USER",
    "DROP POLICY tenant_isolation ON {t}",
    "CREATE POLICY open ON {t} USING (true)",
    "DROP TABLE {t}",
    "TRUNCATE {t}",
]
OTHER_DDL = [
    "CREATE TABLE mine (x integer)",
    "CREATE TEMP TABLE mine (x integer)",
    "CREATE SCHEMA mine",
    "CREATE FUNCTION public.aeterna_tenant() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$",
    "CREATE OR REPLACE FUNCTION aeterna_tenant() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$",
    "ALTER FUNCTION aeterna_tenant() OWNER TO CURRENT_USER",
    "ALTER TABLE aeterna_private.tenant_binding_key DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE leases OWNER TO CURRENT_USER",
    "ALTER TABLE index_cursors ADD COLUMN x integer",
]


async def test_app_role_cannot_change_the_schema(env: MemoryEnv) -> None:
    conn = await asyncpg.connect(env.urls.app)
    try:
        for stmt in [d.format(t=t) for t in TENANT_TABLES for d in DDL_ATTEMPTS] + OTHER_DDL:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(stmt)
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = current_user"
        )
        assert owned == 0
        forced = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[]) "
            "AND relrowsecurity AND relforcerowsecurity",
            list(TENANT_TABLES),
        )
        assert forced == len(TENANT_TABLES)
    finally:
        await conn.close()


async def test_indexer_reads_across_tenants_and_writes_nothing(
    env: MemoryEnv, two_tenants: tuple[str, str]
) -> None:
    a, b = two_tenants
    conn = await asyncpg.connect(env.urls.indexer)
    try:
        attrs = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls, rolcreatedb, rolcreaterole FROM pg_roles "
            "WHERE rolname = current_user"
        )
        assert attrs is not None and not any(attrs.values())
        for t in (a, b):
            assert await conn.fetchval("SELECT count(*) FROM memories WHERE tenant_id = $1", t) == 1
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE tenant_id = $1", t) > 0
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        assert {"memories", "outbox", "leases", "index_cursors"} <= set(tables)
        for table in tables:
            for stmt in (
                f"INSERT INTO {table} DEFAULT VALUES",
                f"UPDATE {table} SET tenant_id = tenant_id"
                if table in TENANT_TABLES
                else f"DELETE FROM {table} WHERE false",
                f"DELETE FROM {table}",
                f"TRUNCATE {table}",
                f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
            ):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                    await conn.execute(stmt)
        # It reads nothing index maintenance does not need.
        for table in ("memory_revisions", "idempotency_keys", "leases"):
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM {table}")
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.execute("SELECT aeterna_bind_tenant($1)", a)
        for stmt in OTHER_DDL:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(stmt)
    finally:
        await conn.close()


async def test_policies_are_bound_to_roles(env: MemoryEnv) -> None:
    """No policy applies to PUBLIC; every policy of the app role is bound to the transaction's
    tenant; the indexer's only SELECT. (Policies of the owner, which serves nothing, may
    serve owner-run maintenance functions.)"""
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        rows = await conn.fetch(
            "SELECT tablename, policyname, roles::text[] AS roles, cmd, qual, with_check "
            "FROM pg_policies"
        )
    finally:
        await conn.close()
    assert {r["tablename"] for r in rows if "aeterna_app" in r["roles"]} >= set(TENANT_TABLES)
    assert {r["tablename"] for r in rows if "aeterna_indexer" in r["roles"]} == {
        "memories",
        "outbox",
        "memory_promotions",
        "usage_hourly",  # the usage reporter finds the tenants with unreported usage
    }
    for r in rows:
        assert "public" not in r["roles"], dict(r)
        if "aeterna_app" in r["roles"]:
            assert r["roles"] == ["aeterna_app"], dict(r)
            assert "aeterna_tenant()" in r["qual"], dict(r)
            assert r["with_check"] is None or "aeterna_tenant()" in r["with_check"], dict(r)
        if "aeterna_indexer" in r["roles"]:
            assert r["roles"] == ["aeterna_indexer"] and r["cmd"] == "SELECT", dict(r)
