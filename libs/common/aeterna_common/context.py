"""The caller (principal) and the per-request context.

The edge (Envoy, after verifying a JWT) sets ``x-aeterna-tenant``, ``x-aeterna-user``,
``x-aeterna-agent`` and ``x-aeterna-roles`` (comma-separated); :func:`principal_from_metadata`
validates them. The interceptor stores the result in a ContextVar for the request's duration.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from aeterna_common.errors import FieldViolation, InvalidArgument, Unauthenticated

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
"""Tenant ids: 1-100 characters of ``[A-Za-z0-9_-]`` (DOMAIN.md, Tenancy)."""

IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z0-9_.:@-]{1,100}$")
"""User, agent, session and unit ids: 1-100 characters of ``[A-Za-z0-9_.:@-]``."""

ROLE_PATTERN = re.compile(r"^[A-Z_]{1,40}$")
"""Role names, e.g. ``DEVELOPER``, ``TENANT_ADMIN``."""

HEADER_TENANT = "x-aeterna-tenant"
HEADER_USER = "x-aeterna-user"
HEADER_AGENT = "x-aeterna-agent"
HEADER_ROLES = "x-aeterna-roles"
HEADER_REQUEST_ID = "x-request-id"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling.

    Attributes:
        tenant_id: The caller's tenant.
        user_id: The user the call is made by or for.
        agent_id: The agent acting for the user, if any.
        roles: Role names, upper case.
    """

    tenant_id: str
    user_id: str
    agent_id: str | None = None
    roles: frozenset[str] = frozenset()

    @property
    def actor(self) -> str:
        """Resource-style actor string: ``users/{user}`` or ``users/{user}/agents/{agent}``."""
        base = f"users/{self.user_id}"
        return f"{base}/agents/{self.agent_id}" if self.agent_id else base


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


def principal_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
    """Build and validate the principal from gRPC invocation metadata.

    Args:
        metadata: ``(key, value)`` pairs; keys lower case as gRPC delivers them.

    Returns:
        The principal.

    Raises:
        Unauthenticated: tenant or user is missing (reason ``MISSING_PRINCIPAL``).
        InvalidArgument: a value does not match its pattern (reason ``INVALID_PRINCIPAL``).
    """
    values: dict[str, str] = {}
    for key, value in metadata:
        if key.startswith("x-aeterna-"):
            values[key] = value.decode() if isinstance(value, bytes) else value
    tenant = values.get(HEADER_TENANT, "").strip()
    user = values.get(HEADER_USER, "").strip()
    if not tenant or not user:
        missing = [h for h, v in ((HEADER_TENANT, tenant), (HEADER_USER, user)) if not v]
        raise Unauthenticated(
            f"missing caller identity: {', '.join(missing)}", reason="MISSING_PRINCIPAL"
        )
    agent = values.get(HEADER_AGENT, "").strip() or None
    roles = frozenset(
        r.strip().upper() for r in values.get(HEADER_ROLES, "").split(",") if r.strip()
    )
    violations: list[FieldViolation] = []
    if not TENANT_PATTERN.match(tenant):
        violations.append(
            FieldViolation(HEADER_TENANT, "must be 1-100 characters of [A-Za-z0-9_-]")
        )
    for header, ident in ((HEADER_USER, user), (HEADER_AGENT, agent)):
        if ident is not None and not IDENTIFIER_PATTERN.match(ident):
            violations.append(
                FieldViolation(header, "must be 1-100 characters of [A-Za-z0-9_.:@-]")
            )
    bad_roles = sorted(r for r in roles if not ROLE_PATTERN.match(r))
    if bad_roles:
        violations.append(FieldViolation(HEADER_ROLES, f"invalid role names: {bad_roles}"))
    if violations:
        raise InvalidArgument(violations, reason="INVALID_PRINCIPAL")
    return Principal(tenant_id=tenant, user_id=user, agent_id=agent, roles=roles)


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
