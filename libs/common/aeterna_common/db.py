"""PostgreSQL access under row-level security.

Every unit of work runs in one transaction on a pooled connection of the application role
(``NOSUPERUSER NOBYPASSRLS``); the transaction is bound to its tenant with
``aeterna_bind_tenant($1)``, a function owned by the schema owner that seals the binding
(transaction-local, keyed hash over tenant, backend and transaction start) and refuses a second
binding in the same transaction, so a connection returned to the pool carries no tenant and no
setting the application role can change reveals another tenant.

Three roles per service database (ARCHITECTURE.md, "Database roles"): the **owner** applies
migrations and serves nothing; the **app** role serves requests under row-level security; the
**indexer** role may only SELECT, across tenants, what index maintenance reads
(:meth:`Database.all_tenants_snapshot` on a pool of that role).
Transient failures (lost connection, serialization failure, deadlock) before COMMIT retry the
whole unit of work with exponential backoff (tenacity); nothing else is retried. A connection
lost during COMMIT leaves the outcome unknown (the server may have committed): the unit of work
is never re-run blindly. When it has an idempotency record, the caller's ``resolve`` reads it
in a new transaction and returns the committed result (or reports that nothing committed, and
the work runs again); without one the call fails with ``UNAVAILABLE`` and ``ErrorInfo`` reason
``COMMIT_OUTCOME_UNKNOWN``.

Round trips: a request's latency on a busy database is mostly the number of its round trips
times the time each one waits for a busy server (measured during a bulk import in another
tenant: every round trip 3-5x slower, the request's own CPU work unchanged). A unit of work
therefore costs three: one simple-protocol message that resets the session, opens the
transaction and binds the tenant (PostgreSQL runs a multi-statement simple query in order, see
"Multiple Statements in a Simple Query" in the protocol chapter), the work itself, and COMMIT.
asyncpg's default pool would add a fourth (and a fifth for a separate ``BEGIN``): its reset
query on release (``Connection.get_reset_query()``: ``pg_advisory_unlock_all()``, ``CLOSE
ALL``, ``UNLISTEN *``, ``RESET ALL``). The same statements run instead at the start of every
transaction this module opens, in the same message as ``BEGIN``, so a connection is never used
with state a previous borrower left, and releasing it costs nothing.

Schema changes are numbered SQL files applied by the owner role under an advisory lock, so
replicas starting together apply each migration once: either at service start
(``AETERNA_MIGRATE_ON_START=true``, the local default) or by a separate migration step (a
service's ``migrate`` command, run as a Helm pre-install/pre-upgrade hook Job), in which case
the service never migrates and waits, bounded, until the versions it needs are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from aeterna_common.context import TENANT_PATTERN
from aeterna_common.errors import Unavailable
from aeterna_common.telemetry import unwatch_pool, watch_pool

log = structlog.get_logger("aeterna.db")

T = TypeVar("T")

TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "57P01", "08000", "08003", "08006"})
"""serialization_failure, deadlock_detected, admin_shutdown and connection exceptions
(PostgreSQL Appendix A, error codes)."""

MIGRATION_LOCK = 7_311_000_001
"""Advisory lock key held while migrations run."""

SCHEMA_POLL_S = 2.0
"""Seconds between checks of the schema version while a service waits for a migration."""


class SchemaSettings(BaseSettings):
    """How a service obtains the schema it needs (environment prefix ``AETERNA_``).

    Attributes:
        migrate_on_start: Apply pending migrations at start with the owner DSN (``make run``,
            tests). When false (Kubernetes: a hook Job migrates) the service never migrates
            and waits until the schema versions it needs are recorded.
        schema_wait_s: Longest wait in seconds for those versions when ``migrate_on_start``
            is false; past it the service exits with an error.
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_", extra="ignore")

    migrate_on_start: bool = True
    schema_wait_s: float = Field(default=300.0, gt=0)


class SchemaNotReadyError(RuntimeError):
    """The schema versions a service needs were not recorded within the wait bound."""


CONNECTION_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "08000", "08003", "08006"})
"""admin_shutdown, crash_shutdown, cannot_connect_now and connection exceptions: the session
is gone, so a COMMIT sent on it has an unknown outcome (PostgreSQL Appendix A)."""

COMMIT_OUTCOME_UNKNOWN = "COMMIT_OUTCOME_UNKNOWN"
"""``ErrorInfo.reason`` of a write whose COMMIT lost its connection and that has no
idempotency record to tell whether it committed."""


class CommitOutcomeUnknown(Unavailable):
    """The connection was lost during COMMIT: the transaction may or may not have committed.

    ``UNAVAILABLE`` with reason :data:`COMMIT_OUTCOME_UNKNOWN`. A client may retry only a call
    that is idempotent (one carrying a ``request_id``, or one whose repetition is harmless).
    """

    default_reason = COMMIT_OUTCOME_UNKNOWN

    def __init__(self, message: str = "") -> None:
        super().__init__(
            message
            or "the database connection was lost while committing; the change may or may not "
            "have been applied (send a request_id to make retries safe)"
        )


class NotCommitted(Unavailable):
    """A commit with an unknown outcome was resolved as not committed: :meth:`Database.run`
    runs the unit of work again, and raises this (``UNAVAILABLE``) only when out of attempts."""

    default_reason = "DATABASE_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the database connection was lost repeatedly; nothing was applied")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the whole transaction may succeed.

    A :class:`CommitOutcomeUnknown` is never transient: re-running could apply a write twice.
    """
    if isinstance(exc, CommitOutcomeUnknown):
        return False
    if isinstance(exc, (ConnectionError, asyncpg.exceptions.InterfaceError, NotCommitted)):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate in TRANSIENT_SQLSTATES


def is_connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the session is gone (so an in-flight COMMIT has an unknown
    outcome), as opposed to a definite refusal such as a serialization failure."""
    if isinstance(
        exc,
        (
            ConnectionError,
            OSError,
            asyncpg.exceptions.InterfaceError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
        ),
    ):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate in CONNECTION_LOST_SQLSTATES


SESSION_RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"
"""What asyncpg's pool runs on release (``Connection.get_reset_query()`` for PostgreSQL 15),
run instead at the start of each transaction (see the module docstring)."""


def quote_literal(value: str) -> str:
    """``value`` as an SQL string literal (``standard_conforming_strings`` is on, the default
    since PostgreSQL 9.1, so only the quote character needs doubling).

    Used only for values already validated against a strict pattern (tenant ids), in the one
    statement that must travel as a simple query (no parameters) to save a round trip.
    """
    return "'" + value.replace("'", "''") + "'"


def begin_statement(tenant_id: str, *, readonly: bool) -> str:
    """One simple-protocol message: reset the session, ``BEGIN``, bind ``tenant_id``.

    Args:
        tenant_id: A tenant id (checked against :data:`TENANT_PATTERN` again here: it is
            spliced into the statement as a literal).
        readonly: ``BEGIN READ ONLY``.

    Returns:
        The statement text for ``Connection.execute`` without arguments.

    Raises:
        ValueError: ``tenant_id`` is not a valid tenant id.
    """
    if not TENANT_PATTERN.fullmatch(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id!r}")
    mode = " READ ONLY" if readonly else ""
    return f"{SESSION_RESET} BEGIN{mode}; SELECT aeterna_bind_tenant({quote_literal(tenant_id)});"


async def _reset_at_next_begin(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing here (asyncpg has already rolled back an open
    transaction and dropped client-side listeners); the session reset travels with the next
    ``BEGIN`` (:data:`SESSION_RESET`)."""


class Database:
    """A pool of application-role connections with per-transaction tenancy.

    Connections are reset when a transaction starts, not when they are released (see the
    module docstring); code that borrows a connection from :attr:`pool` directly must not
    leave session state behind (session ``SET``, advisory locks, ``LISTEN``).

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
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                reset=_reset_at_next_begin,
            )
            # The role labels the pool's saturation gauges (a handful per deployment).
            with contextlib.suppress(ValueError):
                watch_pool(self._pool, role_of(self.dsn))

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            unwatch_pool(self._pool)
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
        """One transaction bound to ``tenant_id`` (``aeterna_bind_tenant``); commits on success.

        Args:
            tenant_id: The tenant whose rows the transaction may see and write.
            readonly: Start a READ ONLY transaction.

        Raises:
            ValueError: ``tenant_id`` is not a valid tenant id.
        """
        if not TENANT_PATTERN.fullmatch(tenant_id):
            raise ValueError(f"invalid tenant id {tenant_id!r}")
        async with self.pool.acquire() as conn, conn.transaction(readonly=readonly):
            # Inside the transaction: the session reset, then the binding (one round trip).
            await conn.execute(
                f"{SESSION_RESET} SELECT aeterna_bind_tenant({quote_literal(tenant_id)});"
            )
            yield cast(asyncpg.Connection, conn)

    @asynccontextmanager
    async def all_tenants_snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A READ ONLY, REPEATABLE READ transaction of this pool's role, bound to no tenant.

        Only index maintenance (followers, rebuilds, the reconciler) uses this, on a pool of
        the **indexer** role, whose policies admit every tenant for SELECT on what index
        maintenance reads and which holds no other privilege. On the application role's pool
        it sees no tenant row at all.
        """
        async with (
            self.pool.acquire() as conn,
            conn.transaction(readonly=True, isolation="repeatable_read"),
        ):
            await conn.execute(SESSION_RESET)
            yield cast(asyncpg.Connection, conn)

    async def _once(
        self,
        tenant_id: str,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        readonly: bool,
    ) -> T:
        """One attempt: reset + BEGIN + bind (one round trip), ``work``, COMMIT; a lost
        connection at COMMIT of a writing transaction raises :class:`CommitOutcomeUnknown`
        instead of a transient error.

        The transaction is opened with SQL rather than ``Connection.transaction()`` (which
        sends ``BEGIN`` on its own), so ``work`` must not open nested transactions
        (asyncpg refuses ``Connection.transaction()`` inside a manually started one).
        """
        begin = begin_statement(tenant_id, readonly=readonly)
        async with self.pool.acquire() as conn:
            try:
                await conn.execute(begin)
                result = await work(cast(asyncpg.Connection, conn))
            except BaseException:
                # The connection may be gone already; the server rolls back on its own then.
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT")
            except Exception as exc:
                if not readonly and is_connection_lost(exc):
                    log.warning("db.commit_outcome_unknown", error=type(exc).__name__)
                    raise CommitOutcomeUnknown() from exc
                raise
            return result

    async def run(
        self,
        tenant_id: str,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        readonly: bool = False,
        resolve: Callable[[asyncpg.Connection], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run ``work`` in one tenant transaction, retrying it whole on transient errors.

        Errors before COMMIT (lost connection, serialization failure, deadlock) roll back and
        retry. A connection lost at COMMIT leaves the outcome unknown: ``work`` is never
        re-run blindly. With ``resolve`` (a read of the idempotency record the work claims
        in the same transaction), the outcome is looked up in a new transaction: a result
        means the work committed and is returned; ``None`` means it did not (the record
        commits or rolls back with the work), so it runs again. Without ``resolve`` the call
        fails with :class:`CommitOutcomeUnknown`.

        Args:
            tenant_id: The tenant.
            work: The unit of work; must be safe to run again after a rollback.
            readonly: Start a READ ONLY transaction.
            resolve: Reads what a committed ``work`` produced from its idempotency record,
                ``None`` when the record does not exist.

        Returns:
            What ``work`` returned (or, after an unknown commit, what ``resolve`` found).

        Raises:
            CommitOutcomeUnknown: COMMIT lost its connection and there is no ``resolve``
                (``UNAVAILABLE``, reason ``COMMIT_OUTCOME_UNKNOWN``).
            ValueError: ``tenant_id`` is not a valid tenant id.
        """
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
            reraise=True,
        ):
            with attempt:
                try:
                    return await self._once(tenant_id, work, readonly)
                except CommitOutcomeUnknown:
                    if resolve is None:
                        raise
                    outcome = await self.run(tenant_id, resolve, readonly=True)
                    if outcome is not None:
                        log.info("db.commit_outcome_resolved", committed=True)
                        return outcome
                    log.info("db.commit_outcome_resolved", committed=False)
                    raise NotCommitted() from None
        raise AssertionError("unreachable")  # pragma: no cover


TENANCY_SQL = resources.files("aeterna_common").joinpath("sql/tenancy.sql").read_text()
"""The sealed tenant binding (``aeterna_bind_tenant``, ``aeterna_tenant``) and the serving
roles' lack of CREATE, one text for every service's database: a migration includes it with a
``{tenancy}`` line (see :func:`apply_migrations`)."""

USAGE_SQL = resources.files("aeterna_common").joinpath("sql/usage.sql").read_text()
"""The hourly usage table every billing service keeps (:mod:`aeterna_common.usage`): a
migration includes it with a ``{usage}`` line."""

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files(directory: Path) -> dict[int, Path]:
    """The numbered migrations of ``directory`` by version.

    Args:
        directory: Folder of ``NNNN_name.sql`` files.

    Returns:
        ``{version: path}``.

    Raises:
        ValueError: a file name does not match ``NNNN_name.sql`` or numbers repeat.
    """
    versions: dict[int, Path] = {}
    for f in sorted(directory.glob("*.sql")):
        m = _MIGRATION_NAME.match(f.name)
        if not m or int(m.group(1)) in versions:
            raise ValueError(f"bad or duplicate migration file name: {f.name}")
        versions[int(m.group(1))] = f
    return versions


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def apply_migrations(
    owner_dsn: str, directory: Path, app_role: str, indexer_role: str | None = None
) -> list[str]:
    """Apply the numbered migrations of ``directory`` not yet applied, in order.

    Each file runs in its own transaction as the owner role. A ``{tenancy}`` line is replaced
    by the sealed tenant binding every service shares (:data:`TENANCY_SQL`), a ``{usage}``
    line by the hourly usage table (:data:`USAGE_SQL`); then
    ``{app_role}`` and ``{indexer_role}`` are replaced by the quoted role names. A table
    ``schema_migrations`` records what ran; the application role may read it (to wait for a
    version, see :func:`wait_for_schema`). An advisory lock makes concurrent callers wait for
    each other.

    Args:
        owner_dsn: DSN of the schema owner.
        directory: Folder of ``NNNN_name.sql`` files.
        app_role: The application role granted access by the migrations.
        indexer_role: The indexer role (cross-tenant SELECT for index maintenance); needed
            by any file that names ``{indexer_role}``.

    Returns:
        Names of the files applied now.

    Raises:
        ValueError: a file name does not match ``NNNN_name.sql`` or numbers repeat, or a
            file names ``{indexer_role}`` and none was given.
    """
    versions = migration_files(directory)
    conn: asyncpg.Connection = await asyncpg.connect(owner_dsn)
    applied_now: list[str] = []
    quoted_role = _quote_ident(app_role)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(f"GRANT SELECT ON schema_migrations TO {quoted_role}")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in sorted(versions.items()):
            if version in done:
                continue
            sql = path.read_text().replace("{tenancy}", TENANCY_SQL).replace("{usage}", USAGE_SQL)
            sql = sql.replace("{app_role}", quoted_role)
            if "{indexer_role}" in sql:
                if not indexer_role:
                    raise ValueError(
                        f"{path.name} grants to the indexer role: set AETERNA_DATABASE_INDEXER_URL"
                    )
                sql = sql.replace("{indexer_role}", _quote_ident(indexer_role))
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


async def schema_versions(dsn: str, *, timeout_s: float = 10.0) -> set[int]:
    """The migration versions recorded in ``schema_migrations``.

    Args:
        dsn: Any role that may read ``schema_migrations`` (the application role may).
        timeout_s: Connection timeout in seconds.

    Returns:
        The recorded versions; empty when no migration ever ran (no table).

    Raises:
        OSError, asyncpg.PostgresError: The database cannot be reached or read.
    """
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    except asyncpg.exceptions.UndefinedTableError:
        return set()
    finally:
        await conn.close()
    return {int(r["version"]) for r in rows}


async def wait_for_schema(
    dsn: str, directory: Path, *, timeout_s: float, poll_s: float = SCHEMA_POLL_S
) -> None:
    """Wait until every migration of ``directory`` is recorded in the database.

    Never changes the schema. Logs what it waits for at each check; an unreachable
    database counts as not ready yet (it may be starting too).

    Args:
        dsn: DSN of the application role.
        directory: The service's migrations: the versions its code needs.
        timeout_s: Longest wait in seconds.
        poll_s: Seconds between checks.

    Raises:
        SchemaNotReadyError: Versions are still missing after ``timeout_s``; the message
            names them, the last problem seen and how to apply them.
        ValueError: A migration file name is malformed.
    """
    needed = migration_files(directory)
    started = time.monotonic()
    while True:
        try:
            present = await schema_versions(dsn, timeout_s=max(poll_s, 5.0))
            problem = ""
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            present, problem = set(), f"{type(exc).__name__}: {exc}"
        missing = [needed[v].name for v in sorted(set(needed) - present)]
        if not missing:
            log.info("schema.ready", version=max(needed, default=0))
            return
        waited = time.monotonic() - started
        if waited >= timeout_s:
            raise SchemaNotReadyError(
                f"the database lacks schema version {max(needed)} after waiting {waited:.0f} s "
                f"(AETERNA_SCHEMA_WAIT_S): missing {', '.join(missing)}"
                + (f"; last error: {problem}" if problem else "")
                + ". Apply the migrations with the service's `migrate` command and "
                "AETERNA_DATABASE_OWNER_URL (the Helm pre-install/pre-upgrade hook Job does), "
                "or set AETERNA_MIGRATE_ON_START=true."
            )
        log.info(
            "schema.waiting",
            missing=missing,
            problem=problem or None,
            waited_s=round(waited, 1),
            bound_s=timeout_s,
        )
        await asyncio.sleep(min(poll_s, timeout_s - waited))


async def prepare_schema(
    settings: SchemaSettings,
    *,
    database_url: str,
    owner_url: str | None,
    directory: Path,
    indexer_url: str | None = None,
) -> list[str]:
    """At service start: migrate, or wait for the migration step, per ``settings``.

    Args:
        settings: ``migrate_on_start`` and ``schema_wait_s``.
        database_url: DSN of the application role.
        owner_url: DSN of the schema owner; ``None`` uses ``database_url``.
        directory: The service's migrations.
        indexer_url: DSN of the indexer role, whose user the migrations grant to.

    Returns:
        Names of the migrations applied now (always empty when waiting).

    Raises:
        SchemaNotReadyError: See :func:`wait_for_schema`.
    """
    if settings.migrate_on_start:
        return await apply_migrations(
            owner_url or database_url,
            directory,
            role_of(database_url),
            role_of(indexer_url) if indexer_url else None,
        )
    await wait_for_schema(database_url, directory, timeout_s=settings.schema_wait_s)
    return []


SERVING_ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION"
"""Attributes of the app and indexer roles: neither bypasses row-level security nor creates
anything (ARCHITECTURE.md, "Database roles")."""


async def provision(
    superuser_dsn: str,
    database: str,
    owner_role: str,
    app_role: str,
    indexer_role: str | None = None,
) -> None:
    """Create the owner, application and indexer roles and the database when missing.

    For development and tests; production provisions roles with its own tooling (the
    CloudNativePG managed roles in ``k8s/``). The owner owns the database and, through the
    migrations, every table. The application and indexer roles are
    :data:`SERVING_ROLE_ATTRIBUTES` (set again on existing roles); row-level security binds
    them, and the migrations grant them what they may do. The database's ``CREATE`` and
    ``TEMPORARY`` privileges are revoked from ``PUBLIC``.

    Args:
        superuser_dsn: DSN of a role allowed to create roles and databases.
        database: Database name.
        owner_role: Role that owns the schema and applies migrations.
        app_role: Role the services serve requests as.
        indexer_role: Role index maintenance reads as; ``None`` creates none.
    """
    conn: asyncpg.Connection = await asyncpg.connect(superuser_dsn)
    try:
        roles = [(owner_role, "LOGIN NOSUPERUSER")]
        roles += [(r, SERVING_ROLE_ATTRIBUTES) for r in (app_role, indexer_role) if r]
        for role, attributes in roles:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            await conn.execute(f"{verb} ROLE {_quote_ident(role)} {attributes}")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(
                f"CREATE DATABASE {_quote_ident(database)} OWNER {_quote_ident(owner_role)}"
            )
            await conn.execute(
                f"REVOKE CREATE, TEMPORARY ON DATABASE {_quote_ident(database)} FROM PUBLIC"
            )
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
