"""Authorization of knowledge's RPCs with the shared permission model
(:mod:`aeterna_common.authz`, policies ``knowledge.cedar`` and ``tenant.cedar``).

An item of layer PROJECT, TEAM, ORG or COMPANY is the resource of its org unit, of the
layer's kind: the kind comes from the item (or the request), never from a lookup, so every
decision is made before the item is read. An RPC on an existing item is decided on the
item's unit; on a name that does not exist, on every piece of the tenant's data
(:meth:`Resource.tenant_data`, tenant admins only), so a caller without rights gets the same
``PERMISSION_DENIED`` whether or not the item exists (permission before existence).
"""

from __future__ import annotations

from collections.abc import Sequence

from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.authz import Authorizer, Resource, UnitKind
from aeterna_common.context import Principal

SERVICE = "aeterna.knowledge.v1.KnowledgeService"

UNIT_KIND: dict[int, UnitKind] = {
    res.KNOWLEDGE_LAYER_PROJECT: UnitKind.PROJECT,
    res.KNOWLEDGE_LAYER_TEAM: UnitKind.TEAM,
    res.KNOWLEDGE_LAYER_ORG: UnitKind.ORGANIZATION,
    res.KNOWLEDGE_LAYER_COMPANY: UnitKind.COMPANY,
}
"""The org unit kind of each knowledge layer (DOMAIN.md: layers are the org tree's levels)."""


def action(name: str) -> str:
    """The action of an RPC: its full method name."""
    return f"{SERVICE}/{name}"


class Access:
    """Knowledge's authorization checks over one :class:`Authorizer` per replica.

    Args:
        authorizer: The replica's authorizer (bindings from governance, cached).
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def require_unit(
        self, principal: Principal, tenant_id: str, rpc: str, layer: int, unit_id: str
    ) -> None:
        """Refuse RPC ``rpc`` on the items of ``unit_id`` at ``layer`` unless allowed.

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``.
        """
        resource = Resource.unit(tenant_id, UNIT_KIND[layer], unit_id)
        await self.authorizer.authorize(principal, action(rpc), resource)

    async def require_everything(self, principal: Principal, tenant_id: str, rpc: str) -> None:
        """Refuse ``rpc`` unless allowed on every piece of the tenant's data (what a name
        that does not exist is decided on).

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``.
        """
        await self.authorizer.authorize(principal, action(rpc), Resource.tenant_data(tenant_id))

    async def unit_kind(self, tenant_id: str, unit_id: str) -> UnitKind | None:
        """The kind of ``unit_id`` in the tenant's tree, or None when it is not there."""
        cache = self.authorizer.directory
        snapshot = await cache.get(tenant_id) if cache is not None else None
        found = next((u for u in snapshot.units if u.id == unit_id), None) if snapshot else None
        return found.kind if found else None

    async def readable_units(
        self, principal: Principal, tenant_id: str, rpc: str
    ) -> Sequence[str] | None:
        """The units whose items ``rpc`` may read, or None for every unit (tenant-wide
        rights)."""
        if await self.authorizer.allowed(principal, action(rpc), Resource.tenant_data(tenant_id)):
            return None
        cache = self.authorizer.directory
        snapshot = await cache.get(tenant_id) if cache is not None else None
        units = list(snapshot.units) if snapshot else []
        verdicts = await self.authorizer.decide(
            principal, action(rpc), [Resource.unit(tenant_id, u.kind, u.id) for u in units]
        )
        return [u.id for u, ok in zip(units, verdicts, strict=True) if ok]
