"""The caller (principal) and the per-request context.

The principal comes only from the claims of a verified bearer token
(:mod:`aeterna_common.auth`): :func:`principal_from_claims` validates them. No request header
names the caller (``x-aeterna-*`` metadata from clients or peers is ignored). The interceptor
stores the result in a ContextVar for the request's duration.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from aeterna_common.errors import Unauthenticated

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
"""Tenant ids: 1-100 characters of ``[A-Za-z0-9_-]`` (DOMAIN.md, Tenancy)."""

IDENTIFIER_MAX_CHARS = 255
"""Longest user, agent, session or unit id: OpenID Connect Core 1.0, section 2, limits
``sub`` to 255 ASCII characters, and an e-mail address has at most 254 (RFC 5321)."""

IDENTIFIER_RULE = f"1-{IDENTIFIER_MAX_CHARS} printable characters, no whitespace and no '/'"
""":func:`is_identifier` in words, for error messages."""

ROLE_PATTERN = re.compile(r"^[A-Z_]{1,40}$")
"""Role names, e.g. ``DEVELOPER``, ``TENANT_ADMIN``."""

HEADER_REQUEST_ID = "x-request-id"

CLAIM_TENANT = "tenant"
CLAIM_USER = "sub"
CLAIM_AGENT = "agent"
CLAIM_ROLES = "roles"


def is_identifier(value: str) -> bool:
    """Whether ``value`` is a valid user, agent, session or unit id.

    Identity-provider subjects are opaque: ``auth0|abc123``, ``google-oauth2|1098``,
    ``alice@example.com``, UUIDs, ``system:serviceaccount:ns:name``. Allowed: 1 to
    :data:`IDENTIFIER_MAX_CHARS` printable characters (``str.isprintable``: no control,
    format or separator characters such as bidi overrides or zero-width spaces) without
    spaces or ``/`` (actors are written ``users/{user}/agents/{agent}``).

    Args:
        value: The candidate id.

    Returns:
        True when it is valid.
    """
    return (
        0 < len(value) <= IDENTIFIER_MAX_CHARS
        and value.isprintable()
        and " " not in value
        and "/" not in value
    )


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling.

    Attributes:
        tenant_id: The caller's tenant; empty for a service principal (a token without a
            ``tenant`` claim), which belongs to no tenant: tenant checks never match it.
        user_id: The user the call is made by or for (the token's ``sub``).
        agent_id: The agent acting for the user, if any.
        roles: Role names, upper case.
        service: A service principal acting in the tenant named by its request (see
            :meth:`acting_in`); ``tenant_id`` is then that tenant, never a token's claim.
    """

    tenant_id: str
    user_id: str
    agent_id: str | None = None
    roles: frozenset[str] = frozenset()
    service: bool = False

    @property
    def actor(self) -> str:
        """Resource-style actor string: ``users/{user}``, ``users/{user}/agents/{agent}``, or
        ``services/{service}`` for a service principal (token ``sub`` ``service:{service}``)."""
        if self.is_service:
            return f"services/{self.user_id.removeprefix('service:')}"
        base = f"users/{self.user_id}"
        return f"{base}/agents/{self.agent_id}" if self.agent_id else base

    @property
    def is_service(self) -> bool:
        """Whether this is a service principal (a token without a ``tenant`` claim), e.g.
        background work or another service, whether or not it is acting in a tenant."""
        return self.service or not self.tenant_id

    def acting_in(self, tenant_id: str) -> Principal:
        """The principal scoped to the tenant a request names.

        A service principal belongs to no tenant; a method that admits it acts in the tenant
        its request names, so the service's tenant-scoped code (RLS, keys, events) runs in
        that tenant while authorization still sees the service (``Aeterna::Service``).

        Args:
            tenant_id: The tenant named by the request, already validated.

        Returns:
            ``self`` for a tenant principal (its tenant was checked against the name); for a
            service principal a copy with ``tenant_id`` set and ``service`` true.
        """
        if not self.is_service:
            return self
        return replace(self, tenant_id=tenant_id, service=True)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What is known about the current request.

    Attributes:
        principal: The validated caller.
        request_id: The edge's ``x-request-id`` or a new UUID.
        method: Full gRPC method name, e.g. ``/aeterna.memory.v1.MemoryService/GetMemory``.
    """

    principal: Principal
    request_id: str
    method: str


_current: ContextVar[RequestContext | None] = ContextVar("aeterna_request", default=None)


def _claim_invalid(claim: str, rule: str) -> Unauthenticated:
    # The claim's value is not echoed: it came from a token.
    return Unauthenticated(
        f"token claim {claim!r} is invalid: {rule}",
        reason="TOKEN_CLAIM_INVALID",
        metadata={"claim": claim},
    )


def _roles(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        raise _claim_invalid(CLAIM_ROLES, "must be a comma-separated string or an array")
    if not all(isinstance(r, str) for r in items):
        raise _claim_invalid(CLAIM_ROLES, "array items must be strings")
    roles = frozenset(r.strip().upper() for r in items if r.strip())
    if any(not ROLE_PATTERN.match(r) for r in roles):
        raise _claim_invalid(CLAIM_ROLES, "role names are 1-40 characters of [A-Z_]")
    return roles


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Build and validate the principal from a verified token's claims.

    Claims: ``tenant`` (absent for a service principal), ``sub`` (the user), ``agent``
    (optional) and ``roles`` (optional; a comma-separated string or an array of strings,
    upper-cased).

    Args:
        claims: The verified claims, e.g. from :meth:`aeterna_common.auth.TokenVerifier.verify`.

    Returns:
        The principal.

    Raises:
        Unauthenticated: ``sub`` is missing (reason ``TOKEN_CLAIM_MISSING``) or a claim does
            not match its rule (reason ``TOKEN_CLAIM_INVALID``, ``ErrorInfo.metadata.claim``
            names it).
    """
    tenant = claims.get(CLAIM_TENANT)
    if tenant is not None and (not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant)):
        raise _claim_invalid(CLAIM_TENANT, "must be 1-100 characters of [A-Za-z0-9_-]")
    user = claims.get(CLAIM_USER)
    if user is None:
        raise Unauthenticated(
            "token lacks the 'sub' claim",
            reason="TOKEN_CLAIM_MISSING",
            metadata={"claim": CLAIM_USER},
        )
    if not isinstance(user, str) or not is_identifier(user):
        raise _claim_invalid(CLAIM_USER, f"must be {IDENTIFIER_RULE}")
    agent = claims.get(CLAIM_AGENT)
    if agent is not None and (not isinstance(agent, str) or not is_identifier(agent)):
        raise _claim_invalid(CLAIM_AGENT, f"must be {IDENTIFIER_RULE}")
    return Principal(
        tenant_id=tenant or "", user_id=user, agent_id=agent, roles=_roles(claims.get(CLAIM_ROLES))
    )


def request_id_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The ``x-request-id`` header (set by Envoy) or a new UUID4."""
    for key, value in metadata:
        if key == HEADER_REQUEST_ID and value:
            text = value.decode() if isinstance(value, bytes) else value
            return text[:128]
    return str(uuid.uuid4())


def current() -> RequestContext:
    """The current request's context.

    Raises:
        Unauthenticated: called outside a request that carried a principal.
    """
    ctx = _current.get()
    if ctx is None:
        raise Unauthenticated("no request context", reason="MISSING_PRINCIPAL")
    return ctx


@contextmanager
def bind(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make ``ctx`` the current request context within the ``with`` block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
