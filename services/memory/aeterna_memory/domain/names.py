"""Memory resource names (https://google.aip.dev/122) over :mod:`aeterna_common.names`: the
tenant check precedes any lookup, and a service principal acts in the tenant a name gives."""

from __future__ import annotations

from aeterna_common.context import Principal
from aeterna_common.names import parse_name, parse_parent


def check_parent(principal: Principal, parent: str, field: str = "parent") -> str:
    """Validate ``tenants/{tenant}`` and that it is the caller's tenant.

    Returns:
        The tenant id.

    Raises:
        InvalidArgument: malformed (reason ``INVALID_NAME``).
        PermissionDenied: another tenant (reason ``TENANT_MISMATCH``); a service principal
            may name any tenant, and authorization decides what it may do there.
    """
    return parse_parent(principal, parent, field)


def parse_memory_name(principal: Principal, name: str, field: str = "name") -> tuple[str, str]:
    """Validate ``tenants/{tenant}/memories/{uuid}``; the tenant check comes first.

    Returns:
        ``(tenant_id, memory_id)`` with the id in canonical UUID form.

    Raises:
        InvalidArgument: malformed (reason ``INVALID_NAME``).
        PermissionDenied: another tenant (reason ``TENANT_MISMATCH``), before any lookup.
    """
    parsed = parse_name(principal, name, "memories", field)
    return parsed.tenant_id, parsed.id
