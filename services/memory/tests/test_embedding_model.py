"""The embedding model is recorded with every vector and index; a replica never mixes spaces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.type.v1 import layer_pb2
from aeterna_common.vectors.port import FieldMatch, IndexFilter
from aeterna_devstack.pytest_plugin import session_auth
from grpc_health.v1 import health_pb2, health_pb2_grpc
from memory_testkit import md, memory, new_tenant, start_memory

INT8 = "all-MiniLM-L6-v2-int8/384"
FP32 = "all-MiniLM-L6-v2/384"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def admin_md(tenant: str) -> tuple[tuple[str, str], ...]:
    token = session_auth().issue_token(tenant, "ops", roles=["TENANT_ADMIN"])
    return (("authorization", f"Bearer {token}"),)


async def health(stub: health_pb2_grpc.HealthStub) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


async def until(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_model_switch_is_refused_until_a_resumed_reembed(
    make_database: Any, redis_server: Any, scratch: Path
) -> None:
    urls = await make_database()
    index_dir = scratch / f"model-switch-{uuid.uuid4().hex[:8]}"
    t = new_tenant()
    contents = [f"Note {i}: the standup moved to room {100 + i}" for i in range(12)]

    # A replica with the int8 model writes memories; model ids are recorded everywhere.
    server, app = await start_memory(urls, redis_server.url, index_dir)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = svc_grpc.MemoryServiceStub(ch)
            for text in contents:
                m = await stub.CreateMemory(
                    svc.CreateMemoryRequest(
                        parent=f"tenants/{t}", memory=memory(text, user_id="u")
                    ),
                    metadata=md(t),
                )
                assert m.embedding_model == INT8 and m.embedding_dimension == 384
        await app.follower.catch_up()
        assert (index_dir / "embedding_model").read_text().strip() == INT8
        hits = await app.follower.index.search_dense([1.0] + [0.0] * 383, _filter(t), 1)
        assert hits, "the index holds the tenant's points"
    finally:
        await server.stop()

    # The same data served with the fp32 model: refused, health stays NOT_SERVING.
    server, app = await start_memory(
        urls,
        redis_server.url,
        index_dir,
        wait_ready=False,
        embedding_int8=False,
        model_check_interval_s=0.2,
        reembed_per_s=10.0,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = svc_grpc.MemoryServiceStub(ch)
            checks = health_pb2_grpc.HealthStub(ch)

            async def refused() -> bool:
                return app.domain.model_mismatch is not None

            await until(refused)
            assert await health(checks) == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SearchMemories(
                    svc.SearchMemoriesRequest(
                        parent=f"tenants/{t}", query="standup", scope=layer_pb2.Scope(user_id="u")
                    ),
                    metadata=md(t),
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            message = err.value.details() or ""
            assert INT8 in message and FP32 in message and "aeterna memory reembed" in message
            assert t in message

            # Only an admin may re-embed, and only with this replica's model.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReembedMemories(
                    svc.ReembedMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t, roles=())
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReembedMemories(
                    svc.ReembedMemoriesRequest(parent=f"tenants/{t}", target_model=INT8),
                    metadata=admin_md(t),
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # Interrupted after 5: the rest stays to do, and the replica still refuses.
            first = await stub.ReembedMemories(
                svc.ReembedMemoriesRequest(
                    parent=f"tenants/{t}", target_model=FP32, max_memories=5
                ),
                metadata=admin_md(t),
            )
            assert (first.model, first.reembedded_count, first.remaining_count) == (FP32, 5, 7)
            await asyncio.sleep(0.6)
            assert await health(checks) == NOT_SERVING

            # Interrupted mid-run (the caller gives up): what was done stays done.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReembedMemories(
                    svc.ReembedMemoriesRequest(parent=f"tenants/{t}"),
                    metadata=admin_md(t),
                    timeout=0.35,
                )
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.3)
            assert await health(checks) == NOT_SERVING

            # Resumed with the CLI: the rest, none twice, at the configured rate.
            started = time.monotonic()
            cli = await asyncio.to_thread(
                subprocess.run,
                [
                    str(Path(sys.executable).parent / "aeterna"),
                    "memory",
                    "reembed",
                    "--tenant",
                    t,
                    "--token",
                    session_auth().issue_token(t, "ops", roles=["TENANT_ADMIN"]),
                    "--endpoint",
                    f"127.0.0.1:{server.port}",
                    "--chunk",
                    "3",
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            elapsed = time.monotonic() - started
            assert cli.returncode == 0, cli.stdout + cli.stderr
            assert f"now embedded with {FP32}" in cli.stdout
            done = int(cli.stdout.split("done: ")[1].split()[0])
            assert 0 < done < 7  # the interrupted call had re-embedded some
            # 10 memories/s: `done` memories in calls of 3 take at least (done - 3) / 10 s.
            assert elapsed >= (done - 3) / 10

            async def serving() -> bool:
                return await health(checks) == SERVING

            await until(serving)
            found = await stub.SearchMemories(
                svc.SearchMemoriesRequest(
                    parent=f"tenants/{t}",
                    query="standup moved to room 103",
                    scope=layer_pb2.Scope(user_id="u"),
                ),
                metadata=md(t),
            )
            assert found.results[0].memory.content == contents[3]
            listed = await stub.ListMemories(
                svc.ListMemoriesRequest(parent=f"tenants/{t}", page_size=100), metadata=md(t)
            )
            assert {m.embedding_model for m in listed.memories} == {FP32}
            for m in listed.memories:
                revisions = await stub.ListMemoryRevisions(
                    svc.ListMemoryRevisionsRequest(name=m.name), metadata=md(t)
                )
                # One ADD and exactly one re-embed per memory, through the normal write path.
                assert [list(r.changed_fields) for r in revisions.revisions][1:] == [["embedding"]]
            # Billed with the writes: each new vector once (4 bytes a component, the content
            # unchanged), and the model calls of the re-embeds (the first 5 at least; a vector
            # the interrupted call made and cached, but never wrote, costs no second call).
            billing = await asyncpg.connect(urls.superuser)
            try:
                billed = {
                    r["metric"]: r["q"]
                    for r in await billing.fetch(
                        "SELECT metric, sum(quantity) AS q FROM usage_hourly "
                        "WHERE tenant_id = $1 GROUP BY metric",
                        t,
                    )
                }
            finally:
                await billing.close()
            stored = sum(len(c.encode()) + 4 * 384 for c in contents)
            assert billed["memory.bytes"] == stored + len(contents) * 4 * 384
            assert len(contents) + 5 <= billed["embedding.calls"] <= 2 * len(contents)
            assert billed["embedding.tokens"] >= 2 * billed["embedding.calls"]  # [CLS] [SEP]
            # Vectors of another model appearing while serving (a rotation under way
            # elsewhere): searches are refused until they are gone.
            admin = await asyncpg.connect(urls.superuser)
            try:
                await admin.execute(
                    "UPDATE memories SET embedding_model = $1 WHERE tenant_id = $2 "
                    "AND content = $3",
                    "other-model/384",
                    t,
                    contents[0],
                )

                async def refusing() -> bool:
                    return app.domain.model_mismatch is not None

                await until(refusing)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SearchMemories(
                        svc.SearchMemoriesRequest(parent=f"tenants/{t}", query="standup"),
                        metadata=md(t),
                    )
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "other-model/384" in (err.value.details() or "")
                await admin.execute(
                    "UPDATE memories SET embedding_model = $1 WHERE tenant_id = $2",
                    FP32,
                    t,
                )

                async def agreed() -> bool:
                    return app.domain.model_mismatch is None

                await until(agreed)
            finally:
                await admin.close()
        assert (index_dir / "embedding_model").read_text().strip() == FP32
        # Each point's payload names the model of its vector.
        index = app.follower.index
        assert await index.count(_filter(t, FieldMatch("embedding_model", value=FP32))) == 12
        assert await index.count(_filter(t, FieldMatch("embedding_model", value=INT8))) == 0
    finally:
        await server.stop()


def _filter(tenant: str, *must: FieldMatch) -> IndexFilter:
    return IndexFilter(tenant_id=tenant, must=list(must))
