"""``aeterna-knowledge`` (or ``python -m aeterna_knowledge``): serve, or apply the migrations.

``aeterna-knowledge`` / ``aeterna-knowledge serve`` runs the service until SIGTERM.
``aeterna-knowledge migrate`` applies pending migrations as the schema owner
(``AETERNA_DATABASE_OWNER_URL``; the Helm pre-install/pre-upgrade hook Job) and exits 0.
A setting or start-up problem exits 1 with one readable line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg
from aeterna_common.auth import AuthConfigError
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings, apply_migrations, migration_files, role_of
from aeterna_common.logging import configure_logging
from aeterna_common.server import StartupError, run_service
from pydantic import ValidationError

from aeterna_knowledge.app import MIGRATIONS, build
from aeterna_knowledge.settings import KnowledgeSettings

PROG = "aeterna-knowledge"


def serve() -> None:
    """Validate settings, then serve until SIGTERM or SIGINT.

    Raises:
        ValidationError: A setting is invalid.
        StartupError: The schema is not ready (see ``build``).
    """
    common = CommonSettings()
    settings = KnowledgeSettings()
    schema = SchemaSettings()
    asyncio.run(run_service("knowledge", common, lambda: build(common, settings, schema)))


def migrate() -> list[str]:
    """Apply pending migrations with the owner DSN, granting the application role
    (``AETERNA_DATABASE_URL``) and the indexer role (``AETERNA_DATABASE_INDEXER_URL``).

    Returns:
        Names of the migrations applied now.

    Raises:
        ValidationError: A setting is invalid.
        StartupError: The database cannot be reached or a migration failed.
    """
    common = CommonSettings()
    configure_logging(common.log_level, common.log_json)
    owner = common.database_owner_url or common.database_url
    try:
        return asyncio.run(
            apply_migrations(
                owner,
                MIGRATIONS,
                role_of(common.database_url),
                role_of(common.database_indexer_url),
            )
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, ValueError) as exc:
        raise StartupError(
            f"migrations failed with AETERNA_DATABASE_OWNER_URL: {type(exc).__name__}: {exc}"
        ) from exc


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run it; exit 1 with a readable message on failure.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Aeterna's knowledge service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve gRPC until SIGTERM (the default)")
    commands.add_parser("migrate", help="apply the migrations as the schema owner, then exit")
    args = parser.parse_args(argv)
    try:
        if args.command == "migrate":
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
    except (StartupError, AuthConfigError) as exc:
        doing = "migrate failed" if args.command == "migrate" else "cannot start"
        sys.exit(f"{PROG}: {doing}: {exc}")


if __name__ == "__main__":
    main()
