"""Interim authorization of governance's RPCs: the one place every servicer asks "may the
caller do this?", before any lookup of the resource.

Until the shared permission model (``aeterna_common.authz``, Cedar policies over the org
tree and the bindings) is in place, this module decides with a small table: each action
names the least the caller must hold. Swapping it for ``aeterna_common.authz`` is one edit
of :meth:`Access.require`.

Requirements (roles are the proto's ``Role``; "admin" means ADMIN bound at the unit or at a
unit above it, inherited downward as DOMAIN.md says, or TENANT_ADMIN/PLATFORM_ADMIN):

* ``MEMBER``: any principal of the tenant (reads of the org tree, bindings, delegations and
  approval requests; creating an approval request).
* ``UNIT_ADMIN``: admin at the unit the action is about (org unit writes at the parent or
  the unit; binding writes at the binding's unit). A unit that does not exist has no
  admins above it, so the caller is refused exactly as for an existing unit it may not
  manage: permission before existence.
* ``UNIT_MEMBER``: any role from VIEWER to ADMIN bound in the unit's tree (at the unit, a
  unit above it or a unit below it: the rules of a unit hold below it), or a tenant-wide role
  (reading and checking policies, drift); without a unit, a tenant-wide role.
* ``TENANT_ADMIN``: TENANT_ADMIN or PLATFORM_ADMIN (tenant-wide bindings, reading the
  authorization snapshot); service principals may read snapshots of any tenant.

Roles in the token count only when ``trust_token_roles`` is set (development stacks); in
production every role comes from ``role_bindings``.
"""

from __future__ import annotations

import enum

import asyncpg
from aeterna_common.context import Principal
from aeterna_common.db import Database
from aeterna_common.errors import PermissionDenied

ACTION_NOT_ALLOWED = "ACTION_NOT_ALLOWED"
"""``ErrorInfo.reason`` of a refused action; ``ErrorInfo.metadata.action`` names it."""

ADMIN = 5
"""``ROLE_ADMIN``: the least role that manages a unit, its bindings and its approvals."""

TENANT_WIDE = (6, 7)
"""``ROLE_TENANT_ADMIN`` and ``ROLE_PLATFORM_ADMIN``: hold for the whole tenant."""

TENANT_WIDE_NAMES = frozenset({"TENANT_ADMIN", "PLATFORM_ADMIN"})


class Need(enum.Enum):
    """What an action requires (see the module docstring)."""

    MEMBER = "member"
    UNIT_MEMBER = "unit_member"
    UNIT_ADMIN = "unit_admin"
    TENANT_ADMIN = "tenant_admin"


ACTIONS: dict[str, Need] = {
    "governance.orgUnits.get": Need.MEMBER,
    "governance.orgUnits.list": Need.MEMBER,
    "governance.orgUnits.create": Need.UNIT_ADMIN,
    "governance.orgUnits.update": Need.UNIT_ADMIN,
    "governance.orgUnits.move": Need.UNIT_ADMIN,
    "governance.orgUnits.delete": Need.UNIT_ADMIN,
    "governance.roleBindings.get": Need.MEMBER,
    "governance.roleBindings.list": Need.MEMBER,
    "governance.roleBindings.create": Need.UNIT_ADMIN,
    "governance.roleBindings.delete": Need.UNIT_ADMIN,
    "governance.delegations.get": Need.MEMBER,
    "governance.delegations.list": Need.MEMBER,
    "governance.delegations.create": Need.MEMBER,
    "governance.delegations.revoke": Need.MEMBER,
    "governance.authorizationSnapshot.get": Need.TENANT_ADMIN,
    "governance.approvalRequests.get": Need.MEMBER,
    "governance.approvalRequests.list": Need.MEMBER,
    "governance.approvalRequests.create": Need.MEMBER,
    "governance.approvalRequests.decide": Need.UNIT_ADMIN,
    "governance.approvalRequests.cancel": Need.MEMBER,
    "governance.policies.get": Need.UNIT_MEMBER,
    "governance.policies.list": Need.UNIT_MEMBER,
    "governance.policies.create": Need.UNIT_ADMIN,
    "governance.policies.update": Need.UNIT_ADMIN,
    "governance.policies.delete": Need.UNIT_ADMIN,
    "governance.policies.check": Need.UNIT_MEMBER,
    "governance.driftReports.get": Need.UNIT_MEMBER,
    "governance.suppressions.list": Need.UNIT_MEMBER,
    "governance.suppressions.create": Need.UNIT_ADMIN,
    "governance.suppressions.delete": Need.UNIT_ADMIN,
    "governance.auditEntries.list": Need.TENANT_ADMIN,
    "governance.auditEntries.verify": Need.TENANT_ADMIN,
}
"""Every governance action and what it requires. Delegation writes and cancellations have
an owner check besides (the delegating user, the requester), made by their use cases."""

SERVICE_ACTIONS = frozenset(
    {
        "governance.authorizationSnapshot.get",
        "governance.approvalRequests.create",
        "governance.approvalRequests.get",
    }
)
"""Actions a service principal (a token without a tenant) may take in any tenant: services
authorize from snapshots and route memory promotions through approvals."""


def denied(action: str) -> PermissionDenied:
    """``PERMISSION_DENIED`` with reason :data:`ACTION_NOT_ALLOWED` and the action."""
    return PermissionDenied(
        f"the caller may not {action}", reason=ACTION_NOT_ALLOWED, metadata={"action": action}
    )


def subjects(principal: Principal) -> list[str]:
    """The binding subjects that stand for ``principal``: ``users/{u}``, or ``agents/{a}``
    for an agent (an agent's own bindings; its user's rights reach it only through
    delegations)."""
    if principal.agent_id:
        return [f"agents/{principal.agent_id}"]
    return [f"users/{principal.user_id}"]


ADMIN_AT_SQL = """
WITH RECURSIVE up(id, parent_id) AS (
    SELECT id, parent_id FROM org_units WHERE tenant_id = $1 AND id = $2
    UNION ALL
    SELECT o.id, o.parent_id FROM org_units o JOIN up ON o.tenant_id = $1 AND o.id = up.parent_id
)
SELECT EXISTS (
    SELECT 1 FROM role_bindings b
    WHERE b.tenant_id = $1 AND b.subject = ANY($3::text[])
      AND (b.role = ANY($5::smallint[])
           OR (b.role BETWEEN $4 AND 5 AND b.org_unit_id IN (SELECT id FROM up)))
)
"""
"""Whether the subjects hold a role of at least ``$4`` (up to ADMIN) at unit ``$2`` or above
it, or a tenant-wide role. The walk up is at most four rows (the tree's depth)."""


MEMBER_OF_TREE_SQL = """
WITH RECURSIVE up(id, parent_id) AS (
    SELECT id, parent_id FROM org_units WHERE tenant_id = $1 AND id = $2
    UNION ALL
    SELECT o.id, o.parent_id FROM org_units o JOIN up ON o.tenant_id = $1 AND o.id = up.parent_id
), down(id) AS (
    SELECT id FROM org_units WHERE tenant_id = $1 AND id = $2
    UNION ALL
    SELECT o.id FROM org_units o JOIN down ON o.tenant_id = $1 AND o.parent_id = down.id
)
SELECT EXISTS (
    SELECT 1 FROM role_bindings b
    WHERE b.tenant_id = $1 AND b.subject = ANY($3::text[])
      AND (b.role = ANY($4::smallint[])
           OR (b.role BETWEEN 1 AND 5 AND (b.org_unit_id IN (SELECT id FROM up)
                                           OR b.org_unit_id IN (SELECT id FROM down))))
)
"""
"""Whether the subjects hold a role from VIEWER to ADMIN at unit ``$2``, above it or below
it, or a tenant-wide role."""


class Access:
    """The interim authorization check (see the module docstring).

    Args:
        db: The application role's pool (bindings are read under the tenant's RLS).
        trust_token_roles: Honour TENANT_ADMIN/PLATFORM_ADMIN from the token's ``roles``
            claim (development only).
    """

    def __init__(self, db: Database, *, trust_token_roles: bool = False) -> None:
        self.db = db
        self.trust_token_roles = trust_token_roles

    def token_admin(self, principal: Principal) -> bool:
        """Whether the token's roles make the caller a tenant admin (when trusted)."""
        return self.trust_token_roles and bool(principal.roles & TENANT_WIDE_NAMES)

    async def holds(
        self,
        conn: asyncpg.Connection,
        principal: Principal,
        tenant_id: str,
        unit_id: str | None,
        min_role: int = ADMIN,
    ) -> bool:
        """Whether ``principal`` holds ``min_role`` or more at ``unit_id`` or above it (any
        tenant-wide role counts; ``unit_id`` None asks for a tenant-wide role).

        Args:
            conn: A connection in a transaction bound to ``tenant_id``.
            principal: The caller.
            tenant_id: The tenant.
            unit_id: The unit, or None.
            min_role: Least role of VIEWER (1) .. ADMIN (5).
        """
        if self.token_admin(principal):
            return True
        return bool(
            await conn.fetchval(
                ADMIN_AT_SQL,
                tenant_id,
                unit_id or "",
                subjects(principal),
                min_role if unit_id else 99,
                list(TENANT_WIDE),
            )
        )

    async def require(
        self, principal: Principal, tenant_id: str, action: str, *, unit_id: str | None = None
    ) -> None:
        """Refuse the action unless the caller may take it; made before any lookup.

        Args:
            principal: The caller (from the verified token).
            tenant_id: The tenant of the resource (already checked against the caller's).
            action: A key of :data:`ACTIONS`.
            unit_id: The unit the action is about (``UNIT_ADMIN`` and ``UNIT_MEMBER``
                actions); None for tenant-level resources, which only tenant admins manage.

        Raises:
            PermissionDenied: Reason ``ACTION_NOT_ALLOWED``, ``metadata.action`` = action.
            KeyError: ``action`` is not in :data:`ACTIONS` (a programming error).
        """
        need = ACTIONS[action]
        if principal.is_service:
            if action in SERVICE_ACTIONS:
                return
            raise denied(action)
        if principal.tenant_id != tenant_id:
            raise denied(action)
        if need is Need.MEMBER:
            return

        async def check(conn: asyncpg.Connection) -> bool:
            if need is Need.UNIT_MEMBER and unit_id is not None:
                return self.token_admin(principal) or bool(
                    await conn.fetchval(
                        MEMBER_OF_TREE_SQL,
                        tenant_id,
                        unit_id,
                        subjects(principal),
                        list(TENANT_WIDE),
                    )
                )
            return await self.holds(
                conn, principal, tenant_id, unit_id if need is Need.UNIT_ADMIN else None
            )

        if not await self.db.run(tenant_id, check, readonly=True):
            raise denied(action)
