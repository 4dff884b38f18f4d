"""Settings shared by every service (environment prefix ``AETERNA_``).

Each service adds its own settings class with prefix ``AETERNA_<SERVICE>_`` and validates it
at start; a bad value stops the process with a readable pydantic error.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Configuration every service reads.

    Attributes:
        database_url: PostgreSQL DSN of the application role (no BYPASSRLS).
        database_owner_url: DSN of the role that owns the schema and applies migrations;
            defaults to ``database_url`` (then that role must be able to create tables).
        redis_url: Redis URL; empty disables the cache.
        listen: ``host:port`` the gRPC server binds; port 0 picks a free port.
        metrics_port: Prometheus ``/metrics`` port; 0 disables it.
        grace_period_s: Seconds in-flight calls get to finish after SIGTERM.
        drain_s: Seconds between NOT_SERVING and closing the listener, so the edge's health
            checks see it first.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        log_json: JSON logs (production) instead of console rendering.
        otel_exporter: ``none``, ``console`` or ``otlp`` (OTLP reads the standard
            ``OTEL_EXPORTER_OTLP_*`` variables).
        db_pool_min: Minimum pooled PostgreSQL connections.
        db_pool_max: Maximum pooled PostgreSQL connections.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_", extra="ignore")

    database_url: str = "postgresql://aeterna_app@127.0.0.1:5432/aeterna"
    database_owner_url: str | None = None
    redis_url: str = ""
    listen: str = "127.0.0.1:50051"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    grace_period_s: float = Field(default=10.0, ge=0)
    drain_s: float = Field(default=1.0, ge=0)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_json: bool = False
    otel_exporter: str = Field(default="none", pattern="^(none|console|otlp)$")
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
