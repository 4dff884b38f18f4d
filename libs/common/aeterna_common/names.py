"""Resource names of tenant-scoped resources (https://google.aip.dev/122) and the tenant check
that precedes any lookup: a name of another tenant is ``PERMISSION_DENIED`` (reason
``TENANT_MISMATCH``) whether or not it exists, so nothing leaks across tenants."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from aeterna_common.context import Principal
from aeterna_common.errors import FieldViolation, InvalidArgument, PermissionDenied

TENANT_PATTERN = r"[A-Za-z0-9_-]{1,100}"
"""A tenant id (as the token's ``tenant`` claim)."""
_TENANT = rf"({TENANT_PATTERN})"
UNIT_ID = re.compile(r"^[a-z0-9-]{1,63}$")
"""Org unit ids: 1-63 characters of [a-z0-9-] (the proto's rule; a DNS label's length)."""


@dataclass(frozen=True, slots=True)
class Name:
    """A parsed resource name ``tenants/{tenant}/{collection}/{id}``.

    Attributes:
        tenant_id: The tenant.
        collection: The collection id, e.g. ``orgUnits``.
        id: The resource id (canonical UUID form for UUID-named collections).
    """

    tenant_id: str
    collection: str
    id: str

    def __str__(self) -> str:
        return f"tenants/{self.tenant_id}/{self.collection}/{self.id}"


def invalid_name(field: str, expected: str) -> InvalidArgument:
    """``INVALID_ARGUMENT`` (reason ``INVALID_NAME``) for a malformed name in ``field``."""
    return InvalidArgument(
        [FieldViolation(field, f"must be {expected}", "INVALID_NAME")], reason="INVALID_NAME"
    )


def tenant_mismatch(field: str, value: str) -> PermissionDenied:
    """``PERMISSION_DENIED`` (reason ``TENANT_MISMATCH``): ``value`` names another tenant."""
    return PermissionDenied(
        f"{field} {value!r} is outside the caller's tenant",
        reason="TENANT_MISMATCH",
        metadata={"field": field},
    )


def _check_tenant(principal: Principal, tenant: str, field: str, value: str) -> None:
    # A service principal (no tenant) acts in any tenant where a method admits it; what it
    # may do is decided by the service's authorization.
    if not principal.is_service and tenant != principal.tenant_id:
        raise tenant_mismatch(field, value)


def parse_parent(principal: Principal, parent: str, field: str = "parent") -> str:
    """Validate ``tenants/{tenant}`` and that it is the caller's tenant.

    Returns:
        The tenant id.

    Raises:
        InvalidArgument: Malformed (reason ``INVALID_NAME``).
        PermissionDenied: Another tenant (reason ``TENANT_MISMATCH``).
    """
    m = re.fullmatch(rf"tenants/{_TENANT}", parent)
    if not m:
        raise invalid_name(field, "tenants/{tenant}")
    _check_tenant(principal, m.group(1), field, parent)
    return m.group(1)


def parse_snapshot_name(principal: Principal, name: str, field: str = "name") -> str:
    """Validate ``tenants/{tenant}/authorizationSnapshot``; returns the tenant id.

    Raises:
        InvalidArgument: Malformed (reason ``INVALID_NAME``).
        PermissionDenied: Another tenant (reason ``TENANT_MISMATCH``).
    """
    m = re.fullmatch(rf"tenants/{_TENANT}/authorizationSnapshot", name)
    if not m:
        raise invalid_name(field, "tenants/{tenant}/authorizationSnapshot")
    _check_tenant(principal, m.group(1), field, name)
    return m.group(1)


def parse_name(principal: Principal, name: str, collection: str, field: str = "name") -> Name:
    """Validate ``tenants/{tenant}/{collection}/{id}``; the tenant check comes first.

    Org unit ids must match :data:`UNIT_ID`; the ids of the other collections are UUIDs.

    Args:
        principal: The caller.
        name: The resource name.
        collection: Expected collection id, e.g. ``orgUnits`` or ``approvalRequests``.
        field: Request field holding the name, for error details.

    Returns:
        The parsed name.

    Raises:
        InvalidArgument: Malformed (reason ``INVALID_NAME``).
        PermissionDenied: Another tenant (reason ``TENANT_MISMATCH``), before any lookup.
    """
    expected = f"tenants/{{tenant}}/{collection}/{{id}}"
    m = re.fullmatch(rf"tenants/{_TENANT}/{collection}/([^/]+)", name)
    if not m:
        raise invalid_name(field, expected)
    _check_tenant(principal, m.group(1), field, name)
    raw = m.group(2)
    if collection == "orgUnits":
        if not UNIT_ID.match(raw):
            raise invalid_name(field, f"{expected} with an id of 1-63 characters of [a-z0-9-]")
        return Name(m.group(1), collection, raw)
    try:
        return Name(m.group(1), collection, str(uuid.UUID(raw)))
    except ValueError as exc:
        raise invalid_name(field, f"{expected} with a UUID id") from exc


def unit_name(tenant_id: str, unit_id: str) -> str:
    """``tenants/{tenant}/orgUnits/{unit}``."""
    return f"tenants/{tenant_id}/orgUnits/{unit_id}"
