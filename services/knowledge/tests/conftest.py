from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest_asyncio
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc
from aeterna_common.authz import StaticDirectory
from knowledge_testkit import KnowledgeEnv, start_knowledge


@pytest_asyncio.fixture(scope="session")
async def kn(make_database: Any) -> AsyncIterator[KnowledgeEnv]:
    """A knowledge server on a fresh database of the session's PostgreSQL."""
    urls = await make_database()
    directory = StaticDirectory()
    server, app = await start_knowledge(urls, directory)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield KnowledgeEnv(
        urls=urls,
        server=server,
        app=app,
        channel=channel,
        stub=svc_grpc.KnowledgeServiceStub(channel),
        directory=directory,
    )
    await channel.close()
    await server.stop()
