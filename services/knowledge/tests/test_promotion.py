"""Promotion of knowledge items through governance's approvals, over real servers: a
governance server and a knowledge server (each on its own PostgreSQL database) whose
promotions ask governance with knowledge's own service token, and whose reviewers decide
with their own tokens.

Covers FULL and PARTIAL apply (relations both ways, the residual's role, ``query_enriched``),
idempotent approve and apply, a stale source (ABORTED), an unauthorised reviewer and the
requester reviewing their own request, credentials refused, downward and sideways refused,
retarget, reject, and the outbox event ``knowledge.promoted``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz import Snapshot, StaticDirectory
from aeterna_devstack.pytest_plugin import session_auth
from aeterna_knowledge.promotion import find_credentials
from aeterna_knowledge.promotion_governance import GovernanceApprovals
from governance_testkit import admin, expect, start_governance
from knowledge_testkit import ADR, BINDINGS, UNITS, draft, start_knowledge, who

FULL, PARTIAL = res.PROMOTION_MODE_FULL, res.PROMOTION_MODE_PARTIAL
TEAM, ORG, PROJECT, COMPANY = (
    res.KNOWLEDGE_LAYER_TEAM,
    res.KNOWLEDGE_LAYER_ORG,
    res.KNOWLEDGE_LAYER_PROJECT,
    res.KNOWLEDGE_LAYER_COMPANY,
)
KIND = {
    "COMPANY": gres.ORG_UNIT_KIND_COMPANY,
    "ORGANIZATION": gres.ORG_UNIT_KIND_ORGANIZATION,
    "TEAM": gres.ORG_UNIT_KIND_TEAM,
    "PROJECT": gres.ORG_UNIT_KIND_PROJECT,
}


@dataclass
class Env:
    stub: svc_grpc.KnowledgeServiceStub
    orgs: osvc_grpc.OrganizationServiceStub
    approvals: asvc_grpc.ApprovalServiceStub
    directory: StaticDirectory
    knowledge_db: str


@pytest_asyncio.fixture(scope="module")
async def env(make_database: Any) -> AsyncIterator[Env]:
    gov_urls, kn_urls = await make_database(), await make_database()
    gov_server, _ = await start_governance(gov_urls)
    gov_target = f"127.0.0.1:{gov_server.port}"
    credentials = ServiceCredentials(session_auth().write_service_token("knowledge"))
    approvals = GovernanceApprovals(gov_target, credentials)
    directory = StaticDirectory()
    kn_server, _ = await start_knowledge(kn_urls, directory, approvals=approvals)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{kn_server.port}") as kn,
        grpc.aio.insecure_channel(gov_target) as gov,
    ):
        yield Env(
            svc_grpc.KnowledgeServiceStub(kn),
            osvc_grpc.OrganizationServiceStub(gov),
            asvc_grpc.ApprovalServiceStub(gov),
            directory,
            kn_urls.indexer,
        )
    await kn_server.stop()
    await approvals.close()
    await gov_server.stop()


async def tenant(env: Env) -> str:
    """A tenant with the knowledge testkit's tree and bindings in both services."""
    from governance_testkit import new_tenant

    t = new_tenant()
    env.directory.put(Snapshot(t, 1, UNITS, BINDINGS))
    for u in UNITS:
        await env.orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=f"tenants/{t}",
                org_unit_id=u.id,
                org_unit=gres.OrgUnit(
                    kind=KIND[u.kind.name],
                    display_name=u.id,
                    parent=f"tenants/{t}/orgUnits/{u.parent_id}" if u.parent_id else "",
                ),
            ),
            metadata=admin(t),
        )
    for b in BINDINGS:
        await env.orgs.CreateRoleBinding(
            osvc.CreateRoleBindingRequest(
                parent=f"tenants/{t}",
                role_binding=gres.RoleBinding(
                    subject=b.subject,
                    role=gres.Role.Value(f"ROLE_{b.role}"),
                    org_unit=f"tenants/{t}/orgUnits/{b.unit_id}",
                ),
            ),
            metadata=admin(t),
        )
    return t


async def accepted(
    env: Env, t: str, path: str = "adr/0010-luxon-dates", content: str = ADR, **kw: Any
) -> res.KnowledgeItem:
    """A team ADR (by default), proposed and accepted by the team's TECH_LEAD."""
    item = await env.stub.CreateKnowledgeItem(
        draft(t, path, content=content, **kw), metadata=who(t, "lead")
    )
    await env.stub.ProposeKnowledgeItem(
        svc.ProposeKnowledgeItemRequest(name=item.name), metadata=who(t, "lead")
    )
    return await env.stub.AcceptKnowledgeItem(
        svc.AcceptKnowledgeItemRequest(name=item.name), metadata=who(t, "lead")
    )


def ask(
    env: Env,
    t: str,
    source: str,
    layer: int = ORG,
    unit: str = "eng",
    mode: int = FULL,
    user: str = "lead",
    request_id: str = "",
    **kw: Any,
) -> Any:
    return env.stub.CreatePromotionRequest(
        svc.CreatePromotionRequestRequest(
            parent=f"tenants/{t}",
            promotion_request=res.PromotionRequest(
                source=source,
                target_layer=layer,
                target_org_unit=f"tenants/{t}/orgUnits/{unit}",
                mode=mode,
                **kw,
            ),
            request_id=request_id,
        ),
        metadata=who(t, user),
    )


def approve(env: Env, t: str, name: str, user: str = "arch") -> Any:
    return env.stub.ApprovePromotionRequest(
        svc.ApprovePromotionRequestRequest(name=name), metadata=who(t, user)
    )


def apply(env: Env, t: str, name: str, user: str = "lead", request_id: str = "") -> Any:
    return env.stub.ApplyPromotionRequest(
        svc.ApplyPromotionRequestRequest(name=name, request_id=request_id), metadata=who(t, user)
    )


async def relations(env: Env, t: str, name: str) -> set[tuple[int, str]]:
    got = await env.stub.ListKnowledgeRelations(
        svc.ListKnowledgeRelationsRequest(parent=name), metadata=who(t, "root")
    )
    return {(r.kind, r.target) for r in got.knowledge_relations}


async def test_full_promotion_through_a_governance_approval(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t)
    preview = await env.stub.PreviewPromotion(
        svc.PreviewPromotionRequest(
            name=source.name,
            target_layer=ORG,
            target_org_unit=f"tenants/{t}/orgUnits/eng",
            mode=FULL,
        ),
        metadata=who(t, "lead"),
    )
    assert list(preview.blockers) == []
    assert (preview.promoted.layer, preview.promoted.promoted_from) == (ORG, source.name)
    assert preview.source.status == res.KNOWLEDGE_STATUS_SUPERSEDED

    request = await ask(env, t, source.name, request_id="full-1")
    assert request.state == res.PROMOTION_STATE_PENDING_REVIEW
    assert (request.source_version, request.requester) == (source.version, "users/lead")
    # The approval is governance's: a KNOWLEDGE request at the target unit, opened by the
    # service, pending.
    approval = await env.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=request.approval_request), metadata=admin(t)
    )
    assert approval.type == gres.APPROVAL_TYPE_KNOWLEDGE
    assert approval.org_unit == f"tenants/{t}/orgUnits/eng"
    assert (approval.target, approval.requester) == (source.name, "services/knowledge")
    assert approval.state == gres.APPROVAL_STATE_PENDING
    # A retried create (same request id) is the same request; a second one is refused.
    assert await ask(env, t, source.name, request_id="full-1") == request
    reason, _, _ = await expect(ask(env, t, source.name), grpc.StatusCode.ALREADY_EXISTS)
    assert reason == "PROMOTION_PENDING"
    # Not approved yet: apply is refused.
    reason, _, _ = await expect(apply(env, t, request.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert reason == "PROMOTION_NOT_APPROVED"

    approved = await approve(env, t, request.name)
    assert approved.state == res.PROMOTION_STATE_APPROVED
    approval = await env.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=request.approval_request), metadata=admin(t)
    )
    assert approval.state == gres.APPROVAL_STATE_APPROVED
    assert [d.approver for d in approval.decisions] == ["users/arch"]
    # Approve is idempotent.
    assert (await approve(env, t, request.name)).state == res.PROMOTION_STATE_APPROVED

    applied = await apply(env, t, request.name, request_id="apply-1")
    assert applied.state == res.PROMOTION_STATE_APPLIED and applied.promoted_item
    # Apply is idempotent: again, and again with its request id, the same request.
    assert (await apply(env, t, request.name)).promoted_item == applied.promoted_item
    assert (await apply(env, t, request.name, request_id="apply-1")) == applied

    promoted = await env.stub.GetKnowledgeItem(
        svc.GetKnowledgeItemRequest(name=applied.promoted_item), metadata=who(t, "arch")
    )
    assert (promoted.layer, promoted.org_unit) == (ORG, f"tenants/{t}/orgUnits/eng")
    assert (promoted.status, promoted.path) == (res.KNOWLEDGE_STATUS_ACCEPTED, source.path)
    assert (promoted.promoted_from, promoted.content_hash) == (source.name, source.content_hash)
    old = await env.stub.GetKnowledgeItem(
        svc.GetKnowledgeItemRequest(name=source.name), metadata=who(t, "lead")
    )
    assert old.status == res.KNOWLEDGE_STATUS_SUPERSEDED
    assert old.variant_role == res.VARIANT_ROLE_SUPERSEDED
    assert await relations(env, t, promoted.name) == {
        (res.RELATION_KIND_PROMOTED_FROM, source.name),
        (res.RELATION_KIND_SUPERSEDES, source.name),
    }
    assert await relations(env, t, source.name) == {
        (res.RELATION_KIND_PROMOTED_TO, promoted.name),
        (res.RELATION_KIND_SUPERSEDED_BY, promoted.name),
    }
    conn = await asyncpg.connect(env.knowledge_db)
    try:
        events = await conn.fetch(
            "SELECT resource, payload FROM outbox WHERE tenant_id = $1 "
            "AND event_type = 'knowledge.promoted'",
            t,
        )
    finally:
        await conn.close()
    assert [e["resource"] for e in events] == [promoted.name]
    assert '"mode": "FULL"' in events[0]["payload"]


async def test_partial_promotion_keeps_a_residual(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t, "adr/0011-retries")
    request = await ask(env, t, source.name, mode=PARTIAL, residual_role=res.VARIANT_ROLE_EXCEPTION)
    await approve(env, t, request.name)
    applied = await apply(env, t, request.name)
    residual = await env.stub.GetKnowledgeItem(
        svc.GetKnowledgeItemRequest(name=source.name), metadata=who(t, "lead")
    )
    # The source stays in force at its layer, now an exception to the promoted item.
    assert residual.status == res.KNOWLEDGE_STATUS_ACCEPTED
    assert residual.variant_role == res.VARIANT_ROLE_EXCEPTION
    assert residual.version == source.version + 1
    assert await relations(env, t, source.name) == {
        (res.RELATION_KIND_PROMOTED_TO, applied.promoted_item),
        (res.RELATION_KIND_EXCEPTION_TO, applied.promoted_item),
    }
    assert await relations(env, t, applied.promoted_item) == {
        (res.RELATION_KIND_PROMOTED_FROM, source.name),
        (res.RELATION_KIND_EXCEPTION_TO, source.name),
    }
    # query_enriched: the primary item carries its residual (ENRICHED view only).
    listed = await env.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(
            parent=f"tenants/{t}", path=source.path, view=res.KNOWLEDGE_ITEM_VIEW_ENRICHED
        ),
        metadata=who(t, "arch"),
    )
    by_name = {i.name: list(i.residuals) for i in listed.knowledge_items}
    assert by_name == {applied.promoted_item: [source.name], source.name: []}
    basic = await env.stub.GetKnowledgeItem(
        svc.GetKnowledgeItemRequest(name=applied.promoted_item), metadata=who(t, "arch")
    )
    assert list(basic.residuals) == []


async def test_stale_source_is_aborted(env: Env) -> None:
    t = await tenant(env)
    # A POLICY may be edited while ACCEPTED (only ADRs and specs are immutable).
    policy = "# Retention\n\n## Scope\nAll services.\n\n## Rules\nKeep logs 30 days.\n"
    source = await accepted(
        env, t, "policy/retention", content=policy, type_=res.KNOWLEDGE_TYPE_POLICY
    )
    request = await ask(env, t, source.name)
    await approve(env, t, request.name)
    await env.stub.UpdateKnowledgeItem(
        svc.UpdateKnowledgeItemRequest(
            knowledge_item=res.KnowledgeItem(name=source.name, content=policy + "Keep 60.\n"),
            update_mask={"paths": ["content"]},
        ),
        metadata=who(t, "lead"),
    )
    reason, _, meta = await expect(apply(env, t, request.name), grpc.StatusCode.ABORTED)
    assert reason == "SOURCE_CHANGED"
    assert (meta["requested_version"], meta["current_version"]) == ("3", "4")
    # Nothing was written: no item at the organization, the request still APPROVED.
    listed = await env.stub.ListKnowledgeItems(
        svc.ListKnowledgeItemsRequest(parent=f"tenants/{t}", layer=ORG), metadata=who(t, "root")
    )
    assert list(listed.knowledge_items) == []
    got = await env.stub.GetPromotionRequest(
        svc.GetPromotionRequestRequest(name=request.name), metadata=who(t, "lead")
    )
    assert got.state == res.PROMOTION_STATE_APPROVED


async def test_reviewer_authority(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t)
    request = await ask(env, t, source.name)
    # A TECH_LEAD of another team, a viewer, and a TECH_LEAD (reviews teams only) for an
    # organization's target: refused by the permission model before governance is asked.
    for user in ("other", "viewer", "lead"):
        code = grpc.StatusCode.PERMISSION_DENIED
        reason, _, _ = await expect(approve(env, t, request.name, user), code)
        assert reason in ("ACTION_NOT_ALLOWED", "SELF_REVIEW")
    # The requester never reviews their own request, even with the authority to.
    arch_source = await accepted(env, t, "adr/0012-arch")
    own = await ask(env, t, arch_source.name, user="arch")
    reason, _, _ = await expect(
        approve(env, t, own.name, "arch"), grpc.StatusCode.PERMISSION_DENIED
    )
    assert reason == "SELF_REVIEW"
    # Another tenant's name: PERMISSION_DENIED before any lookup.
    other = await tenant(env)
    reason, _, _ = await expect(
        approve(env, other, request.name, "arch"), grpc.StatusCode.PERMISSION_DENIED
    )
    # Governance was asked nothing: still pending there.
    approval = await env.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=request.approval_request), metadata=admin(t)
    )
    assert approval.state == gres.APPROVAL_STATE_PENDING and not approval.decisions
    # A rejection by the organization's ARCHITECT closes it; apply is then refused.
    rejected = await env.stub.RejectPromotionRequest(
        svc.RejectPromotionRequestRequest(name=request.name), metadata=who(t, "arch")
    )
    assert rejected.state == res.PROMOTION_STATE_REJECTED
    reason, _, _ = await expect(apply(env, t, request.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert reason == "PROMOTION_REJECTED"


async def test_decision_made_in_governance_is_picked_up(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t)
    request = await ask(env, t, source.name)
    await env.approvals.ApproveApprovalRequest(
        asvc.ApproveApprovalRequestRequest(name=request.approval_request),
        metadata=who(t, "arch"),
    )
    got = await env.stub.GetPromotionRequest(
        svc.GetPromotionRequestRequest(name=request.name), metadata=who(t, "lead")
    )
    assert got.state == res.PROMOTION_STATE_APPROVED
    assert (await apply(env, t, request.name)).state == res.PROMOTION_STATE_APPLIED


async def test_retarget_opens_a_new_approval(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t)
    request = await ask(env, t, source.name)
    moved = await env.stub.RetargetPromotionRequest(
        svc.RetargetPromotionRequestRequest(
            name=request.name,
            etag=request.etag,
            target_layer=COMPANY,
            target_org_unit=f"tenants/{t}/orgUnits/acme",
        ),
        metadata=who(t, "arch"),
    )
    assert (moved.target_layer, moved.state) == (COMPANY, res.PROMOTION_STATE_PENDING_REVIEW)
    assert moved.approval_request != request.approval_request
    old = await env.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=request.approval_request), metadata=admin(t)
    )
    assert old.state == gres.APPROVAL_STATE_CANCELLED
    # The organization's ARCHITECT no longer reviews it; a tenant admin does.
    await expect(approve(env, t, request.name, "arch"), grpc.StatusCode.PERMISSION_DENIED)
    assert (await approve(env, t, request.name, "root")).state == res.PROMOTION_STATE_APPROVED
    # Retargeting downward is refused.
    other = await accepted(env, t, "adr/0013-queues")
    pending = await ask(env, t, other.name)
    reason, fields, _ = await expect(
        env.stub.RetargetPromotionRequest(
            svc.RetargetPromotionRequestRequest(
                name=pending.name,
                target_layer=TEAM,
                target_org_unit=f"tenants/{t}/orgUnits/search",
            ),
            metadata=who(t, "arch"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("PROMOTION_NOT_UPWARD", ["target_layer"])


async def test_refusals_leave_nothing_behind(env: Env) -> None:
    t = await tenant(env)
    source = await accepted(env, t)
    # Downward and sideways.
    for layer, unit in ((PROJECT, "checkout"), (TEAM, "search")):
        reason, fields, _ = await expect(
            ask(env, t, source.name, layer=layer, unit=unit), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (reason, fields) == ("PROMOTION_NOT_UPWARD", ["promotion_request.target_layer"])
    # A unit of the wrong kind for the layer, and one that does not exist.
    reason, _, _ = await expect(
        ask(env, t, source.name, layer=ORG, unit="acme"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert reason == "LAYER_UNIT_MISMATCH"
    await expect(ask(env, t, source.name, unit="nowhere"), grpc.StatusCode.NOT_FOUND)
    # Not ACCEPTED.
    drafted = await env.stub.CreateKnowledgeItem(
        draft(t, "adr/0020-draft"), metadata=who(t, "lead")
    )
    reason, _, _ = await expect(ask(env, t, drafted.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert reason == "SOURCE_NOT_ACCEPTED"
    # Credentials in the content.
    leaky = ADR.replace("We use Luxon.", "We use Luxon.\n\n    DB_PASSWORD=hunter2-prod-42\n")
    secret = await accepted(env, t, "adr/0021-leaky", content=leaky)
    reason, fields, _ = await expect(ask(env, t, secret.name), grpc.StatusCode.FAILED_PRECONDITION)
    assert (reason, fields) == ("CREDENTIALS_IN_CONTENT", ["content"])
    preview = await env.stub.PreviewPromotion(
        svc.PreviewPromotionRequest(
            name=secret.name,
            target_layer=ORG,
            target_org_unit=f"tenants/{t}/orgUnits/eng",
            mode=FULL,
        ),
        metadata=who(t, "lead"),
    )
    assert any("credentials" in b for b in preview.blockers)
    assert not any("hunter2" in b for b in preview.blockers)
    # Nothing is above COMPANY.
    top = await env.stub.CreateKnowledgeItem(
        draft(t, "adr/0022-top", unit="acme", layer=COMPANY), metadata=who(t, "root")
    )
    for step in ("Propose", "Accept"):
        top = await getattr(env.stub, f"{step}KnowledgeItem")(
            getattr(svc, f"{step}KnowledgeItemRequest")(name=top.name), metadata=who(t, "root")
        )
    reason, _, _ = await expect(
        ask(env, t, top.name, layer=COMPANY, unit="acme", user="root"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert reason == "SOURCE_AT_TOP_LAYER"
    # A developer of the project may not request a team's promotion.
    await expect(ask(env, t, source.name, user="dev"), grpc.StatusCode.PERMISSION_DENIED)
    # Nothing was opened in governance for any of these.
    listed = await env.approvals.ListApprovalRequests(
        asvc.ListApprovalRequestsRequest(parent=f"tenants/{t}"), metadata=admin(t)
    )
    assert list(listed.approval_requests) == []


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("password = 'hunter2-prod'", ["Keyword: password"]),
        (
            "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
            ["AWS Access Key", "Keyword: aws_access_key_id"],
        ),
        ("-----BEGIN RSA PRIVATE KEY-----", ["Private Key"]),
        ("token: ghp_abcdefghijklmnopqrstuvwxyz0123456789", ["GitHub Token", "Keyword: token"]),
        ("We validate the token on every request.", []),
        ("Set password: ${DB_PASSWORD} from the vault.", []),
        (
            "The content hash is 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08.",
            [],
        ),
    ],
)
def test_credential_detection(text: str, kinds: list[str]) -> None:
    assert sorted(f.kind for f in find_credentials(text)) == sorted(kinds)
