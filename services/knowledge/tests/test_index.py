"""The knowledge index's maintenance on real PostgreSQL with the real model and embedded
index: HNSW graphs built on a copy while searches go on, the reconciler repairing a damaged
index, the outbox trimmed only below every live follower's report, and a follower that comes
back behind the trim rebuilding instead of skipping changes."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna_common import leases
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY
from aeterna_common.db import Database, SchemaSettings, prepare_schema
from aeterna_common.search.lexical import BM25Encoder
from aeterna_common.vectors.edge import EdgeVectorIndex
from aeterna_common.vectors.follow import FileCursor
from aeterna_common.vectors.port import IndexFilter, IndexPoint, SparseVector
from aeterna_knowledge.app import MIGRATIONS
from aeterna_knowledge.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    KnowledgeIndexFollower,
    trim_outbox,
)
from aeterna_knowledge.search_chunks import chunk_point_id
from knowledge_testkit import ADR, KnowledgeEnv, draft, who

KAFKA_ADR = """# Use Kafka for the event bus

## Context
Services exchange events and need replay of a topic for a week.

## Decision
We use Kafka as the event bus.

## Consequences
Operations runs a Kafka cluster.
"""


async def search(kn: KnowledgeEnv, tenant: str, query: str, token: str) -> list[str]:
    """Paths of the hits of a search as the tenant admin, with a write's consistency token."""
    response = await kn.stub.SearchKnowledge(
        svc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", query=query),
        metadata=(*who(tenant, "root"), (CONSISTENCY_TOKEN_KEY, token)),
    )
    return [r.knowledge_item.path for r in response.results]


def follower_of(kn: KnowledgeEnv) -> KnowledgeIndexFollower:
    follower = kn.app.deps.search.follower  # type: ignore[union-attr]
    assert isinstance(follower, KnowledgeIndexFollower)
    return follower


async def create(kn: KnowledgeEnv, tenant: str, path: str, content: str = ADR) -> tuple[str, str]:
    """Create a team ADR; its item id and the write's consistency token."""
    call = kn.stub.CreateKnowledgeItem(
        draft(tenant, path, content=content), metadata=who(tenant, "root")
    )
    item = await call
    token = dict(await call.initial_metadata() or ())[CONSISTENCY_TOKEN_KEY]
    return item.name.rsplit("/", 1)[1], str(token)


async def test_graph_built_on_a_copy_while_searches_go_on(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    _, token = await create(kn, tenant, "adr/luxon")
    before = await search(kn, tenant, "dates library", token)
    assert before == ["adr/luxon"]
    follower = follower_of(kn)
    index = follower.index
    assert isinstance(index, EdgeVectorIndex)
    shard = index.active_path
    # Below the threshold: no copy.
    assert not await follower.build_graph(10**9)
    build = asyncio.create_task(follower.build_graph(1))
    # Searches and writes go on during the build; a write made meanwhile is replayed into
    # the copy before it is swapped in.
    _, token = await create(kn, tenant, "adr/kafka", KAFKA_ADR)
    assert "adr/luxon" in await search(kn, tenant, "dates library", token)
    assert await build
    found = await search(kn, tenant, "event bus", token)
    assert found[0] == "adr/kafka"
    assert (await search(kn, tenant, "dates library", token))[0] == "adr/luxon"
    # The optimised copy serves now.
    assert index.active_path != shard


async def test_reconcile_repairs_missing_stale_and_foreign_points(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    missing, _ = await create(kn, tenant, "adr/missing")
    stale, token = await create(kn, tenant, "adr/stale", ADR.replace("Luxon", "date-fns"))
    assert set(await search(kn, tenant, "dates", token)) == {
        "adr/missing",
        "adr/stale",
    }
    follower = follower_of(kn)
    index = follower.index
    mine = IndexFilter(tenant_id=tenant)
    points = await index.all_ids(tenant)
    # Damage: one item's points lost, another's chunk count wrong (an extra ordinal), and a
    # point of an item PostgreSQL never held.
    await index.delete([p for p in points if _owner(p, missing)])
    vector = [1.0] + [0.0] * 383
    ghost = str(uuid.uuid4())
    extra = IndexPoint(
        chunk_point_id(stale, 30), vector, SparseVector([1], [1.0]), _payload(tenant, stale)
    )
    stray = IndexPoint(
        chunk_point_id(ghost, 0), vector, SparseVector([1], [1.0]), _payload(tenant, ghost)
    )
    await index.upsert([extra, stray])
    assert "adr/missing" not in await search(kn, tenant, "dates", token)

    result = await follower.reconcile()
    assert result["added"] >= 1 and result["updated"] >= 1 and result["removed"] >= 1
    assert await index.all_ids(tenant) == points
    assert await index.count(mine) == len(points)
    assert set(await search(kn, tenant, "dates", token)) == {
        "adr/missing",
        "adr/stale",
    }


def _owner(point: str, item_id: str) -> bool:
    return point in {chunk_point_id(item_id, i) for i in range(32)}


def _payload(tenant: str, item_id: str) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "item_id": item_id,
        "ordinal": 0,
        "type": "ADR",
        "layer": "TEAM",
        "status": "DRAFT",
        "org_unit_id": "payments",
        "tags": [],
        "variant_role": 0,
        "version": 1,
        "updated_at": 0.0,
    }


@pytest.fixture
async def outbox_db(make_database: Any) -> Any:
    """A migrated knowledge database with no server, its outbox filled with 10 changes
    (positions 1-10) of items that do not exist (deletions to a follower)."""
    urls = await make_database()
    await prepare_schema(
        SchemaSettings(migrate_on_start=True),
        database_url=urls.app,
        owner_url=urls.owner,
        directory=MIGRATIONS,
        indexer_url=urls.indexer,
    )
    conn = await asyncpg.connect(urls.owner)
    try:
        await conn.executemany(
            "INSERT INTO outbox (position, tenant_id, event_type, resource) "
            "VALUES ($1, 't', 'knowledge.deleted', $2)",
            [(p, f"tenants/t/knowledgeItems/{uuid.uuid4()}") for p in range(1, 11)],
        )
    finally:
        await conn.close()
    db = Database(urls.app, min_size=1, max_size=2)
    await db.open()
    yield urls, db
    await db.close()


async def _report(urls: Any, name: str, position: int, expires_in_s: float) -> None:
    conn = await asyncpg.connect(urls.app)
    try:
        await conn.execute(
            "INSERT INTO outbox_followers (name, position, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) ON CONFLICT (name) "
            "DO UPDATE SET position = EXCLUDED.position, expires_at = EXCLUDED.expires_at",
            name,
            position,
            expires_in_s,
        )
    finally:
        await conn.close()


async def _positions(urls: Any) -> tuple[list[int], int]:
    conn = await asyncpg.connect(urls.owner)
    try:
        rows = await conn.fetch("SELECT position FROM outbox ORDER BY position")
        upto = await conn.fetchval("SELECT upto FROM outbox_trim WHERE id = 1")
        return [r["position"] for r in rows], int(upto)
    finally:
        await conn.close()


async def test_outbox_trimmed_only_below_every_live_follower(outbox_db: Any) -> None:
    urls, db = outbox_db
    # Nobody reported: nothing is known to be applied, nothing goes.
    assert await trim_outbox(db) == 0
    await _report(urls, "edge:ahead", 9, 60)
    await _report(urls, "edge:behind", 4, 60)
    await _report(urls, "edge:gone", 1, -1)  # expired: holds nothing back
    # The trim holds its lease and checks it in each batch's transaction.
    lease = await leases.acquire(db.pool, "knowledge:outbox:trim", leases.new_owner_id(), 30)
    assert lease is not None
    assert await trim_outbox(db, lease, batch=3) == 4
    assert await _positions(urls) == (list(range(5, 11)), 4)
    await _report(urls, "edge:behind", 7, 60)
    assert await trim_outbox(db) == 3
    assert await _positions(urls) == ([8, 9, 10], 7)


async def test_follower_behind_the_trim_rebuilds(outbox_db: Any, kn: KnowledgeEnv) -> None:
    urls, db = outbox_db
    await _report(urls, "edge:other", 6, 60)
    assert await trim_outbox(db) == 6
    indexer = Database(urls.indexer, min_size=1, max_size=2)
    await indexer.open()
    directory = Path(tempfile.mkdtemp(prefix="knowledge-index-"))
    index = EdgeVectorIndex(str(directory / "shard"), KEYWORD_FIELDS, FLOAT_FIELDS)
    follower = KnowledgeIndexFollower(
        db,
        indexer,
        index,
        FileCursor(directory / "applied_position"),
        follower_of(kn).embedder,
        BM25Encoder().encode_document,
        dsn=urls.indexer,
    )
    try:
        await follower.start()  # no cursor yet: a rebuild, to the latest position
        assert follower.applied == 10
        # This replica's cursor says 2 (its report had expired while it was away): the
        # changes 3-6 are trimmed, so it rebuilds rather than skipping them.
        follower.applied = 2
        rebuilds = follower._rebuilds
        await follower.catch_up()
        assert follower._rebuilds == rebuilds + 1
        assert follower.applied == 10
        # Its own report is what the trim honours from now on.
        await follower.report_position("edge:me", 60)
        conn = await asyncpg.connect(urls.app)
        try:
            assert (
                await conn.fetchval("SELECT position FROM outbox_followers WHERE name = 'edge:me'")
                == 10
            )
        finally:
            await conn.close()
    finally:
        await follower.close()
        await index.close()
        await indexer.close()
