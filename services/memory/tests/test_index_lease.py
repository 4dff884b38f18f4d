"""The shared index's lease: one leader applies, a deposed leader's writes are refused, a cut
leader is replaced; LISTEN reconnects; reconcile compares revisions outside the apply lock."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aeterna_common import leases
from aeterna_common.db import Database
from aeterna_common.search.lexical import encode_document
from aeterna_common.vectors.port import VectorIndex
from aeterna_common.vectors.qdrant import QdrantVectorIndex
from aeterna_devstack.netcut import CutProxy
from aeterna_memory.adapters.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    FileCursor,
    IndexFollower,
    LeaseFencedError,
    PostgresCursor,
)
from memory_testkit import MemoryEnv, create, memory, new_tenant
from qdrant_client import AsyncQdrantClient

DIM = 384


class RecordingFollower(IndexFollower):
    """Records each outbox batch it applies: (name, epoch, first position, last position)."""

    def __init__(self, name: str, log: list[tuple[str, int, int, int]], *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.name = name
        self.log = log

    async def _apply(
        self,
        rows: Sequence[asyncpg.Record],
        ids: Sequence[uuid.UUID],
        *,
        positions: tuple[int, int] | None = None,
    ) -> None:
        if positions is not None:
            epoch = self.keeper.lease.epoch if self.keeper and self.keeper.lease else 0
            self.log.append((self.name, epoch, *positions))
        await super()._apply(rows, ids, positions=positions)


def shared_index() -> QdrantVectorIndex:
    return QdrantVectorIndex(
        AsyncQdrantClient(location=":memory:"), "shared", KEYWORD_FIELDS, FLOAT_FIELDS
    )


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Wait until ``cond`` holds; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def max_position(env: MemoryEnv) -> int:
    conn = await asyncpg.connect(env.urls.superuser)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
    finally:
        await conn.close()


class Replica:
    """One follower of a shared index with its own pools (optionally through a proxy)."""

    def __init__(self, env: MemoryEnv, proxy: CutProxy | None) -> None:
        wrap = proxy.dsn if proxy else (lambda d: d)
        self.db = Database(wrap(env.urls.app), min_size=1, max_size=3, attempts=1)
        self.indexer = Database(wrap(env.urls.indexer), min_size=1, max_size=2, attempts=1)
        self.listen_dsn = wrap(env.urls.indexer)
        self.task: asyncio.Task[None] | None = None
        self.follower: RecordingFollower

    async def start(
        self,
        name: str,
        log: list[tuple[str, int, int, int]],
        index: VectorIndex,
        cursor_name: str,
        lease_name: str,
    ) -> RecordingFollower:
        await self.db.open()
        await self.indexer.open()
        self.follower = RecordingFollower(
            name,
            log,
            self.db,
            self.indexer,
            index,
            PostgresCursor(self.db, cursor_name),
            encode_document,
            dsn=self.listen_dsn,
            dimension=DIM,
            lease_name=lease_name,
            # The default ratio (apply margin ttl / 6, below the 2 s renewal interval): the
            # start's rebuild applies the session's memories in fenced batches, which took
            # over 0.5 s each on a slow machine with a 3 s lease.
            lease_ttl_s=6.0,
            apply_timeout_s=1.0,
            poll_s=0.2,
        )
        await self.follower.start()
        self.task = asyncio.create_task(self.follower.run())
        return self.follower

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
        await self.follower.close()
        await self.indexer.close()
        await self.db.close()


@pytest.fixture
async def proxy(env: MemoryEnv) -> AsyncIterator[CutProxy]:
    p = CutProxy.for_dsn(env.urls.app)
    await p.start()
    yield p
    await p.close()


async def test_leader_cut_off_is_replaced_without_double_apply(
    env: MemoryEnv, proxy: CutProxy
) -> None:
    tenant = new_tenant()
    log: list[tuple[str, int, int, int]] = []
    index = shared_index()
    cursor_name, lease_name = f"test:{uuid.uuid4()}", f"test-lease:{uuid.uuid4()}"
    ra, rb = Replica(env, proxy), Replica(env, None)
    a = await ra.start("a", log, index, cursor_name, lease_name)
    b = await rb.start("b", log, index, cursor_name, lease_name)
    try:
        assert a.leader and not b.leader
        assert a.keeper and a.keeper.lease and a.keeper.lease.epoch == 1
        start_position = a.applied
        # Only the leader reconciles a shared index.
        assert await b.reconcile() == {"added": 0, "updated": 0, "removed": 0}

        for i in range(5):
            await create(env, tenant, memory(f"before the cut {i}", user_id="u"))
        p1 = await max_position(env)
        await until(lambda: a.applied >= p1 and b.applied >= p1, 5, "both followed phase 1")

        cut_at = time.monotonic()
        proxy.cut()  # the leader loses every connection to PostgreSQL
        for i in range(5):
            await create(env, tenant, memory(f"during the cut {i}", user_id="u"))
        p2 = await max_position(env)
        await until(lambda: b.leader and b.applied >= p2, 15, "b took over and applied")
        assert not a.leader
        # b took over at a later epoch (2, or higher if a slow renewal let it lapse and b
        # took it again: still one holder at a time, each epoch newer than the last).
        assert b.keeper and b.keeper.lease and b.keeper.lease.epoch >= 2
        # Not before the cut leader's lease (6 s, renewed every 2 s) could expire. Measured from
        # the cut: the creates above may take a while on a loaded machine.
        assert time.monotonic() - cut_at > 1.0

        proxy.restore()  # the deposed leader comes back: it learns it lost the lease
        await until(lambda: a.keeper is not None and a.keeper.lease is None, 10, "a saw its loss")
        for i in range(5):
            await create(env, tenant, memory(f"after the cut {i}", user_id="u"))
        p3 = await max_position(env)
        await until(lambda: b.applied >= p3 and a.applied >= p3, 10, "phase 3 applied")
        # Exactly one leader. Usually b; on a loaded machine b's renewal may lapse and a take
        # the lease again at a newer epoch, which is correct as long as each epoch has one
        # holder and nothing is applied twice (checked below).
        assert a.leader != b.leader

        # No position applied twice, none skipped, and never by a deposed epoch.
        covered: list[int] = []
        for _, _, first, last in log:
            covered.extend(range(first, last + 1))
        assert sorted(covered) == covered == list(range(start_position + 1, p3 + 1))
        epochs = [epoch for _, epoch, _, _ in log]
        assert epochs == sorted(epochs)
        # One holder per epoch: a applied at epoch 1 (and later ones only if it took the
        # lease again), b only at the epochs it held, never at a's.
        a_epochs = {epoch for name, epoch, _, _ in log if name == "a"}
        b_epochs = {epoch for name, epoch, _, _ in log if name == "b"}
        assert 1 in a_epochs and a_epochs.isdisjoint(b_epochs) and min(b_epochs) >= 2
        holder = a if a.leader else b
        holder_epoch = holder.keeper.lease.epoch if holder.keeper and holder.keeper.lease else 0
        # The shared index holds the tenant's 15 memories at their revisions.
        values = await index.payload_values("revision")
        conn = await asyncpg.connect(env.urls.superuser)
        try:
            rows = await conn.fetch(
                "SELECT id, revision FROM memories WHERE tenant_id = $1", tenant
            )
            cursor = await conn.fetchrow(
                "SELECT position, epoch FROM index_cursors WHERE name = $1", cursor_name
            )
        finally:
            await conn.close()
        assert len(rows) == 15
        assert all(values[str(r["id"])] == r["revision"] for r in rows)
        assert cursor is not None and cursor["position"] >= p3 and cursor["epoch"] == holder_epoch
    finally:
        await rb.stop()
        await ra.stop()


async def test_a_batch_margin_beyond_the_renewal_interval_is_refused(env: MemoryEnv) -> None:
    # Just before a renewal the keeper counts ttl / 3 left: a batch needing more would find
    # the lease "not held" on every other step, and the leader would give it up.
    with pytest.raises(ValueError, match="renewal interval"):
        IndexFollower(
            Database(env.urls.app),
            Database(env.urls.indexer),
            shared_index(),
            PostgresCursor(Database(env.urls.app), "test:margin"),
            encode_document,
            dsn=env.urls.indexer,
            dimension=DIM,
            lease_name="test-lease:margin",
            lease_ttl_s=3.0,
            apply_timeout_s=1.5,
        )


async def test_a_stale_epoch_is_refused(env: MemoryEnv) -> None:
    db = Database(env.urls.app)
    await db.open()
    name, cursor_name = f"test-lease:{uuid.uuid4()}", f"test:{uuid.uuid4()}"
    cursor = PostgresCursor(db, cursor_name)
    try:
        old = await leases.acquire(db.pool, name, "old-holder", 0.5)
        assert old is not None and old.epoch == 1
        # Held: nobody else takes it.
        assert await leases.acquire(db.pool, name, "new-holder", 0.5) is None
        await cursor.save_fenced(10, old)
        await asyncio.sleep(0.7)
        new = await leases.acquire(db.pool, name, "new-holder", 30)
        assert new is not None and new.epoch == 2
        with pytest.raises(leases.LeaseLostError):
            await leases.renew(db.pool, old)
        with pytest.raises(LeaseFencedError):
            await cursor.save_fenced(99, old)
        async with db.pool.acquire() as conn, conn.transaction():
            with pytest.raises(leases.LeaseLostError):
                await leases.check(conn, old)
        assert await leases.release(db.pool, old) is False
        await cursor.save_fenced(20, new)
        # Even with the lease row forged back to the old epoch, the cursor keeps the later
        # epoch's write.
        forged = leases.Lease(name=name, owner=new.owner, epoch=1, ttl_s=30)
        async with db.pool.acquire() as conn:
            await conn.execute("UPDATE leases SET epoch = 1 WHERE name = $1", name)
        with pytest.raises(LeaseFencedError):
            await cursor.save_fenced(30, forged)
        assert await cursor.load("") == 20
        # Unfenced writes to a shared cursor are refused outright.
        with pytest.raises(LeaseFencedError):
            await cursor.save(40, "")
        # The keeper reports a refused renewal as a loss.
        async with db.pool.acquire() as conn:
            await conn.execute("UPDATE leases SET epoch = 3 WHERE name = $1", name)
        changes: list[leases.Lease | None] = []
        keeper = leases.LeaseKeeper(db.pool, name, ttl_s=30, owner=new.owner)
        keeper.on_change = changes.append
        keeper.lease, keeper._valid_until = forged, time.monotonic() + 10
        with pytest.raises(leases.LeaseLostError):
            await keeper.renew_once()
        assert not keeper.held and changes == [None]
    finally:
        await db.close()


async def test_periodic_job_runs_on_one_replica(env: MemoryEnv) -> None:
    db = Database(env.urls.app)
    await db.open()
    name = f"test-job:{uuid.uuid4()}"
    runs: list[tuple[str, int]] = []

    def job(replica: str) -> Callable[[leases.Lease], Awaitable[None]]:
        async def run(lease: leases.Lease) -> None:
            runs.append((replica, lease.epoch))

        return run

    tasks = [
        asyncio.create_task(
            leases.run_periodic_under_lease(db.pool, name, job(r), interval_s=0.1, ttl_s=2)
        )
        for r in ("r1", "r2", "r3")
    ]
    try:
        await until(lambda: len(runs) >= 5, 10, "the job ran")
        # Renewed well before expiry: the same holder at the same epoch for 2.5 lifetimes.
        await asyncio.sleep(5)
        assert len(set(runs)) == 1, set(runs)
        holder = runs[0][0]
        # The holder stops (and releases): another replica takes over at the next epoch.
        tasks[int(holder[1]) - 1].cancel()
        await asyncio.gather(tasks[int(holder[1]) - 1], return_exceptions=True)
        seen = len(runs)
        await until(lambda: any(r != holder for r, _ in runs[seen:]), 10, "another took over")
        later = {(r, e) for r, e in runs[seen:]}
        assert len(later) == 1 and next(iter(later))[1] == runs[0][1] + 1, runs
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.close()


async def edge_follower(
    env: MemoryEnv, tmp_path: Path, index: VectorIndex, **kw: Any
) -> tuple[IndexFollower, Database, Database]:
    db, indexer = Database(env.urls.app), Database(env.urls.indexer)
    await db.open()
    await indexer.open()
    follower = IndexFollower(
        db,
        indexer,
        index,
        FileCursor(tmp_path / "applied_position"),
        encode_document,
        dsn=env.urls.indexer,
        dimension=DIM,
        **kw,
    )
    await follower.start()
    return follower, db, indexer


async def test_listen_reconnects_after_its_backend_is_terminated(
    env: MemoryEnv, tmp_path: Path
) -> None:
    index = shared_index()
    # Polling is off in effect: only notifications make this follower apply promptly.
    follower, db, indexer = await edge_follower(env, tmp_path, index, poll_s=60)
    task = asyncio.create_task(follower.run())
    tenant = new_tenant()
    try:
        await create(env, tenant, memory("before", user_id="u"))
        p = await max_position(env)
        await until(lambda: follower.applied >= p, 3, "applied before")
        pid = follower.listener_pid
        assert pid is not None
        conn = await asyncpg.connect(env.urls.superuser)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await until(lambda: follower.listener_pid not in (None, pid), 5, "a new LISTEN connection")
        for i in range(3):
            await create(env, tenant, memory(f"after {i}", user_id="u"))
            wanted = await max_position(env)
            took = await until(
                lambda wanted=wanted: follower.applied >= wanted, 3, f"write {i} applied"
            )
            assert took < 1.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await follower.close()
        await indexer.close()
        await db.close()


class BlockingScan:
    """Delegates to an index; its full scan (``payload_values``) waits for ``release``."""

    def __init__(self, inner: VectorIndex) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.scanning = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def payload_values(self, key: str) -> dict[str, Any]:
        self.scanning.set()
        await self.release.wait()
        return await self.inner.payload_values(key)


async def test_reconcile_compares_revisions_outside_the_apply_lock(
    env: MemoryEnv, tmp_path: Path
) -> None:
    inner = shared_index()
    index = BlockingScan(inner)
    follower, db, indexer = await edge_follower(env, tmp_path, index, poll_s=60)
    tenant = new_tenant()
    try:
        made = [await create(env, tenant, memory(f"memory {i}", user_id="u")) for i in range(3)]
        await follower.catch_up()
        ids = [m.name.rsplit("/", 1)[1] for m in made]
        # Damage the index: one point at an old revision with other content, one missing,
        # one that PostgreSQL does not hold.
        async with indexer.all_tenants_snapshot() as conn:
            (row,) = await conn.fetch("SELECT * FROM memories WHERE id = $1", uuid.UUID(ids[1]))
        old = await inner.retrieve_dense([ids[1]])
        from aeterna_common.vectors.port import IndexPoint, SparseVector

        await inner.upsert(
            [
                IndexPoint(
                    id=ids[1],
                    dense=old[ids[1]],
                    sparse=SparseVector([1], [1.0]),
                    payload={"tenant_id": tenant, "revision": 0, "user_id": "u"},
                )
            ]
        )
        await inner.delete([ids[2]])
        bogus = str(uuid.uuid4())
        await inner.upsert(
            [
                IndexPoint(
                    id=bogus,
                    dense=old[ids[1]],
                    sparse=SparseVector([1], [1.0]),
                    payload={"tenant_id": tenant, "revision": 1},
                )
            ]
        )
        assert row["revision"] == 1

        reconciling = asyncio.create_task(follower.reconcile())
        await asyncio.wait_for(index.scanning.wait(), 5)
        # While the full scan is under way, catch-up is not blocked behind it.
        await create(env, tenant, memory("written during the scan", user_id="u"))
        p = await max_position(env)
        await asyncio.wait_for(follower.catch_up(), 5)
        assert follower.applied >= p
        index.release.set()
        result = await asyncio.wait_for(reconciling, 10)
        assert result["added"] >= 1 and result["updated"] >= 1 and result["removed"] >= 1
        values = await inner.payload_values("revision")
        conn = await asyncpg.connect(env.urls.superuser)
        try:
            live = {
                str(r["id"]): r["revision"]
                for r in await conn.fetch(
                    "SELECT id, revision FROM memories WHERE deleted_at IS NULL "
                    "AND (expire_at IS NULL OR expire_at > now())"
                )
            }
        finally:
            await conn.close()
        assert values == live
        # Nothing left to repair.
        index.release.set()
        assert await follower.reconcile() == {"added": 0, "updated": 0, "removed": 0}
    finally:
        await follower.close()
        await indexer.close()
        await db.close()
