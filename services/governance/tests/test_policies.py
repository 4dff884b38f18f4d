"""PolicyService over a real server and PostgreSQL: writes with their events and
idempotency, checks and drift with suppressions down the org tree, and every refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from aeterna.governance.v1 import policy_service_pb2 as svc
from aeterna.governance.v1 import policy_service_pb2_grpc as svc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from google.protobuf import field_mask_pb2, timestamp_pb2
from governance_testkit import GovernanceEnv, admin, expect, md, new_tenant
from test_organization import COMPANY, ORG, PROJECT, TEAM, bind, outbox, unit

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def rule(rule_id: str, value: str, severity: int = res.SEVERITY_BLOCK, **kw) -> res.PolicyRule:  # type: ignore[no-untyped-def]
    """DENY MUST_USE on dependencies (violated when the project uses ``value``) unless told."""
    fields = dict(
        type=res.RULE_TYPE_DENY,
        target=res.RULE_TARGET_DEPENDENCY,
        operator=res.RULE_OPERATOR_MUST_USE,
        value=value,
        severity=severity,
    )
    fields.update(kw)
    return res.PolicyRule(id=rule_id, **fields)


async def setup(gov: GovernanceEnv) -> tuple[str, svc_grpc.PolicyServiceStub]:
    """acme ⊃ eng ⊃ {payments ⊃ checkout, search}; alice ADMIN at payments, bob VIEWER at
    checkout, carol DEVELOPER at search."""
    t = new_tenant()
    await unit(gov, t, "acme", COMPANY)
    await unit(gov, t, "eng", ORG, "acme")
    await unit(gov, t, "payments", TEAM, "eng")
    await unit(gov, t, "search", TEAM, "eng")
    await unit(gov, t, "checkout", PROJECT, "payments")
    await bind(gov, t, "users/alice", res.ROLE_ADMIN, "payments")
    await bind(gov, t, "users/bob", res.ROLE_VIEWER, "checkout")
    await bind(gov, t, "users/carol", res.ROLE_DEVELOPER, "search")
    return t, svc_grpc.PolicyServiceStub(gov.channel)


def create(
    t: str, policy_id: str, at: str, *rules: res.PolicyRule, request_id: str = "", **kw
) -> svc.CreatePolicyRequest:  # type: ignore[no-untyped-def]
    return svc.CreatePolicyRequest(
        parent=f"tenants/{t}",
        policy_id=policy_id,
        policy=res.Policy(
            display_name=policy_id, org_unit=f"tenants/{t}/orgUnits/{at}", rules=rules, **kw
        ),
        request_id=request_id,
    )


def unit_of(t: str, uid: str) -> str:
    return f"tenants/{t}/orgUnits/{uid}"


async def test_policies_down_the_tree_checks_and_drift(gov: GovernanceEnv) -> None:
    t, stub = await setup(gov)
    # A MANDATORY company baseline and an optional company rule.
    await stub.CreatePolicy(
        create(t, "baseline", "acme", rule("no-moment", "moment"), mode=res.POLICY_MODE_MANDATORY),
        metadata=admin(t),
    )
    await stub.CreatePolicy(
        create(t, "style", "acme", rule("no-lodash", "lodash", res.SEVERITY_WARN)),
        metadata=admin(t),
    )
    # The team admin overrides both ids below; only the optional one gives way.
    team = await stub.CreatePolicy(
        create(
            t,
            "payments-deps",
            "payments",
            rule("no-moment", "nothing"),
            rule("no-lodash", "nothing"),
            rule(
                "license",
                r"(?m)^# SPDX",
                res.SEVERITY_INFO,
                type=res.RULE_TYPE_ALLOW,
                target=res.RULE_TARGET_CODE,
                operator=res.RULE_OPERATOR_MUST_MATCH,
            ),
            merge_strategy=res.MERGE_STRATEGY_OVERRIDE,
        ),
        metadata=md(t, "alice"),
    )
    assert team.name == f"tenants/{t}/policies/payments-deps" and team.etag

    state = res.PolicyContext(dependencies=["moment@2.29", "lodash"], content="x = 1\n")
    checked = await stub.CheckPolicy(
        svc.CheckPolicyRequest(org_unit=unit_of(t, "checkout"), context=state),
        metadata=md(t, "bob"),
    )
    assert [(v.policy.rsplit("/", 1)[1], v.rule_id) for v in checked.violations] == [
        ("baseline", "no-moment"),
        ("payments-deps", "license"),
    ]
    assert checked.blocked and checked.drift_score == 1.0
    # The same state at the search team, where the override does not apply.
    at_search = await stub.CheckPolicy(
        svc.CheckPolicyRequest(org_unit=unit_of(t, "search"), context=state),
        metadata=md(t, "carol"),
    )
    assert sorted(v.rule_id for v in at_search.violations) == ["no-lodash", "no-moment"]
    # ValidateContent checks FILE and CODE rules only.
    validated = await stub.ValidateContent(
        svc.ValidateContentRequest(org_unit=unit_of(t, "checkout"), path="a.py", content="x\n"),
        metadata=md(t, "bob"),
    )
    assert [v.rule_id for v in validated.violations] == ["license"]
    assert not validated.blocked and validated.drift_score == 0.1

    report = await stub.CheckDrift(
        svc.CheckDriftRequest(org_unit=unit_of(t, "checkout"), context=state),
        metadata=md(t, "bob"),
    )
    assert report.name == f"{unit_of(t, 'checkout')}/driftReport" and report.score == 1.0

    # Alice suppresses the BLOCK rule at her team for a day: it no longer counts below.
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    suppression = await stub.CreateSuppression(
        svc.CreateSuppressionRequest(
            parent=f"tenants/{t}",
            suppression=res.Suppression(
                policy=f"tenants/{t}/policies/baseline",
                rule_id="no-moment",
                org_unit=unit_of(t, "payments"),
                reason="migration to luxon planned",
                expire_time=expire,
            ),
        ),
        metadata=md(t, "alice"),
    )
    assert suppression.creator == "users/alice"
    got = await stub.GetDriftReport(
        svc.GetDriftReportRequest(name=report.name), metadata=md(t, "bob")
    )
    assert [(v.rule_id, v.suppressed) for v in got.violations] == [
        ("no-moment", True),
        ("license", False),
    ]
    assert got.score == 0.1
    # Once expired (moved into the past by the owner of the data), it no longer applies.
    su = await asyncpg.connect(gov.urls.superuser)
    try:
        await su.execute(
            "UPDATE suppressions SET expire_at = now() - interval '1 second' WHERE tenant_id = $1",
            t,
        )
    finally:
        await su.close()
    got = await stub.GetDriftReport(
        svc.GetDriftReportRequest(name=report.name), metadata=md(t, "bob")
    )
    assert [v.suppressed for v in got.violations] == [False, False] and got.score == 1.0
    listed = await stub.ListSuppressions(
        svc.ListSuppressionsRequest(parent=f"tenants/{t}"), metadata=admin(t)
    )
    assert list(listed.suppressions) == []
    listed = await stub.ListSuppressions(
        svc.ListSuppressionsRequest(parent=f"tenants/{t}", show_expired=True), metadata=admin(t)
    )
    assert [s.name for s in listed.suppressions] == [suppression.name]

    # Update with the etag; a stale etag is ABORTED.
    changed = res.Policy(name=team.name, display_name="Payments dependencies", etag=team.etag)
    updated = await stub.UpdatePolicy(
        svc.UpdatePolicyRequest(
            policy=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
        ),
        metadata=md(t, "alice"),
    )
    assert updated.display_name == "Payments dependencies" and updated.etag != team.etag
    assert list(updated.rules) == list(team.rules)
    reason, _, _ = await expect(
        stub.UpdatePolicy(
            svc.UpdatePolicyRequest(
                policy=changed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            ),
            metadata=md(t, "alice"),
        ),
        grpc.StatusCode.ABORTED,
    )
    assert reason == "ETAG_MISMATCH"

    listed_policies = await stub.ListPolicies(
        svc.ListPoliciesRequest(parent=f"tenants/{t}", page_size=2), metadata=admin(t)
    )
    assert [p.name.rsplit("/", 1)[1] for p in listed_policies.policies] == [
        "baseline",
        "payments-deps",
    ]
    rest = await stub.ListPolicies(
        svc.ListPoliciesRequest(
            parent=f"tenants/{t}", page_size=2, page_token=listed_policies.next_page_token
        ),
        metadata=admin(t),
    )
    assert [p.name.rsplit("/", 1)[1] for p in rest.policies] == ["style"]

    await stub.DeletePolicy(
        svc.DeletePolicyRequest(name=f"tenants/{t}/policies/baseline"), metadata=admin(t)
    )
    listed = await stub.ListSuppressions(
        svc.ListSuppressionsRequest(parent=f"tenants/{t}", show_expired=True), metadata=admin(t)
    )
    assert list(listed.suppressions) == []
    events = [
        (r["event_type"], r["actor"])
        for r in await outbox(gov, t)
        if r["event_type"].startswith(
            ("governance.policy", "governance.suppression", "governance.drift")
        )
    ]
    assert events == [
        ("governance.policy.created", "users/root"),
        ("governance.policy.created", "users/root"),
        ("governance.policy.created", "users/alice"),
        ("governance.drift.checked", "users/bob"),
        ("governance.suppression.created", "users/alice"),
        ("governance.policy.updated", "users/alice"),
        ("governance.policy.deleted", "users/root"),
    ]


async def test_refusals_come_before_lookups(gov: GovernanceEnv) -> None:
    t, stub = await setup(gov)
    await stub.CreatePolicy(create(t, "p", "payments", rule("r", "x")), metadata=md(t, "alice"))
    # Writing needs ADMIN at the unit or above: alice is admin of payments, not of eng.
    reason, _, meta = await expect(
        stub.CreatePolicy(create(t, "q", "eng", rule("r", "x")), metadata=md(t, "alice")),
        DENIED,
    )
    assert (
        reason == "ACTION_NOT_ALLOWED"
        and meta["action"] == "aeterna.governance.v1.PolicyService/CreatePolicy"
    )
    # A viewer may check but not write.
    await expect(
        stub.CreatePolicy(create(t, "q", "checkout", rule("r", "x")), metadata=md(t, "bob")),
        DENIED,
    )
    await expect(
        stub.DeletePolicy(
            svc.DeletePolicyRequest(name=f"tenants/{t}/policies/p"), metadata=md(t, "bob")
        ),
        DENIED,
    )
    # Suppressing needs ADMIN at the suppression's unit too.
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    suppress = svc.CreateSuppressionRequest(
        parent=f"tenants/{t}",
        suppression=res.Suppression(
            policy=f"tenants/{t}/policies/p",
            rule_id="r",
            org_unit=unit_of(t, "checkout"),
            reason="because",
            expire_time=expire,
        ),
    )
    reason, _, meta = await expect(stub.CreateSuppression(suppress, metadata=md(t, "bob")), DENIED)
    assert meta["action"] == "aeterna.governance.v1.PolicyService/CreateSuppression"
    created = await stub.CreateSuppression(suppress, metadata=md(t, "alice"))
    await expect(
        stub.DeleteSuppression(
            svc.DeleteSuppressionRequest(name=created.name), metadata=md(t, "bob")
        ),
        DENIED,
    )
    # Reading and checking need membership of the unit or a unit above or below it.
    await expect(
        stub.GetPolicy(
            svc.GetPolicyRequest(name=f"tenants/{t}/policies/p"), metadata=md(t, "carol")
        ),
        DENIED,
    )
    await expect(
        stub.CheckPolicy(
            svc.CheckPolicyRequest(org_unit=unit_of(t, "checkout"), context=res.PolicyContext()),
            metadata=md(t, "carol"),
        ),
        DENIED,
    )
    # Permission before existence: a missing policy is refused like an existing one to a
    # caller without rights, and NOT_FOUND only to one who could read it.
    await expect(
        stub.GetPolicy(
            svc.GetPolicyRequest(name=f"tenants/{t}/policies/nope"), metadata=md(t, "bob")
        ),
        DENIED,
    )
    reason, _, _ = await expect(
        stub.GetPolicy(svc.GetPolicyRequest(name=f"tenants/{t}/policies/nope"), metadata=admin(t)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "POLICY_NOT_FOUND"
    got = await stub.GetPolicy(
        svc.GetPolicyRequest(name=f"tenants/{t}/policies/p"), metadata=md(t, "bob")
    )
    assert [r.id for r in got.rules] == ["r"]
    # Another tenant's names are refused before anything is read.
    reason, _, _ = await expect(
        stub.GetPolicy(
            svc.GetPolicyRequest(name=f"tenants/{t}/policies/p"), metadata=admin(new_tenant())
        ),
        DENIED,
    )
    assert reason == "TENANT_MISMATCH"


async def test_bad_input_is_refused_whole_and_retries_apply_once(gov: GovernanceEnv) -> None:
    t, stub = await setup(gov)
    bad = create(
        t,
        "bad",
        "acme",
        rule("ok", "x"),
        rule("re", "(unclosed", operator=res.RULE_OPERATOR_MUST_MATCH),
        rule("Bad Id", "x"),
    )
    _, fields, _ = await expect(stub.CreatePolicy(bad, metadata=admin(t)), INVALID)
    assert fields == ["policy.rules[1].value", "policy.rules[2].id"]
    too_many = create(t, "big", "acme", *(rule(f"r{i}", "x") for i in range(201)))
    _, fields, _ = await expect(stub.CreatePolicy(too_many, metadata=admin(t)), INVALID)
    assert fields == ["policy.rules"]
    long_value = create(t, "long", "acme", rule("r", "x" * 1001))
    _, fields, _ = await expect(stub.CreatePolicy(long_value, metadata=admin(t)), INVALID)
    assert fields == ["policy.rules[0].value"]
    _, fields, _ = await expect(
        stub.CheckPolicy(
            svc.CheckPolicyRequest(
                org_unit=unit_of(t, "acme"),
                context=res.PolicyContext(content="a" * (1 << 20) + "b"),
            ),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert fields == ["context.content"]
    # A suppression must expire, within a year.
    _, fields, _ = await expect(
        stub.CreateSuppression(
            svc.CreateSuppressionRequest(
                parent=f"tenants/{t}",
                suppression=res.Suppression(
                    policy=f"tenants/{t}/policies/x",
                    rule_id="r",
                    org_unit=unit_of(t, "acme"),
                    reason="",
                ),
            ),
            metadata=admin(t),
        ),
        INVALID,
    )
    assert fields == ["suppression.reason", "suppression.expire_time"]
    # Nothing of the refused writes was stored.
    listed = await stub.ListPolicies(
        svc.ListPoliciesRequest(parent=f"tenants/{t}"), metadata=admin(t)
    )
    assert list(listed.policies) == []

    # A retried create with the same request_id is applied once.
    request = create(t, "once", "acme", rule("r", "x"), request_id="req-1")
    first = await stub.CreatePolicy(request, metadata=admin(t))
    again = await stub.CreatePolicy(request, metadata=admin(t))
    assert again == first
    created = [r for r in await outbox(gov, t) if r["event_type"] == "governance.policy.created"]
    assert len(created) == 1
    # The same request_id for another request is refused.
    other = create(t, "twice", "acme", rule("r", "y"), request_id="req-1")
    reason, _, _ = await expect(
        stub.CreatePolicy(other, metadata=admin(t)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "REQUEST_ID_REUSED"
    reason, _, _ = await expect(
        stub.CreatePolicy(create(t, "once", "acme", rule("r", "x")), metadata=admin(t)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert reason == "POLICY_EXISTS"


async def test_a_unit_with_policies_or_suppressions_is_not_deleted(gov: GovernanceEnv) -> None:
    from aeterna.governance.v1 import organization_service_pb2 as org_svc

    t, stub = await setup(gov)
    await stub.CreatePolicy(
        create(t, "deps", "search", rule("no-moment", "moment")), metadata=admin(t)
    )
    delete = org_svc.DeleteOrgUnitRequest(name=unit_of(t, "search"))
    reason, _, meta = await expect(
        gov.orgs.DeleteOrgUnit(delete, metadata=admin(t)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "ORG_UNIT_NOT_EMPTY" and meta["policies"] == "1"
    # The unit and its policy are both still there.
    await gov.orgs.GetOrgUnit(
        org_svc.GetOrgUnitRequest(name=unit_of(t, "search")), metadata=admin(t)
    )
    await stub.GetPolicy(svc.GetPolicyRequest(name=f"tenants/{t}/policies/deps"), metadata=admin(t))
