"""End to end through Envoy: JWT at the edge and at each replica, two replicas, a replica
killed mid-run, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_cli.client import honour_retry_info
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "locomo-dev.json"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack("aeterna-e2e-", replicas=2) as s:
        yield s


def bearer(stack: DevStack, tenant: str, user: str = "e2e") -> tuple[tuple[str, str], ...]:
    # The edge's behaviour is under test, not permissions: TENANT_ADMIN, whose token roles
    # the development stack trusts (AETERNA_AUTH_TRUST_TOKEN_ROLES).
    token = DevAuth(stack.root / "auth").issue_token(tenant, user, roles=("TENANT_ADMIN",))
    return (("authorization", f"Bearer {token}"),)


async def test_health_and_auth_at_the_edge(stack: DevStack) -> None:
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="aeterna.memory.v1.MemoryService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "aeterna.memory.v1.MemoryService" in names  # reflection needs no token either
        stub = svc_grpc.MemoryServiceStub(ch)
        req = svc.ListMemoriesRequest(parent="tenants/e2e")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListMemories(req)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Identity headers sent by a client are dropped; only the token's claims count.
        forged = (("x-aeterna-tenant", "e2e"), ("x-aeterna-user", "mallory"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListMemories(req, metadata=forged)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        created = await stub.CreateMemory(
            svc.CreateMemoryRequest(
                parent="tenants/e2e",
                memory=res.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="x"),
                    content="edge",
                ),
            ),
            metadata=(*bearer(stack, "e2e"), ("x-aeterna-user", "mallory")),
        )
        history = await stub.ListMemoryRevisions(
            svc.ListMemoryRevisionsRequest(name=created.name), metadata=bearer(stack, "e2e")
        )
        assert history.revisions[0].actor == "users/e2e"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetMemory(
                svc.GetMemoryRequest(name=created.name), metadata=bearer(stack, "other")
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Each replica exposes Prometheus metrics with the standard gRPC server series.
    import httpx

    port = stack.replica_list[0].metrics_port
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    assert "grpc_server_handled_total" in text and "grpc_server_handling_seconds" in text


def _reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None, exc.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


async def test_a_replica_port_trusts_no_forged_metadata(stack: DevStack) -> None:
    # Anyone who reaches a replica's port directly (a peer in the cluster, a port-forward)
    # gets no identity from metadata: only a verified token names the caller.
    forged = (
        ("x-aeterna-tenant", "e2e-direct"),
        ("x-aeterna-user", "mallory"),
        ("x-aeterna-roles", "TENANT_ADMIN"),
    )
    req = svc.ListMemoriesRequest(parent="tenants/e2e-direct")
    async with grpc.aio.insecure_channel(stack.replica_list[1].target) as ch:
        stub = svc_grpc.MemoryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListMemories(req, metadata=forged, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(info.value) == "TOKEN_MISSING"
        # Health stays open on the replica too (Envoy's active health checks need it).
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="aeterna.memory.v1.MemoryService"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("no_exp", "TOKEN_CLAIM_MISSING"),
        ("wrong_audience", "TOKEN_AUDIENCE_MISMATCH"),
    ],
)
async def test_bad_tokens_are_refused_at_the_edge_and_at_the_replica(
    stack: DevStack, case: str, reason: str
) -> None:
    auth = DevAuth(stack.root / "auth")
    token = {
        "expired": auth.issue_token("e2e", "e2e", ttl_s=-300),  # beyond the 60 s skew
        "no_exp": auth.issue_token("e2e", "e2e", ttl_s=None),
        "wrong_audience": auth.issue_token("e2e", "e2e", audience="another-api"),
    }[case]
    md = (("authorization", f"Bearer {token}"),)
    req = svc.ListMemoriesRequest(parent="tenants/e2e")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await svc_grpc.MemoryServiceStub(ch).ListMemories(req, metadata=md, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # Envoy's jwt_authn
    async with grpc.aio.insecure_channel(stack.replica_list[1].target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await svc_grpc.MemoryServiceStub(ch).ListMemories(req, metadata=md, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(info.value) == reason
        assert token not in (info.value.details() or "")


async def test_a_valid_token_is_accepted_at_the_edge_and_at_the_replica(stack: DevStack) -> None:
    md = bearer(stack, "e2e-valid", user="auth0|abc123")
    for target in (stack.endpoint, stack.replica_list[1].target):
        async with grpc.aio.insecure_channel(target) as ch:
            stub = svc_grpc.MemoryServiceStub(ch)
            created = await stub.CreateMemory(
                svc.CreateMemoryRequest(
                    parent="tenants/e2e-valid",
                    memory=res.Memory(
                        layer=layer_pb2.MEMORY_LAYER_USER,
                        scope=layer_pb2.Scope(user_id="auth0|abc123"),
                        content=f"via {target}",
                    ),
                ),
                metadata=md,
                timeout=30,
            )
            history = await stub.ListMemoryRevisions(
                svc.ListMemoryRevisionsRequest(name=created.name), metadata=md, timeout=10
            )
            assert history.revisions[0].actor == "users/auth0|abc123"


async def test_json_over_http_is_transcoded_at_the_edge(stack: DevStack) -> None:
    import httpx

    base = f"http://{stack.endpoint}/v1"
    # Transcoding is under test, not permissions: a tenant admin (it writes bob's memories too).
    token = DevAuth(stack.root / "auth").issue_token("e2e-json", "alice", roles=("TENANT_ADMIN",))
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        created = await http.post(
            "/tenants/e2e-json/memories",
            headers=auth,
            json={
                "layer": "MEMORY_LAYER_USER",
                "scope": {"userId": "alice"},
                "content": "Alice is allergic to peanuts",
                "tags": ["health"],
            },
            params={"requestId": "json-1"},
        )
        assert created.status_code == 200, created.text
        memory = created.json()
        assert memory["name"].startswith("tenants/e2e-json/memories/")
        assert memory["content"] == "Alice is allergic to peanuts"
        assert memory["layer"] == "MEMORY_LAYER_USER"

        found = await http.post(
            "/tenants/e2e-json/memories:search",
            headers=auth,
            json={"query": "what food should alice avoid?", "scope": {"userId": "alice"}},
        )
        assert found.status_code == 200, found.text
        assert found.headers["content-type"].startswith("application/json")
        results = found.json()["results"]
        assert [r["memory"]["name"] for r in results] == [memory["name"]]
        assert results[0]["score"] > 0

        got = await http.get(f"/{memory['name']}", headers=auth)
        assert got.status_code == 200 and got.json()["name"] == memory["name"]
        listed = await http.get("/tenants/e2e-json/memories", headers=auth, params={"pageSize": 5})
        assert [m["name"] for m in listed.json()["memories"]] == [memory["name"]]
        # The other methods' routes (google.api.http rules in memory_service.proto).
        changed = await http.patch(
            f"/{memory['name']}",
            headers=auth,
            params={"updateMask": "content"},
            json={"content": "Alice is allergic to peanuts and cashews"},
        )
        assert changed.json()["revision"] == "2", changed.text
        revisions = await http.get(f"/{memory['name']}:listRevisions", headers=auth)
        actions = [r["action"] for r in revisions.json()["revisions"]]
        assert actions == ["REVISION_ACTION_ADD", "REVISION_ACTION_UPDATE"], revisions.text
        feedback = await http.post(
            f"/{memory['name']}:recordFeedback",
            headers=auth,
            json={"type": "FEEDBACK_TYPE_HELPFUL", "score": 1},
        )
        assert feedback.json()["importance"] > memory["importance"], feedback.text
        batch = await http.post(
            "/tenants/e2e-json/memories:batchCreate",
            headers=auth,
            json={
                "requests": [
                    {
                        "memory": {
                            "layer": "MEMORY_LAYER_USER",
                            "scope": {"userId": "bob"},
                            "content": c,
                        }
                    }
                    for c in ("one", "two")
                ]
            },
        )
        assert [m["content"] for m in batch.json()["memories"]] == ["one", "two"], batch.text
        deleted = await http.delete(f"/{batch.json()['memories'][0]['name']}", headers=auth)
        assert "deleteTime" in deleted.json(), deleted.text

        # A failed call keeps its status: HTTP 404 with google.rpc.Status as JSON.
        missing = await http.get(
            "/tenants/e2e-json/memories/00000000-0000-0000-0000-000000000000", headers=auth
        )
        assert missing.status_code == 404, missing.text
        reasons = [d.get("reason") for d in missing.json()["details"]]
        assert "MEMORY_NOT_FOUND" in reasons
        # An unknown REST path is answered by Envoy (404), not retried into a 503.
        unknown = await http.get("/tenants/e2e-json/nothing-here", headers=auth)
        assert unknown.status_code == 404, unknown.text
        # A misspelt query parameter is rejected, not ignored.
        typo = await http.get("/tenants/e2e-json/memories", headers=auth, params={"pageSise": 5})
        assert typo.status_code == 400, typo.text
        # No token, or a forged identity header instead of one: 401 before any transcoding.
        anonymous = await http.post(
            "/tenants/e2e-json/memories:search",
            json={"query": "peanuts"},
            headers={"x-aeterna-tenant": "e2e-json", "x-aeterna-user": "alice"},
        )
        assert anonymous.status_code == 401, anonymous.text


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_losing_a_replica_mid_run_loses_no_idempotent_call(
    stack: DevStack, sig: signal.Signals
) -> None:
    # SIGKILL: a crash (Envoy retries on reset / refused connections). SIGTERM: a rolling
    # restart (the replica drains: NOT_SERVING first, in-flight calls finish).
    tenant = f"e2e-{sig.name.lower()}"
    md = bearer(stack, tenant)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        stub = svc_grpc.MemoryServiceStub(ch)
        failures: list[str] = []
        client_retries: list[int] = []
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            try:
                if i % 3 == 0:
                    request = svc.CreateMemoryRequest(
                        parent=f"tenants/{tenant}",
                        memory=res.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="k"),
                            content=f"kill test note {i}",
                        ),
                        request_id=f"kill-{i}",
                    )
                    # The header lets the edge retry the create on a reset too.
                    write_md = (*md, ("x-aeterna-request-id", f"kill-{i}"))
                    try:
                        await stub.CreateMemory(request, metadata=write_md, timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        # A replica killed after its response headers (the consistency token)
                        # left: the edge cannot retry a started response, the client can, with
                        # the same request_id, as the SDK contract says.
                        if "RST_STREAM" not in (exc.details() or ""):
                            raise
                        client_retries.append(i)
                        await stub.CreateMemory(request, metadata=write_md, timeout=30)
                else:
                    await stub.SearchMemories(
                        svc.SearchMemoriesRequest(
                            parent=f"tenants/{tenant}",
                            query=f"note {i}",
                            scope=layer_pb2.Scope(user_id="k"),
                        ),
                        metadata=md,
                        timeout=30,
                    )
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{i}: {exc.code().name} {exc.details()}")
            done += 1

        sem = asyncio.Semaphore(8)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        calls = [asyncio.create_task(bounded(i)) for i in range(300)]
        while done < 100:  # noqa: ASYNC110 (poll a counter the calls advance)
            await asyncio.sleep(0.01)
        try:
            await asyncio.to_thread(stack.kill_replica, 0, sig)
            await asyncio.gather(*calls)
            assert failures == []
            assert len(client_retries) <= 2, client_retries  # only calls in flight at the kill
            listed = await stub.ListMemories(
                svc.ListMemoriesRequest(parent=f"tenants/{tenant}", page_size=1000), metadata=md
            )
            assert len(listed.memories) == 100  # one per request id, none lost, none doubled
        finally:
            # Back for the module's later tests, whatever the outcome here.
            stack.start_replica(stack.replica_list[0])
            stack.wait_healthy(stack.replica_list[0])


async def test_creates_without_request_id_are_never_doubled_when_a_replica_dies(
    stack: DevStack,
) -> None:
    # Without a request_id the edge retries a write only where it never reached a replica;
    # a create cut off by the SIGKILL fails instead of being applied twice.
    tenant = "e2e-noid"
    md = bearer(stack, tenant)
    # Each of this tenant's creates spends 0.2 s inside COMMIT (a deferred trigger), so the
    # SIGKILL finds creates that PostgreSQL commits although their replica never answers: the
    # case where a retry on `reset` would store the content twice.
    assert stack.superuser_url is not None
    admin = await asyncpg.connect(stack.superuser_url)
    await admin.execute(
        "CREATE FUNCTION e2e_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$; "
        "CREATE CONSTRAINT TRIGGER e2e_slow_commit AFTER INSERT ON memories "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        f"WHEN (NEW.tenant_id = '{tenant}') EXECUTE FUNCTION e2e_slow_commit()"
    )
    acknowledged: dict[str, str] = {}
    failures: list[str] = []
    done = 0
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        stub = svc_grpc.MemoryServiceStub(ch)

        async def one(i: int) -> None:
            nonlocal done
            content = f"unkeyed create {i}"
            try:
                created = await stub.CreateMemory(
                    svc.CreateMemoryRequest(
                        parent=f"tenants/{tenant}",
                        memory=res.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="n"),
                            content=content,
                        ),
                    ),
                    metadata=md,
                    timeout=30,
                )
                acknowledged[content] = created.name
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{i}: {exc.code().name}")
            done += 1

        sem = asyncio.Semaphore(8)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        calls = [asyncio.create_task(bounded(i)) for i in range(300)]
        while done < 100:  # noqa: ASYNC110 (poll a counter the calls advance)
            await asyncio.sleep(0.01)
        # Kill the replica whose create is inside COMMIT right now.
        victim = None
        while victim is None:
            ports = await admin.fetch(
                "SELECT client_port FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            )
            for r in ports:
                victim = next(
                    (
                        i
                        for i, rep in enumerate(stack.replica_list)
                        if rep.proc is not None and r["client_port"] in _local_ports(rep.proc.pid)
                    ),
                    victim,
                )
        await asyncio.to_thread(stack.kill_replica, victim, signal.SIGKILL)
        await asyncio.gather(*calls)
        stored: list[res.Memory] = []
        token = ""
        while True:
            page = await stub.ListMemories(
                svc.ListMemoriesRequest(
                    parent=f"tenants/{tenant}", page_size=1000, page_token=token
                ),
                metadata=md,
            )
            stored.extend(page.memories)
            token = page.next_page_token
            if not token:
                break
    await admin.execute("DROP TRIGGER e2e_slow_commit ON memories; DROP FUNCTION e2e_slow_commit()")
    await admin.close()
    print(f"unkeyed creates: {len(acknowledged)} acknowledged, {len(failures)} failed")
    contents = [m.content for m in stored]
    assert len(contents) == len(set(contents))  # no content stored twice
    by_content = {m.content: m.name for m in stored}
    assert all(by_content.get(c) == name for c, name in acknowledged.items())
    assert len(acknowledged) >= 200  # most calls were untouched by the kill
    stack.start_replica(stack.replica_list[victim])
    stack.wait_healthy(stack.replica_list[victim])


def _local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_read_your_writes_with_the_token_while_another_tenant_imports(
    stack: DevStack,
) -> None:
    # Default read-wait bound; the write's consistency token makes any replica that answers
    # the search see the write (or answer UNAVAILABLE, which the edge retries elsewhere).
    tenant, bulk_tenant = "e2e-ryw", "e2e-bulk"
    md, bulk_md = bearer(stack, tenant), bearer(stack, bulk_tenant)
    misses: list[str] = []
    stop = asyncio.Event()
    imported = 0
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        stub = svc_grpc.MemoryServiceStub(ch)

        async def bulk_import() -> None:
            nonlocal imported
            n = 0
            while not stop.is_set():
                rid = f"bulk-{n}"
                batch = svc.BatchCreateMemoriesRequest(
                    parent=f"tenants/{bulk_tenant}",
                    requests=[
                        svc.CreateMemoryRequest(
                            memory=res.Memory(
                                layer=layer_pb2.MEMORY_LAYER_USER,
                                scope=layer_pb2.Scope(user_id=f"b{n % 7}"),
                                content=f"imported line {n}-{j} about topic {j % 13}",
                            )
                        )
                        for j in range(100)
                    ],
                    request_id=rid,
                )
                # Over the tenant's bulk write rate: wait the RetryInfo delay, as the CLI does.
                await honour_retry_info(
                    lambda batch=batch, rid=rid: stub.BatchCreateMemories(
                        batch, metadata=(*bulk_md, ("x-aeterna-request-id", rid)), timeout=120
                    )
                )
                imported += 100
                n += 1

        async def pair(i: int) -> None:
            content = f"pair {i} remembers the violet lighthouse number {i * 7919}"
            call = stub.CreateMemory(
                svc.CreateMemoryRequest(
                    parent=f"tenants/{tenant}",
                    memory=res.Memory(
                        layer=layer_pb2.MEMORY_LAYER_USER,
                        scope=layer_pb2.Scope(user_id=f"p{i}"),
                        content=content,
                    ),
                    request_id=f"pair-{i}",
                ),
                metadata=(*md, ("x-aeterna-request-id", f"pair-{i}")),
                timeout=60,
            )
            created = await call
            token = dict(await call.initial_metadata())["x-aeterna-consistency-token"]
            found = await stub.SearchMemories(
                svc.SearchMemoriesRequest(
                    parent=f"tenants/{tenant}",
                    query=content,
                    scope=layer_pb2.Scope(user_id=f"p{i}"),
                    top_k=5,
                ),
                metadata=(*md, ("x-aeterna-consistency-token", token)),
                timeout=60,
            )
            if created.name not in [r.memory.name for r in found.results]:
                misses.append(f"pair {i}")

        importer = asyncio.create_task(bulk_import())
        while imported < 100:  # noqa: ASYNC110 (the import is running)
            await asyncio.sleep(0.05)
        sem = asyncio.Semaphore(8)

        async def bounded(i: int) -> None:
            async with sem:
                await pair(i)

        try:
            await asyncio.gather(*(bounded(i) for i in range(300)))
        finally:
            stop.set()
            await importer
    print(f"write->search pairs: 300, misses {len(misses)}, imported meanwhile {imported}")
    assert imported >= 200  # the import really ran alongside
    assert misses == []


def test_cli_import_and_search_a_slice_of_locomo(stack: DevStack, tmp_path: Path) -> None:
    if not DATA.exists():
        pytest.fail(f"dev data missing: {DATA}")
    import json

    sample = json.loads(DATA.read_text())[0]
    conv = sample["conversation"]
    keep = {
        k: v
        for k, v in conv.items()
        if not k.startswith("session_") or k.split("_")[1] in {"1", "2"}
    }
    sliced = tmp_path / "slice.json"
    sliced.write_text(json.dumps([{**sample, "conversation": keep}]))
    n_turns = len(conv["session_1"]) + len(conv["session_2"])
    # Importing a dataset writes every speaker's memories: a tenant admin's job.
    admin = DevAuth(stack.root / "auth").issue_token("cli", "cli", roles=("TENANT_ADMIN",))
    env = {
        **os.environ,
        "AETERNA_ENDPOINT": stack.endpoint,
        "AETERNA_STATE_DIR": str(stack.root),
        "AETERNA_TOKEN": admin,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "aeterna_cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    out = cli("import", "locomo", str(sliced), "--tenant", "cli")
    assert f"imported {n_turns} memories" in out.stdout
    # Importing again is idempotent (stable request ids per session).
    cli("import", "locomo", str(sliced), "--tenant", "cli")
    listed = cli("memory", "list", "--tenant", "cli", "--page-size", "1000", "--json")
    # --json writes one object per line.
    assert len(listed.stdout.splitlines()) == n_turns
    question = "When did Caroline go to the LGBTQ support group?"
    user = str(sample["sample_id"])
    found = cli(
        "memory", "search", question, "--tenant", "cli", "--user-id", user, "--json", "--top-k", "5"
    )
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert "D1:3" in [h["metadata"]["dia_id"] for h in hits]
    assert all(h["layer"] == "SESSION" and h["score"] > 0 and h["title"] for h in hits)
    # `memory add` always sends a request_id and prints its consistency token, which a
    # search passes along to read the new memory at once on any replica.
    added = json.loads(
        cli("memory", "add", "the cli wrote about amber kites", "--tenant", "cli", "--json").stdout
    )[0]
    assert added["consistencyToken"]
    again = cli(
        "memory",
        "search",
        "amber kites",
        "--tenant",
        "cli",
        "--user-id",
        "cli",
        "--json",
        "--consistency-token",
        added["consistencyToken"],
    )
    assert [json.loads(h)["name"] for h in again.stdout.splitlines()] == [added["name"]]
    keyed = ("memory", "add", "same request twice", "--tenant", "cli", "--json")
    first = json.loads(cli(*keyed, "--request-id", "cli-1").stdout)[0]
    second = json.loads(cli(*keyed, "--request-id", "cli-1").stdout)[0]
    assert first["name"] == second["name"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "aeterna_cli.main",
            "memory",
            "search",
            "x",
            "--tenant",
            "cli",
            "--consistency-token",
            "garbage",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "INVALID_CONSISTENCY_TOKEN" in bad.stdout


def test_a_new_user_cannot_reach_another_users_memories_from_the_cli(stack: DevStack) -> None:
    # Issue 7's report: a token for user `cli` could write, read and delete alice's memories.
    # Development tokens without roles, as a new user gets them from the CLI.
    import json

    env = {**os.environ, "AETERNA_ENDPOINT": stack.endpoint, "AETERNA_STATE_DIR": str(stack.root)}
    env.pop("AETERNA_TOKEN", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aeterna_cli.main", *args, "--tenant", "perm"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    mine = cli("memory", "add", "alice parks on level 3", "--user", "alice", "--json")
    assert mine.returncode == 0, mine.stdout + mine.stderr
    name = json.loads(mine.stdout)[0]["name"]
    for args in (
        ("memory", "add", "x", "--user-id", "alice"),
        ("memory", "get", name),
        ("memory", "delete", name),
        ("memory", "search", "where does alice park", "--user-id", "alice"),
    ):
        done = cli(*args, "--user", "bob")
        assert done.returncode == 1 and "ACTION_NOT_ALLOWED" in done.stdout, (args, done.stdout)
    # bob's open search finds nothing of alice's; alice still reads hers.
    found = cli("memory", "search", "where does alice park", "--user", "bob", "--json")
    # --json writes one object per line: none.
    assert found.returncode == 0 and found.stdout.strip() == ""
    got = cli("memory", "get", name, "--user", "alice", "--json")
    assert got.returncode == 0 and "level 3" in got.stdout
