from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_common.consistency import ReadYourWrites
from aeterna_devstack.servers import scratch_dir
from memory_testkit import MemoryEnv, start_memory


@pytest.fixture(scope="session")
def scratch() -> Path:
    base = scratch_dir("aeterna-mem-")
    return base


@pytest_asyncio.fixture(scope="session")
async def env(make_database: Any, redis_server: Any, scratch: Path) -> AsyncIterator[MemoryEnv]:
    urls = await make_database()
    index_dir = scratch / "replica-a"
    server, app = await start_memory(urls, redis_server.url, index_dir, background_process=True)
    # Session consistency: every read on this channel sees the writes made through it.
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[ReadYourWrites()])
    yield MemoryEnv(
        urls=urls,
        redis_url=redis_server.url,
        server=server,
        stub=svc_grpc.MemoryServiceStub(channel),
        app=app,
        index_dir=index_dir,
    )
    await channel.close()
    await server.stop()
