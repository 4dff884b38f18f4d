"""Settings of the governance service (environment prefix ``AETERNA_GOVERNANCE_``), validated
at start. Shared settings (database, Redis, listen address, logs, auth) are in
:class:`aeterna_common.config.CommonSettings` (prefix ``AETERNA_``)."""

from __future__ import annotations

from aeterna_common.events import RelaySettings
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GovernanceSettings(BaseSettings, RelaySettings):
    """Configuration of the governance service; the outbox relay's ``events_*`` settings are
    :class:`~aeterna_common.events.RelaySettings`'s (``AETERNA_GOVERNANCE_EVENTS_*``, lease
    ``governance:events:relay``).

    Attributes:
        idempotency_ttl_s: Seconds a ``request_id`` is remembered per (tenant, principal,
            method); a later call with the same id is a new request (24 h, as memory's).
        idempotency_gc_interval_s: Seconds between runs of the collector of expired
            idempotency keys (0 disables), under the lease ``governance:idempotency:gc``.
        approval_ttl_s: Seconds an approval request stays open before it expires (72 h,
            DOMAIN.md, Approvals).
        approval_expiry_interval_s: Seconds between runs of the approval expiry job (0
            disables), under the lease ``governance:approvals:expire``.
        jobs_lease_ttl_s: Time to live in seconds of the background jobs' leases.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_GOVERNANCE_", extra="ignore")

    idempotency_ttl_s: float = Field(default=86_400.0, ge=3600)
    idempotency_gc_interval_s: float = Field(default=600.0, ge=0)
    approval_ttl_s: float = Field(default=72 * 3600.0, gt=0)
    approval_expiry_interval_s: float = Field(default=60.0, ge=0)
    jobs_lease_ttl_s: float = Field(default=30.0, ge=1.0, le=600.0)
