"""Authorization: one permission model, evaluated in process with Cedar (``cedarpy``).

The policies and schema in ``policies/`` are the single source of truth: roles (VIEWER,
DEVELOPER, TECH_LEAD, ARCHITECT, ADMIN, TENANT_ADMIN, PLATFORM_ADMIN, AGENT, and SERVICE
for service principals) × actions (every RPC, by full method name, in action groups such
as ``memory:read`` that are also the delegation capabilities) × resources (the tenant, a
user's own memories, org units). The entity model is explained in
:mod:`aeterna_common.authz.engine`; ``docs/permissions.md`` is generated from the policies.

Usage, before any lookup::

    await authorizer.authorize(principal, "aeterna.memory.v1.MemoryService/GetMemory",
                               Resource.user_space(tenant, "alice"))

which returns or raises :class:`~aeterna_common.errors.PermissionDenied` (reason
``ACTION_NOT_ALLOWED``, ``ErrorInfo.metadata.action``) or, when bindings are needed and the
directory is down past the cache's grace, :class:`~aeterna_common.errors.Unavailable`
(reason ``AUTHORIZATION_DIRECTORY_UNAVAILABLE``).
"""

from aeterna_common.authz.authorizer import ACTION_NOT_ALLOWED, Authorizer, denied
from aeterna_common.authz.directory import (
    DIRECTORY_UNAVAILABLE,
    Directory,
    DirectoryCache,
    StaticDirectory,
)
from aeterna_common.authz.engine import PolicyModel
from aeterna_common.authz.model import (
    ROLES,
    Delegation,
    OrgUnit,
    ReadableScope,
    Resource,
    ResourceKind,
    RoleBinding,
    Snapshot,
    UnitKind,
)

__all__ = [
    "ACTION_NOT_ALLOWED",
    "DIRECTORY_UNAVAILABLE",
    "ROLES",
    "Authorizer",
    "Delegation",
    "Directory",
    "DirectoryCache",
    "OrgUnit",
    "PolicyModel",
    "ReadableScope",
    "Resource",
    "ResourceKind",
    "RoleBinding",
    "Snapshot",
    "StaticDirectory",
    "UnitKind",
    "denied",
]
