"""``aeterna-sync`` (or ``python -m aeterna_sync``): serve, or apply the migrations.

``aeterna-sync`` / ``aeterna-sync serve`` runs the service until SIGTERM.
``aeterna-sync migrate`` applies pending migrations as the schema owner
(``AETERNA_DATABASE_OWNER_URL``; the Helm pre-install/pre-upgrade hook Job) and exits 0.
A setting or start-up problem exits 1 with one readable line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aeterna_common.auth import AuthConfigError
from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings, migration_files
from aeterna_common.server import StartupError, migrate_as_owner, run_service
from pydantic import ValidationError

from aeterna_sync.app import MIGRATIONS, build
from aeterna_sync.settings import SyncSettings

PROG = "aeterna-sync"


def serve() -> None:
    """Validate settings, then serve until SIGTERM or SIGINT.

    Raises:
        ValidationError: A setting is invalid.
        StartupError: The schema is not ready (see ``build``).
    """
    common = CommonSettings()
    settings = SyncSettings()
    schema = SchemaSettings()
    asyncio.run(run_service("sync", common, lambda: build(common, settings, schema)))


def migrate() -> list[str]:
    """Apply pending migrations with the owner DSN (:func:`aeterna_common.server.migrate_as_owner`).

    Returns:
        Names of the migrations applied now.
    """
    return migrate_as_owner(MIGRATIONS)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run it; exit 1 with a readable message on failure.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Aeterna's sync service.")
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
