"""``aeterna-memory`` (or ``python -m aeterna_memory``): serve, or apply the migrations
(:func:`aeterna_common.server.service_main`: ``serve``, the default, or ``migrate``)."""

from __future__ import annotations

from collections.abc import Sequence

from aeterna_common.config import CommonSettings
from aeterna_common.db import SchemaSettings
from aeterna_common.server import ServiceApp, service_main

from aeterna_memory.app import MIGRATIONS, build
from aeterna_memory.settings import MemorySettings


async def _build(common: CommonSettings, schema: SchemaSettings) -> ServiceApp:
    return await build(common, MemorySettings(), schema)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (default ``sys.argv[1:]``); exit 1 with a readable message."""
    service_main("memory", MIGRATIONS, _build, argv)


if __name__ == "__main__":
    main()
