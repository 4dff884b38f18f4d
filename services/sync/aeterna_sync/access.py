"""Authorization of sync's RPCs with the shared permission model
(:mod:`aeterna_common.authz`, policies ``sync.cedar`` and ``tenant.cedar``).

A room is decided as the resource whose data it shows (:func:`aeterna_sync.rooms.room_resource`):
``tenant`` as every piece of the tenant's data, ``user:{u}`` as u's own memories, a unit
room as the unit. Decisions never look anything up but the caller's bindings, and are made
before any stream is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from aeterna_common.authz import Authorizer, DirectoryCache, Resource
from aeterna_common.context import Principal

from aeterna_sync.rooms import room_resource

SERVICE = "aeterna.sync.v1.SyncService"


def action(name: str) -> str:
    """The action of an RPC: its full method name."""
    return f"{SERVICE}/{name}"


class Access:
    """Sync's authorization checks over one :class:`Authorizer` per replica.

    Args:
        authorizer: The replica's authorizer (bindings from governance, cached).
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def require_rooms(
        self, principal: Principal, tenant_id: str, rpc: str, rooms: Sequence[str]
    ) -> None:
        """Refuse ``rpc`` unless the caller may read every room (all or none).

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``.
        """
        resources = [room_resource(tenant_id, r) for r in rooms]
        await self.authorizer.authorize(principal, action(rpc), *resources)

    async def require_tenant(self, principal: Principal, tenant_id: str, rpc: str) -> None:
        """Refuse a tenant-level ``rpc`` (status, cycles, conflicts, devices) unless allowed.

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``.
        """
        await self.authorizer.authorize(principal, action(rpc), Resource.tenant(tenant_id))

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's cached bindings (a binding changed): the next decision fetches
        them again."""
        cache = self.authorizer.directory
        if isinstance(cache, DirectoryCache):
            cache.invalidate(tenant_id)
