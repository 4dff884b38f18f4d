"""``aeterna-sync`` (or ``python -m aeterna_sync``): serve, or apply the migrations
(:func:`aeterna_common.server.service_main`: ``serve``, the default, or ``migrate``)."""

from __future__ import annotations

from collections.abc import Sequence

from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.server import ServiceApp, service_main

from aeterna_sync.app import MIGRATIONS, build
from aeterna_sync.settings import SyncSettings


async def _build(common: CommonSettings, schema: SchemaSettings) -> ServiceApp:
    return await build(common, SyncSettings(), schema)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (default ``sys.argv[1:]``); exit 1 with a readable message."""
    service_main("sync", MIGRATIONS, _build, argv)


if __name__ == "__main__":
    main()
