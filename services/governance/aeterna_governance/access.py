"""Authorization of governance's RPCs with the shared permission model
(:mod:`aeterna_common.authz`): the Cedar policies (``governance.cedar``, ``tenant.cedar``)
decide, before any lookup of the resource.

Governance is the source of the bindings, so its authorizer's :class:`OwnTablesDirectory`
reads its own tables in process (the snapshot
:func:`~aeterna_governance.organization.read_snapshot` that ``GetAuthorizationSnapshot``
serves to other services), never through a gRPC call to itself. The snapshots are cached
per tenant as in every service
(:class:`~aeterna_common.authz.DirectoryCache`): a write of this replica invalidates its
tenant at once (:meth:`Access.written`); the other replicas learn of it from the tenant's
events on Redis, or at the latest when the TTL runs out.

Resources: a unit the action is about is ``Resource.unit`` of its kind in the cached tree;
a unit that is not in the tree (missing, or not yet seen) is the entity standing for any
unit missing from the tree, which only tenant-wide bindings reach, so the caller is refused
exactly as for an existing unit it may not manage (permission before existence).
Tenant-level resources (the tree itself, tenant-wide bindings, snapshots) are
``Resource.tenant``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aeterna_common.authz import Authorizer, Resource, Snapshot, UnitKind, denied
from aeterna_common.authz.governance import snapshot_from_pb
from aeterna_common.context import Principal

if TYPE_CHECKING:
    from aeterna.governance.v1 import resources_pb2 as res

__all__ = ["Access", "OwnTablesDirectory", "denied", "method"]

ORGANIZATION = "aeterna.governance.v1.OrganizationService"
APPROVALS = "aeterna.governance.v1.ApprovalService"


def method(service: str, name: str) -> str:
    """The action of an RPC: its full method name, ``{service}/{name}``."""
    return f"{service}/{name}"


class OwnTablesDirectory:
    """The :class:`~aeterna_common.authz.Directory` of governance itself: the snapshot read
    from its own tables (one REPEATABLE READ transaction), converted as a remote directory
    converts governance's reply.

    Args:
        read: Reads a tenant's snapshot message
            (:func:`aeterna_governance.organization.read_snapshot` over the app pool).
    """

    def __init__(self, read: Callable[[str], Awaitable[res.AuthorizationSnapshot]]) -> None:
        self.read = read

    async def snapshot(self, tenant_id: str) -> Snapshot:
        """See :class:`~aeterna_common.authz.Directory`.

        Raises:
            asyncpg.PostgresError: The database failed (the cache treats it as an outage).
        """
        return snapshot_from_pb(tenant_id, await self.read(tenant_id))


class Access:
    """Governance's authorization checks over one :class:`Authorizer` per replica.

    Args:
        authorizer: The replica's authorizer; its ``directory`` is the cache over
            :class:`OwnTablesDirectory`.
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def _units(self, tenant_id: str) -> Snapshot | None:
        cache = self.authorizer.directory
        return await cache.get(tenant_id) if cache is not None else None

    async def prefetch(self, tenant_id: str) -> None:
        """Have the tenant's snapshot cached before a transaction that decides with it: a
        fetch inside would hold the transaction's connection while taking another one from
        the same pool."""
        await self._units(tenant_id)

    async def unit(self, tenant_id: str, unit_id: str | None) -> Resource:
        """The resource of unit ``unit_id`` (None: the tenant itself), as the module
        docstring says; a unit missing from the tree stands for any missing unit."""
        if unit_id is None:
            return Resource.tenant(tenant_id)
        snapshot = await self._units(tenant_id)
        found = next((u for u in snapshot.units if u.id == unit_id), None) if snapshot else None
        # Any kind will do for a missing unit: every kind's missing entity has only the
        # tenant-wide grants.
        return Resource.unit(tenant_id, found.kind if found else UnitKind.PROJECT, unit_id)

    async def company(self, tenant_id: str) -> Resource:
        """The tenant's company unit (the root of its tree), or the tenant itself when the tree
        has no single company: what tenant-wide data such as the audit log belongs to."""
        snapshot = await self._units(tenant_id)
        roots = [u for u in (snapshot.units if snapshot else ()) if u.kind is UnitKind.COMPANY]
        if len(roots) != 1:
            return Resource.tenant(tenant_id)
        return Resource.unit(tenant_id, UnitKind.COMPANY, roots[0].id)

    async def require(self, principal: Principal, action: str, resource: Resource) -> None:
        """Refuse ``action`` unless allowed; made before any lookup.

        Args:
            principal: The caller (from the verified token).
            action: Full method name (:func:`method`).
            resource: What the action is about.

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``, ``metadata.action`` = action.
            Unavailable: The bindings could not be read (reason
                ``AUTHORIZATION_DIRECTORY_UNAVAILABLE``).
        """
        await self.authorizer.authorize(principal, action, resource)

    async def require_at(
        self, principal: Principal, tenant_id: str, action: str, unit_id: str | None
    ) -> None:
        """:meth:`require` on unit ``unit_id`` of ``tenant_id`` (None: the tenant)."""
        await self.require(principal, action, await self.unit(tenant_id, unit_id))

    async def require_in_tree(
        self, principal: Principal, tenant_id: str, action: str, unit_id: str | None
    ) -> None:
        """Refuse a read of unit ``unit_id``'s policies unless ``action`` is allowed on the
        unit or on a unit below it: a unit's rules hold below it, so whoever reads a unit
        below reads them too. Each unit is decided by the policies; without a unit (every
        unit's data at once) only tenant-wide rights do.

        Raises:
            PermissionDenied: As :meth:`require`.
        """
        if unit_id is None:
            resources = [Resource.tenant_data(tenant_id)]
        else:
            snapshot = await self._units(tenant_id)
            units = list(snapshot.units) if snapshot else []
            below = {unit_id}
            for _ in range(len(UnitKind)):  # the tree is at most four levels deep
                below |= {u.id for u in units if u.parent_id in below}
            resources = [await self.unit(tenant_id, unit_id)] + [
                Resource.unit(tenant_id, u.kind, u.id)
                for u in units
                if u.id in below and u.id != unit_id
            ]
        if not any(await self.authorizer.decide(principal, action, resources)):
            raise denied(action)

    async def allowed_at(
        self, principal: Principal, tenant_id: str, action: str, unit_id: str | None
    ) -> bool:
        """Whether ``action`` on unit ``unit_id`` (None: the tenant) is allowed."""
        return await self.authorizer.allowed(principal, action, await self.unit(tenant_id, unit_id))

    async def tenant_admin(self, principal: Principal, tenant_id: str, action: str) -> bool:
        """Whether ``action`` is allowed on every piece of data of the tenant: what only
        tenant-wide rights give (TENANT_ADMIN, or a policy that says so)."""
        return await self.authorizer.allowed(principal, action, Resource.tenant_data(tenant_id))

    async def units_allowed(
        self, principal: Principal, tenant_id: str, action: str
    ) -> Sequence[str]:
        """The ids of the tenant's units on which ``action`` is allowed (one batch)."""
        snapshot = await self._units(tenant_id)
        units = list(snapshot.units) if snapshot else []
        verdicts = await self.authorizer.decide(
            principal, action, [Resource.unit(tenant_id, u.kind, u.id) for u in units]
        )
        return [u.id for u, ok in zip(units, verdicts, strict=True) if ok]

    async def users_allowed(self, tenant_id: str, action: str, unit_id: str | None) -> list[str]:
        """The bound users (``users/{u}``) allowed ``action`` on unit ``unit_id`` (None: the
        tenant), sorted: e.g. the approvers of a unit. Token roles never count here."""
        snapshot = await self._units(tenant_id)
        subjects = sorted(
            {b.subject for b in snapshot.bindings if b.subject.startswith("users/")}
            if snapshot
            else set()
        )
        resource = await self.unit(tenant_id, unit_id)
        out = []
        for subject in subjects:
            user = Principal(tenant_id=tenant_id, user_id=subject.removeprefix("users/"))
            # Decided without trusted token roles: a stored principal has no token.
            if await self.authorizer.allowed(user, action, resource):
                out.append(subject)
        return out

    def written(self, tenant_id: str) -> None:
        """Forget the tenant's cached bindings after this replica changed them (committed)."""
        if self.authorizer.directory is not None:
            self.authorizer.directory.invalidate(tenant_id)
