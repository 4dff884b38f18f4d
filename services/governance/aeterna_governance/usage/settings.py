"""Settings of the usage ledger (environment prefix ``AETERNA_GOVERNANCE_USAGE_``), validated
at start."""

from __future__ import annotations

from aeterna_common.usage import DEFAULT_PRICES, METRICS, PriceTable
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class UsageSettings(BaseSettings):
    """Prices, budgets and the embedding hard cap.

    Attributes:
        prices: Metric → price per unit in ``currency`` (JSON in the environment); replaces
            :data:`aeterna_common.usage.DEFAULT_PRICES` metric by metric.
        currency: ISO 4217 code of prices and budgets.
        budgets: Tenant id → budget per calendar month (UTC) in ``currency``.
        default_budget: Budget of a tenant not in ``budgets`` (0: none).
        hard_cap: Refuse new embeddings with ``RESOURCE_EXHAUSTED`` once a tenant's month
            has spent its budget (memory asks ``GetTenantUsage``).
        consume: Run the consumer that folds the event streams (when ``AETERNA_REDIS_URL``
            is set), under the lease ``governance:usage:consume``.
        consume_batch: Stream entries read per stream and round.
        consume_block_ms: Longest wait for new entries per round, in milliseconds.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_GOVERNANCE_USAGE_", extra="ignore")

    prices: dict[str, float] = Field(default_factory=dict)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    budgets: dict[str, float] = Field(default_factory=dict)
    default_budget: float = Field(default=0.0, ge=0)
    hard_cap: bool = False
    consume: bool = True
    consume_batch: int = Field(default=100, ge=1, le=10_000)
    consume_block_ms: int = Field(default=1000, ge=10, le=60_000)

    @field_validator("prices")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {list(METRICS)}")
        if any(p < 0 for p in value.values()):
            raise ValueError("prices must be >= 0")
        return value

    @field_validator("budgets")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        if any(b < 0 for b in value.values()):
            raise ValueError("budgets must be >= 0")
        return value

    def price_table(self) -> PriceTable:
        """The defaults overlaid with :attr:`prices`."""
        return PriceTable({**DEFAULT_PRICES, **self.prices}, self.currency)

    def budget_of(self, tenant_id: str) -> float:
        """The tenant's monthly budget (0: none)."""
        return self.budgets.get(tenant_id, self.default_budget)
