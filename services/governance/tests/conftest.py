from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest_asyncio
from aeterna.governance.v1 import approval_service_pb2_grpc as approval_grpc
from aeterna.governance.v1 import organization_service_pb2_grpc as org_grpc
from governance_testkit import GovernanceEnv, start_governance


@pytest_asyncio.fixture(scope="session")
async def gov(make_database: Any) -> AsyncIterator[GovernanceEnv]:
    """A governance server on a fresh database of the session's PostgreSQL."""
    urls = await make_database()
    server, app = await start_governance(urls)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    yield GovernanceEnv(
        urls=urls,
        server=server,
        app=app,
        channel=channel,
        orgs=org_grpc.OrganizationServiceStub(channel),
        approvals=approval_grpc.ApprovalServiceStub(channel),
    )
    await channel.close()
    await server.stop()
