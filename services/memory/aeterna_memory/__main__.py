"""``python -m aeterna_memory``: run the memory service until SIGTERM."""

from __future__ import annotations

import asyncio

from aeterna_common.config import CommonSettings
from aeterna_common.server import run_service

from aeterna_memory.app import build
from aeterna_memory.settings import MemorySettings


def main() -> None:
    """Validate settings, then serve."""
    common = CommonSettings()
    settings = MemorySettings()
    asyncio.run(run_service("memory", common, lambda: build(common, settings)))


if __name__ == "__main__":
    main()
