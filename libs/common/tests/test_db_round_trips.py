"""A unit of work costs three round trips, and no session state survives into the next one.

Real PostgreSQL (the project's throwaway cluster) with the memory schema, which defines
``aeterna_bind_tenant``; round trips are counted with asyncpg's query logger, which sees every
statement the connection sends, including the pool's reset on release.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from aeterna_common.db import Database, apply_migrations, begin_statement, role_of
from aeterna_memory.adapters.postgres import _append_outbox
from aeterna_memory.app import MIGRATIONS


@pytest_asyncio.fixture
async def db(make_database: Any) -> AsyncIterator[Database]:
    urls = await make_database()
    await apply_migrations(urls.owner, MIGRATIONS, role_of(urls.app), role_of(urls.indexer))
    database = Database(urls.app, min_size=1, max_size=1)  # one connection: reuse is certain
    await database.open()
    yield database
    await database.close()


def tenant() -> str:
    return f"rt-{uuid.uuid4().hex[:10]}"


async def statements_of(db: Database, unit: Any) -> list[str]:
    """The statements the pool's one connection sends while ``unit()`` runs."""
    sent: list[str] = []
    async with db.pool.acquire() as conn:
        raw = conn._con  # the connection behind the pool's proxy: the logger outlives release
    raw.add_query_logger(lambda record: sent.append(record.query))
    try:
        await unit()
    finally:
        raw.remove_query_logger(sent.append)
    return sent


async def test_a_unit_of_work_is_three_round_trips(db: Database) -> None:
    t = tenant()

    async def work(conn: asyncpg.Connection) -> Any:
        return await conn.fetchval("SELECT aeterna_tenant()")

    seen: list[Any] = []

    async def unit() -> None:
        seen.append(await db.run(t, work, readonly=True))

    sent = await statements_of(db, unit)
    assert seen == [t]  # the work ran bound to its tenant
    # reset + BEGIN + bind in one message, the work, COMMIT; nothing on release.
    assert len(sent) == 3, sent
    assert sent[0] == begin_statement(t, readonly=True)
    assert sent[2] == "COMMIT"


async def test_a_writing_unit_of_work_commits(db: Database) -> None:
    t = tenant()

    async def write(conn: asyncpg.Connection) -> None:
        await _append_outbox(conn, t, "memory.created", [uuid.uuid4()], actor="users/alice")

    async def count(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE tenant_id = $1", t))

    await db.run(t, write)
    assert await db.run(t, count, readonly=True) == 1

    async def failing(conn: asyncpg.Connection) -> None:
        await write(conn)
        raise RuntimeError("after the insert")

    with pytest.raises(RuntimeError):
        await db.run(t, failing)
    assert await db.run(t, count, readonly=True) == 1  # rolled back, nothing half-done


async def test_session_state_left_on_a_connection_is_reset_before_the_next_transaction(
    db: Database,
) -> None:
    t = tenant()
    async with db.pool.acquire() as conn:  # a careless borrower
        await conn.execute("SET statement_timeout = '1234ms'")
        await conn.execute("SELECT pg_advisory_lock(4242)")
        await conn.execute("LISTEN careless")
        before = await conn.fetchval("SELECT pg_backend_pid()")

    async def state(conn: asyncpg.Connection) -> tuple[int, str, int, int]:
        return (
            int(await conn.fetchval("SELECT pg_backend_pid()")),
            str(await conn.fetchval("SELECT current_setting('statement_timeout')")),
            int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = 4242 AND pid = pg_backend_pid()"
                )
            ),
            int(await conn.fetchval("SELECT count(*) FROM pg_listening_channels()")),
        )

    pid, timeout, locks, _ = await db.run(t, state, readonly=True)
    assert pid == before  # the same session ...
    assert (timeout, locks) == ("0", 0)  # ... with nothing left behind
    # UNLISTEN takes effect when the transaction that ran it commits.
    assert (await db.run(t, state, readonly=True))[3] == 0
    async with db.pool.acquire() as conn:
        await conn.execute("SET statement_timeout = '1234ms'")
    async with db.transaction(t) as conn:
        assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "0"
        assert await conn.fetchval("SELECT aeterna_tenant()") == t


@pytest.mark.parametrize("bad", ["a'b", "x'); SELECT 1; --", "acme\n", "", "a" * 101])
async def test_a_tenant_id_outside_the_pattern_never_reaches_sql(db: Database, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid tenant id"):
        begin_statement(bad, readonly=False)

    async def work(conn: asyncpg.Connection) -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="invalid tenant id"):
        await db.run(bad, work)
