"""gRPC servicer of ``aeterna.governance.v1.OrganizationService``: thin, protobuf ⇄ use
cases. Each method checks the name's tenant, then authorizes (``Access.require``, the Cedar
policies, before any lookup), then validates the body, then runs the use case
(:mod:`.organization`)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import grpc
from aeterna.governance.v1 import organization_service_pb2 as svc
from aeterna.governance.v1 import organization_service_pb2_grpc as svc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.authz import Resource
from aeterna_common.errors import FieldViolation, InvalidArgument
from aeterna_common.names import parse_name, parse_parent, parse_snapshot_name
from aeterna_common.servicing import Ctx
from google.protobuf import empty_pb2

from aeterna_governance.access import method
from aeterna_governance.deps import Deps, Registered, ServicerSpec
from aeterna_governance.organization import (
    SUBJECT,
    Organization,
    check_display_name,
    unit_reference,
    validate_binding,
    validate_delegation,
    validate_new_unit,
)
from aeterna_governance.store import request_hash

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["OrganizationService"].full_name


def _action(name: str) -> str:
    return method(SERVICE_NAME, name)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class OrganizationServicer(svc_grpc.OrganizationServiceServicer):
    """``OrganizationService`` over :class:`~aeterna_governance.organization.Organization`."""

    def __init__(self, deps: Deps) -> None:
        self.access = deps.access
        self.org = Organization(
            deps.db, deps.access, idempotency_ttl_s=deps.settings.idempotency_ttl_s
        )

    # ----- org units -----

    async def CreateOrgUnit(self, request: svc.CreateOrgUnitRequest, context: Ctx) -> res.OrgUnit:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        # The unit the caller must administer: the parent (a COMPANY: the tenant).
        parent = request.org_unit.parent
        parent_id = unit_reference(tenant_id, parent, "org_unit.parent") if parent else None
        await self.access.require_at(principal, tenant_id, _action("CreateOrgUnit"), parent_id)
        parent_id = validate_new_unit(tenant_id, request.org_unit_id, request.org_unit)
        key = self.org.key(
            tenant_id, principal, "CreateOrgUnit", request.request_id, request_hash(request)
        )
        created, position = await self.org.create_unit(
            key, request.org_unit_id, request.org_unit, parent_id
        )
        await servicing.send_token(context, position)
        return created

    async def GetOrgUnit(self, request: svc.GetOrgUnitRequest, context: Ctx) -> res.OrgUnit:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "orgUnits")
        await self.access.require_at(principal, name.tenant_id, _action("GetOrgUnit"), None)
        servicing.check_read_token(context)
        return await self.org.get_unit(name.tenant_id, name.id)

    async def ListOrgUnits(
        self, request: svc.ListOrgUnitsRequest, context: Ctx
    ) -> svc.ListOrgUnitsResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        await self.access.require_at(principal, tenant_id, _action("ListOrgUnits"), None)
        servicing.check_read_token(context)
        parent_id = (
            unit_reference(tenant_id, request.parent_org_unit, "parent_org_unit")
            if request.parent_org_unit
            else None
        )
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(tenant_id, parent_id)
        after = servicing.decode_page_token(request.page_token, fingerprint)
        units, token = servicing.cut_page(
            await self.org.list_units(tenant_id, parent_id, after, size + 1),
            size,
            fingerprint,
            servicing.name_id,
        )
        return svc.ListOrgUnitsResponse(org_units=units, next_page_token=token)

    async def UpdateOrgUnit(self, request: svc.UpdateOrgUnitRequest, context: Ctx) -> res.OrgUnit:
        """See the proto. Only ``display_name`` is updatable (kind is immutable, the parent
        changes by MoveOrgUnit)."""
        principal = rc.current().principal
        name = parse_name(principal, request.org_unit.name, "orgUnits", "org_unit.name")
        await self.access.require_at(principal, name.tenant_id, _action("UpdateOrgUnit"), name.id)
        servicing.check_mask(list(request.update_mask.paths), {"display_name"})
        violations = check_display_name(request.org_unit.display_name, "org_unit.display_name")
        if violations:
            raise InvalidArgument(violations)
        key = self.org.key(name.tenant_id, principal, "UpdateOrgUnit", "", request_hash(request))
        updated, position = await self.org.update_unit(
            key, name.id, request.org_unit.display_name, request.org_unit.etag
        )
        await servicing.send_token(context, position)
        return updated

    async def DeleteOrgUnit(
        self, request: svc.DeleteOrgUnitRequest, context: Ctx
    ) -> empty_pb2.Empty:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "orgUnits")
        await self.access.require_at(principal, name.tenant_id, _action("DeleteOrgUnit"), name.id)
        key = self.org.key(name.tenant_id, principal, "DeleteOrgUnit", "", request_hash(request))
        _, position = await self.org.delete_unit(key, name.id, request.etag)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()

    async def MoveOrgUnit(self, request: svc.MoveOrgUnitRequest, context: Ctx) -> res.OrgUnit:
        """See the proto. The caller administers the unit and the new parent."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "orgUnits")
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        if not request.new_parent:
            raise InvalidArgument(
                [FieldViolation("new_parent", "required: the unit to move under", "REQUIRED")]
            )
        new_parent = unit_reference(name.tenant_id, request.new_parent, "new_parent")
        for unit_id in (name.id, new_parent):
            await self.access.require_at(principal, name.tenant_id, _action("MoveOrgUnit"), unit_id)
        key = self.org.key(
            name.tenant_id, principal, "MoveOrgUnit", request.request_id, request_hash(request)
        )
        moved, position = await self.org.move_unit(key, name.id, new_parent, request.etag)
        await servicing.send_token(context, position)
        return moved

    # ----- role bindings -----

    async def CreateRoleBinding(
        self, request: svc.CreateRoleBindingRequest, context: Ctx
    ) -> res.RoleBinding:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        unit = request.role_binding.org_unit
        unit_id = unit_reference(tenant_id, unit, "role_binding.org_unit") if unit else None
        await self.access.require_at(principal, tenant_id, _action("CreateRoleBinding"), unit_id)
        unit_id = validate_binding(tenant_id, request.role_binding)
        key = self.org.key(
            tenant_id, principal, "CreateRoleBinding", request.request_id, request_hash(request)
        )
        created, position = await self.org.create_binding(key, request.role_binding, unit_id)
        await servicing.send_token(context, position)
        return created

    async def GetRoleBinding(
        self, request: svc.GetRoleBindingRequest, context: Ctx
    ) -> res.RoleBinding:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "roleBindings")
        await self.access.require_at(principal, name.tenant_id, _action("GetRoleBinding"), None)
        servicing.check_read_token(context)
        return await self.org.get_binding(name.tenant_id, name.id)

    async def ListRoleBindings(
        self, request: svc.ListRoleBindingsRequest, context: Ctx
    ) -> svc.ListRoleBindingsResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        await self.access.require_at(principal, tenant_id, _action("ListRoleBindings"), None)
        servicing.check_read_token(context)
        if request.subject and not SUBJECT.match(request.subject):
            raise InvalidArgument(
                [FieldViolation("subject", "users/{user} or agents/{agent}", "INVALID_SUBJECT")]
            )
        unit_id = (
            unit_reference(tenant_id, request.org_unit, "org_unit") if request.org_unit else None
        )
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(tenant_id, request.subject, unit_id)
        after = servicing.decode_page_token(request.page_token, fingerprint)
        bindings, token = servicing.cut_page(
            await self.org.list_bindings(
                tenant_id, request.subject or None, unit_id, after, size + 1
            ),
            size,
            fingerprint,
            servicing.name_id,
        )
        return svc.ListRoleBindingsResponse(role_bindings=bindings, next_page_token=token)

    async def DeleteRoleBinding(
        self, request: svc.DeleteRoleBindingRequest, context: Ctx
    ) -> empty_pb2.Empty:
        """See the proto. The caller administers the binding's unit (checked with the row,
        refused alike whether or not it exists)."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "roleBindings")
        key = self.org.key(
            name.tenant_id, principal, "DeleteRoleBinding", "", request_hash(request)
        )
        _, position = await self.org.delete_binding(key, principal, name.id)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()

    # ----- delegations -----

    async def CreateDelegation(
        self, request: svc.CreateDelegationRequest, context: Ctx
    ) -> res.Delegation:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        # For the delegation's user: its own space (or its agents'), or a tenant admin's.
        await self.access.require(
            principal,
            _action("CreateDelegation"),
            Resource.user_space(tenant_id, request.delegation.user_id),
        )
        parent_id = validate_delegation(tenant_id, request.delegation, datetime.now(UTC))
        key = self.org.key(
            tenant_id, principal, "CreateDelegation", request.request_id, request_hash(request)
        )
        created, position = await self.org.create_delegation(
            key, principal, request.delegation, parent_id
        )
        await servicing.send_token(context, position)
        return created

    async def GetDelegation(
        self, request: svc.GetDelegationRequest, context: Ctx
    ) -> res.Delegation:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "delegations")
        await self.access.require_at(principal, name.tenant_id, _action("GetDelegation"), None)
        servicing.check_read_token(context)
        return await self.org.get_delegation(name.tenant_id, name.id)

    async def ListDelegations(
        self, request: svc.ListDelegationsRequest, context: Ctx
    ) -> svc.ListDelegationsResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        await self.access.require_at(principal, tenant_id, _action("ListDelegations"), None)
        servicing.check_read_token(context)
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(
            tenant_id, request.user_id, request.agent_id, request.show_revoked
        )
        after = servicing.decode_page_token(request.page_token, fingerprint)
        delegations, token = servicing.cut_page(
            await self.org.list_delegations(
                tenant_id,
                request.user_id or None,
                request.agent_id or None,
                request.show_revoked,
                after,
                size + 1,
            ),
            size,
            fingerprint,
            servicing.name_id,
        )
        return svc.ListDelegationsResponse(delegations=delegations, next_page_token=token)

    async def RevokeDelegation(
        self, request: svc.RevokeDelegationRequest, context: Ctx
    ) -> res.Delegation:
        """See the proto. The delegating user, the agent that delegated onward, or a tenant
        admin revokes (checked with the row)."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "delegations")
        # Whose it is needs the row: the caller's own space here, the owner in the use case.
        await self.access.require(
            principal,
            _action("RevokeDelegation"),
            Resource.user_space(name.tenant_id, principal.user_id),
        )
        key = self.org.key(name.tenant_id, principal, "RevokeDelegation", "", request_hash(request))
        revoked, position = await self.org.revoke_delegation(key, principal, name.id)
        await servicing.send_token(context, position)
        return revoked

    # ----- snapshot -----

    async def GetAuthorizationSnapshot(
        self, request: svc.GetAuthorizationSnapshotRequest, context: Ctx
    ) -> res.AuthorizationSnapshot:
        """See the proto. Tenant admins and service principals only."""
        principal = rc.current().principal
        tenant_id = parse_snapshot_name(principal, request.name)
        await self.access.require(
            principal, _action("GetAuthorizationSnapshot"), Resource.tenant(tenant_id)
        )
        servicing.check_read_token(context)
        return await self.org.snapshot(tenant_id)


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = OrganizationServicer(deps)
    svc_grpc.add_OrganizationServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer)


SPEC = ServicerSpec(SERVICE_NAME, _build)
