"""SearchKnowledge through the gRPC API on real PostgreSQL, with the real model and each
server's embedded index: precedence among near-equals, relevance first, superseded items,
filters, the best section of a long document, authorization before scoring, read-your-writes
and two replicas answering alike."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import grpc
import pytest
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, encode_token
from governance_testkit import expect, new_tenant
from knowledge_testkit import ADR, KnowledgeEnv, draft, start_knowledge, who

TEAM, ORG, COMPANY = res.KNOWLEDGE_LAYER_TEAM, res.KNOWLEDGE_LAYER_ORG, res.KNOWLEDGE_LAYER_COMPANY
UNIT_OF = {TEAM: "payments", ORG: "eng", COMPANY: "acme", res.KNOWLEDGE_LAYER_PROJECT: "checkout"}

QUEUE_ADR = """# Use Kafka for the event bus

## Context
Services exchange events and need replay of a topic for a week.

## Decision
We use Kafka as the event bus, with one topic per bounded context.

## Consequences
Operations runs a Kafka cluster; consumers track their own offsets.
"""

LONG_ADR = """# Platform conventions

Conventions of the platform group, one section per subject.

## Context
Teams asked for one place that records the platform's conventions.

## Decision
Each subject below is decided separately.

### Logging
Services write structured JSON logs to standard output; the collector ships them.

### Feature flags
Feature flags live in Unleash; a flag older than ninety days is removed.

### Database migrations
Schema migrations are numbered SQL files applied by a Helm hook before the rollout.

### Container images
Images are built from distroless bases and scanned with Trivy before they are pushed.

## Consequences
New services copy these conventions from the template repository.
"""


async def add(
    kn: KnowledgeEnv,
    tenant: str,
    path: str,
    *,
    layer: int = TEAM,
    content: str = ADR,
    title: str = "Use Luxon for dates",
    accept: bool = False,
    **fields: object,
) -> tuple[res.KnowledgeItem, str]:
    """Create an item as the tenant admin (and accept it); the item and the consistency
    token of the last write."""
    root = who(tenant, "root")
    call = kn.stub.CreateKnowledgeItem(
        draft(
            tenant,
            path,
            unit=UNIT_OF[layer],
            layer=layer,
            content=content,
            title=title,
            **fields,
        ),
        metadata=root,
    )
    item = await call
    token = _token(await call.initial_metadata())
    if accept:
        for rpc, request in (
            ("ProposeKnowledgeItem", svc.ProposeKnowledgeItemRequest),
            ("AcceptKnowledgeItem", svc.AcceptKnowledgeItemRequest),
        ):
            call = getattr(kn.stub, rpc)(request(name=item.name), metadata=root)
            item = await call
            token = _token(await call.initial_metadata())
    return item, token


def _token(metadata: object) -> str:
    return next(str(v) for k, v in metadata or () if k == CONSISTENCY_TOKEN_KEY)  # type: ignore[attr-defined]


async def search(
    stub: object,
    tenant: str,
    query: str,
    token: str,
    user: str = "root",
    **fields: object,
) -> list[svc.KnowledgeSearchResult]:
    """Search as ``user`` with the consistency token of the last write."""
    request = svc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", query=query, **fields)  # type: ignore[arg-type]
    metadata = (*who(tenant, user), (CONSISTENCY_TOKEN_KEY, token))
    response = await stub.SearchKnowledge(request, metadata=metadata)  # type: ignore[attr-defined]
    return list(response.results)


def paths(results: Sequence[svc.KnowledgeSearchResult]) -> list[str]:
    return [r.knowledge_item.path for r in results]


async def test_precedence_orders_near_equals(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    # The same decision at three layers, and a clarification beside the team's canonical one.
    await add(kn, tenant, "adr/team", layer=TEAM)
    await add(kn, tenant, "adr/company", layer=COMPANY)
    await add(
        kn, tenant, "adr/team-clarified", layer=TEAM, variant_role=res.VARIANT_ROLE_CLARIFICATION
    )
    _, token = await add(kn, tenant, "adr/org", layer=ORG)
    found = await search(kn.stub, tenant, "which library parses dates", token)
    assert paths(found) == ["adr/company", "adr/org", "adr/team", "adr/team-clarified"]
    assert len({round(r.score, 6) for r in found}) == 1


async def test_relevance_beats_precedence(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    await add(kn, tenant, "adr/kafka", layer=COMPANY, content=QUEUE_ADR, title="Kafka events")
    _, token = await add(kn, tenant, "adr/luxon", layer=TEAM)
    found = await search(kn.stub, tenant, "Luxon date parsing library", token)
    assert paths(found)[0] == "adr/luxon"
    assert found[0].score - found[1].score > 0.02
    found = await search(kn.stub, tenant, "event bus topic replay", token)
    assert paths(found)[0] == "adr/kafka"


async def test_superseded_excluded_unless_asked(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    old, _ = await add(kn, tenant, "adr/0010-luxon-dates", accept=True)
    call = kn.stub.SupersedeKnowledgeItem(
        svc.SupersedeKnowledgeItemRequest(
            name=old.name,
            successor=res.KnowledgeItem(
                path="adr/0011-temporal-dates",
                title="Use Temporal for dates",
                content=ADR.replace("Luxon", "Temporal"),
            ),
        ),
        metadata=who(tenant, "root"),
    )
    moved = await call
    token = _token(await call.initial_metadata())
    found = await search(kn.stub, tenant, "dates library Luxon Temporal", token)
    assert [r.knowledge_item.name for r in found] == [moved.successor.name]
    everything = await search(
        kn.stub,
        tenant,
        "dates library Luxon Temporal",
        token,
        statuses=[res.KNOWLEDGE_STATUS_ACCEPTED, res.KNOWLEDGE_STATUS_SUPERSEDED],
    )
    assert {r.knowledge_item.name for r in everything} == {old.name, moved.successor.name}
    assert {r.knowledge_item.status for r in everything} == {
        res.KNOWLEDGE_STATUS_ACCEPTED,
        res.KNOWLEDGE_STATUS_SUPERSEDED,
    }


async def test_filters(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    await add(kn, tenant, "adr/draft", tags=["frontend"])
    await add(kn, tenant, "adr/accepted", accept=True, tags=["frontend", "dates"])
    await add(
        kn,
        tenant,
        "policy/dates",
        type_=res.KNOWLEDGE_TYPE_POLICY,
        content="# Dates\n\n## Scope\nAll services.\n\n## Rules\nParse dates with Luxon.\n",
        tags=["dates"],
    )
    _, token = await add(kn, tenant, "adr/org", layer=ORG)
    query = "Luxon dates"
    assert sorted(paths(await search(kn.stub, tenant, query, token))) == [
        "adr/accepted",
        "adr/draft",
        "adr/org",
        "policy/dates",
    ]
    by_type = await search(kn.stub, tenant, query, token, types=[res.KNOWLEDGE_TYPE_POLICY])
    assert paths(by_type) == ["policy/dates"]
    by_layer = await search(kn.stub, tenant, query, token, layers=[ORG])
    assert paths(by_layer) == ["adr/org"]
    by_status = await search(
        kn.stub, tenant, query, token, statuses=[res.KNOWLEDGE_STATUS_ACCEPTED]
    )
    assert paths(by_status) == ["adr/accepted"]
    by_tags = await search(kn.stub, tenant, query, token, tags=["dates", "frontend"])
    assert paths(by_tags) == ["adr/accepted"]
    limited = await search(kn.stub, tenant, query, token, page_size=2)
    assert len(limited) == 2


async def test_long_document_answers_with_its_best_section(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    await add(kn, tenant, "adr/luxon")
    _, token = await add(kn, tenant, "adr/platform", content=LONG_ADR, title="Platform conventions")
    found = await search(kn.stub, tenant, "how old may a feature flag get", token)
    assert paths(found)[0] == "adr/platform"
    assert found[0].section == "Feature flags"
    assert "Unleash" in found[0].snippet
    found = await search(kn.stub, tenant, "container image vulnerability scanning", token)
    assert (paths(found)[0], found[0].section) == ("adr/platform", "Container images")


async def test_only_readable_items_are_searched(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    await add(kn, tenant, "adr/payments", layer=TEAM)
    await add(kn, tenant, "adr/org", layer=ORG, accept=True)
    root = who(tenant, "root")
    call = kn.stub.CreateKnowledgeItem(
        draft(tenant, "adr/search-team", unit="search"), metadata=root
    )
    await call
    token = _token(await call.initial_metadata())
    query = "Luxon dates"
    # Decisions apply downward: a team's members read their organisation's ACCEPTED item
    # (List and Search alike), never a sibling team's items.
    assert sorted(paths(await search(kn.stub, tenant, query, token, user="lead"))) == [
        "adr/org",
        "adr/payments",
    ]
    listed = await kn.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}"),
        metadata=(*who(tenant, "lead"), (CONSISTENCY_TOKEN_KEY, token)),
    )
    assert sorted(i.path for i in listed.knowledge_items) == ["adr/org", "adr/payments"]
    assert sorted(paths(await search(kn.stub, tenant, query, token, user="other"))) == [
        "adr/org",
        "adr/search-team",
    ]
    assert sorted(paths(await search(kn.stub, tenant, query, token, user="viewer"))) == [
        "adr/org",
        "adr/payments",
    ]
    # An architect of the organisation reads both teams' and the organisation's items.
    assert sorted(paths(await search(kn.stub, tenant, query, token, user="arch"))) == [
        "adr/org",
        "adr/payments",
        "adr/search-team",
    ]
    # A user bound nowhere reads nothing; another tenant's caller is refused before lookup.
    assert await search(kn.stub, tenant, query, token, user="nobody") == []
    stranger = new_tenant()
    reason, _, _ = await expect(
        kn.stub.SearchKnowledge(
            svc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", query=query),
            metadata=who(stranger, "root"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"query": "  "}, "query"),
        ({"query": "x" * 2001}, "query"),
        ({"query": "dates", "page_size": -1}, "page_size"),
        ({"query": "dates", "types": [0]}, "types"),
        ({"query": "dates", "layers": [9]}, "layers"),
        ({"query": "dates", "tags": ["Not A Tag"]}, "tags"),
    ],
)
async def test_bad_search_input(kn: KnowledgeEnv, fields: dict[str, object], field: str) -> None:
    tenant = kn.tenant()
    _, violations, _ = await expect(
        kn.stub.SearchKnowledge(
            svc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", **fields),  # type: ignore[arg-type]
            metadata=who(tenant, "root"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in violations


async def test_token_beyond_the_index_is_unavailable(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    far = encode_token(kn.app.deps.search.follower.applied + 10**9)  # type: ignore[union-attr]
    reason, _, _ = await expect(
        kn.stub.SearchKnowledge(
            svc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", query="dates"),
            metadata=(*who(tenant, "root"), (CONSISTENCY_TOKEN_KEY, far)),
        ),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert reason == "CONSISTENCY_TOKEN_NOT_REACHED"


async def test_two_replicas_answer_alike(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    await add(kn, tenant, "adr/luxon")
    await add(kn, tenant, "adr/platform", content=LONG_ADR, title="Platform conventions")
    _, token = await add(kn, tenant, "adr/kafka", layer=ORG, content=QUEUE_ADR, title="Kafka")
    # A second replica on the same database builds its own index from PostgreSQL (the
    # stored vectors), then follows the outbox.
    server, _ = await start_knowledge(kn.urls, kn.directory)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc

        other = svc_grpc.KnowledgeServiceStub(channel)
        for query in ("dates library", "feature flags", "event bus"):
            here = await search(kn.stub, tenant, query, token)
            there = await search(other, tenant, query, token)
            assert [(r.knowledge_item.name, r.section) for r in here] == [
                (r.knowledge_item.name, r.section) for r in there
            ]
            assert [r.score for r in here] == pytest.approx([r.score for r in there], abs=1e-4)
        # A write through one replica is read through the other with its token.
        _, token = await add(
            kn, tenant, "adr/grpc", content=ADR.replace("Luxon", "gRPC"), title="Use gRPC"
        )
        assert "adr/grpc" in paths(await search(other, tenant, "gRPC", token))
    finally:
        await channel.close()
        await server.stop()


async def test_chunks_are_stored_per_tenant_under_rls(kn: KnowledgeEnv) -> None:
    a, b = kn.tenant(), kn.tenant()
    mine, token_a = await add(kn, a, "adr/luxon")
    _, token_b = await add(kn, b, "adr/luxon")
    # Searching with each write's token means its chunks were embedded and stored.
    assert paths(await search(kn.stub, a, "dates", token_a)) == ["adr/luxon"]
    assert paths(await search(kn.stub, b, "dates", token_b)) == ["adr/luxon"]
    conn = await asyncpg.connect(kn.urls.app)
    try:
        async with conn.transaction():
            await conn.execute("SELECT aeterna_bind_tenant($1)", a)
            rows = await conn.fetch(
                "SELECT tenant_id, item_id, heading, array_length(embedding, 1) AS dim "
                "FROM knowledge_chunks ORDER BY ordinal"
            )
            assert {(r["tenant_id"], str(r["item_id"])) for r in rows} == {
                (a, mine.name.rsplit("/", 1)[1])
            }
            # Chunk 0 (title only: the ADR opens with its heading), then one per section.
            assert [r["heading"] for r in rows] == ["", "Context", "Decision", "Consequences"]
            assert {r["dim"] for r in rows} == {384}
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO knowledge_chunks (tenant_id, item_id, source_hash, "
                    "embedding_model, ordinal, point_id, heading, body, embedding) "
                    "VALUES ($1, gen_random_uuid(), 'h', 'm', 0, gen_random_uuid(), '', '', "
                    "'{0}')",
                    b,
                )
        assert await conn.fetchval("SELECT count(*) FROM knowledge_chunks") == 0
    finally:
        await conn.close()
