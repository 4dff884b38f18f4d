"""Below and beside the lifecycle: row-level security between tenants, deletes of items
and relations, and relations kept both ways."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import resources_pb2 as res
from governance_testkit import expect
from knowledge_testkit import KnowledgeEnv, draft, who


async def test_rls_keeps_each_tenant_to_its_rows(kn: KnowledgeEnv) -> None:
    a, b = kn.tenant(), kn.tenant()
    mine = await kn.stub.CreateKnowledgeItem(draft(a), metadata=who(a, "root"))
    await kn.stub.CreateKnowledgeItem(draft(b), metadata=who(b, "root"))
    conn = await asyncpg.connect(kn.urls.app)
    try:
        async with conn.transaction():
            await conn.execute("SELECT aeterna_bind_tenant($1)", a)
            for table in ("knowledge_items", "knowledge_revisions", "outbox"):
                tenants = await conn.fetch(f"SELECT DISTINCT tenant_id FROM {table}")
                assert [r["tenant_id"] for r in tenants] == [a], table
            ids = await conn.fetch("SELECT id FROM knowledge_items")
            assert [str(r["id"]) for r in ids] == [mine.name.rsplit("/", 1)[1]]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO knowledge_revisions (tenant_id, item_id, version, content, "
                    "content_hash, author, reason, status) "
                    "VALUES ($1, gen_random_uuid(), 1, '', '', 'x', 'x', 1)",
                    b,
                )
        # Revisions are append-only for the application role.
        async with conn.transaction():
            await conn.execute("SELECT aeterna_bind_tenant($1)", a)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("UPDATE knowledge_revisions SET reason = 'rewritten'")
        # Unbound, the application role sees nothing at all.
        assert await conn.fetchval("SELECT count(*) FROM knowledge_items") == 0
    finally:
        await conn.close()


async def test_relations_are_written_and_deleted_both_ways(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    a = await kn.stub.CreateKnowledgeItem(draft(tenant, "pattern/a"), metadata=root)
    b = await kn.stub.CreateKnowledgeItem(draft(tenant, "pattern/b"), metadata=root)
    created = await kn.stub.CreateKnowledgeRelation(
        svc.CreateKnowledgeRelationRequest(
            parent=a.name,
            knowledge_relation=res.KnowledgeRelation(
                kind=res.RELATION_KIND_PROMOTED_TO, target=b.name
            ),
        ),
        metadata=root,
    )
    reason, _, _ = await expect(
        kn.stub.CreateKnowledgeRelation(
            svc.CreateKnowledgeRelationRequest(
                parent=a.name,
                knowledge_relation=res.KnowledgeRelation(
                    kind=res.RELATION_KIND_PROMOTED_TO, target=b.name
                ),
            ),
            metadata=root,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reason == "RELATION_EXISTS"

    async def kinds(item: res.KnowledgeItem) -> list[tuple[int, str]]:
        reply = await kn.stub.ListKnowledgeRelations(
            svc.ListKnowledgeRelationsRequest(parent=item.name), metadata=root
        )
        return [(r.kind, r.target) for r in reply.knowledge_relations]

    assert await kinds(a) == [(res.RELATION_KIND_PROMOTED_TO, b.name)]
    assert await kinds(b) == [(res.RELATION_KIND_PROMOTED_FROM, a.name)]
    await kn.stub.DeleteKnowledgeRelation(
        svc.DeleteKnowledgeRelationRequest(name=created.name), metadata=root
    )
    assert await kinds(a) == [] and await kinds(b) == []


async def test_only_never_proposed_items_are_deleted(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    scratch = await kn.stub.CreateKnowledgeItem(draft(tenant, "adr/scratch"), metadata=root)
    await kn.stub.DeleteKnowledgeItem(
        svc.DeleteKnowledgeItemRequest(name=scratch.name, etag=scratch.etag), metadata=root
    )
    await expect(
        kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=scratch.name), metadata=root),
        grpc.StatusCode.NOT_FOUND,
    )
    reviewed = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=root)
    await kn.stub.ProposeKnowledgeItem(
        svc.ProposeKnowledgeItemRequest(name=reviewed.name), metadata=root
    )
    await kn.stub.RejectKnowledgeItem(
        svc.RejectKnowledgeItemRequest(name=reviewed.name), metadata=root
    )
    reason, _, _ = await expect(
        kn.stub.DeleteKnowledgeItem(
            svc.DeleteKnowledgeItemRequest(name=reviewed.name), metadata=root
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "ITEM_WAS_REVIEWED"
