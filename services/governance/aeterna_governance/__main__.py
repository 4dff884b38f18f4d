"""``aeterna-governance`` (or ``python -m aeterna_governance``): serve, or apply the migrations.

``aeterna-governance`` / ``aeterna-governance serve`` runs the service until SIGTERM.
``aeterna-governance migrate`` applies pending migrations as the schema owner
(``AETERNA_DATABASE_OWNER_URL``; the Helm pre-install/pre-upgrade hook Job) and exits 0.
``aeterna-governance bootstrap --tenant T --admin users/U`` binds the first TENANT_ADMIN of
tenant T as the schema owner (as ``migrate`` runs; production trusts no token roles, so no RPC
can until a tenant admin exists). It is idempotent and writes an outbox event
(``governance.role_binding.created``, actor ``services/governance-bootstrap``), published and
audited like any other change.
A setting or start-up problem exits 1 with one readable line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
from aeterna_common.auth import AuthConfigError
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings, migration_files
from aeterna_common.errors import InvalidArgument
from aeterna_common.logging import configure_logging
from aeterna_common.server import StartupError, migrate_as_owner, run_service
from pydantic import ValidationError

from aeterna_governance.app import MIGRATIONS, build
from aeterna_governance.organization import bootstrap_tenant_admin
from aeterna_governance.settings import GovernanceSettings

PROG = "aeterna-governance"


def serve() -> None:
    """Validate settings, then serve until SIGTERM or SIGINT.

    Raises:
        ValidationError: A setting is invalid.
        StartupError: The schema is not ready (see ``build``).
    """
    common = CommonSettings()
    settings = GovernanceSettings()
    schema = SchemaSettings()
    asyncio.run(run_service("governance", common, lambda: build(common, settings, schema)))


def migrate() -> list[str]:
    """Apply pending migrations with the owner DSN (:func:`aeterna_common.server.migrate_as_owner`).

    Returns:
        Names of the migrations applied now.
    """
    return migrate_as_owner(MIGRATIONS)


def bootstrap(tenant_id: str, admin: str) -> bool:
    """Bind ``admin`` (``users/{u}``) as TENANT_ADMIN of ``tenant_id`` with the owner DSN.

    Returns:
        True when written now, False when it existed already.

    Raises:
        InvalidArgument: A malformed tenant or subject.
        StartupError: The database cannot be reached or refused the write (e.g. the schema
            is older than ``0004_bootstrap.sql``: run ``migrate`` first).
    """
    common = CommonSettings()
    configure_logging(common.log_level, common.log_json)
    user_id = admin.removeprefix("users/") if admin.startswith("users/") else ""

    async def run() -> bool:
        conn = await asyncpg.connect(common.database_owner_url or common.database_url)
        try:
            return await bootstrap_tenant_admin(conn, tenant_id, user_id)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise StartupError(
            f"bootstrap failed with AETERNA_DATABASE_OWNER_URL: {type(exc).__name__}: {exc}"
        ) from exc


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run it; exit 1 with a readable message on failure.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Aeterna's governance service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve gRPC until SIGTERM (the default)")
    commands.add_parser("migrate", help="apply the migrations as the schema owner, then exit")
    boot = commands.add_parser(
        "bootstrap", help="bind a tenant's first TENANT_ADMIN as the schema owner, then exit"
    )
    boot.add_argument("--tenant", required=True, help="tenant id")
    boot.add_argument("--admin", required=True, help="users/{user} to bind as TENANT_ADMIN")
    args = parser.parse_args(argv)
    try:
        if args.command == "bootstrap":
            written = bootstrap(args.tenant, args.admin)
            state = "bound now" if written else "already bound, nothing written"
            print(f"{PROG}: {args.admin} is TENANT_ADMIN of tenant {args.tenant} ({state})")
        elif args.command == "migrate":
            applied = migrate()
            latest = max(migration_files(MIGRATIONS))
            print(
                f"{PROG}: schema at version {latest}; applied now: "
                + (", ".join(applied) or "nothing")
            )
        else:
            serve()
    except ValidationError as exc:
        sys.exit(f"{PROG}: invalid settings:\n{exc}")
    except InvalidArgument as exc:
        sys.exit(f"{PROG}: invalid arguments: {exc}")
    except (StartupError, AuthConfigError) as exc:
        doing = (
            f"{args.command} failed"
            if args.command in ("migrate", "bootstrap")
            else ("cannot start")
        )
        sys.exit(f"{PROG}: {doing}: {exc}")


if __name__ == "__main__":
    main()
