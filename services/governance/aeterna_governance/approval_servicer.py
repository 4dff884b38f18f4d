"""gRPC servicer of ``aeterna.governance.v1.ApprovalService``: thin, protobuf ⇄ use cases
(:mod:`.approvals`). Tenant check, then authorization, then validation, then the use case;
decisions and cancellations are authorized with the request's row, refused alike whether or
not it exists."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import grpc
from aeterna.governance.v1 import approval_service_pb2 as svc
from aeterna.governance.v1 import approval_service_pb2_grpc as svc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.authz import Resource
from aeterna_common.errors import FieldViolation, InvalidArgument
from aeterna_common.names import parse_name, parse_parent
from aeterna_common.servicing import Ctx

from aeterna_governance.access import method
from aeterna_governance.approvals import (
    DECIDE,
    Approvals,
    check_comment,
    requester_of,
    validate_request,
)
from aeterna_governance.deps import Deps, Registered, ServicerSpec
from aeterna_governance.store import WriteKey, request_hash

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["ApprovalService"].full_name


def _action(name: str) -> str:
    return method(SERVICE_NAME, name)


def _page_key(request: res.ApprovalRequest) -> str:
    # Newest first: the keyset is (create time, id), both descending.
    when = request.create_time.ToDatetime(tzinfo=UTC).isoformat()
    return f"{when}|{servicing.name_id(request)}"


def _after(token: str, fingerprint: str) -> tuple[datetime, uuid.UUID] | None:
    raw = servicing.decode_page_token(token, fingerprint)
    if raw is None:
        return None
    try:
        when, _, rid = raw.partition("|")
        return datetime.fromisoformat(when), uuid.UUID(rid)
    except ValueError as exc:
        raise InvalidArgument([FieldViolation("page_token", "malformed page token")]) from exc


class ApprovalServicer(svc_grpc.ApprovalServiceServicer):
    """``ApprovalService`` over :class:`~aeterna_governance.approvals.Approvals`."""

    def __init__(self, deps: Deps) -> None:
        self.access = deps.access
        self.idempotency_ttl_s = deps.settings.idempotency_ttl_s
        self.approvals = Approvals(
            deps.db,
            deps.indexer,
            deps.access,
            ttl_s=deps.settings.approval_ttl_s,
            idempotency_ttl_s=deps.settings.idempotency_ttl_s,
        )

    async def CreateApprovalRequest(
        self, request: svc.CreateApprovalRequestRequest, context: Ctx
    ) -> res.ApprovalRequest:
        """See the proto. Any principal of the tenant, or a service, may ask."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        await self.access.require(
            principal, _action("CreateApprovalRequest"), Resource.tenant(tenant_id)
        )
        unit_id, mode, required, risk = validate_request(tenant_id, request.approval_request)
        requester = requester_of(principal)
        key = WriteKey(
            tenant_id,
            requester,
            "CreateApprovalRequest",
            request.request_id,
            request_hash(request),
            self.idempotency_ttl_s,
        )
        created, position = await self.approvals.create(
            key, request.approval_request, unit_id, mode, required, risk
        )
        await servicing.send_token(context, position)
        return created

    async def GetApprovalRequest(
        self, request: svc.GetApprovalRequestRequest, context: Ctx
    ) -> res.ApprovalRequest:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "approvalRequests")
        await self.access.require(
            principal, _action("GetApprovalRequest"), Resource.tenant(name.tenant_id)
        )
        servicing.check_read_token(context)
        return await self.approvals.get(name.tenant_id, name.id)

    async def ListApprovalRequests(
        self, request: svc.ListApprovalRequestsRequest, context: Ctx
    ) -> svc.ListApprovalRequestsResponse:
        """See the proto. Newest first."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        await self.access.require(
            principal, _action("ListApprovalRequests"), Resource.tenant(tenant_id)
        )
        servicing.check_read_token(context)
        if request.state not in res.ApprovalState.values():
            raise InvalidArgument([FieldViolation("state", "unknown state", "INVALID_STATE")])
        size = servicing.page_size(request.page_size)
        fingerprint = base64.urlsafe_b64encode(
            f"{tenant_id}|{request.state}|{request.awaiting_me}|{principal.actor}".encode()
        ).decode()[:64]
        after = _after(request.page_token, fingerprint)
        found, token = servicing.cut_page(
            await self.approvals.list(
                principal, tenant_id, request.state, request.awaiting_me, after, size + 1
            ),
            size,
            fingerprint,
            _page_key,
        )
        return svc.ListApprovalRequestsResponse(approval_requests=found, next_page_token=token)

    async def ApproveApprovalRequest(
        self, request: svc.ApproveApprovalRequestRequest, context: Ctx
    ) -> res.ApprovalRequest:
        """See the proto."""
        return await self._decide(request.name, True, request.comment, context)

    async def RejectApprovalRequest(
        self, request: svc.RejectApprovalRequestRequest, context: Ctx
    ) -> res.ApprovalRequest:
        """See the proto. A rejection needs a comment."""
        return await self._decide(request.name, False, request.comment, context)

    async def _decide(
        self, name_text: str, approve: bool, comment: str, context: Ctx
    ) -> res.ApprovalRequest:
        principal = rc.current().principal
        name = parse_name(principal, name_text, "approvalRequests")
        if principal.is_service:
            await self.access.require(principal, DECIDE, Resource.tenant(name.tenant_id))
        check_comment(comment, required=not approve)
        decided, position = await self.approvals.decide(
            principal, name.tenant_id, name.id, approve, comment
        )
        await servicing.send_token(context, position)
        return decided

    async def CancelApprovalRequest(
        self, request: svc.CancelApprovalRequestRequest, context: Ctx
    ) -> res.ApprovalRequest:
        """See the proto. The requester or a tenant admin cancels."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "approvalRequests")
        await self.access.require(
            principal, _action("CancelApprovalRequest"), Resource.tenant(name.tenant_id)
        )
        cancelled, position = await self.approvals.cancel(principal, name.tenant_id, name.id)
        await servicing.send_token(context, position)
        return cancelled


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = ApprovalServicer(deps)
    svc_grpc.add_ApprovalServiceServicer_to_server(servicer, server)
    expire = deps.under_lease(
        "governance:approvals:expire",
        deps.settings.approval_expiry_interval_s,
        servicer.approvals.expire_due,
    )
    return Registered(servicer=servicer, background=[expire])


SPEC = ServicerSpec(SERVICE_NAME, _build)
