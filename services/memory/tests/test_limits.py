"""Bounded requests: filter counts, ``any_of`` lengths, tags and message sizes, with the same
limits on the server and in the CLI's channel."""

from __future__ import annotations

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna_cli import client
from aeterna_common.limits import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES
from aeterna_memory.adapters.postgres import PAGE_BYTES
from aeterna_memory.convert import MAX_ANY_OF, MAX_METADATA_FILTERS, MAX_TAGS
from google.protobuf import struct_pb2
from memory_testkit import MemoryEnv, md, memory, new_tenant
from test_grpc_api import expect


def search_request(tenant: str, **kw: object) -> svc.SearchMemoriesRequest:
    return svc.SearchMemoriesRequest(parent=f"tenants/{tenant}", query="anything", **kw)


def eq(key: str, value: str) -> svc.MetadataFilter:
    return svc.MetadataFilter(key=key, equals=struct_pb2.Value(string_value=value))


async def test_filter_counts_any_of_lengths_and_tags_are_capped(env: MemoryEnv) -> None:
    t = new_tenant()
    at_limit = [eq(f"k{i}", "v") for i in range(MAX_METADATA_FILTERS)]
    await env.stub.SearchMemories(search_request(t, metadata_filters=at_limit), metadata=md(t))

    over = [eq(f"k{i}", "v") for i in range(MAX_METADATA_FILTERS + 1)]
    reason, fields = await expect(
        env.stub.SearchMemories(search_request(t, metadata_filters=over), metadata=md(t)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("TOO_MANY_FILTERS", ["metadata_filters"])

    values = struct_pb2.ListValue()
    values.extend([f"v{i}" for i in range(MAX_ANY_OF + 1)])
    long_any_of = svc.MetadataFilter(key="k", any_of=values)
    reason, fields = await expect(
        env.stub.SearchMemories(search_request(t, metadata_filters=[long_any_of]), metadata=md(t)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("TOO_MANY_VALUES", ["metadata_filters[0].any_of"])

    tags = [f"tag-{i}" for i in range(MAX_TAGS + 1)]
    reason, fields = await expect(
        env.stub.SearchMemories(search_request(t, tags=tags), metadata=md(t)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("TOO_MANY_TAGS", ["tags"])
    reason, fields = await expect(
        env.stub.ListMemories(
            svc.ListMemoriesRequest(parent=f"tenants/{t}", tags=tags), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert (reason, fields) == ("TOO_MANY_TAGS", ["tags"])


def oversized_batch(tenant: str) -> svc.BatchCreateMemoriesRequest:
    """Valid memories (30 KiB each), more than 4 MiB in all."""
    n = MAX_REQUEST_BYTES // (30 * 1024) + 2
    req = svc.BatchCreateMemoriesRequest(
        parent=f"tenants/{tenant}",
        requests=[
            svc.CreateMemoryRequest(memory=memory(f"{i} " + "x" * 30 * 1024, user_id="u"))
            for i in range(n)
        ],
    )
    assert req.ByteSize() > MAX_REQUEST_BYTES
    return req


async def test_server_refuses_requests_over_4_mib(env: MemoryEnv) -> None:
    t = new_tenant()
    # A client that would send anything: the server's own limit refuses it.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{env.server.port}", options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = svc_grpc.MemoryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.BatchCreateMemories(oversized_batch(t), metadata=md(t))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert not listed.memories


async def test_cli_channel_has_the_server_limits(env: MemoryEnv) -> None:
    assert ("grpc.max_send_message_length", MAX_REQUEST_BYTES) in client.CLIENT_OPTIONS
    assert ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES) in client.CLIENT_OPTIONS
    t = new_tenant()
    channel, stub = client.memory_stub(f"127.0.0.1:{env.server.port}")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.BatchCreateMemories(oversized_batch(t), metadata=md(t))
    # Refused by the CLI's channel before it is sent, with the same code as the server's.
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_list_pages_stay_under_the_response_limit(env: MemoryEnv) -> None:
    t = new_tenant()
    per_memory = 30 * 1024
    n = PAGE_BYTES // per_memory + 10
    for start in range(0, n, 60):
        await env.stub.BatchCreateMemories(
            svc.BatchCreateMemoriesRequest(
                parent=f"tenants/{t}",
                requests=[
                    svc.CreateMemoryRequest(
                        memory=memory(f"{i} " + "y" * (per_memory - 8), user_id="u")
                    )
                    for i in range(start, min(n, start + 60))
                ],
            ),
            metadata=md(t),
        )
    first = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", page_size=1000), metadata=md(t)
    )
    assert 0 < len(first.memories) < n and first.next_page_token
    assert first.ByteSize() <= MAX_RESPONSE_BYTES
    second = await env.stub.ListMemories(
        svc.ListMemoriesRequest(
            parent=f"tenants/{t}", page_size=1000, page_token=first.next_page_token
        ),
        metadata=md(t),
    )
    names = [m.name for m in (*first.memories, *second.memories)]
    assert len(names) == len(set(names)) == n and not second.next_page_token
