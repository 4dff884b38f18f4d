"""gRPC servicer of ``aeterna.governance.v1.PolicyService``: thin, protobuf ⇄ use cases.

Each method checks the name's tenant, then authorizes (``Access.require``), then validates
the body, then runs the use case (:mod:`.policy.policies`). Rights (the interim access
check): reading and checking need a role at the unit or above it (``UNIT_MEMBER``);
writing policies and suppressions needs ADMIN at the unit or above, or a tenant-wide role
(``UNIT_ADMIN``). For a policy or suppression named by id, its unit is looked up first and
the caller is authorized against it; a name that does not exist is authorized as a
tenant-level resource (tenant admins only), so a caller without rights gets the same
``PERMISSION_DENIED`` whether or not it exists.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from aeterna.governance.v1 import policy_service_pb2 as svc
from aeterna.governance.v1 import policy_service_pb2_grpc as svc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.context import Principal
from aeterna_common.errors import FieldViolation, InvalidArgument
from aeterna_common.names import invalid_name, parse_name, parse_parent, tenant_mismatch
from aeterna_common.servicing import Ctx
from google.protobuf import empty_pb2

from aeterna_governance.access import Access, method
from aeterna_governance.deps import Deps, Registered, ServicerSpec
from aeterna_governance.organization import check_display_name, unit_reference
from aeterna_governance.policy import engine
from aeterna_governance.policy.model import CheckResult, MergeStrategy, PolicyContext, PolicyMode
from aeterna_governance.policy.policies import Policies, context_of, violation_pb
from aeterna_governance.policy.validation import RULE_ID, check_context, parse_rules
from aeterna_governance.store import request_hash

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["PolicyService"].full_name


def _action(name: str) -> str:
    return method(SERVICE_NAME, name)


POLICY_ID = re.compile(r"[a-z0-9-]{1,63}")
"""Policy ids (the contract: 1-63 characters of [a-z0-9-])."""

MAX_SUPPRESSION_DAYS = 365
"""Furthest a suppression may expire, in days from its creation (the contract)."""

MAX_REASON_CHARS = 1000
"""Longest suppression reason (the contract: 1-1,000 characters)."""

UPDATABLE = {"display_name", "mode", "merge_strategy", "rules"}
"""Fields UpdatePolicy changes (the contract)."""


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _parse_policy_name(principal: Principal, name: str, field: str) -> tuple[str, str]:
    """(tenant, policy id) of ``tenants/{tenant}/policies/{policy}``; the tenant check first.

    Raises:
        InvalidArgument: Malformed (reason ``INVALID_NAME``).
        PermissionDenied: Another tenant (reason ``TENANT_MISMATCH``).
    """
    m = re.fullmatch(r"tenants/([A-Za-z0-9_-]{1,100})/policies/([^/]+)", name)
    if not m:
        raise invalid_name(field, "tenants/{tenant}/policies/{policy}")
    if not principal.is_service and m.group(1) != principal.tenant_id:
        raise tenant_mismatch(field, name)
    if not POLICY_ID.fullmatch(m.group(2)):
        raise invalid_name(field, "tenants/{tenant}/policies/{policy} with 1-63 of [a-z0-9-]")
    return m.group(1), m.group(2)


def _policy_reference(tenant_id: str, value: str, field: str) -> str:
    """The policy id of a body's policy name, which must be of the same tenant."""
    m = re.fullmatch(r"tenants/([A-Za-z0-9_-]{1,100})/policies/([a-z0-9-]{1,63})", value)
    if not m:
        raise invalid_name(field, "tenants/{tenant}/policies/{policy}")
    if m.group(1) != tenant_id:
        raise InvalidArgument(
            [
                FieldViolation(
                    field, "must be a resource of the same tenant", "CROSS_TENANT_REFERENCE"
                )
            ]
        )
    return m.group(2)


def _parse_report_name(principal: Principal, name: str) -> tuple[str, str]:
    """(tenant, unit id) of ``tenants/{tenant}/orgUnits/{unit}/driftReport``."""
    unit, sep, tail = name.rpartition("/")
    if not sep or tail != "driftReport":
        raise invalid_name("name", "tenants/{tenant}/orgUnits/{org_unit}/driftReport")
    parsed = parse_name(principal, unit, "orgUnits")
    return parsed.tenant_id, parsed.id


def _policy_fields(
    policy: res.Policy, fields: set[str]
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """Validated values of ``fields`` of a policy, and the violations found."""
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    if "display_name" in fields:
        violations += check_display_name(policy.display_name, "policy.display_name")
        values["display_name"] = policy.display_name
    if "mode" in fields:
        if policy.mode not in (0, *PolicyMode):
            violations.append(FieldViolation("policy.mode", "OPTIONAL or MANDATORY"))
        values["mode"] = policy.mode or PolicyMode.OPTIONAL
    if "merge_strategy" in fields:
        if policy.merge_strategy not in (0, *MergeStrategy):
            violations.append(
                FieldViolation("policy.merge_strategy", "OVERRIDE, MERGE or INTERSECT")
            )
        values["merge_strategy"] = policy.merge_strategy or MergeStrategy.MERGE
    if "rules" in fields:
        rules, problems = parse_rules(policy.rules, "policy.rules")
        violations += problems
        values["rules"] = rules
    return values, violations


def _context(message: res.PolicyContext, field: str) -> PolicyContext:
    context = context_of(message)
    violations = check_context(context, field)
    if violations:
        raise InvalidArgument(violations)
    return context


def _response(result: CheckResult) -> svc.CheckPolicyResponse:
    return svc.CheckPolicyResponse(
        violations=[violation_pb(v) for v in result.violations],
        blocked=result.blocked,
        drift_score=result.drift_score,
    )


class PolicyServicer(svc_grpc.PolicyServiceServicer):
    """``PolicyService`` over :class:`~aeterna_governance.policy.policies.Policies`."""

    def __init__(self, deps: Deps) -> None:
        self.access: Access = deps.access
        self.policies = Policies(deps.db, idempotency_ttl_s=deps.settings.idempotency_ttl_s)

    async def _require_for_policy(
        self, principal: Principal, tenant_id: str, policy_id: str, action: str
    ) -> None:
        # A policy's unit decides (a missing policy: tenant admins only, as if it existed).
        unit = await self.policies.unit_of_policy(tenant_id, policy_id)
        if action == _action("GetPolicy"):
            await self.access.require_in_tree(principal, tenant_id, action, unit)
        else:
            await self.access.require_at(principal, tenant_id, action, unit)

    # ----- policies -----

    async def CreatePolicy(self, request: svc.CreatePolicyRequest, context: Ctx) -> res.Policy:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        if not request.policy.org_unit:
            raise InvalidArgument([FieldViolation("policy.org_unit", "required", "REQUIRED")])
        unit_id = unit_reference(tenant_id, request.policy.org_unit, "policy.org_unit")
        await self.access.require_at(principal, tenant_id, _action("CreatePolicy"), unit_id)
        values, violations = _policy_fields(request.policy, UPDATABLE)
        if not POLICY_ID.fullmatch(request.policy_id):
            violations.insert(0, FieldViolation("policy_id", "1-63 characters of [a-z0-9-]"))
        if violations:
            raise InvalidArgument(violations)
        key = self.policies.key(
            tenant_id, principal, "CreatePolicy", request.request_id, request_hash(request)
        )
        created, position = await self.policies.create(
            key, request.policy_id, request.policy, unit_id, values["rules"]
        )
        await servicing.send_token(context, position)
        return created

    async def GetPolicy(self, request: svc.GetPolicyRequest, context: Ctx) -> res.Policy:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, policy_id = _parse_policy_name(principal, request.name, "name")
        await self._require_for_policy(principal, tenant_id, policy_id, _action("GetPolicy"))
        servicing.check_read_token(context)
        return await self.policies.get(tenant_id, policy_id)

    async def ListPolicies(
        self, request: svc.ListPoliciesRequest, context: Ctx
    ) -> svc.ListPoliciesResponse:
        """See the proto. Without ``org_unit`` only tenant admins list (every unit's
        policies); with it, readers of the unit's tree (:meth:`Access.require_in_tree`)."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        unit_id = (
            unit_reference(tenant_id, request.org_unit, "org_unit") if request.org_unit else None
        )
        await self.access.require_in_tree(principal, tenant_id, _action("ListPolicies"), unit_id)
        servicing.check_read_token(context)
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(tenant_id, unit_id)
        after = servicing.decode_page_token(request.page_token, fingerprint)
        policies, token = servicing.cut_page(
            await self.policies.list_policies(tenant_id, unit_id, after, size + 1),
            size,
            fingerprint,
            servicing.name_id,
        )
        return svc.ListPoliciesResponse(policies=policies, next_page_token=token)

    async def UpdatePolicy(self, request: svc.UpdatePolicyRequest, context: Ctx) -> res.Policy:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, policy_id = _parse_policy_name(principal, request.policy.name, "policy.name")
        await self._require_for_policy(principal, tenant_id, policy_id, _action("UpdatePolicy"))
        paths = servicing.check_mask(list(request.update_mask.paths), UPDATABLE)
        values, violations = _policy_fields(request.policy, set(paths))
        if violations:
            raise InvalidArgument(violations)
        key = self.policies.key(tenant_id, principal, "UpdatePolicy", "", request_hash(request))
        updated, position = await self.policies.update(key, policy_id, values, request.policy.etag)
        await servicing.send_token(context, position)
        return updated

    async def DeletePolicy(self, request: svc.DeletePolicyRequest, context: Ctx) -> empty_pb2.Empty:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, policy_id = _parse_policy_name(principal, request.name, "name")
        await self._require_for_policy(principal, tenant_id, policy_id, _action("DeletePolicy"))
        key = self.policies.key(tenant_id, principal, "DeletePolicy", "", request_hash(request))
        _, position = await self.policies.delete(key, policy_id, request.etag)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()

    # ----- checks and drift -----

    async def _unit(self, principal: Principal, org_unit: str, action: str) -> tuple[str, str]:
        name = parse_name(principal, org_unit, "orgUnits", "org_unit")
        await self.access.require_in_tree(principal, name.tenant_id, action, name.id)
        return name.tenant_id, name.id

    async def CheckPolicy(
        self, request: svc.CheckPolicyRequest, context: Ctx
    ) -> svc.CheckPolicyResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, unit_id = await self._unit(principal, request.org_unit, _action("CheckPolicy"))
        checked = await self.policies.check(
            tenant_id, unit_id, _context(request.context, "context")
        )
        return _response(checked.result)

    async def ValidateContent(
        self, request: svc.ValidateContentRequest, context: Ctx
    ) -> svc.CheckPolicyResponse:
        """See the proto: FILE and CODE rules only."""
        principal = rc.current().principal
        tenant_id, unit_id = await self._unit(
            principal, request.org_unit, _action("ValidateContent")
        )
        checked_context = _context(
            res.PolicyContext(path=request.path, content=request.content), ""
        )
        checked = await self.policies.check(
            tenant_id, unit_id, checked_context, engine.FILE_TARGETS
        )
        return _response(checked.result)

    async def CheckDrift(self, request: svc.CheckDriftRequest, context: Ctx) -> res.DriftReport:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, unit_id = await self._unit(principal, request.org_unit, _action("CheckDrift"))
        state = _context(request.context, "context")
        key = self.policies.key(tenant_id, principal, "CheckDrift", "", request_hash(request))
        report, position = await self.policies.check_drift(key, unit_id, state)
        await servicing.send_token(context, position)
        return report

    async def GetDriftReport(
        self, request: svc.GetDriftReportRequest, context: Ctx
    ) -> res.DriftReport:
        """See the proto."""
        principal = rc.current().principal
        tenant_id, unit_id = _parse_report_name(principal, request.name)
        await self.access.require_in_tree(principal, tenant_id, _action("GetDriftReport"), unit_id)
        servicing.check_read_token(context)
        return await self.policies.drift_report(tenant_id, unit_id)

    # ----- suppressions -----

    async def CreateSuppression(
        self, request: svc.CreateSuppressionRequest, context: Ctx
    ) -> res.Suppression:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        s = request.suppression
        if not s.org_unit:
            raise InvalidArgument([FieldViolation("suppression.org_unit", "required", "REQUIRED")])
        unit_id = unit_reference(tenant_id, s.org_unit, "suppression.org_unit")
        await self.access.require_at(principal, tenant_id, _action("CreateSuppression"), unit_id)
        violations: list[FieldViolation] = []
        policy_id = ""
        try:
            policy_id = _policy_reference(tenant_id, s.policy, "suppression.policy")
        except InvalidArgument as exc:
            violations += exc.violations
        if not RULE_ID.fullmatch(s.rule_id):
            violations.append(FieldViolation("suppression.rule_id", "1-64 of [a-z0-9-_.]"))
        if not 1 <= len(s.reason) <= MAX_REASON_CHARS or not s.reason.strip():
            violations.append(
                FieldViolation("suppression.reason", f"1-{MAX_REASON_CHARS} characters")
            )
        now = datetime.now(UTC)
        expire = s.expire_time.ToDatetime(tzinfo=UTC) if s.HasField("expire_time") else None
        if expire is None or not now < expire <= now + timedelta(days=MAX_SUPPRESSION_DAYS):
            violations.append(
                FieldViolation(
                    "suppression.expire_time",
                    f"required, in the future and at most {MAX_SUPPRESSION_DAYS} days ahead",
                )
            )
        if violations:
            raise InvalidArgument(violations)
        key = self.policies.key(
            tenant_id, principal, "CreateSuppression", request.request_id, request_hash(request)
        )
        created, position = await self.policies.create_suppression(key, s, policy_id, unit_id)
        await servicing.send_token(context, position)
        return created

    async def ListSuppressions(
        self, request: svc.ListSuppressionsRequest, context: Ctx
    ) -> svc.ListSuppressionsResponse:
        """See the proto (every unit's suppressions: tenant admins only)."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        await self.access.require_in_tree(principal, tenant_id, _action("ListSuppressions"), None)
        servicing.check_read_token(context)
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(tenant_id, request.show_expired)
        after = servicing.decode_page_token(request.page_token, fingerprint)
        found, token = servicing.cut_page(
            await self.policies.list_suppressions(tenant_id, request.show_expired, after, size + 1),
            size,
            fingerprint,
            servicing.name_id,
        )
        return svc.ListSuppressionsResponse(suppressions=found, next_page_token=token)

    async def DeleteSuppression(
        self, request: svc.DeleteSuppressionRequest, context: Ctx
    ) -> empty_pb2.Empty:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "suppressions")
        unit = await self.policies.unit_of_suppression(name.tenant_id, name.id)
        await self.access.require_at(principal, name.tenant_id, _action("DeleteSuppression"), unit)
        key = self.policies.key(
            name.tenant_id, principal, "DeleteSuppression", "", request_hash(request)
        )
        _, position = await self.policies.delete_suppression(key, name.id)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = PolicyServicer(deps)
    svc_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer)


SPEC = ServicerSpec(SERVICE_NAME, _build)
