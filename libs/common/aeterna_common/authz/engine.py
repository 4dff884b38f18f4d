"""Cedar evaluation: the policy files, the entities of a tenant, and the decisions.

Entity model (why this shape): "role R bound at unit U or at any unit above U" must be a
Cedar ``in`` check, not Python. Each (unit, role) pair is a group entity
``Grant::"{tenant}/{Kind}:{unit}#{ROLE}"`` and each unit names its groups in attributes
(``viewers``, ``developers``, ``tech_leads``, ``architects``, ``admins``). A grant is a
member (Cedar parent) of

* the grant of the same role at each child unit: holders of a role at a team are ``in``
  the same role's group of every project of that team, so inheritance down the tree is
  Cedar's transitive ``in``;
* the grant of the next lower role at the same unit (:data:`~.model.LOWER_ROLE`): an
  ARCHITECT is ``in`` the DEVELOPER and VIEWER groups, so "writable by DEVELOPER at the
  project" admits every higher role bound there or above.

Each unit also names its audience (``audience``), an ``Audience::"{tenant}/{Kind}:{unit}"``
group of everyone holding any role at the unit or at any unit below it: the unit's VIEWER
grant (which every role there or above is ``in``) is a member of it, and each unit's
audience is a member of its parent's, so Cedar's transitive ``in`` reaches the holders of
every unit below. Knowledge reads upward with it (an organization's decisions apply to its
teams and projects); siblings never share a path.

Tenant-wide bindings are grants of the tenant (``{tenant}/Tenant#{ROLE}``), members of each
company's grant of that role. A principal's parents are just the grants of its own
bindings: the graph of a tenant is built once per directory revision, parsed once into a
``cedarpy.Entities`` handle (JSON parsing and transitive closure done then), and each
principal is added once per revision with ``Entities.with_added_json_str`` (memoised). The
alternative, precomputing every principal's
inherited roles into attributes, would move the inheritance rules out of Cedar into
Python and make every binding change rewrite many principals.

A unit missing from the tree (a scope id nobody modelled yet) gets the tenant-wide grants as
its role groups and the tenant's audience (``Audience::"{tenant}/Tenant"``, whose only member
is the tenant-wide VIEWER grant): only tenant-wide bindings reach it. All such units of one
kind are one entity (``Project::"{tenant}/"``; a tree unit is ``"{tenant}/{id}"`` and ids are
never empty), as no policy looks at a unit's id. Likewise a user space is the principal's own
(``UserSpace::"{tenant}/{user}"``, added with the principal; for an agent, its user's) or
``UserSpace::"{tenant}/"`` standing for any other user's, whose owner is no user: the only
policies that tell user spaces apart compare the owner with the principal, which is false for
every other user's space alike. So a request adds no entities to the graph of its principal
(a copy costs about a millisecond at 600 entities); only a request about another tenant
(PLATFORM_ADMIN) does.

Agents acting for a user carry the user, the capabilities of their active delegation chain
and its depth as attributes; the policies decide what they allow.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import cedarpy

from aeterna_common.authz.model import (
    LOWER_ROLE,
    MAX_DELEGATION_DEPTH,
    TENANT_ROLES,
    UNIT_ROLES,
    Resource,
    ResourceKind,
    Snapshot,
    UnitKind,
)
from aeterna_common.context import Principal

POLICY_DIR = Path(__file__).parent / "policies"
"""The ``*.cedar`` policies and the ``.cedarschema``: the single source of truth."""

NAMESPACE = "Aeterna"

UNIT_ATTRS: Mapping[str, str] = {
    "VIEWER": "viewers",
    "DEVELOPER": "developers",
    "TECH_LEAD": "tech_leads",
    "ARCHITECT": "architects",
    "ADMIN": "admins",
}
"""Unit attribute naming each role's grant (AGENT's grant is only ``in`` VIEWER's)."""

OTHER = ""
"""Id (after ``{tenant}/``) of the entity standing for any other user's space, and of the
one standing for any unit of a kind missing from the tree; real ids are never empty."""

PRINCIPAL_CACHE_SIZE = 4096
"""Per-tenant-graph LRU of principals' entity handles (a request adds one principal)."""


def uid(kind: str, id_: str) -> dict[str, str]:
    """A Cedar entity uid in the JSON form (``{"type": "Aeterna::User", "id": "t/u"}``)."""
    return {"type": f"{NAMESPACE}::{kind}", "id": id_}


def ref(kind: str, id_: str) -> dict[str, dict[str, str]]:
    """An entity reference as an attribute value."""
    return {"__entity": uid(kind, id_)}


def action_uid(action: str) -> dict[str, str]:
    """The uid of an action or action group."""
    return uid("Action", action)


def grant_id(tenant: str, holder: str, role: str) -> str:
    """Id of the grant of ``role`` at ``holder`` (``Project:p1`` or ``Tenant``)."""
    return f"{tenant}/{holder}#{role}"


class PolicyModel:
    """The parsed policies and schema, and the actions the schema declares.

    Args:
        directory: Folder with ``*.cedar`` policies and one ``*.cedarschema``.

    Raises:
        ValueError: The policies do not parse or do not validate against the schema.
    """

    def __init__(self, directory: Path = POLICY_DIR) -> None:
        schemas = sorted(directory.glob("*.cedarschema"))
        if len(schemas) != 1:
            raise ValueError(f"expected one .cedarschema in {directory}, found {len(schemas)}")
        self.schema_text = schemas[0].read_text()
        self.policy_text = "\n".join(p.read_text() for p in sorted(directory.glob("*.cedar")))
        self.schema = cedarpy.Schema.from_str(self.schema_text)
        result = cedarpy.validate_policies(self.policy_text, self.schema)
        if not result.validation_passed:
            raise ValueError(f"the Cedar policies do not validate: {result.errors}")
        self.policies = cedarpy.PolicySet.from_str(self.policy_text)

    @cached_property
    def action_groups(self) -> dict[str, tuple[str, ...]]:
        """Each action the schema declares → the groups it is in (groups map to ``()``)."""
        # Cedar adds the schema's action entities to any entity set parsed with the schema.
        entities = json.loads(str(cedarpy.Entities.from_json_str("[]", self.schema)))
        return {
            e["uid"]["id"]: tuple(sorted(p["id"] for p in e["parents"]))
            for e in entities
            if e["uid"]["type"] == f"{NAMESPACE}::Action"
        }

    @property
    def groups(self) -> list[str]:
        """The action groups (also the delegation capabilities), sorted."""
        return sorted(a for a, parents in self.action_groups.items() if ":" in a and not parents)

    def actions_in(self, group: str) -> list[str]:
        """The actions (RPCs) of ``group``, sorted."""
        return sorted(a for a, parents in self.action_groups.items() if group in parents)


def delegation_chain(snapshot: Snapshot, user_id: str, agent_id: str) -> tuple[int, frozenset[str]]:
    """Depth and capabilities of the shortest active delegation chain from ``user_id`` to
    ``agent_id``.

    A delegation made from another holds only while every delegation up the chain is active,
    and gives at most what each of them gives (capabilities intersect along the chain). The
    walk stops one link past :data:`~.model.MAX_DELEGATION_DEPTH`, so a longer chain reports
    a depth the policies refuse.

    Returns:
        ``(depth, capabilities)``; ``(0, ∅)`` without an active chain.
    """
    by_id = {d.id: d for d in snapshot.delegations if d.active and d.user_id == user_id}
    best: tuple[int, frozenset[str]] = (0, frozenset())
    for d in by_id.values():
        if d.agent_id != agent_id:
            continue
        depth, caps, link = 1, d.capabilities, d
        while link.parent_id is not None and depth <= MAX_DELEGATION_DEPTH:
            parent = by_id.get(link.parent_id)
            if parent is None:  # revoked, expired or another user's: the chain is broken
                depth = 0
                break
            depth, caps, link = depth + 1, caps & parent.capabilities, parent
        if depth and (not best[0] or depth < best[0]):
            best = (depth, caps)
    return best


class TenantGraph:
    """The Cedar entities of one tenant at one directory revision, parsed once.

    Args:
        model: The policies and schema.
        snapshot: The tenant's directory data (an empty one: no bindings at all).
    """

    def __init__(self, model: PolicyModel, snapshot: Snapshot) -> None:
        self.model = model
        self.snapshot = snapshot
        t = snapshot.tenant_id
        self.tenant_id = t
        self.units = {u.id: u for u in snapshot.units}
        children: dict[str | None, list[str]] = {}
        for u in snapshot.units:
            children.setdefault(u.parent_id, []).append(u.id)
        entities: list[dict[str, Any]] = [self.tenant_entity(t)]
        entities.append(
            {
                "uid": uid("TenantData", t),
                "attrs": {"tenant": ref("Tenant", t)},
                "parents": [uid("Tenant", t)],
            }
        )
        roots = [
            u.id for u in snapshot.units if u.parent_id is None or u.parent_id not in self.units
        ]
        # Any other user's space, and any unit missing from the tree (see the module docstring).
        entities.append(self._space_entity(OTHER))
        for kind in UnitKind:
            entities.append(
                {
                    "uid": uid(kind.value, f"{t}/{OTHER}"),
                    "attrs": self._unit_attrs("Tenant"),
                    "parents": [uid("Tenant", t)],
                }
            )
        for role in TENANT_ROLES:
            entities.append(
                {"uid": uid("Grant", grant_id(t, "Tenant", role)), "attrs": {}, "parents": []}
            )
        entities.append({"uid": uid("Audience", f"{t}/Tenant"), "attrs": {}, "parents": []})
        for role in UNIT_ROLES:
            parents = [uid("Grant", grant_id(t, self._holder(r), role)) for r in roots]
            if role in LOWER_ROLE:
                parents.append(uid("Grant", grant_id(t, "Tenant", LOWER_ROLE[role])))
            if role == "VIEWER":
                parents.append(uid("Audience", f"{t}/Tenant"))
            entities.append(
                {"uid": uid("Grant", grant_id(t, "Tenant", role)), "attrs": {}, "parents": parents}
            )
        for u in snapshot.units:
            parent = self.units.get(u.parent_id) if u.parent_id else None
            up = uid(parent.kind.value, f"{t}/{parent.id}") if parent else uid("Tenant", t)
            entities.append(
                {
                    "uid": uid(u.kind.value, f"{t}/{u.id}"),
                    "attrs": self._unit_attrs(self._holder(u.id)),
                    "parents": [up],
                }
            )
            audience_parents = [uid("Audience", f"{t}/{self._holder(parent.id)}")] if parent else []
            entities.append(
                {
                    "uid": uid("Audience", f"{t}/{self._holder(u.id)}"),
                    "attrs": {},
                    "parents": audience_parents,
                }
            )
            for role in UNIT_ROLES:
                parents = [
                    uid("Grant", grant_id(t, self._holder(c), role)) for c in children.get(u.id, [])
                ]
                if role in LOWER_ROLE:
                    parents.append(uid("Grant", grant_id(t, self._holder(u.id), LOWER_ROLE[role])))
                if role == "VIEWER":
                    parents.append(uid("Audience", f"{t}/{self._holder(u.id)}"))
                entities.append(
                    {
                        "uid": uid("Grant", grant_id(t, self._holder(u.id), role)),
                        "attrs": {},
                        "parents": parents,
                    }
                )
        self.entities = cedarpy.Entities.from_json_str(json.dumps(entities), model.schema)
        self._principals: OrderedDict[tuple[Principal, str], cedarpy.Entities] = OrderedDict()
        self.memo: OrderedDict[tuple[Principal, str, str], object] = OrderedDict()
        """Derived answers per (principal, action, token roles), e.g. readable scopes; they
        live as long as this revision's graph (:meth:`remember`)."""

    def _space_entity(self, user_id: str) -> dict[str, Any]:
        t = self.tenant_id
        return {
            "uid": uid("UserSpace", f"{t}/{user_id}"),
            "attrs": {"tenant": ref("Tenant", t), "owner": ref("User", f"{t}/{user_id}")},
            "parents": [uid("Tenant", t)],
        }

    def _holder(self, unit_id: str) -> str:
        return f"{self.units[unit_id].kind.value}:{unit_id}"

    def _unit_attrs(self, holder: str) -> dict[str, Any]:
        t = self.tenant_id
        attrs: dict[str, Any] = {"tenant": ref("Tenant", t)}
        for role, attr in UNIT_ATTRS.items():
            attrs[attr] = ref("Grant", grant_id(t, holder, role))
        attrs["audience"] = ref("Audience", f"{t}/{holder}")
        return attrs

    @staticmethod
    def tenant_entity(tenant: str) -> dict[str, Any]:
        """The ``Tenant`` entity of ``tenant``."""
        return {
            "uid": uid("Tenant", tenant),
            "attrs": {
                "admins": ref("Grant", grant_id(tenant, "Tenant", "TENANT_ADMIN")),
                "platform_admins": ref("Grant", grant_id(tenant, "Tenant", "PLATFORM_ADMIN")),
            },
            "parents": [],
        }

    def principal_uid(self, principal: Principal) -> dict[str, str]:
        """The uid of ``principal``'s entity."""
        if principal.is_service:
            return uid("Service", principal.user_id)
        if principal.agent_id:
            return uid("Agent", f"{principal.tenant_id}/{principal.user_id}/{principal.agent_id}")
        return uid("User", f"{principal.tenant_id}/{principal.user_id}")

    def _grants(self, subject: str, token_roles: Iterable[str]) -> list[dict[str, str]]:
        t = self.tenant_id
        out: list[dict[str, str]] = []
        for role in token_roles:
            if role in UNIT_ROLES or role in TENANT_ROLES:
                out.append(uid("Grant", grant_id(t, "Tenant", role)))
        for b in self.snapshot.bindings:
            if b.subject != subject:
                continue
            if b.role in TENANT_ROLES or b.unit_id is None:
                out.append(uid("Grant", grant_id(t, "Tenant", b.role)))
            elif b.unit_id in self.units and b.role in UNIT_ROLES:
                out.append(uid("Grant", grant_id(t, self._holder(b.unit_id), b.role)))
        return out

    def principal_entity(self, principal: Principal, token_roles: Iterable[str]) -> dict[str, Any]:
        """The entity of a principal of this tenant: the grants of its bindings (and of the
        token's roles when those are trusted) as parents; an agent's delegation chain."""
        t = self.tenant_id
        if principal.is_service:
            return {"uid": self.principal_uid(principal), "attrs": {}, "parents": []}
        attrs: dict[str, Any] = {"tenant": ref("Tenant", t)}
        if principal.agent_id:
            depth, caps = delegation_chain(self.snapshot, principal.user_id, principal.agent_id)
            attrs |= {
                "user": ref("User", f"{t}/{principal.user_id}"),
                "capabilities": sorted(caps),
                "depth": depth,
            }
            subject = f"agents/{principal.agent_id}"
        else:
            subject = f"users/{principal.user_id}"
        return {
            "uid": self.principal_uid(principal),
            "attrs": attrs,
            "parents": self._grants(subject, token_roles),
        }

    def with_principal(self, principal: Principal, token_roles: frozenset[str]) -> cedarpy.Entities:
        """The tenant's entities plus ``principal`` (memoised per principal)."""
        key = (principal, ",".join(sorted(token_roles)))
        found = self._principals.get(key)
        if found is not None:
            self._principals.move_to_end(key)
            return found
        if principal.is_service or principal.tenant_id != self.tenant_id:
            delta = [{"uid": self.principal_uid(principal), "attrs": {}, "parents": []}]
        else:
            # With its own user space (an agent: its user's), the one space it may own.
            delta = [
                self.principal_entity(principal, token_roles),
                self._space_entity(principal.user_id),
            ]
        handle = self.entities.with_added_json_str(json.dumps(delta))
        self._principals[key] = handle
        if len(self._principals) > PRINCIPAL_CACHE_SIZE:
            self._principals.popitem(last=False)
        return handle

    def remember(self, key: tuple[Principal, str, str], value: object) -> None:
        """Keep ``value`` in :attr:`memo` (LRU of :data:`PRINCIPAL_CACHE_SIZE`)."""
        self.memo[key] = value
        if len(self.memo) > PRINCIPAL_CACHE_SIZE:
            self.memo.popitem(last=False)

    def resource_uid(self, resource: Resource, principal: Principal) -> dict[str, str]:
        """The uid of ``resource`` in this graph as seen by ``principal`` (see the module
        docstring: other users' spaces and units missing from the tree share one entity)."""
        t = resource.tenant_id
        if resource.kind is ResourceKind.TENANT:
            return uid("Tenant", t)
        if resource.kind is ResourceKind.TENANT_DATA:
            return uid("TenantData", t)
        if resource.kind is ResourceKind.USER_SPACE:
            own = t == principal.tenant_id and resource.id == principal.user_id
            return uid("UserSpace", f"{t}/{resource.id if own else OTHER}")
        assert resource.unit_kind is not None
        unit = self.units.get(resource.id)
        known = unit is not None and unit.kind is resource.unit_kind
        return uid(resource.unit_kind.value, f"{t}/{resource.id if known else OTHER}")


@dataclass(frozen=True, slots=True)
class Request:
    """One decision to make: who, what and on what."""

    principal: Principal
    action: str
    resource: Resource


def evaluate(
    model: PolicyModel,
    graph: TenantGraph,
    requests: Sequence[Request],
    token_roles: frozenset[str],
) -> list[bool]:
    """Decide ``requests`` (all of one principal) in one ``is_authorized_batch`` call.

    Args:
        model: The policies.
        graph: The principal's tenant's entities.
        requests: Requests of one principal.
        token_roles: Roles from the token that count (empty unless trusted).

    Returns:
        One allow (True) or deny per request, in order.
    """
    if not requests:
        return []
    principal = requests[0].principal
    entities = graph.with_principal(principal, token_roles)
    others = {r.resource.tenant_id for r in requests} - {graph.tenant_id}
    if others:
        # A request about another tenant (PLATFORM_ADMIN): that tenant's entity, no more.
        entities = entities.with_added_json_str(
            json.dumps([TenantGraph.tenant_entity(t) for t in sorted(others)])
        )
    cedar_requests = [
        {
            "principal": graph.principal_uid(principal),
            "action": action_uid(r.action),
            "resource": graph.resource_uid(r.resource, principal),
            "context": {},
        }
        for r in requests
    ]
    results = cedarpy.is_authorized_batch(cedar_requests, model.policies, entities)
    return [bool(res.allowed) for res in results]
