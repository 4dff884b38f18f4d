"""Governance's ``ApprovalService`` over gRPC, as the services that open approval requests use
it (memory's team promotions, knowledge's promotions).

Opening, reading and withdrawing requests carry the service's own token (a service principal;
``service-approval-requests`` in ``governance.cedar``) and go where the authorization
directory's calls go (``AETERNA_AUTHZ_DIRECTORY_URL``: the pod's sidecar in Kubernetes, the
gateway locally). A decision carries the deciding user's own verified bearer token, so that
governance records that user as the approver and checks their authority itself. A create sends
its ``request_id`` as ``x-aeterna-request-id`` too, so that the route may retry it on any
transient failure: governance answers a retry with the request it opened first, and decisions
are idempotent per approver. The trace continues in governance (W3C ``traceparent``).
"""

from __future__ import annotations

from typing import Any

import grpc
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from google.protobuf import struct_pb2

from aeterna_common.auth import ServiceCredentials
from aeterna_common.servicing import REQUEST_ID_KEY
from aeterna_common.telemetry import client_interceptors

CALL_TIMEOUT_S = 5.0
"""Deadline of one call in seconds (the edge's per-try timeout is 10 s; a job or consumer
tries again later)."""


def state_name(pb: gres.ApprovalRequest) -> str:
    """The request's state without its enum prefix, e.g. ``PENDING``."""
    return gres.ApprovalState.Name(pb.state).removeprefix("APPROVAL_STATE_")


def type_name(pb: gres.ApprovalRequest) -> str:
    """The request's type without its enum prefix, e.g. ``MEMORY_PROMOTION``."""
    return gres.ApprovalType.Name(pb.type).removeprefix("APPROVAL_TYPE_")


class ApprovalsClient:
    """Opens, reads, decides and withdraws governance approval requests.

    Args:
        target: ``host:port`` of governance, or of the sidecar or edge routing to it.
        credentials: This service's token, sent as the bearer token of its own calls.
    """

    def __init__(self, target: str, credentials: ServiceCredentials) -> None:
        self.channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
        self.stub = asvc_grpc.ApprovalServiceStub(self.channel)
        self.credentials = credentials

    async def open_single(
        self,
        *,
        tenant_id: str,
        type: gres.ApprovalType.ValueType,
        unit: str,
        target: str,
        title: str,
        payload: dict[str, Any],
        request_id: str,
    ) -> gres.ApprovalRequest:
        """Open a SINGLE request (one approval by a user who may decide at ``unit``).

        Args:
            tenant_id: The tenant.
            type: The approval type, e.g. ``APPROVAL_TYPE_KNOWLEDGE``.
            unit: The org unit id the decision belongs to.
            target: The resource name the request is about.
            title: A short title (at most 200 characters are sent).
            payload: JSON-like details (numbers come back as floats).
            request_id: Idempotency key: a retry returns the request opened first.

        Returns:
            Governance's request.

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``FAILED_PRECONDITION`` when the
                unit no longer exists) or could not be reached.
        """
        body = struct_pb2.Struct()
        body.update(payload)
        return await self.stub.CreateApprovalRequest(
            asvc.CreateApprovalRequestRequest(
                parent=f"tenants/{tenant_id}",
                approval_request=gres.ApprovalRequest(
                    type=type,
                    mode=gres.APPROVAL_MODE_SINGLE,
                    org_unit=f"tenants/{tenant_id}/orgUnits/{unit}",
                    target=target,
                    title=title[:200],
                    payload=body,
                ),
                request_id=request_id,
            ),
            metadata=(*await self.credentials.metadata(), (REQUEST_ID_KEY, request_id)),
            timeout=CALL_TIMEOUT_S,
        )

    async def get(self, name: str) -> gres.ApprovalRequest:
        """Read a request by name.

        Raises:
            grpc.aio.AioRpcError: Governance refused (``NOT_FOUND``) or could not be reached.
        """
        return await self.stub.GetApprovalRequest(
            asvc.GetApprovalRequestRequest(name=name),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )

    async def decide(
        self, name: str, *, approve: bool, authorization: str, comment: str
    ) -> gres.ApprovalRequest:
        """Approve or reject as the user whose ``authorization`` header value is given.

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``PERMISSION_DENIED``: the user
                may not decide at the unit) or could not be reached.
        """
        metadata = (("authorization", authorization),)
        if approve:
            return await self.stub.ApproveApprovalRequest(
                asvc.ApproveApprovalRequestRequest(name=name, comment=comment),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
        return await self.stub.RejectApprovalRequest(
            asvc.RejectApprovalRequestRequest(name=name, comment=comment or "rejected"),
            metadata=metadata,
            timeout=CALL_TIMEOUT_S,
        )

    async def cancel(self, name: str) -> None:
        """Withdraw a request this service opened.

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        await self.stub.CancelApprovalRequest(
            asvc.CancelApprovalRequestRequest(name=name),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
