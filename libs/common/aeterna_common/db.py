"""PostgreSQL access under row-level security.

Every unit of work runs in one transaction on a pooled connection of the application role
(``NOSUPERUSER NOBYPASSRLS``); the tenant is set with ``set_config('app.tenant_id', $1, true)``,
which is transaction-local, so a connection returned to the pool carries no tenant.
Transient failures (lost connection, serialization failure, deadlock) retry the whole unit of
work with exponential backoff (tenacity); nothing else is retried.

Schema changes are numbered SQL files applied by the owner role under an advisory lock, so
replicas starting together apply each migration once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from aeterna_common.context import TENANT_PATTERN

log = structlog.get_logger("aeterna.db")

T = TypeVar("T")

TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "08000", "08003", "08006"})
"""serialization_failure, deadlock_detected, admin_shutdown and connection exceptions
(PostgreSQL Appendix A, error codes)."""

MIGRATION_LOCK = 7_311_000_001
"""Advisory lock key held while migrations run."""


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the whole transaction may succeed."""
    if isinstance(exc, (ConnectionError, asyncpg.exceptions.InterfaceError)):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate in TRANSIENT_SQLSTATES


class Database:
    """A pool of application-role connections with per-transaction tenancy.

    Args:
        dsn: DSN of the application role.
        min_size: Minimum pooled connections.
        max_size: Maximum pooled connections.
        attempts: Tries of a unit of work on transient errors (1 = no retry).
    """

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, attempts: int = 4):
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.attempts = attempts
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Create the pool (idempotent)."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self.min_size, max_size=self.max_size
            )

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The pool.

        Raises:
            RuntimeError: :meth:`open` was not called.
        """
        if self._pool is None:
            raise RuntimeError("Database.open() was not called")
        return self._pool

    @asynccontextmanager
    async def transaction(
        self, tenant_id: str, *, readonly: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """One transaction with ``app.tenant_id`` set; commits on success.

        Args:
            tenant_id: The tenant whose rows the transaction may see and write.
            readonly: Start a READ ONLY transaction.

        Raises:
            ValueError: ``tenant_id`` is not a valid tenant id.
        """
        if not TENANT_PATTERN.match(tenant_id):
            raise ValueError(f"invalid tenant id {tenant_id!r}")
        async with self.pool.acquire() as conn, conn.transaction(readonly=readonly):
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant_id)
            yield cast(asyncpg.Connection, conn)

    @asynccontextmanager
    async def all_tenants_snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A READ ONLY, REPEATABLE READ transaction that may read every tenant's rows.

        Only index maintenance (followers, rebuilds, the reconciler) uses this: the policies
        admit all tenants for SELECT when ``app.all_tenants`` is ``on`` and never for writes,
        and the transaction is read-only besides.
        """
        async with (
            self.pool.acquire() as conn,
            conn.transaction(readonly=True, isolation="repeatable_read"),
        ):
            await conn.execute("SELECT set_config('app.all_tenants', 'on', true)")
            yield cast(asyncpg.Connection, conn)

    async def run(
        self,
        tenant_id: str,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        readonly: bool = False,
    ) -> T:
        """Run ``work`` in one tenant transaction, retrying it whole on transient errors.

        Args:
            tenant_id: The tenant.
            work: The unit of work; must be safe to run again after a rollback.
            readonly: Start a READ ONLY transaction.

        Returns:
            What ``work`` returned.
        """
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            reraise=True,
        ):
            with attempt:
                async with self.transaction(tenant_id, readonly=readonly) as conn:
                    return await work(conn)
        raise AssertionError("unreachable")  # pragma: no cover


_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


async def apply_migrations(owner_dsn: str, directory: Path, app_role: str) -> list[str]:
    """Apply the numbered migrations of ``directory`` not yet applied, in order.

    Each file runs in its own transaction as the owner role; ``{app_role}`` in a file is
    replaced by the quoted application role name. A table ``schema_migrations`` records what
    ran. An advisory lock makes concurrent callers wait for each other.

    Args:
        owner_dsn: DSN of the schema owner.
        directory: Folder of ``NNNN_name.sql`` files.
        app_role: The application role granted access by the migrations.

    Returns:
        Names of the files applied now.

    Raises:
        ValueError: a file name does not match ``NNNN_name.sql`` or numbers repeat.
    """
    files = sorted(directory.glob("*.sql"))  # noqa: ASYNC240 (a few small files, at start)
    versions: dict[int, Path] = {}
    for f in files:
        m = _MIGRATION_NAME.match(f.name)
        if not m or int(m.group(1)) in versions:
            raise ValueError(f"bad or duplicate migration file name: {f.name}")
        versions[int(m.group(1))] = f
    conn: asyncpg.Connection = await asyncpg.connect(owner_dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        quoted_role = '"' + app_role.replace('"', '""') + '"'
        for version, path in sorted(versions.items()):
            if version in done:
                continue
            sql = path.read_text().replace("{app_role}", quoted_role)
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    path.name,
                )
            applied_now.append(path.name)
            log.info("migration.applied", name=path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.close()
    return applied_now


async def provision(superuser_dsn: str, database: str, owner_role: str, app_role: str) -> None:
    """Create the owner role, the application role and the database when missing.

    For development and tests; production provisions roles with its own tooling. The
    application role is ``LOGIN NOSUPERUSER NOBYPASSRLS``: row-level security binds it.

    Args:
        superuser_dsn: DSN of a role allowed to create roles and databases.
        database: Database name.
        owner_role: Role that owns the schema and applies migrations.
        app_role: Role the services connect as.
    """
    conn: asyncpg.Connection = await asyncpg.connect(superuser_dsn)
    try:
        for role, extra in ((owner_role, ""), (app_role, " NOBYPASSRLS")):
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            if not exists:
                await conn.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER{extra}')
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}" OWNER "{owner_role}"')
    finally:
        await conn.close()


def role_of(dsn: str) -> str:
    """The user name of a ``postgresql://user@host/db`` DSN.

    Raises:
        ValueError: the DSN names no user.
    """
    from urllib.parse import urlparse

    user = urlparse(dsn).username
    if not user:
        raise ValueError("the DSN names no user")
    return user


def record_to_dict(record: asyncpg.Record) -> dict[str, Any]:
    """A row as a plain dict."""
    return dict(record.items())
