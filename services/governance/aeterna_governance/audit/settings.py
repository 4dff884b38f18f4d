"""Settings of the audit log (environment prefix ``AETERNA_GOVERNANCE_AUDIT_``), validated
at start."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuditSettings(BaseSettings):
    """Configuration of the audit log.

    Attributes:
        checkpoint_interval_s: Seconds between checkpoints of every tenant's chain head (0
            disables), under the lease ``governance:audit:checkpoint``. A truncation of the
            tail is detected once a checkpoint covers it.
        consume: Run the consumer of the event streams (when ``AETERNA_REDIS_URL`` is set),
            under the lease ``governance:audit:consume``.
        consume_batch: Stream entries read per stream and round.
        consume_block_ms: Longest wait for new entries per round, in milliseconds.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_GOVERNANCE_AUDIT_", extra="ignore")

    checkpoint_interval_s: float = Field(default=60.0, ge=0)
    consume: bool = True
    consume_batch: int = Field(default=100, ge=1, le=10_000)
    consume_block_ms: int = Field(default=1000, ge=10, le=60_000)
