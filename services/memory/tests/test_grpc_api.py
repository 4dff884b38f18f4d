"""The gRPC API with the real interceptors: status codes and ErrorInfo reasons."""

from __future__ import annotations

import uuid

import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.pytest_plugin import session_auth
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memory_testkit import MemoryEnv, create, md, memory, new_tenant


def details(exc: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    status = rpc_status.from_call(exc)
    assert status is not None
    reason, fields = "", []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
            assert info.domain == "aeterna.dev"
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields


async def expect(coro, code: grpc.StatusCode) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    return details(info.value)


async def test_create_get_update_delete_history(env: MemoryEnv) -> None:
    t = new_tenant()
    m = memory("Prefers dark roast coffee", "USER", user_id="alice")
    m.tags.append("pref")
    m.metadata.update({"source": "chat", "count": 3})
    created = await create(env, t, m)
    assert created.name.startswith(f"tenants/{t}/memories/")
    assert created.revision == 1 and created.importance == 0.5
    assert created.embedding_model == "all-MiniLM-L6-v2-int8/384"
    assert created.embedding_dimension == 384
    assert created.metadata["count"] == 3
    got = await env.stub.GetMemory(svc.GetMemoryRequest(name=created.name), metadata=md(t))
    assert got.content == "Prefers dark roast coffee"

    upd = res.Memory(
        name=created.name, content="Prefers light roast coffee", tags=["pref", "coffee"]
    )
    updated = await env.stub.UpdateMemory(
        svc.UpdateMemoryRequest(
            memory=upd, update_mask=field_mask_pb2.FieldMask(paths=["content", "tags"])
        ),
        metadata=md(t),
    )
    assert updated.revision == 2 and list(updated.tags) == ["pref", "coffee"]
    assert updated.metadata["source"] == "chat"  # not in the mask: unchanged

    deleted = await env.stub.DeleteMemory(
        svc.DeleteMemoryRequest(name=created.name), metadata=md(t)
    )
    assert deleted.HasField("delete_time") and deleted.revision == 3
    again = await env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=created.name), metadata=md(t))
    assert again.revision == 3 and again.delete_time == deleted.delete_time  # idempotent

    history = await env.stub.ListMemoryRevisions(
        svc.ListMemoryRevisionsRequest(name=created.name), metadata=md(t)
    )
    actions = [r.action for r in history.revisions]
    assert actions == [
        res.REVISION_ACTION_ADD,
        res.REVISION_ACTION_UPDATE,
        res.REVISION_ACTION_DELETE,
    ]
    assert history.revisions[1].old_content == "Prefers dark roast coffee"
    assert history.revisions[1].new_content == "Prefers light roast coffee"
    assert sorted(history.revisions[1].changed_fields) == ["content", "tags"]
    assert history.revisions[0].actor == "users/u1"

    reason, _ = await expect(
        env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=upd, update_mask=field_mask_pb2.FieldMask(paths=["tags"])
            ),
            metadata=md(t),
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "MEMORY_NOT_FOUND"


async def test_not_found_and_permission_before_existence(env: MemoryEnv) -> None:
    t, other = new_tenant(), new_tenant()
    theirs = await create(env, other, memory("secret of another tenant", user_id="bob"))
    missing = f"tenants/{t}/memories/{uuid.uuid4()}"
    reason, _ = await expect(
        env.stub.GetMemory(svc.GetMemoryRequest(name=missing), metadata=md(t)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert reason == "MEMORY_NOT_FOUND"
    # Another tenant's name: denied whether it exists or not (no existence leak).
    for name in (theirs.name, f"tenants/{other}/memories/{uuid.uuid4()}"):
        for call in (
            env.stub.GetMemory(svc.GetMemoryRequest(name=name), metadata=md(t)),
            env.stub.DeleteMemory(svc.DeleteMemoryRequest(name=name), metadata=md(t)),
            env.stub.ListMemoryRevisions(svc.ListMemoryRevisionsRequest(name=name), metadata=md(t)),
        ):
            reason, _ = await expect(call, grpc.StatusCode.PERMISSION_DENIED)
            assert reason == "TENANT_MISMATCH"
    reason, _ = await expect(
        env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=f"tenants/{other}", memory=memory("x", user_id="u")),
            metadata=md(t),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason == "TENANT_MISMATCH"
    # The other tenant's memory is untouched.
    still = await env.stub.GetMemory(svc.GetMemoryRequest(name=theirs.name), metadata=md(other))
    assert not still.HasField("delete_time")


async def test_principal_comes_only_from_a_verified_token(env: MemoryEnv) -> None:
    t = new_tenant()
    mine = await create(env, t, memory("only the token says who calls", user_id="u1"))
    req = svc.GetMemoryRequest(name=mine.name)
    reason, _ = await expect(env.stub.GetMemory(req), grpc.StatusCode.UNAUTHENTICATED)
    assert reason == "TOKEN_MISSING"
    # Identity metadata straight to the replica's port, no token: nobody.
    forged = (("x-aeterna-tenant", t), ("x-aeterna-user", "mallory"), ("x-aeterna-roles", "ADMIN"))
    reason, _ = await expect(
        env.stub.GetMemory(req, metadata=forged), grpc.StatusCode.UNAUTHENTICATED
    )
    assert reason == "TOKEN_MISSING"
    # A token of another tenant plus forged metadata naming this tenant: still the other one.
    reason, _ = await expect(
        env.stub.GetMemory(req, metadata=(*md(new_tenant()), *forged)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason == "TENANT_MISMATCH"
    auth = session_auth()
    unsigned = auth.issue_token(t, "u1", ttl_s=None)
    reason, _ = await expect(
        env.stub.GetMemory(req, metadata=(("authorization", f"Bearer {unsigned}"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason == "TOKEN_CLAIM_MISSING"
    bad_tenant = auth.issue_token("bad tenant!", "u1")
    reason, _ = await expect(
        env.stub.GetMemory(req, metadata=(("authorization", f"Bearer {bad_tenant}"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason == "TOKEN_CLAIM_INVALID"
    # A service principal acts in the tenant a name gives only where authorization admits it
    # (sync may write pointer memories); reading a user's memory is refused before any lookup.
    service = auth.issue_service_token("memory")
    reason, _ = await expect(
        env.stub.GetMemory(req, metadata=(("authorization", f"Bearer {service}"),)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert reason == "ACTION_NOT_ALLOWED"
    got = await env.stub.GetMemory(req, metadata=md(t))
    assert got.content == "only the token says who calls"
    # A slug with a hyphen is a valid tenant (validated by pattern, never by keywords).
    t = "acme-update"
    created = await create(env, t, memory("slug tenants work", user_id="u1"))
    assert created.name.startswith("tenants/acme-update/")


@pytest.mark.parametrize(
    "subject",
    ["auth0|abc123", "google-oauth2|1098", "alice+notes@example.com", str(uuid.uuid4())],
)
async def test_identity_provider_subjects_are_users_and_scope_ids(
    env: MemoryEnv, subject: str
) -> None:
    t = new_tenant()
    created = await env.stub.CreateMemory(
        svc.CreateMemoryRequest(
            parent=f"tenants/{t}", memory=memory("idp subject", user_id=subject)
        ),
        metadata=md(t, user=subject),
    )
    assert created.scope.user_id == subject
    history = await env.stub.ListMemoryRevisions(
        svc.ListMemoryRevisionsRequest(name=created.name), metadata=md(t, user=subject)
    )
    assert history.revisions[0].actor == f"users/{subject}"
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", scope=layer_pb2.Scope(user_id=subject)),
        metadata=md(t),
    )
    assert [m.name for m in listed.memories] == [created.name]


@pytest.mark.parametrize(
    "bad",
    ["line\nbreak", "tab\tid", "nul\x00", "bidi\u202eoverride", "a/b", "x" * 256, "two words"],
)
async def test_bad_identifiers_are_rejected_in_scopes_and_tokens(env: MemoryEnv, bad: str) -> None:
    t = new_tenant()
    reason, fields = await expect(
        env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=f"tenants/{t}", memory=memory("x", user_id=bad)),
            metadata=md(t),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["memory.scope.user_id"]
    reason, _ = await expect(
        env.stub.ListMemories(svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t, bad)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert reason == "TOKEN_CLAIM_INVALID"


@pytest.mark.parametrize(
    ("mem", "field", "reason"),
    [
        (memory("no ids", "SESSION", user_id="u"), "memory.scope.session_id", "MISSING_IDENTIFIER"),
        (memory("no ids", "AGENT", user_id="u"), "memory.scope.agent_id", "MISSING_IDENTIFIER"),
        (memory("no ids", "PROJECT"), "memory.scope.project_id", "MISSING_IDENTIFIER"),
        (memory("   ", "USER", user_id="u"), "memory.content", "EMPTY_CONTENT"),
        (memory("x" * (32 * 1024 + 1), "USER", user_id="u"), "memory.content", "CONTENT_TOO_LARGE"),
        (memory("nul \x00 inside", "USER", user_id="u"), "memory.content", "INVALID_UTF8"),
        (
            res.Memory(content="no layer", scope=layer_pb2.Scope(user_id="u")),
            "memory.layer",
            "MISSING_LAYER",
        ),
        (memory("bad id", "USER", user_id="has space"), "memory.scope.user_id", ""),
    ],
)
async def test_create_validation(env: MemoryEnv, mem: res.Memory, field: str, reason: str) -> None:
    t = new_tenant()
    got_reason, fields = await expect(
        env.stub.CreateMemory(
            svc.CreateMemoryRequest(parent=f"tenants/{t}", memory=mem), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in fields
    if reason:
        assert got_reason == reason
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert len(listed.memories) == 0  # nothing written


async def test_exactly_32_kib_is_accepted(env: MemoryEnv) -> None:
    t = new_tenant()
    content = "é" * (16 * 1024)  # 2 bytes each: exactly 32 KiB of UTF-8
    created = await create(env, t, memory(content, user_id="u"))
    assert len(created.content.encode()) == 32 * 1024


async def test_batch_is_atomic(env: MemoryEnv) -> None:
    t = new_tenant()
    good = svc.CreateMemoryRequest(memory=memory("fine", user_id="u"))
    bad = svc.CreateMemoryRequest(memory=memory("missing session", "SESSION", user_id="u"))
    _, fields = await expect(
        env.stub.BatchCreateMemories(
            svc.BatchCreateMemoriesRequest(parent=f"tenants/{t}", requests=[good, bad, good]),
            metadata=md(t),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["requests[1].memory.scope.session_id"]
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert len(listed.memories) == 0
    _, fields = await expect(
        env.stub.BatchCreateMemories(
            svc.BatchCreateMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["requests"]


async def test_request_id_makes_creates_idempotent(env: MemoryEnv) -> None:
    t = new_tenant()
    req = svc.CreateMemoryRequest(
        parent=f"tenants/{t}", memory=memory("once", user_id="u"), request_id="r-1"
    )
    first = await env.stub.CreateMemory(req, metadata=md(t))
    second = await env.stub.CreateMemory(req, metadata=md(t))
    assert first.name == second.name
    listed = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}"), metadata=md(t)
    )
    assert len(listed.memories) == 1
    other = svc.CreateMemoryRequest(
        parent=f"tenants/{t}", memory=memory("different", user_id="u"), request_id="r-1"
    )
    reason, _ = await expect(
        env.stub.CreateMemory(other, metadata=md(t)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert reason == "REQUEST_ID_REUSED"


async def test_list_pagination_and_filters(env: MemoryEnv) -> None:
    t = new_tenant()
    reqs = [
        svc.CreateMemoryRequest(
            memory=memory(f"note {i}", "SESSION", user_id="u", session_id=f"s{i % 2}")
        )
        for i in range(7)
    ]
    for r in reqs[:3]:
        r.memory.tags.append("x")
    await env.stub.BatchCreateMemories(
        svc.BatchCreateMemoriesRequest(parent=f"tenants/{t}", requests=reqs), metadata=md(t)
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await env.stub.ListMemories(
            svc.ListMemoriesRequest(parent=f"tenants/{t}", page_size=3, page_token=token),
            metadata=md(t),
        )
        seen.extend(m.name for m in page.memories)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 7 == len(set(seen))
    s0 = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", scope=layer_pb2.Scope(session_id="s0")),
        metadata=md(t),
    )
    assert len(s0.memories) == 4
    tagged = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", tags=["x"]), metadata=md(t)
    )
    assert len(tagged.memories) == 3
    # A token is bound to its filters.
    page = await env.stub.ListMemories(
        svc.ListMemoriesRequest(parent=f"tenants/{t}", page_size=2), metadata=md(t)
    )
    _, fields = await expect(
        env.stub.ListMemories(
            svc.ListMemoriesRequest(
                parent=f"tenants/{t}", page_size=2, tags=["x"], page_token=page.next_page_token
            ),
            metadata=md(t),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["page_token"]
    _, fields = await expect(
        env.stub.ListMemories(
            svc.ListMemoriesRequest(parent=f"tenants/{t}", page_size=5000), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["page_size"]


async def test_update_mask_validation(env: MemoryEnv) -> None:
    t = new_tenant()
    created = await create(env, t, memory("original", user_id="u"))
    _, fields = await expect(
        env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(
                memory=res.Memory(name=created.name, layer=2),
                update_mask=field_mask_pb2.FieldMask(paths=["layer"]),
            ),
            metadata=md(t),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["update_mask"]
    reason, _ = await expect(
        env.stub.UpdateMemory(
            svc.UpdateMemoryRequest(memory=res.Memory(name=created.name)), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert reason == "EMPTY_UPDATE_MASK"


async def test_feedback_updates_importance_once_per_request_id(env: MemoryEnv) -> None:
    t = new_tenant()
    created = await create(env, t, memory("useful fact", user_id="u"))
    req = svc.RecordMemoryFeedbackRequest(
        name=created.name, type=res.FEEDBACK_TYPE_HELPFUL, score=1.0, request_id="fb-1"
    )
    first = await env.stub.RecordMemoryFeedback(req, metadata=md(t))
    assert first.importance == pytest.approx(0.75)  # (0.5 + 1) / 2
    again = await env.stub.RecordMemoryFeedback(req, metadata=md(t))
    assert again.importance == pytest.approx(0.75) and again.revision == first.revision
    low = await env.stub.RecordMemoryFeedback(
        svc.RecordMemoryFeedbackRequest(
            name=created.name, type=res.FEEDBACK_TYPE_INACCURATE, score=-1.0
        ),
        metadata=md(t),
    )
    assert low.importance == pytest.approx(0.0)  # clamp((0.75 - 1) / 2) = 0
    _, fields = await expect(
        env.stub.RecordMemoryFeedback(
            svc.RecordMemoryFeedbackRequest(
                name=created.name, type=res.FEEDBACK_TYPE_HELPFUL, score=2.0
            ),
            metadata=md(t),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["score"]
    _, fields = await expect(
        env.stub.RecordMemoryFeedback(
            svc.RecordMemoryFeedbackRequest(name=created.name, score=0.5), metadata=md(t)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert fields == ["type"]


async def test_malformed_names(env: MemoryEnv) -> None:
    t = new_tenant()
    for name in ("", "memories/x", f"tenants/{t}/memories/not-a-uuid", f"tenants/{t}/memories/a/b"):
        reason, fields = await expect(
            env.stub.GetMemory(svc.GetMemoryRequest(name=name), metadata=md(t)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert reason == "INVALID_NAME" and fields == ["name"]


async def test_health_and_reflection_need_no_principal(env: MemoryEnv) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.server.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="aeterna.memory.v1.MemoryService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "aeterna.memory.v1.MemoryService" in names


async def test_invalid_utf8_on_the_wire_is_invalid_argument(env: MemoryEnv) -> None:
    # Field 2 (query) of SearchMemoriesRequest carrying bytes that are not UTF-8.
    t = new_tenant()
    parent = f"tenants/{t}".encode()
    raw = b"\x0a" + bytes([len(parent)]) + parent + b"\x12\x03\xff\xfe\xfd"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.server.port}") as ch:
        call = ch.unary_unary(
            "/aeterna.memory.v1.MemoryService/SearchMemories",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(raw, metadata=md(t))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = details(info.value)
    assert reason == "MALFORMED_REQUEST" and fields == ["request"]
