"""Settings shared by every service (environment prefix ``AETERNA_``).

Each service adds its own settings class with prefix ``AETERNA_<SERVICE>_`` and validates it
at start; a bad value stops the process with a readable pydantic error.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_CLOCK_SKEW_S = 60
"""Largest accepted clock skew for ``exp``/``nbf``/``iat`` in seconds: Envoy's
``jwt_authn`` default, and the bound the architecture sets for every verifier."""


class CommonSettings(BaseSettings):
    """Configuration every service reads.

    Attributes:
        database_url: PostgreSQL DSN of the application role (no BYPASSRLS).
        database_owner_url: DSN of the role that owns the schema and applies migrations;
            defaults to ``database_url`` (then that role must be able to create tables).
        database_indexer_url: DSN of the indexer role: SELECT across tenants on what index
            maintenance reads, nothing else. Only index followers and the reconciler use it,
            on a pool of their own (``db_indexer_pool_max`` connections).
        redis_url: Redis URL; empty disables the cache.
        listen: ``host:port`` the gRPC server binds; port 0 picks a free port.
        metrics_port: Prometheus ``/metrics`` port; 0 disables it.
        metrics_host: Address the ``/metrics`` endpoint binds: loopback by default; the Helm
            chart sets ``0.0.0.0`` (Prometheus scrapes the pod IP; the chart's NetworkPolicy
            limits who reaches it).
        grace_period_s: Seconds in-flight calls get to finish after SIGTERM.
        drain_s: Seconds between NOT_SERVING and closing the listener, so the edge's health
            checks see it first.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        log_json: JSON logs (production) instead of console rendering.
        otel_exporter: ``none``, ``console`` or ``otlp`` (OTLP/gRPC to ``otel_endpoint``).
        otel_endpoint: OTLP/gRPC endpoint of the trace collector, e.g.
            ``http://otel-collector:4317`` (``http://`` is plaintext); empty: the standard
            ``OTEL_EXPORTER_OTLP_*`` variables.
        db_pool_min: Minimum pooled PostgreSQL connections.
        db_pool_max: Maximum pooled PostgreSQL connections.
        db_indexer_pool_max: Maximum pooled connections of the indexer role.
        auth_jwks_file: JWKS file that verifies bearer tokens (re-read when it changes).
            Serving needs exactly one of this and ``auth_jwks_url``.
        auth_jwks_url: ``http(s)`` URL of the identity provider's JWKS (cached 300 s,
            refetched when a token names an unknown key).
        auth_issuer: Required ``iss`` of bearer tokens; needed to serve.
        auth_audience: Required ``aud`` of bearer tokens; needed to serve.
        auth_clock_skew_s: Tolerance for ``exp``, ``nbf`` and ``iat`` in seconds (at most 60).
        service_token_file: File holding this service's own token for background work
            (in Kubernetes a projected ServiceAccount token; re-read when it changes);
            empty means no service credentials.
        auth_trust_token_roles: Honour the token's ``roles`` claim as tenant-wide role
            bindings: a development shortcut (``make run`` sets it); off by default, so
            production roles come only from governance's bindings.
        authz_directory_url: ``host:port`` of the governance service that serves
            authorization snapshots; empty: no bindings (own memories and trusted token
            roles only).
        authz_cache_ttl_s: Seconds a tenant's cached bindings are used without a refetch
            (bounds staleness when invalidation events are lost).
        authz_stale_grace_s: Seconds past the TTL cached bindings are still used while the
            directory is unreachable; after that, decisions that need them fail with
            ``UNAVAILABLE``.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_", extra="ignore")

    database_url: str = "postgresql://aeterna_app@127.0.0.1:5432/aeterna"
    database_owner_url: str | None = None
    database_indexer_url: str = "postgresql://aeterna_indexer@127.0.0.1:5432/aeterna"
    redis_url: str = ""
    listen: str = "127.0.0.1:50051"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    grace_period_s: float = Field(default=10.0, ge=0)
    # The edge marks a host unhealthy after 2 failed checks 1 s apart (unhealthy_threshold,
    # interval in aeterna_devstack.envoy): up to ~2.5 s with the checks' own latency.
    drain_s: float = Field(default=3.0, ge=0)
    log_level: str = Field(default="info", pattern="^(debug|info|warning|error)$")
    log_json: bool = False
    otel_exporter: str = Field(default="none", pattern="^(none|console|otlp)$")
    otel_endpoint: str = ""
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
    db_indexer_pool_max: int = Field(default=2, ge=1)
    auth_jwks_file: Path | None = None
    auth_jwks_url: str = ""
    auth_issuer: str = ""
    auth_audience: str = ""
    auth_clock_skew_s: int = Field(default=MAX_CLOCK_SKEW_S, ge=0, le=MAX_CLOCK_SKEW_S)
    service_token_file: Path | None = None
    auth_trust_token_roles: bool = False
    authz_directory_url: str = ""
    authz_cache_ttl_s: float = Field(default=60.0, gt=0)
    authz_stale_grace_s: float = Field(default=30.0, ge=0)

    @field_validator("auth_jwks_file", "service_token_file", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        # An exported but empty variable means "not set", not the current directory.
        return None if value == "" else value

    @model_validator(mode="after")
    def _check_auth(self) -> CommonSettings:
        if self.auth_jwks_file is not None and self.auth_jwks_url:
            raise ValueError("set only one of AETERNA_AUTH_JWKS_FILE and AETERNA_AUTH_JWKS_URL")
        if self.auth_jwks_url and urlparse(self.auth_jwks_url).scheme not in ("http", "https"):
            raise ValueError("AETERNA_AUTH_JWKS_URL must be an http:// or https:// URL")
        return self
