"""ListMemories in update order (``order_by`` ``update_time``, ``min_update_time``): the
order devices pull in (sync's PullMemories)."""

from __future__ import annotations

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from google.protobuf import field_mask_pb2
from memory_testkit import MemoryEnv, create, md, memory, new_tenant


async def _all(env: MemoryEnv, t: str, **kw: object) -> list[res.Memory]:
    out: list[res.Memory] = []
    token = ""
    while True:
        page = await env.stub.ListMemories(
            svc.ListMemoriesRequest(
                parent=f"tenants/{t}", page_size=2, page_token=token, order_by="update_time", **kw
            ),
            metadata=md(t),
        )
        out.extend(page.memories)
        token = page.next_page_token
        if not token:
            return out


async def test_oldest_change_first_across_pages_and_since_a_time(env: MemoryEnv) -> None:
    t = new_tenant()
    made = [await create(env, t, memory(f"n{i}", user_id="u")) for i in range(3)]
    changed = await env.stub.UpdateMemory(
        svc.UpdateMemoryRequest(
            memory=res.Memory(name=made[0].name, content="n0 changed"),
            update_mask=field_mask_pb2.FieldMask(paths=["content"]),
        ),
        metadata=md(t),
    )
    listed = await _all(env, t)
    assert [m.name for m in listed] == [made[1].name, made[2].name, made[0].name]
    # Deleted memories come too with show_deleted, at their deletion time.
    await env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=made[1].name), metadata=md(t))
    listed = await _all(env, t, show_deleted=True)
    assert [m.name for m in listed] == [made[2].name, made[0].name, made[1].name]
    assert listed[-1].HasField("delete_time")
    # Only changes at or after a time.
    since = await _all(env, t, show_deleted=True, min_update_time=changed.update_time)
    assert [m.name for m in since] == [made[0].name, made[1].name]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"order_by": "content"}, "order_by"),
        ({"min_update_time": {"seconds": 1}}, "min_update_time"),
    ],
)
async def test_bad_order_is_refused(env: MemoryEnv, kw: dict[str, object], field: str) -> None:
    t = new_tenant()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await env.stub.ListMemories(
            svc.ListMemoriesRequest(parent=f"tenants/{t}", **kw),  # type: ignore[arg-type]
            metadata=md(t),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
