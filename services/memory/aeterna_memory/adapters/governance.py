"""Governance's ``ApprovalService`` over gRPC: the
:class:`~aeterna_memory.ports.PromotionApprovals` port.

Calls carry the service's own token (a service principal, ``services/memory``; the policies
let services open and read approval requests, ``service-approval-requests`` in
``governance.cedar``) and go where the authorization directory's calls go
(``AETERNA_AUTHZ_DIRECTORY_URL``: the pod's sidecar in Kubernetes, the gateway locally).
A create sends its ``request_id`` as ``x-aeterna-request-id`` too, so that the route may
retry it on any transient failure: governance answers a retry with the request it opened
first.
"""

from __future__ import annotations

import grpc
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna_common.auth import ServiceCredentials
from aeterna_common.telemetry import client_interceptors
from google.protobuf import json_format, struct_pb2

from aeterna_memory.domain.promotion import Approval, PromotionRequest
from aeterna_memory.servicer import REQUEST_ID_KEY

CALL_TIMEOUT_S = 5.0
"""Deadline of one call in seconds (the edge's per-try timeout is 10 s; a job or the
consumer tries again later)."""


def approval_from_pb(pb: gres.ApprovalRequest) -> Approval:
    """Governance's message as memory's :class:`Approval` (enum names without prefixes;
    numbers in the payload arrive as floats, as JSON has them)."""
    return Approval(
        name=pb.name,
        type=gres.ApprovalType.Name(pb.type).removeprefix("APPROVAL_TYPE_"),
        state=gres.ApprovalState.Name(pb.state).removeprefix("APPROVAL_STATE_"),
        target=pb.target,
        payload=json_format.MessageToDict(pb.payload),
    )


class GovernanceApprovals:
    """Opens and reads approval requests of type ``MEMORY_PROMOTION``.

    Args:
        target: ``host:port`` of governance, or of the sidecar or edge routing to it.
        credentials: This service's token, sent as the bearer token of each call.
    """

    def __init__(self, target: str, credentials: ServiceCredentials) -> None:
        # The trace continues in governance (W3C traceparent metadata).
        self.channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
        self.stub = asvc_grpc.ApprovalServiceStub(self.channel)
        self.credentials = credentials

    async def ask(self, request: PromotionRequest) -> Approval:
        """See :class:`~aeterna_memory.ports.PromotionApprovals`: a SINGLE request at the
        target unit (one approval by a user who may decide there, e.g. a team's TECH_LEAD).

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``FAILED_PRECONDITION`` when the
                unit no longer exists) or could not be reached.
        """
        payload = struct_pb2.Struct()
        payload.update(request.payload())
        pb = await self.stub.CreateApprovalRequest(
            asvc.CreateApprovalRequestRequest(
                parent=f"tenants/{request.tenant_id}",
                approval_request=gres.ApprovalRequest(
                    type=gres.APPROVAL_TYPE_MEMORY_PROMOTION,
                    mode=gres.APPROVAL_MODE_SINGLE,
                    org_unit=f"tenants/{request.tenant_id}/orgUnits/{request.target_unit}",
                    target=request.memory,
                    title=request.title,
                    payload=payload,
                ),
                request_id=request.request_id,
            ),
            metadata=(*await self.credentials.metadata(), (REQUEST_ID_KEY, request.request_id)),
            timeout=CALL_TIMEOUT_S,
        )
        return approval_from_pb(pb)

    async def get(self, name: str) -> Approval:
        """See :class:`~aeterna_memory.ports.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused (``NOT_FOUND``) or could not be reached.
        """
        pb = await self.stub.GetApprovalRequest(
            asvc.GetApprovalRequestRequest(name=name),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return approval_from_pb(pb)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
