"""Dependency outages answer UNAVAILABLE with a stable reason (retryable), never INTERNAL:
a stopped PostgreSQL, and an OpenAI-compatible embedding endpoint on a closed port."""

from __future__ import annotations

import os
from typing import Any

import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.type.v1 import layer_pb2
from aeterna_common.db import provision
from aeterna_devstack.pytest_plugin import DatabaseUrls
from aeterna_devstack.servers import PostgresServer, free_port, scratch_dir
from memory_testkit import md, memory, new_tenant, start_memory
from test_grpc_api import expect


async def test_stopped_database_is_unavailable(scratch: Any) -> None:
    base = str(scratch_dir("aeterna-pg-outage-"))
    pg = PostgresServer(os.path.join(base, "data")).start()
    stopped = False
    try:
        await provision(pg.dsn(), "outage", "aeterna_owner", "aeterna_app", "aeterna_indexer")
        urls = DatabaseUrls(
            superuser=pg.dsn("postgres", "outage"),
            owner=pg.dsn("aeterna_owner", "outage"),
            app=pg.dsn("aeterna_app", "outage"),
            indexer=pg.dsn("aeterna_indexer", "outage"),
        )
        server, _app = await start_memory(urls, "", scratch / "outage-db")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = svc_grpc.MemoryServiceStub(channel)
                t = new_tenant()
                created = await stub.CreateMemory(
                    svc.CreateMemoryRequest(
                        parent=f"tenants/{t}", memory=memory("Likes tea", user_id="u")
                    ),
                    metadata=md(t),
                )
                pg.stop()
                stopped = True
                calls = [
                    stub.GetMemory(svc.GetMemoryRequest(name=created.name), metadata=md(t)),
                    stub.SearchMemories(
                        svc.SearchMemoriesRequest(
                            parent=f"tenants/{t}", query="tea", scope=layer_pb2.Scope(user_id="u")
                        ),
                        metadata=md(t),
                    ),
                    stub.CreateMemory(
                        svc.CreateMemoryRequest(
                            parent=f"tenants/{t}", memory=memory("Likes coffee", user_id="u")
                        ),
                        metadata=md(t),
                    ),
                    stub.ListMemories(
                        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
                    ),
                ]
                for call in calls:
                    reason, _ = await expect(call, grpc.StatusCode.UNAVAILABLE)
                    assert reason == "DATABASE_UNAVAILABLE"
        finally:
            await server.stop()
    finally:
        if not stopped:
            pg.stop()


async def test_unreachable_embedding_endpoint_is_unavailable(
    make_database: Any, scratch: Any
) -> None:
    urls = await make_database()
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server, _app = await start_memory(
        urls, "", scratch / "outage-embedding", embedding="openai", embedding_url=closed
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = svc_grpc.MemoryServiceStub(channel)
            t = new_tenant()
            for call in (
                stub.CreateMemory(
                    svc.CreateMemoryRequest(
                        parent=f"tenants/{t}", memory=memory("Likes tea", user_id="u")
                    ),
                    metadata=md(t),
                ),
                stub.SearchMemories(
                    svc.SearchMemoriesRequest(
                        parent=f"tenants/{t}", query="tea", scope=layer_pb2.Scope(user_id="u")
                    ),
                    metadata=md(t),
                ),
            ):
                reason, _ = await expect(call, grpc.StatusCode.UNAVAILABLE)
                assert reason == "EMBEDDING_UNAVAILABLE"
            # Nothing was written.
            listed = await stub.ListMemories(
                svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
            )
            assert not listed.memories
    finally:
        await server.stop()
