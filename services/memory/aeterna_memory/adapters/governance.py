"""Governance's ``ApprovalService`` as the :class:`~aeterna_memory.ports.PromotionApprovals`
port: requests of type ``MEMORY_PROMOTION`` over :class:`aeterna_common.approvals.ApprovalsClient`
(the service's own token; the calls go where the authorization directory's calls go)."""

from __future__ import annotations

from aeterna.governance.v1 import resources_pb2 as gres
from aeterna_common.approvals import ApprovalsClient, state_name, type_name
from aeterna_common.auth import ServiceCredentials
from google.protobuf import json_format

from aeterna_memory.domain.promotion import Approval, PromotionRequest


def approval_from_pb(pb: gres.ApprovalRequest) -> Approval:
    """Governance's message as memory's :class:`Approval` (enum names without prefixes;
    numbers in the payload arrive as floats, as JSON has them)."""
    return Approval(
        name=pb.name,
        type=type_name(pb),
        state=state_name(pb),
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
        self.client = ApprovalsClient(target, credentials)

    async def ask(self, request: PromotionRequest) -> Approval:
        """See :class:`~aeterna_memory.ports.PromotionApprovals`: a SINGLE request at the
        target unit (one approval by a user who may decide there, e.g. a team's TECH_LEAD).

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``FAILED_PRECONDITION`` when the
                unit no longer exists) or could not be reached.
        """
        pb = await self.client.open_single(
            tenant_id=request.tenant_id,
            type=gres.APPROVAL_TYPE_MEMORY_PROMOTION,
            unit=request.target_unit,
            target=request.memory,
            title=request.title,
            payload=request.payload(),
            request_id=request.request_id,
        )
        return approval_from_pb(pb)

    async def get(self, name: str) -> Approval:
        """See :class:`~aeterna_memory.ports.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused (``NOT_FOUND``) or could not be reached.
        """
        return approval_from_pb(await self.client.get(name))

    async def close(self) -> None:
        """Close the channel."""
        await self.client.close()
