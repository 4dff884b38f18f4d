"""ApprovalService over a real server and PostgreSQL: modes, eligibility, self-approval,
idempotent decisions, quorum under concurrent decisions, cancellation and leased expiry."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import leases
from governance_testkit import GovernanceEnv, admin, expect, md, new_tenant, service_md
from test_organization import COMPANY, ORG, TEAM, bind, outbox, unit

PENDING, APPROVED, REJECTED, EXPIRED, CANCELLED = (
    res.APPROVAL_STATE_PENDING,
    res.APPROVAL_STATE_APPROVED,
    res.APPROVAL_STATE_REJECTED,
    res.APPROVAL_STATE_EXPIRED,
    res.APPROVAL_STATE_CANCELLED,
)


async def setup(gov: GovernanceEnv, approvers: int) -> str:
    """A tenant acme ⊃ eng ⊃ payments with ``approvers`` ADMINs (a0, a1, ...) at eng."""
    t = new_tenant()
    await unit(gov, t, "acme", COMPANY)
    await unit(gov, t, "eng", ORG, "acme")
    await unit(gov, t, "payments", TEAM, "eng")
    for i in range(approvers):
        await bind(gov, t, f"users/a{i}", res.ROLE_ADMIN, "eng")
    await bind(gov, t, "users/dev", res.ROLE_DEVELOPER, "payments")
    return t


async def ask(gov: GovernanceEnv, t: str, meta=None, **kw) -> res.ApprovalRequest:  # type: ignore[no-untyped-def]
    kw.setdefault("type", res.APPROVAL_TYPE_MEMORY_PROMOTION)
    kw.setdefault("org_unit", f"tenants/{t}/orgUnits/payments")
    kw.setdefault("target", f"tenants/{t}/memories/00000000-0000-4000-8000-000000000001")
    kw.setdefault("title", "Promote the deploy checklist to TEAM")
    request_id = kw.pop("request_id", "")
    return await gov.approvals.CreateApprovalRequest(
        asvc.CreateApprovalRequestRequest(
            parent=f"tenants/{t}", approval_request=res.ApprovalRequest(**kw), request_id=request_id
        ),
        metadata=meta or md(t, "dev"),
    )


def approve(gov: GovernanceEnv, name: str, meta):  # type: ignore[no-untyped-def]
    return gov.approvals.ApproveApprovalRequest(
        asvc.ApproveApprovalRequestRequest(name=name), metadata=meta
    )


def reject(gov: GovernanceEnv, name: str, meta, comment: str = "not yet"):  # type: ignore[no-untyped-def]
    return gov.approvals.RejectApprovalRequest(
        asvc.RejectApprovalRequestRequest(name=name, comment=comment), metadata=meta
    )


async def test_single_quorum_unanimous_and_rejection(gov: GovernanceEnv) -> None:
    t = await setup(gov, 3)
    single = await ask(gov, t, mode=res.APPROVAL_MODE_SINGLE, risk_level=res.RISK_LEVEL_LOW)
    assert (single.state, single.required_approvals, single.requester) == (PENDING, 1, "users/dev")
    assert single.expire_time.seconds - single.create_time.seconds == 72 * 3600
    done = await approve(gov, single.name, md(t, "a0"))
    assert done.state == APPROVED and done.HasField("close_time")
    # Approving again is a no-op; approving a closed request one did not decide is refused.
    assert (await approve(gov, single.name, md(t, "a0"))) == done
    reason, fields, _ = await expect(
        approve(gov, single.name, md(t, "a1")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (reason, fields) == ("APPROVAL_CLOSED", ["name"])

    quorum = await ask(gov, t, mode=res.APPROVAL_MODE_QUORUM)
    assert quorum.required_approvals == 2
    assert (await approve(gov, quorum.name, md(t, "a0"))).state == PENDING
    assert (await approve(gov, quorum.name, md(t, "a1"))).state == APPROVED

    unanimous = await ask(gov, t, mode=res.APPROVAL_MODE_UNANIMOUS, meta=md(t, "a2"))
    assert unanimous.required_approvals == 2  # a0 and a1; the requester a2 is not counted
    assert (await approve(gov, unanimous.name, md(t, "a0"))).state == PENDING
    # One rejection closes it; the other way after a decision is refused.
    rejected = await reject(gov, unanimous.name, md(t, "a1"))
    assert rejected.state == REJECTED and [d.approve for d in rejected.decisions] == [True, False]
    reason, _, _ = await expect(
        reject(gov, unanimous.name, md(t, "a0")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "ALREADY_DECIDED"
    events = [e["event_type"] for e in await outbox(gov, t) if "approval" in e["event_type"]]
    assert events.count("governance.approval_request.approved") == 2
    assert events.count("governance.approval_request.rejected") == 1
    assert events.count("governance.approval_request.decided") == 5


async def test_who_may_decide(gov: GovernanceEnv) -> None:
    t = await setup(gov, 1)
    mine = await ask(gov, t, meta=md(t, "a0"))
    # Self-approval is refused; so is an agent of the requester (agents are no approvers).
    reason, fields, _ = await expect(
        approve(gov, mine.name, md(t, "a0")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (reason, fields) == ("SELF_APPROVAL", ["name"])
    await expect(
        approve(gov, mine.name, md(t, "a0", agent="helper")), grpc.StatusCode.PERMISSION_DENIED
    )
    # A developer of the unit, an outsider, a service: not approvers. A request that does
    # not exist is refused the same way.
    ghost = f"tenants/{t}/approvalRequests/00000000-0000-4000-8000-00000000dead"
    for name, meta in (
        (mine.name, md(t, "dev")),
        (mine.name, md(t, "stranger")),
        (mine.name, service_md()),
        (ghost, md(t, "dev")),
    ):
        reason, _, _ = await expect(approve(gov, name, meta), grpc.StatusCode.PERMISSION_DENIED)
        assert reason == "ACTION_NOT_ALLOWED"
    await expect(approve(gov, ghost, admin(t)), grpc.StatusCode.NOT_FOUND)
    # A tenant admin decides anywhere; a rejection needs a reason.
    _, fields, _ = await expect(
        reject(gov, mine.name, admin(t), comment=""), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert fields == ["comment"]
    assert (await approve(gov, mine.name, admin(t))).state == APPROVED
    # Another tenant's request: TENANT_MISMATCH before any lookup.
    reason, _, _ = await expect(
        approve(gov, mine.name, admin(new_tenant())), grpc.StatusCode.PERMISSION_DENIED
    )
    assert reason == "TENANT_MISMATCH"
    # awaiting_me lists what the caller may still decide.
    waiting = await ask(gov, t)
    listed = await gov.approvals.ListApprovalRequests(
        asvc.ListApprovalRequestsRequest(parent=f"tenants/{t}", awaiting_me=True),
        metadata=md(t, "a0"),
    )
    assert [a.name for a in listed.approval_requests] == [waiting.name]
    none = await gov.approvals.ListApprovalRequests(
        asvc.ListApprovalRequestsRequest(parent=f"tenants/{t}", awaiting_me=True),
        metadata=md(t, "dev"),
    )
    assert not none.approval_requests


async def test_bad_requests(gov: GovernanceEnv) -> None:
    t = await setup(gov, 0)
    cases = [
        ({"type": 0}, "approval_request.type"),
        (
            {"mode": res.APPROVAL_MODE_QUORUM, "required_approvals": 11},
            "approval_request.required_approvals",
        ),
        (
            {"mode": res.APPROVAL_MODE_SINGLE, "required_approvals": 3},
            "approval_request.required_approvals",
        ),
        ({"title": "x" * 201}, "approval_request.title"),
        ({"target": ""}, "approval_request.target"),
        ({"org_unit": f"tenants/{new_tenant()}/orgUnits/eng"}, "approval_request.org_unit"),
    ]
    for kw, field in cases:
        _, fields, _ = await expect(ask(gov, t, **kw), grpc.StatusCode.INVALID_ARGUMENT)
        assert fields == [field], kw
    reason, _, _ = await expect(
        ask(gov, t, mode=res.APPROVAL_MODE_UNANIMOUS), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "NO_ELIGIBLE_APPROVERS"
    # A service asks (memory promotions); retried with its request_id, it is asked once.
    first = await ask(gov, t, meta=service_md("memory"), request_id="promote-1")
    again = await ask(gov, t, meta=service_md("memory"), request_id="promote-1")
    assert first == again and first.requester == "services/memory"


async def test_quorum_under_concurrent_decisions(gov: GovernanceEnv) -> None:
    """Five approvers decide at once: the quorum-th decision approves, each decision is
    recorded or refused as closed (none lost), and the request is approved exactly once."""
    t = await setup(gov, 5)
    for quorum in (3, 5):
        request = await ask(gov, t, mode=res.APPROVAL_MODE_QUORUM, required_approvals=quorum)
        outcomes = await asyncio.gather(
            *(approve(gov, request.name, md(t, f"a{i}")) for i in range(5)), return_exceptions=True
        )
        accepted = [o for o in outcomes if isinstance(o, res.ApprovalRequest)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(accepted) == quorum and len(refused) == 5 - quorum
        assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
        # Exactly one response carries the approval, and it is the one with quorum decisions.
        approving = [o for o in accepted if o.state == APPROVED]
        assert len(approving) == 1 and len(approving[0].decisions) == quorum
        assert sorted(len(o.decisions) for o in accepted) == list(range(1, quorum + 1))
        final = await gov.approvals.GetApprovalRequest(
            asvc.GetApprovalRequestRequest(name=request.name), metadata=md(t, "dev")
        )
        assert final.state == APPROVED and len(final.decisions) == quorum
    events = [
        e
        for e in await outbox(gov, t)
        if e["event_type"].startswith("governance.approval_request.")
    ]
    assert [e["event_type"] for e in events].count("governance.approval_request.approved") == 2
    assert [e["event_type"] for e in events].count("governance.approval_request.decided") == 8


async def test_cancel_and_leased_expiry(gov: GovernanceEnv) -> None:
    t = await setup(gov, 1)
    request = await ask(gov, t)
    await expect(
        gov.approvals.CancelApprovalRequest(
            asvc.CancelApprovalRequestRequest(name=request.name), metadata=md(t, "a0")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    cancelled = await gov.approvals.CancelApprovalRequest(
        asvc.CancelApprovalRequestRequest(name=request.name), metadata=md(t, "dev")
    )
    assert cancelled.state == CANCELLED
    due = await ask(gov, t)
    later = await ask(gov, t)
    await make_due(gov, due)
    reason, _, _ = await expect(
        approve(gov, due.name, md(t, "a0")), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "APPROVAL_EXPIRED"
    approvals = gov.app.servicers["aeterna.governance.v1.ApprovalService"].servicer.approvals  # type: ignore[attr-defined]
    pool = gov.app.deps.db.pool
    name = "governance:approvals:expire"
    first = await leases.acquire(pool, name, leases.new_owner_id(), 30)
    assert first is not None
    assert await approvals.expire_due(first) == 1
    assert await approvals.expire_due(first) == 0  # idempotent
    await leases.release(pool, first)
    # A replica whose lease was taken over writes nothing (fenced by the epoch).
    await make_due(gov, later)
    second = await leases.acquire(pool, name, leases.new_owner_id(), 30)
    assert second is not None and second.epoch == first.epoch + 1
    with pytest.raises(leases.LeaseLostError):
        await approvals.expire_due(first)
    still = await gov.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=later.name), metadata=md(t, "dev")
    )
    assert still.state == PENDING
    assert await approvals.expire_due(second) == 1
    await leases.release(pool, second)
    got = await gov.approvals.GetApprovalRequest(
        asvc.GetApprovalRequestRequest(name=due.name), metadata=md(t, "dev")
    )
    assert got.state == EXPIRED and got.HasField("close_time")
    events = [e["event_type"] for e in await outbox(gov, t)]
    assert events.count("governance.approval_request.expired") == 2
    assert events.count("governance.approval_request.cancelled") == 1


async def make_due(gov: GovernanceEnv, request: res.ApprovalRequest) -> None:
    """Move a request's expiry into the past (as the owner, lifting FORCE for one transaction)."""
    owner = await asyncpg.connect(gov.urls.owner)
    try:
        async with owner.transaction():
            await owner.execute("ALTER TABLE approval_requests NO FORCE ROW LEVEL SECURITY")
            await owner.execute(
                "UPDATE approval_requests SET expire_at = now() - interval '1 second' WHERE id = $1",
                uuid.UUID(request.name.rsplit("/", 1)[1]),
            )
            await owner.execute("ALTER TABLE approval_requests FORCE ROW LEVEL SECURITY")
    finally:
        await owner.close()


async def test_listing_pages_newest_first(gov: GovernanceEnv) -> None:
    t = await setup(gov, 1)
    made = [await ask(gov, t, title=f"request {i}") for i in range(3)]
    seen: list[str] = []
    token = ""
    while True:
        page = await gov.approvals.ListApprovalRequests(
            asvc.ListApprovalRequestsRequest(parent=f"tenants/{t}", page_size=1, page_token=token),
            metadata=md(t, "dev"),
        )
        seen += [a.name for a in page.approval_requests]
        token = page.next_page_token
        if not token:
            break
    assert seen == [a.name for a in reversed(made)]
    _, fields, _ = await expect(
        gov.approvals.ListApprovalRequests(
            asvc.ListApprovalRequestsRequest(parent=f"tenants/{t}", state=3, page_token="junk"),
            metadata=md(t, "dev"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["page_token"]
