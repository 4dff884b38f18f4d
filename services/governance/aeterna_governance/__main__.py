"""``aeterna-governance`` (or ``python -m aeterna_governance``): serve, apply the migrations, or
bootstrap a tenant (:func:`aeterna_common.server.service_main`).

``aeterna-governance bootstrap --tenant T --admin users/U`` binds the first TENANT_ADMIN of
tenant T as the schema owner (as ``migrate`` runs; production trusts no token roles, so no RPC
can until a tenant admin exists). It is idempotent and writes an outbox event
(``governance.role_binding.created``, actor ``services/governance-bootstrap``), published and
audited like any other change.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import asyncpg
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.logging import configure_logging
from aeterna_common.server import Command, ServiceApp, StartupError, service_main

from aeterna_governance.app import MIGRATIONS, build
from aeterna_governance.organization import bootstrap_tenant_admin
from aeterna_governance.settings import GovernanceSettings


async def _build(common: CommonSettings, schema: SchemaSettings) -> ServiceApp:
    return await build(common, GovernanceSettings(), schema)


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


def _bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True, help="tenant id")
    parser.add_argument("--admin", required=True, help="users/{user} to bind as TENANT_ADMIN")


def _bootstrap(args: argparse.Namespace) -> str:
    written = bootstrap(args.tenant, args.admin)
    state = "bound now" if written else "already bound, nothing written"
    return f"{args.admin} is TENANT_ADMIN of tenant {args.tenant} ({state})"


BOOTSTRAP = Command(
    help="bind a tenant's first TENANT_ADMIN as the schema owner, then exit",
    add_arguments=_bootstrap_arguments,
    run=_bootstrap,
)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (default ``sys.argv[1:]``); exit 1 with a readable message."""
    service_main("governance", MIGRATIONS, _build, argv, commands={"bootstrap": BOOTSTRAP})


if __name__ == "__main__":
    main()
