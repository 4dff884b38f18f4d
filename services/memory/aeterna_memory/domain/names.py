"""Resource names (https://google.aip.dev/122) and the tenant check that precedes any lookup."""

from __future__ import annotations

import re
import uuid

from aeterna_common.context import Principal
from aeterna_common.errors import FieldViolation, InvalidArgument, PermissionDenied

_PARENT = re.compile(r"^tenants/([A-Za-z0-9_-]{1,100})$")
_MEMORY = re.compile(r"^tenants/([A-Za-z0-9_-]{1,100})/memories/([^/]+)$")


def _deny(field: str, name: str) -> PermissionDenied:
    # Same answer whether or not the resource exists: no existence leak across tenants.
    return PermissionDenied(
        f"{field} {name!r} is outside the caller's tenant",
        reason="TENANT_MISMATCH",
        metadata={"field": field},
    )


def check_parent(principal: Principal, parent: str, field: str = "parent") -> str:
    """Validate ``tenants/{tenant}`` and that it is the caller's tenant.

    Returns:
        The tenant id.

    Raises:
        InvalidArgument: malformed (reason ``INVALID_NAME``).
        PermissionDenied: another tenant (reason ``TENANT_MISMATCH``).
    """
    m = _PARENT.match(parent)
    if not m:
        raise InvalidArgument(
            [FieldViolation(field, "must be tenants/{tenant}", "INVALID_NAME")],
            reason="INVALID_NAME",
        )
    if m.group(1) != principal.tenant_id:
        raise _deny(field, parent)
    return m.group(1)


def parse_memory_name(principal: Principal, name: str, field: str = "name") -> tuple[str, str]:
    """Validate ``tenants/{tenant}/memories/{uuid}``; the tenant check comes first.

    Returns:
        ``(tenant_id, memory_id)`` with the id in canonical UUID form.

    Raises:
        InvalidArgument: malformed (reason ``INVALID_NAME``).
        PermissionDenied: another tenant (reason ``TENANT_MISMATCH``), before any lookup.
    """
    m = _MEMORY.match(name)
    if not m:
        raise InvalidArgument(
            [FieldViolation(field, "must be tenants/{tenant}/memories/{memory}", "INVALID_NAME")],
            reason="INVALID_NAME",
        )
    if m.group(1) != principal.tenant_id:
        raise _deny(field, name)
    try:
        memory_id = str(uuid.UUID(m.group(2)))
    except ValueError as exc:
        raise InvalidArgument(
            [FieldViolation(field, "the memory id must be a UUID", "INVALID_NAME")],
            reason="INVALID_NAME",
        ) from exc
    return m.group(1), memory_id
