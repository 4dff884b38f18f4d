"""Who may read, write and review which items, refusals before existence, cross-tenant
names and bad input, through the gRPC API on real PostgreSQL."""

from __future__ import annotations

import uuid

import grpc
import pytest
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import resources_pb2 as res
from governance_testkit import expect, new_tenant
from knowledge_testkit import KnowledgeEnv, draft, who

TEAM, ORG, PROJECT = res.KNOWLEDGE_LAYER_TEAM, res.KNOWLEDGE_LAYER_ORG, res.KNOWLEDGE_LAYER_PROJECT


@pytest.mark.parametrize(
    ("user", "layer", "unit", "allowed"),
    [
        ("dev", PROJECT, "checkout", True),
        ("dev", TEAM, "payments", False),
        ("lead", TEAM, "payments", True),
        ("lead", PROJECT, "checkout", True),
        ("lead", ORG, "eng", False),
        ("arch", ORG, "eng", True),
        ("arch", TEAM, "payments", True),
        ("viewer", TEAM, "payments", False),
        ("other", TEAM, "payments", False),
        ("root", res.KNOWLEDGE_LAYER_COMPANY, "acme", True),
    ],
)
async def test_who_writes_which_layer(
    kn: KnowledgeEnv, user: str, layer: int, unit: str, allowed: bool
) -> None:
    tenant = kn.tenant()
    call = kn.stub.CreateKnowledgeItem(
        draft(tenant, layer=layer, unit=unit), metadata=who(tenant, user)
    )
    if allowed:
        assert (await call).org_unit == f"tenants/{tenant}/orgUnits/{unit}"
    else:
        reason, _, _ = await expect(call, grpc.StatusCode.PERMISSION_DENIED)
        assert reason == "ACTION_NOT_ALLOWED"


async def test_readers_and_reviewers(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    dev, lead, viewer, other = (who(tenant, u) for u in ("dev", "lead", "viewer", "other"))
    item = await kn.stub.CreateKnowledgeItem(
        draft(tenant, layer=PROJECT, unit="checkout"), metadata=dev
    )
    item = await kn.stub.ProposeKnowledgeItem(
        svc.ProposeKnowledgeItemRequest(name=item.name), metadata=dev
    )
    # A team viewer reads the project's item below it; another team's lead does not.
    assert (
        await kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=item.name), metadata=viewer)
    ).name == item.name
    await expect(
        kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=item.name), metadata=other),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    listed = await kn.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}"), metadata=other
    )
    assert list(listed.knowledge_items) == []
    # The developer who wrote it may not accept it; the team's tech lead may.
    await expect(
        kn.stub.AcceptKnowledgeItem(svc.AcceptKnowledgeItemRequest(name=item.name), metadata=dev),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    accepted = await kn.stub.AcceptKnowledgeItem(
        svc.AcceptKnowledgeItemRequest(name=item.name), metadata=lead
    )
    assert accepted.status == res.KNOWLEDGE_STATUS_ACCEPTED
    # Superseding puts an ACCEPTED successor in force: a review, not a developer's write.
    supersede = svc.SupersedeKnowledgeItemRequest(
        name=item.name,
        successor=res.KnowledgeItem(path=item.path, title="Use Temporal", content=item.content),
    )
    await expect(
        kn.stub.SupersedeKnowledgeItem(supersede, metadata=dev), grpc.StatusCode.PERMISSION_DENIED
    )
    reply = await kn.stub.SupersedeKnowledgeItem(supersede, metadata=lead)
    assert reply.successor.status == res.KNOWLEDGE_STATUS_ACCEPTED


async def test_org_items_are_reviewed_by_architects_not_tech_leads(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    arch, lead = who(tenant, "arch"), who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant, layer=ORG, unit="eng"), metadata=arch)
    await kn.stub.ProposeKnowledgeItem(
        svc.ProposeKnowledgeItemRequest(name=item.name), metadata=arch
    )
    await expect(
        kn.stub.AcceptKnowledgeItem(svc.AcceptKnowledgeItemRequest(name=item.name), metadata=lead),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    accepted = await kn.stub.AcceptKnowledgeItem(
        svc.AcceptKnowledgeItemRequest(name=item.name), metadata=arch
    )
    assert accepted.status == res.KNOWLEDGE_STATUS_ACCEPTED


async def test_permission_before_existence(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    lead = who(tenant, "lead")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=lead)
    missing = f"tenants/{tenant}/knowledgeItems/{uuid.uuid4()}"
    other = who(tenant, "other")
    # Without rights on the item, existing and missing names get the same answer.
    for name in (item.name, missing):
        reason, _, _ = await expect(
            kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=name), metadata=other),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert reason == "ACTION_NOT_ALLOWED"
    # A tenant admin learns that it does not exist.
    await expect(
        kn.stub.GetKnowledgeItem(
            svc.GetKnowledgeItemRequest(name=missing), metadata=who(tenant, "root")
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_cross_tenant_names_are_refused(kn: KnowledgeEnv) -> None:
    tenant, elsewhere = kn.tenant(), kn.tenant()
    item = await kn.stub.CreateKnowledgeItem(draft(elsewhere), metadata=who(elsewhere, "lead"))
    root = who(tenant, "root")
    reason, _, _ = await expect(
        kn.stub.GetKnowledgeItem(svc.GetKnowledgeItemRequest(name=item.name), metadata=root),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason == "TENANT_MISMATCH"
    request = draft(tenant)
    request.knowledge_item.org_unit = f"tenants/{elsewhere}/orgUnits/payments"
    _, fields, _ = await expect(
        kn.stub.CreateKnowledgeItem(request, metadata=root), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert fields == ["knowledge_item.org_unit"]
    mine = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=root)
    _, fields, _ = await expect(
        kn.stub.CreateKnowledgeRelation(
            svc.CreateKnowledgeRelationRequest(
                parent=mine.name,
                knowledge_relation=res.KnowledgeRelation(
                    kind=res.RELATION_KIND_CLARIFIES, target=item.name
                ),
            ),
            metadata=root,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Someone of no tenant in the tree at all.
    stranger = who(new_tenant(), "root")
    await expect(
        kn.stub.ListKnowledgeItems(
            svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}"), metadata=stranger
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"type_": 0}, "knowledge_item.type", "INVALID_TYPE"),
        ({"type_": 9}, "knowledge_item.type", "INVALID_TYPE"),
        ({"layer": 7}, "knowledge_item.layer", "INVALID_LAYER"),
        ({"path": "ADR/Upper"}, "knowledge_item.path", "INVALID_PATH"),
        ({"path": "adr/../x"}, "knowledge_item.path", "INVALID_PATH"),
        ({"content": "x" * (256 * 1024 + 1)}, "knowledge_item.content", "CONTENT_TOO_LARGE"),
        ({"title": ""}, "knowledge_item.title", ""),
        ({"tags": ["Bad Tag"]}, "knowledge_item.tags", ""),
    ],
)
async def test_bad_input_is_invalid_argument(
    kn: KnowledgeEnv, change: dict[str, object], field: str, reason: str
) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    _, fields, _ = await expect(
        kn.stub.CreateKnowledgeItem(draft(tenant, **change), metadata=root),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields[0] == field
    listed = await kn.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}"), metadata=root
    )
    assert list(listed.knowledge_items) == []


async def test_layer_and_unit_must_agree_and_exist(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    _, fields, _ = await expect(
        kn.stub.CreateKnowledgeItem(draft(tenant, layer=ORG, unit="payments"), metadata=root),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["knowledge_item.org_unit"]
    reason, _, _ = await expect(
        kn.stub.CreateKnowledgeItem(draft(tenant, unit="nowhere"), metadata=root),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "ORG_UNIT_NOT_FOUND"


async def test_live_path_is_unique_per_layer_and_unit(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=root)
    reason, _, _ = await expect(
        kn.stub.CreateKnowledgeItem(draft(tenant), metadata=root), grpc.StatusCode.ALREADY_EXISTS
    )
    assert reason == "PATH_TAKEN"
    # The same path at the organisation is another item.
    org = await kn.stub.CreateKnowledgeItem(draft(tenant, layer=ORG, unit="eng"), metadata=root)
    listed = await kn.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{tenant}", path=org.path), metadata=root
    )
    assert [i.layer for i in listed.knowledge_items] == [TEAM, ORG]


async def test_self_relations_are_refused(kn: KnowledgeEnv) -> None:
    tenant = kn.tenant()
    root = who(tenant, "root")
    item = await kn.stub.CreateKnowledgeItem(draft(tenant), metadata=root)
    reason, _, _ = await expect(
        kn.stub.CreateKnowledgeRelation(
            svc.CreateKnowledgeRelationRequest(
                parent=item.name,
                knowledge_relation=res.KnowledgeRelation(
                    kind=res.RELATION_KIND_CLARIFIES, target=item.name
                ),
            ),
            metadata=root,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert reason == "SELF_RELATION"
