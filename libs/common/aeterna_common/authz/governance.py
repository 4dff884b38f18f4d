"""The :class:`~aeterna_common.authz.directory.Directory` served by governance:
``aeterna.governance.v1.OrganizationService/GetAuthorizationSnapshot``, called with the
service's own credentials (a service principal, role SERVICE)."""

from __future__ import annotations

import grpc
from aeterna.governance.v1 import organization_service_pb2 as org
from aeterna.governance.v1 import organization_service_pb2_grpc as org_grpc
from aeterna.governance.v1 import resources_pb2 as gres

from aeterna_common.auth import ServiceCredentials
from aeterna_common.authz.directory import Directory
from aeterna_common.authz.model import Delegation, OrgUnit, RoleBinding, Snapshot, UnitKind
from aeterna_common.config import CommonSettings
from aeterna_common.server import StartupError
from aeterna_common.telemetry import client_interceptors

CALL_TIMEOUT_S = 2.0
"""Deadline of one snapshot call in seconds; the cache serves its copy meanwhile."""

_KINDS = {
    gres.ORG_UNIT_KIND_COMPANY: UnitKind.COMPANY,
    gres.ORG_UNIT_KIND_ORGANIZATION: UnitKind.ORGANIZATION,
    gres.ORG_UNIT_KIND_TEAM: UnitKind.TEAM,
    gres.ORG_UNIT_KIND_PROJECT: UnitKind.PROJECT,
}


def _last(name: str) -> str:
    # `tenants/{tenant}/orgUnits/{unit}` → `{unit}`; empty stays empty.
    return name.rsplit("/", 1)[-1] if name else ""


def snapshot_from_pb(tenant_id: str, pb: gres.AuthorizationSnapshot) -> Snapshot:
    """Convert governance's snapshot message to the model's :class:`Snapshot`."""
    units = tuple(
        OrgUnit(_last(u.name), _KINDS[u.kind], _last(u.parent) or None)
        for u in pb.org_units
        if u.kind in _KINDS
    )
    bindings = tuple(
        RoleBinding(
            b.subject, gres.Role.Name(b.role).removeprefix("ROLE_"), _last(b.org_unit) or None
        )
        for b in pb.role_bindings
        if b.role != gres.ROLE_UNSPECIFIED
    )
    delegations = tuple(
        Delegation(
            _last(d.name),
            d.user_id,
            d.agent_id,
            frozenset(d.capabilities),
            _last(d.parent_delegation) or None,
            d.state == gres.DELEGATION_STATE_ACTIVE,
        )
        for d in pb.delegations
    )
    return Snapshot(tenant_id, pb.revision, units, bindings, delegations)


class GovernanceDirectory:
    """Reads snapshots from governance over gRPC.

    Args:
        target: ``host:port`` of governance (or of the edge routing to it).
        credentials: This service's token, sent as the bearer token of each call.
    """

    def __init__(self, target: str, credentials: ServiceCredentials) -> None:
        # The trace continues in governance (W3C traceparent metadata).
        self.channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
        self.stub = org_grpc.OrganizationServiceStub(self.channel)
        self.credentials = credentials

    async def snapshot(self, tenant_id: str) -> Snapshot:
        """See :class:`~aeterna_common.authz.directory.Directory`.

        Raises:
            grpc.aio.AioRpcError: Governance refused or could not be reached.
        """
        pb = await self.stub.GetAuthorizationSnapshot(
            org.GetAuthorizationSnapshotRequest(name=f"tenants/{tenant_id}/authorizationSnapshot"),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return snapshot_from_pb(tenant_id, pb)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()


def directory_from_settings(
    common: CommonSettings,
    directory: Directory | None = None,
    credentials: ServiceCredentials | None = None,
) -> Directory | None:
    """A service's source of role bindings: ``directory`` when given (plain data, e.g. a
    ``StaticDirectory`` in tests), else governance's at ``AETERNA_AUTHZ_DIRECTORY_URL`` called
    with the service's own token, else None (token roles only).

    Args:
        common: Shared settings.
        directory: An explicit directory, returned as is.
        credentials: The service's token; read from the settings when omitted.

    Raises:
        StartupError: A governance directory is configured without service credentials.
    """
    if directory is not None or not common.authz_directory_url:
        return directory
    credentials = credentials or ServiceCredentials.from_settings(common)
    if credentials is None:
        raise StartupError(
            "AETERNA_AUTHZ_DIRECTORY_URL needs AETERNA_SERVICE_TOKEN_FILE: governance is "
            "called with the service's own token"
        )
    return GovernanceDirectory(common.authz_directory_url, credentials)
