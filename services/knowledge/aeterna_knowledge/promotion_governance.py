"""Governance's ``ApprovalService`` over gRPC: the
:class:`~aeterna_knowledge.promotion.PromotionApprovals` port (memory's
``adapters/governance.py`` pattern).

Opening, reading and withdrawing requests carry the service's own token (a service
principal, ``services/knowledge``; ``service-approval-requests`` in ``governance.cedar``) and
go where the authorization directory's calls go (``AETERNA_AUTHZ_DIRECTORY_URL``: the pod's
sidecar in Kubernetes, the gateway locally). A decision carries the deciding user's own
verified bearer token, so that governance records that user as the approver and checks their
authority (``approval:decide`` at the request's unit) itself. A create sends its
``request_id`` as ``x-aeterna-request-id`` too, so that the route may retry it: governance
answers a retry with the request it opened first; decisions are idempotent per approver.
"""

from __future__ import annotations

from typing import Any

import grpc
from aeterna.governance.v1 import approval_service_pb2 as asvc
from aeterna.governance.v1 import approval_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna_common.auth import ServiceCredentials
from google.protobuf import struct_pb2

REQUEST_ID_KEY = "x-aeterna-request-id"
"""The header a retryable write carries its request id in (the gateway's retry rule)."""

CALL_TIMEOUT_S = 5.0
"""Deadline of one call in seconds (the edge's per-try timeout is 10 s)."""


def _state(pb: gres.ApprovalRequest) -> str:
    return gres.ApprovalState.Name(pb.state).removeprefix("APPROVAL_STATE_")


class GovernanceApprovals:
    """Approval requests of type ``KNOWLEDGE`` for promotions.

    Args:
        target: ``host:port`` of governance, or of the sidecar or edge routing to it.
        credentials: This service's token, sent as the bearer token of its own calls.
    """

    def __init__(self, target: str, credentials: ServiceCredentials) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = asvc_grpc.ApprovalServiceStub(self.channel)
        self.credentials = credentials

    async def ask(
        self,
        tenant_id: str,
        target_unit: str,
        source: str,
        title: str,
        payload: dict[str, Any],
        request_id: str,
    ) -> tuple[str, str]:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`: a SINGLE request at
        the target unit (one approval by a user who may decide there: a team's TECH_LEAD, an
        organization's ARCHITECT, the company's ADMIN, or a tenant admin).

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        body = struct_pb2.Struct()
        body.update(payload)
        pb = await self.stub.CreateApprovalRequest(
            asvc.CreateApprovalRequestRequest(
                parent=f"tenants/{tenant_id}",
                approval_request=gres.ApprovalRequest(
                    type=gres.APPROVAL_TYPE_KNOWLEDGE,
                    mode=gres.APPROVAL_MODE_SINGLE,
                    org_unit=f"tenants/{tenant_id}/orgUnits/{target_unit}",
                    target=source,
                    title=title[:200],
                    payload=body,
                ),
                request_id=request_id,
            ),
            metadata=(*await self.credentials.metadata(), (REQUEST_ID_KEY, request_id)),
            timeout=CALL_TIMEOUT_S,
        )
        return pb.name, _state(pb)

    async def state(self, name: str) -> str:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        pb = await self.stub.GetApprovalRequest(
            asvc.GetApprovalRequestRequest(name=name),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return _state(pb)

    async def decide(self, name: str, approve: bool, authorization: str, comment: str) -> str:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``PERMISSION_DENIED``: the caller
                may not decide at the unit) or could not be reached.
        """
        # Governance's decisions are idempotent per approver, so a retried one is harmless.
        metadata = (("authorization", authorization),)
        if approve:
            pb = await self.stub.ApproveApprovalRequest(
                asvc.ApproveApprovalRequestRequest(name=name, comment=comment),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
        else:
            pb = await self.stub.RejectApprovalRequest(
                asvc.RejectApprovalRequestRequest(name=name, comment=comment or "rejected"),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
        return _state(pb)

    async def cancel(self, name: str) -> None:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`.

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
