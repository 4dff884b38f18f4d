"""The one call every service makes before any lookup: :meth:`Authorizer.authorize`."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from aeterna_common.auth import SERVICE_ROLE
from aeterna_common.authz.directory import DirectoryCache
from aeterna_common.authz.engine import PolicyModel, Request, TenantGraph, evaluate
from aeterna_common.authz.model import ReadableScope, Resource, Snapshot, UnitKind
from aeterna_common.context import Principal
from aeterna_common.errors import PermissionDenied, Unavailable
from aeterna_common.telemetry import AUTHZ_DECISIONS

log = structlog.get_logger("aeterna.authz")

ACTION_NOT_ALLOWED = "ACTION_NOT_ALLOWED"
"""``ErrorInfo.reason`` of a refused action; ``ErrorInfo.metadata.action`` names it."""


def denied(action: str) -> PermissionDenied:
    """The refusal of ``action``: the same for a forbidden and for a missing resource."""
    return PermissionDenied(
        f"the caller may not {action.rsplit('/', 1)[-1]} here",
        reason=ACTION_NOT_ALLOWED,
        metadata={"action": action},
    )


def _count(allowed: Sequence[bool], source: str) -> None:
    granted = sum(allowed)
    if granted:
        AUTHZ_DECISIONS.labels("allow", source).inc(granted)
    if len(allowed) - granted:
        AUTHZ_DECISIONS.labels("deny", source).inc(len(allowed) - granted)


class Authorizer:
    """Decides role × action × resource with the Cedar policies.

    Each decision is first made from what the token alone proves (the principal's own user
    space; the token's roles when ``trust_token_roles``): policies only permit, so an allow
    there is final and needs no directory. Otherwise the tenant's bindings and delegations
    are fetched through ``directory`` (cached) and the decision is made again. Entities are
    built once per tenant and directory revision (:class:`TenantGraph`).

    Args:
        directory: Cached directory; None: no bindings (own user and token roles only).
        trust_token_roles: Honour the token's ``roles`` claim as tenant-wide bindings, a
            development shortcut (``AETERNA_AUTH_TRUST_TOKEN_ROLES``); production roles come
            from bindings.
        model: The policies; loaded from the package when omitted.
    """

    def __init__(
        self,
        directory: DirectoryCache | None = None,
        *,
        trust_token_roles: bool = False,
        model: PolicyModel | None = None,
    ) -> None:
        self.directory = directory
        self.trust_token_roles = trust_token_roles
        self.model = model or PolicyModel()
        self._empty: dict[str, TenantGraph] = {}
        self._graphs: dict[str, TenantGraph] = {}

    def _token_roles(self, principal: Principal) -> frozenset[str]:
        return principal.roles if self.trust_token_roles else frozenset()

    def _empty_graph(self, tenant: str) -> TenantGraph:
        graph = self._empty.get(tenant)
        if graph is None:
            graph = self._empty[tenant] = TenantGraph(self.model, Snapshot(tenant))
        return graph

    async def _graph(self, tenant: str) -> TenantGraph:
        assert self.directory is not None
        snapshot = await self.directory.get(tenant)
        graph = self._graphs.get(tenant)
        if graph is None or graph.snapshot is not snapshot:
            graph = self._graphs[tenant] = TenantGraph(self.model, snapshot)
        return graph

    async def decide(
        self, principal: Principal, action: str, resources: Sequence[Resource]
    ) -> list[bool]:
        """Allow or deny ``action`` on each resource.

        Args:
            principal: The verified caller.
            action: Full method name, ``aeterna.memory.v1.MemoryService/GetMemory``.
            resources: What the action touches.

        Returns:
            One bool per resource.

        Raises:
            Unavailable: Bindings were needed and the directory is unavailable past the
                cache's grace (reason ``AUTHORIZATION_DIRECTORY_UNAVAILABLE``).
        """
        if principal.is_service and SERVICE_ROLE not in principal.roles:
            AUTHZ_DECISIONS.labels("deny", "token").inc(len(resources))
            return [False] * len(resources)
        tenant = principal.tenant_id
        requests = [Request(principal, action, r) for r in resources]
        roles = self._token_roles(principal)
        allowed = evaluate(self.model, self._empty_graph(tenant), requests, roles)
        if all(allowed) or self.directory is None or principal.is_service:
            _count(allowed, "token")
            return allowed
        graph = await self._graph(tenant)
        pending = [i for i, ok in enumerate(allowed) if not ok]
        again = evaluate(self.model, graph, [requests[i] for i in pending], roles)
        for i, ok in zip(pending, again, strict=True):
            allowed[i] = ok
        _count(allowed, "directory")
        return allowed

    async def allowed(self, principal: Principal, action: str, resource: Resource) -> bool:
        """Whether ``action`` on ``resource`` is allowed (see :meth:`decide`)."""
        return (await self.decide(principal, action, [resource]))[0]

    async def authorize(self, principal: Principal, action: str, *resources: Resource) -> None:
        """Allow ``action`` on every resource, or refuse it whole (all or none).

        Raises:
            PermissionDenied: Some resource is not allowed (reason ``ACTION_NOT_ALLOWED``,
                ``ErrorInfo.metadata.action`` = ``action``).
            Unavailable: As :meth:`decide`.
        """
        if not all(await self.decide(principal, action, resources)):
            raise denied(action)

    async def readable_scope(self, principal: Principal, action: str) -> ReadableScope:
        """What ``principal`` may read with ``action`` in its tenant (to narrow open searches).

        With the directory unavailable, the scope is what the token alone proves (the
        caller's own memories, trusted token roles): narrower, never wider.

        Args:
            principal: The caller.
            action: The read method, e.g. ``…/SearchMemories``.

        Returns:
            The readable scope.
        """
        tenant = principal.tenant_id
        try:
            graph = (
                await self._graph(tenant)
                if self.directory is not None
                else self._empty_graph(tenant)
            )
        except Unavailable:
            log.warning("authz.scope_without_directory", tenant=tenant)
            graph = self._empty_graph(tenant)
        roles = self._token_roles(principal)
        key = (principal, action, ",".join(sorted(roles)))
        known = graph.memo.get(key)
        if isinstance(known, ReadableScope):
            return known
        scope = self._readable_scope(graph, principal, action, roles)
        graph.remember(key, scope)
        return scope

    def _readable_scope(
        self, graph: TenantGraph, principal: Principal, action: str, roles: frozenset[str]
    ) -> ReadableScope:
        tenant = principal.tenant_id
        units = list(graph.units.values())
        probes = [
            Resource.tenant_data(tenant),
            Resource.user_space(tenant, principal.user_id),
            # A unit missing from the tree: readable only through tenant-wide bindings.
            *(Resource.unit(tenant, kind, "") for kind in UnitKind),  # "" is never in the tree
            *(Resource.unit(tenant, u.kind, u.id) for u in units),
        ]
        requests = [Request(principal, action, r) for r in probes]
        allowed = evaluate(self.model, graph, requests, roles)
        if allowed[0]:
            return ReadableScope(everything=True)
        per_kind: dict[UnitKind, set[str]] = {kind: set() for kind in UnitKind}
        for unit, ok in zip(units, allowed[2 + len(UnitKind) :], strict=True):
            if ok:
                per_kind[unit.kind].add(unit.id)
        return ReadableScope(
            user_ids=frozenset({principal.user_id}) if allowed[1] else frozenset(),
            units={k: frozenset(v) for k, v in per_kind.items()},
            all_units=frozenset(
                k for k, ok in zip(UnitKind, allowed[2 : 2 + len(UnitKind)], strict=True) if ok
            ),
        )
