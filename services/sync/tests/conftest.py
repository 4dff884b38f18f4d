from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from aeterna_common.authz import StaticDirectory
from aeterna_devstack.servers import RedisServer
from sync_testkit import SyncEnv, start_sync


@pytest_asyncio.fixture(scope="session")
async def sync_env(make_database: Any, redis_server: RedisServer) -> AsyncIterator[SyncEnv]:
    """A sync server on a fresh database of the session's PostgreSQL and its Redis; fast
    presence (gone 1.5 s after the last heartbeat, swept every 0.2 s) and a short
    keepalive."""
    env = await start_sync(
        await make_database(),
        redis_server.url,
        StaticDirectory(),
        presence_ttl_s=1.5,
        presence_sweep_s=0.2,
        keepalive_s=1.0,
        block_ms=200,
    )
    yield env
    await env.close()
