"""Data of the permission model: the directory snapshot of a tenant and the resources checked.

No Cedar here: :mod:`aeterna_common.authz.engine` turns these into Cedar entities.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

UNIT_ROLES = ("VIEWER", "DEVELOPER", "TECH_LEAD", "ARCHITECT", "ADMIN", "AGENT")
"""Roles bound at an org unit (or tenant-wide) and inherited down the tree."""

TENANT_ROLES = ("TENANT_ADMIN", "PLATFORM_ADMIN")
"""Roles that hold for the whole tenant whatever unit their binding names."""

ROLES = (*UNIT_ROLES, *TENANT_ROLES)
"""Every role of the permission model (DOMAIN.md, Governance)."""

LOWER_ROLE: Mapping[str, str] = {
    "ADMIN": "ARCHITECT",
    "ARCHITECT": "TECH_LEAD",
    "TECH_LEAD": "DEVELOPER",
    "DEVELOPER": "VIEWER",
    "AGENT": "VIEWER",
}
"""Each unit role includes the next lower one (ADMIN ⊃ ARCHITECT ⊃ TECH_LEAD ⊃ DEVELOPER ⊃
VIEWER; AGENT ⊃ VIEWER): "writable by DEVELOPER" also admits the higher roles."""

MAX_DELEGATION_DEPTH = 3
"""Longest delegation chain user → agent → … honoured (DOMAIN.md, Governance); the policies
compare the depth with it."""


class UnitKind(enum.Enum):
    """Kinds of org units, broadest first; the value is the Cedar entity type's name."""

    COMPANY = "Company"
    ORGANIZATION = "Organization"
    TEAM = "Team"
    PROJECT = "Project"


@dataclass(frozen=True, slots=True)
class OrgUnit:
    """One unit of a tenant's tree.

    Attributes:
        id: Unit id, unique in the tenant; equal to the memory scope identifier of its layer
            (unit ``p1`` of kind PROJECT is memory ``project_id=p1``).
        kind: Its kind.
        parent_id: The enclosing unit, or None for a company.
    """

    id: str
    kind: UnitKind
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class RoleBinding:
    """A role held by a user or an agent.

    Attributes:
        subject: ``users/{user}`` or ``agents/{agent}``.
        role: One of :data:`ROLES`.
        unit_id: Where it is bound (inherited by every unit below); None means tenant-wide.
    """

    subject: str
    role: str
    unit_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delegation:
    """An agent acting for a user with some capabilities (action groups).

    Attributes:
        id: Delegation id, unique in the tenant.
        user_id: The user the agent acts for.
        agent_id: The agent.
        capabilities: Action groups, e.g. ``memory:read``, ``memory:write``.
        parent_id: The delegation this one was made from when an agent delegates onward
            (depth = parent's + 1), or None when the user delegated directly (depth 1).
        active: False once revoked: it and every delegation made from it give nothing.
    """

    id: str
    user_id: str
    agent_id: str
    capabilities: frozenset[str]
    parent_id: str | None = None
    active: bool = True


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What governance knows about a tenant's authorization, at one revision.

    Attributes:
        tenant_id: The tenant.
        revision: Governance's revision of this data (grows with every change).
        units: The org tree.
        bindings: Role bindings.
        delegations: Agent delegations, active and revoked.
    """

    tenant_id: str
    revision: int = 0
    units: tuple[OrgUnit, ...] = ()
    bindings: tuple[RoleBinding, ...] = ()
    delegations: tuple[Delegation, ...] = ()


class ResourceKind(enum.Enum):
    """What a :class:`Resource` stands for."""

    TENANT = "tenant"
    """The tenant itself: coarse checks (may this caller call the method here at all) and
    tenant-level methods such as a re-embed."""
    TENANT_DATA = "tenant_data"
    """Every piece of data of the tenant at once (e.g. "could read it if it existed")."""
    USER_SPACE = "user_space"
    """One user's own memories (layers USER, SESSION, AGENT)."""
    UNIT = "unit"
    """An org unit (layers PROJECT, TEAM, ORG, COMPANY)."""


@dataclass(frozen=True, slots=True)
class Resource:
    """What a decision is about; build it with the class methods.

    Attributes:
        tenant_id: The tenant the resource belongs to.
        kind: See :class:`ResourceKind`.
        id: The user id (USER_SPACE) or unit id (UNIT); empty otherwise.
        unit_kind: The unit's kind (UNIT only).
    """

    tenant_id: str
    kind: ResourceKind
    id: str = ""
    unit_kind: UnitKind | None = None

    @classmethod
    def tenant(cls, tenant_id: str) -> Resource:
        """The tenant itself."""
        return cls(tenant_id, ResourceKind.TENANT)

    @classmethod
    def tenant_data(cls, tenant_id: str) -> Resource:
        """All data of the tenant."""
        return cls(tenant_id, ResourceKind.TENANT_DATA)

    @classmethod
    def user_space(cls, tenant_id: str, user_id: str) -> Resource:
        """The USER, SESSION and AGENT memories of ``user_id``."""
        return cls(tenant_id, ResourceKind.USER_SPACE, user_id)

    @classmethod
    def unit(cls, tenant_id: str, kind: UnitKind, unit_id: str) -> Resource:
        """An org unit and the memories of its layer."""
        return cls(tenant_id, ResourceKind.UNIT, unit_id, kind)


@dataclass(frozen=True, slots=True)
class ReadableScope:
    """What a principal may read in its tenant, to narrow an open search or listing.

    Attributes:
        everything: The caller reads every memory of the tenant (e.g. TENANT_ADMIN);
            the other fields are then irrelevant.
        user_ids: Users whose USER, SESSION and AGENT memories the caller reads: its own,
            or for an agent the delegating user when ``memory:read`` was delegated.
        units: Per unit kind, the unit ids the caller reads.
        all_units: Unit kinds whose every unit the caller reads (tenant-wide bindings),
            including units missing from the tree.
    """

    everything: bool = False
    user_ids: frozenset[str] = frozenset()
    units: Mapping[UnitKind, frozenset[str]] = field(default_factory=dict)
    all_units: frozenset[UnitKind] = frozenset()
