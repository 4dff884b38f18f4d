"""What every governance servicer is built from, and how a servicer is registered
(:data:`aeterna_governance.app.SERVICERS`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aeterna_common import leases
from aeterna_common.auth import ServiceCredentials
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database

from aeterna_governance.access import Access
from aeterna_governance.settings import GovernanceSettings

Job = Callable[[], Coroutine[Any, Any, None]]


@dataclass(kw_only=True)
class Deps:
    """What servicers are built from.

    Attributes:
        common: Shared settings.
        settings: Governance settings.
        db: Pool of the application role (tenant transactions under RLS).
        indexer: Pool of the indexer role (cross-tenant SELECT of what background jobs find).
        access: The authorization checks (the shared permission model).
        credentials: The service's own token for calls to other services, if configured.
    """

    common: CommonSettings
    settings: GovernanceSettings
    db: Database
    indexer: Database
    access: Access
    credentials: ServiceCredentials | None = None

    def under_lease(
        self, name: str, interval_s: float, job: Callable[[leases.Lease], Awaitable[object]]
    ) -> Job:
        """A background job that runs ``job`` every ``interval_s`` seconds on the one replica
        holding lease ``name`` (0 disables it), as memory's lifecycle jobs do."""

        async def run() -> None:
            if not interval_s:
                return
            await leases.run_periodic_under_lease(
                self.db.pool, name, job, interval_s=interval_s, ttl_s=self.settings.jobs_lease_ttl_s
            )

        return run


@dataclass(frozen=True, kw_only=True)
class Registered:
    """A servicer added to the server, with what it exposes to operators and tests.

    Attributes:
        servicer: The servicer instance.
        background: Its background jobs.
    """

    servicer: object
    background: Sequence[Job] = ()


@dataclass(frozen=True)
class ServicerSpec:
    """One gRPC service of governance.

    Attributes:
        service_name: Full proto name, e.g. ``aeterna.governance.v1.OrganizationService``
            (health status and reflection).
        build: Builds the servicer from :class:`Deps` and adds it to the server.
    """

    service_name: str
    build: Callable[[Deps, grpc.aio.Server], Registered]
