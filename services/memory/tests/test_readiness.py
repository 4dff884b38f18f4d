"""Readiness: health stays NOT_SERVING until the embedded index has caught up with the outbox."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_devstack.pytest_plugin import DatabaseUrls
from grpc_health.v1 import health_pb2, health_pb2_grpc
from memory_testkit import md, memory, new_tenant, start_memory
from structlog.testing import capture_logs

SERVICE = "aeterna.memory.v1.MemoryService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return int(reply.status)


async def write(port: int, tenant: str, texts: list[str]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = svc_grpc.MemoryServiceStub(ch)
        for text in texts:
            await stub.CreateMemory(
                svc.CreateMemoryRequest(
                    parent=f"tenants/{tenant}", memory=memory(text, user_id="u")
                ),
                metadata=md(tenant),
            )


async def start_gated(urls: DatabaseUrls, redis_url: str, index_dir: Path) -> tuple[Any, Any]:
    """Start a replica while the outbox is locked, so its index cannot catch up; check it is
    not ready, then release the lock and check it becomes ready with everything applied."""
    # The superuser: the owner is bound by the forced row-level security of the outbox.
    admin = await asyncpg.connect(urls.superuser)
    try:
        latest = int(await admin.fetchval("SELECT coalesce(max(position), 0) FROM outbox"))
        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        server, app = await start_memory(urls, redis_url, index_dir, wait_ready=False)
        try:
            for _ in range(5):
                assert await health(server.port, "") == NOT_SERVING
                assert await health(server.port, SERVICE) == NOT_SERVING
                await asyncio.sleep(0.2)
            assert server.ready_task is not None and not server.ready_task.done()
            assert app.follower.applied < latest
        finally:
            await lock.rollback()
        await asyncio.wait_for(server.wait_ready(), 60)
    finally:
        await admin.close()
    assert await health(server.port, "") == SERVING
    assert await health(server.port, SERVICE) == SERVING
    assert app.follower.applied == latest
    return server, app


async def test_not_serving_until_the_index_caught_up(
    make_database: Any, redis_server: Any, scratch: Path
) -> None:
    urls = await make_database()
    tenant = new_tenant()
    dir_a = scratch / f"ready-a-{uuid.uuid4().hex[:6]}"
    dir_b = scratch / f"ready-b-{uuid.uuid4().hex[:6]}"
    server, _ = await start_memory(urls, redis_server.url, dir_a)
    await write(server.port, tenant, ["one", "two", "three"])
    await server.stop()

    # A new replica (no index yet) rebuilds from PostgreSQL before it says SERVING.
    with capture_logs() as logs:
        server, app = await start_gated(urls, redis_server.url, dir_b)
    assert any(e["event"] == "index.rebuilt" for e in logs)
    assert len(await app.follower.index.all_ids(tenant)) == 3
    await write(server.port, tenant, ["four", "five"])
    await server.stop()

    # A replica whose index is behind (it missed "four" and "five") catches up first.
    with capture_logs() as logs:
        server, app = await start_gated(urls, redis_server.url, dir_a)
    try:
        assert not any(e["event"] == "index.rebuilt" for e in logs)
        assert len(await app.follower.index.all_ids(tenant)) == 5
    finally:
        await server.stop()
