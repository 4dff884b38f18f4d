"""``python -m aeterna_memory``: run the memory service until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from aeterna_common.auth import AuthConfigError
from aeterna_common.config import CommonSettings
from aeterna_common.server import run_service

from aeterna_memory.app import build
from aeterna_memory.settings import MemorySettings


def main() -> None:
    """Validate settings, then serve."""
    common = CommonSettings()
    settings = MemorySettings()
    try:
        asyncio.run(run_service("memory", common, lambda: build(common, settings)))
    except AuthConfigError as exc:
        sys.exit(f"aeterna-memory: cannot start: {exc}")


if __name__ == "__main__":
    main()
