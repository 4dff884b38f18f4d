"""The lifecycle of knowledge items through the gRPC API on real PostgreSQL: the transition
matrix of DOMAIN.md, required sections, immutability, supersede, revisions, etags and
idempotency."""

from __future__ import annotations

import itertools

import grpc
import pytest
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_knowledge.lifecycle import TRANSITIONS
from governance_testkit import expect
from knowledge_testkit import ADR, KnowledgeEnv, draft, who

S = res.KnowledgeStatus
DRAFT, PROPOSED, ACCEPTED = (
    S.KNOWLEDGE_STATUS_DRAFT,
    S.KNOWLEDGE_STATUS_PROPOSED,
    S.KNOWLEDGE_STATUS_ACCEPTED,
)
DEPRECATED, SUPERSEDED, REJECTED = (
    S.KNOWLEDGE_STATUS_DEPRECATED,
    S.KNOWLEDGE_STATUS_SUPERSEDED,
    S.KNOWLEDGE_STATUS_REJECTED,
)

PATH_TO: dict[int, tuple[str, ...]] = {
    DRAFT: (),
    PROPOSED: ("Propose",),
    ACCEPTED: ("Propose", "Accept"),
    DEPRECATED: ("Propose", "Accept", "Deprecate"),
    REJECTED: ("Reject",),
    SUPERSEDED: ("Propose", "Accept", "Supersede"),
}
"""The calls that bring a new draft to each status."""

VERB_TARGET = {
    "Propose": PROPOSED,
    "Accept": ACCEPTED,
    "Reject": REJECTED,
    "Deprecate": DEPRECATED,
    "Supersede": SUPERSEDED,
}

ALLOWED = {
    (DRAFT, PROPOSED),
    (DRAFT, REJECTED),
    (PROPOSED, ACCEPTED),
    (PROPOSED, REJECTED),
    (ACCEPTED, DEPRECATED),
    (ACCEPTED, SUPERSEDED),
}
"""DOMAIN.md's allowed transitions, written out independently of the service's table."""


def test_transition_table_is_domain_md() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED


async def call(
    kn: KnowledgeEnv, tenant: str, verb: str, item: res.KnowledgeItem, n: int = 0
) -> res.KnowledgeItem:
    """Apply one transition as the team's tech lead (who may write and review)."""
    meta = who(tenant, "lead")
    if verb == "Supersede":
        reply = await kn.stub.SupersedeKnowledgeItem(
            svc.SupersedeKnowledgeItemRequest(
                name=item.name,
                successor=res.KnowledgeItem(
                    path=f"{item.path}-v{n + 2}", title="Use Luxon for all dates", content=ADR
                ),
            ),
            metadata=meta,
        )
        return reply.superseded
    method = getattr(kn.stub, f"{verb}KnowledgeItem")
    request = getattr(svc, f"{verb}KnowledgeItemRequest")(name=item.name)
    result: res.KnowledgeItem = await method(request, metadata=meta)
    return result


CASES = [(start, verb) for start, verb in itertools.product(PATH_TO, VERB_TARGET)]


@pytest.mark.parametrize(("start", "verb"), CASES)
async def test_transition_matrix(kn: KnowledgeEnv, start: int, verb: str) -> None:
    tenant = kn.tenant()
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=who(tenant, "lead"))
    for step, earlier in enumerate(PATH_TO[start]):
        item = await call(kn, tenant, earlier, item, step)
    assert item.status == start
    target = VERB_TARGET[verb]
    if (start, target) in ALLOWED:
        moved = await call(kn, tenant, verb, item)
        assert moved.status == target
        assert moved.version == item.version + 1
    else:
        reason, _, meta = await expect(
            call(kn, tenant, verb, item), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert reason == "INVALID_TRANSITION"
        allowed = {S.Name(s).removeprefix("KNOWLEDGE_STATUS_") for a, s in ALLOWED if a == start}  # type: ignore[arg-type]
        assert set(filter(None, meta["allowed"].split(","))) == allowed
        again = await kn.stub.GetKnowledgeItem(
            svc.GetKnowledgeItemRequest(name=item.name), metadata=who(tenant, "lead")
        )
        assert (again.status, again.version) == (item.status, item.version)


async def test_required_sections_on_propose_and_accept_not_on_draft(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(
        draft(tenant, content="# Luxon\n\n## Context\nx\n\n```\n## Decision\n```\n"), metadata=lead
    )
    assert item.status == DRAFT
    reason, fields, meta = await expect(
        kn.stub.ProposeKnowledgeItem(
            svc.ProposeKnowledgeItemRequest(name=item.name), metadata=lead
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    # A heading inside a fenced code block is no section.
    assert (reason, fields, meta["missing"]) == (
        "MISSING_SECTIONS",
        ["content"],
        "decision,consequences",
    )
    mask = svc.UpdateKnowledgeItemRequest(
        knowledge_item=res.KnowledgeItem(name=item.name, content=ADR)
    )
    mask.update_mask.paths.append("content")
    await kn.stub.UpdateKnowledgeItem(mask, metadata=lead)
    proposed = await kn.stub.ProposeKnowledgeItem(
        svc.ProposeKnowledgeItemRequest(name=item.name), metadata=lead
    )
    assert proposed.status == PROPOSED


async def test_accepted_adr_is_immutable_and_superseded_both_ways(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=lead)
    for verb in ("Propose", "Accept"):
        item = await call(kn, tenant, verb, item)
    edit = svc.UpdateKnowledgeItemRequest(
        knowledge_item=res.KnowledgeItem(name=item.name, title="Use date-fns")
    )
    edit.update_mask.paths.append("title")
    reason, _, _ = await expect(
        kn.stub.UpdateKnowledgeItem(edit, metadata=lead), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "IMMUTABLE_ITEM"

    reply = await kn.stub.SupersedeKnowledgeItem(
        svc.SupersedeKnowledgeItemRequest(
            name=item.name,
            etag=item.etag,
            # The successor may keep the path: the old item is no longer live.
            successor=res.KnowledgeItem(path=item.path, title="Use Temporal", content=ADR),
            reason="Temporal is standard now",
        ),
        metadata=lead,
    )
    old, new = reply.superseded, reply.successor
    assert (old.status, old.variant_role) == (SUPERSEDED, res.VARIANT_ROLE_SUPERSEDED)
    assert (new.status, new.type, new.layer, new.org_unit, new.path) == (
        ACCEPTED,
        item.type,
        item.layer,
        item.org_unit,
        item.path,
    )
    forward = await kn.stub.ListKnowledgeRelations(
        svc.ListKnowledgeRelationsRequest(parent=new.name), metadata=lead
    )
    back = await kn.stub.ListKnowledgeRelations(
        svc.ListKnowledgeRelationsRequest(parent=old.name), metadata=lead
    )
    assert [(r.kind, r.target) for r in forward.knowledge_relations] == [
        (res.RELATION_KIND_SUPERSEDES, old.name)
    ]
    assert [(r.kind, r.target) for r in back.knowledge_relations] == [
        (res.RELATION_KIND_SUPERSEDED_BY, new.name)
    ]
    # The reverse SUPERSEDES would close a cycle.
    reason, _, _ = await expect(
        kn.stub.CreateKnowledgeRelation(
            svc.CreateKnowledgeRelationRequest(
                parent=old.name,
                knowledge_relation=res.KnowledgeRelation(
                    kind=res.RELATION_KIND_SUPERSEDES, target=new.name
                ),
            ),
            metadata=lead,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "SUPERSEDES_CYCLE"


async def test_supersede_refused_leaves_nothing_behind(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=lead)
    item = await call(kn, tenant, "Propose", item)
    # PROPOSED cannot be superseded: neither the successor nor a relation is written.
    await expect(call(kn, tenant, "Supersede", item), grpc.StatusCode.FAILED_PRECONDITION)
    listed = await kn.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}"), metadata=lead
    )
    assert [i.name for i in listed.knowledge_items] == [item.name]
    relations = await kn.stub.ListKnowledgeRelations(
        svc.ListKnowledgeRelationsRequest(parent=item.name), metadata=lead
    )
    assert list(relations.knowledge_relations) == []


async def test_every_change_appends_a_revision(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(
        draft(tenant, type_=res.KNOWLEDGE_TYPE_PATTERN, content="## Problem\np\n"),
        metadata=lead,
    )
    edit = svc.UpdateKnowledgeItemRequest(
        knowledge_item=res.KnowledgeItem(name=item.name, content="## Problem\np\n## Solution\ns\n"),
        reason="add the solution",
    )
    edit.update_mask.paths.append("content")
    edited = await kn.stub.UpdateKnowledgeItem(edit, metadata=lead)
    proposed = await call(kn, tenant, "Propose", edited)
    accepted = await call(kn, tenant, "Accept", proposed)
    # An accepted PATTERN (unlike an ADR or SPEC) may still be edited.
    edit.knowledge_item.content += "\nMore.\n"
    edit.reason = ""
    after = await kn.stub.UpdateKnowledgeItem(edit, metadata=lead)
    assert after.version == accepted.version + 1 == 5
    revisions = await kn.stub.ListKnowledgeRevisions(
        svc.ListKnowledgeRevisionsRequest(parent=item.name, page_size=2), metadata=lead
    )
    page2 = await kn.stub.ListKnowledgeRevisions(
        svc.ListKnowledgeRevisionsRequest(
            parent=item.name, page_size=10, page_token=revisions.next_page_token
        ),
        metadata=lead,
    )
    history = [*revisions.revisions, *page2.revisions]
    assert [(r.version, r.reason, r.status) for r in history] == [
        (5, "updated", ACCEPTED),
        (4, "accepted", ACCEPTED),
        (3, "proposed", PROPOSED),
        (2, "add the solution", DRAFT),
        (1, "created", DRAFT),
    ]
    assert history[0].content == after.content
    assert history[0].content_hash == after.content_hash != history[1].content_hash
    assert {r.author for r in history} == {"users/lead"}
    assert page2.next_page_token == ""


async def test_stale_etag_is_aborted(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=lead)
    edit = svc.UpdateKnowledgeItemRequest(
        knowledge_item=res.KnowledgeItem(name=item.name, title="First", etag=item.etag)
    )
    edit.update_mask.paths.append("title")
    first = await kn.stub.UpdateKnowledgeItem(edit, metadata=lead)
    assert first.etag != item.etag
    edit.knowledge_item.title = "Second"
    reason, _, _ = await expect(
        kn.stub.UpdateKnowledgeItem(edit, metadata=lead), grpc.StatusCode.ABORTED
    )
    assert reason == "ETAG_MISMATCH"
    await expect(
        kn.stub.ProposeKnowledgeItem(
            svc.ProposeKnowledgeItemRequest(name=item.name, etag=item.etag), metadata=lead
        ),
        grpc.StatusCode.ABORTED,
    )
    got = await kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=item.name), metadata=lead)
    assert (got.title, got.version) == ("First", 2)


async def test_retried_write_applies_once(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    request = draft(tenant)
    request.request_id = "create-1"
    first = await kn.stub.CreateKnowledgeItem(request, metadata=lead)
    second = await kn.stub.CreateKnowledgeItem(request, metadata=lead)
    assert first == second
    propose = svc.ProposeKnowledgeItemRequest(name=first.name, request_id="propose-1")
    a = await kn.stub.ProposeKnowledgeItem(propose, metadata=lead)
    b = await kn.stub.ProposeKnowledgeItem(propose, metadata=lead)
    assert a == b and a.version == 2
    history = await kn.stub.ListKnowledgeRevisions(
        svc.ListKnowledgeRevisionsRequest(parent=first.name), metadata=lead
    )
    assert [r.version for r in history.revisions] == [2, 1]


async def test_changes_append_outbox_events_without_content(kn: KnowledgeEnv) -> None:
    import asyncpg

    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=lead)
    await call(kn, tenant, "Propose", item)
    # The indexer role reads the outbox of every tenant (the relay's view).
    conn = await asyncpg.connect(kn.urls.indexer)
    try:
        rows = await conn.fetch(
            "SELECT event_type, resource, actor, payload::text AS payload FROM outbox "
            "WHERE tenant_id = $1 ORDER BY position",
            tenant,
        )
    finally:
        await conn.close()
    assert [(r["event_type"], r["resource"], r["actor"]) for r in rows] == [
        ("knowledge.created", item.name, "users/lead"),
        ("knowledge.status_changed", item.name, "users/lead"),
    ]
    assert all("Luxon" not in r["payload"] for r in rows)
