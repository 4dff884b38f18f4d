"""Governance's ``ApprovalService`` as the
:class:`~aeterna_knowledge.promotion.PromotionApprovals` port: requests of type ``KNOWLEDGE``
over :class:`aeterna_common.approvals.ApprovalsClient`. Opening, reading and withdrawing carry
the service's own token; a decision carries the deciding user's own bearer token, so that
governance records that user as the approver and checks ``approval:decide`` at the unit."""

from __future__ import annotations

from typing import Any

from aeterna.governance.v1 import resources_pb2 as gres
from aeterna_common.approvals import ApprovalsClient, state_name
from aeterna_common.auth import ServiceCredentials


class GovernanceApprovals:
    """Approval requests of type ``KNOWLEDGE`` for promotions.

    Args:
        target: ``host:port`` of governance, or of the sidecar or edge routing to it.
        credentials: This service's token, sent as the bearer token of its own calls.
    """

    def __init__(self, target: str, credentials: ServiceCredentials) -> None:
        self.client = ApprovalsClient(target, credentials)

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
        pb = await self.client.open_single(
            tenant_id=tenant_id,
            type=gres.APPROVAL_TYPE_KNOWLEDGE,
            unit=target_unit,
            target=source,
            title=title,
            payload=payload,
            request_id=request_id,
        )
        return pb.name, state_name(pb)

    async def state(self, name: str) -> str:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        return state_name(await self.client.get(name))

    async def decide(self, name: str, approve: bool, authorization: str, comment: str) -> str:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals` (decisions are
        idempotent per approver, so a retried one is harmless).

        Raises:
            grpc.aio.AioRpcError: Governance refused (e.g. ``PERMISSION_DENIED``: the caller
                may not decide at the unit) or could not be reached.
        """
        pb = await self.client.decide(
            name, approve=approve, authorization=authorization, comment=comment
        )
        return state_name(pb)

    async def cancel(self, name: str) -> None:
        """See :class:`~aeterna_knowledge.promotion.PromotionApprovals`.

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        await self.client.cancel(name)

    async def close(self) -> None:
        """Close the channel."""
        await self.client.close()
