"""Events end to end: memory and governance replicas behind the gateway (as ``make run``
starts them, Redis with its append-only file), both outbox relays and the audit consumer
running. Writes of both services go on through a Redis crash and the loss of the replicas
that relay; afterwards every outbox event is in the tenant's audit chain exactly once, in
each service's position order. Memory's authorization cache follows governance's events."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from aeterna.governance.v1 import audit_service_pb2 as asvc
from aeterna.governance.v1 import audit_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.type.v1 import layer_pb2
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DATABASE, GOVERNANCE_DATABASE, DevStack, throwaway_stack

CACHE_TTL_S = 60.0
"""Memory's authorization cache TTL here: long, so only an event can explain a quick
refusal."""

LEASE_TTL_S = "2"
"""Relay and job leases (seconds): a killed holder is replaced within about this long."""


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    port = free_port()
    with throwaway_stack(
        "aeterna-e2e-events-",
        replicas=2,
        governance_replicas=2,
        port=port,
        env={
            # Memory reads bindings from governance through the gateway.
            "AETERNA_AUTHZ_DIRECTORY_URL": f"127.0.0.1:{port}",
            "AETERNA_AUTHZ_CACHE_TTL_S": str(CACHE_TTL_S),
            "AETERNA_MEMORY_EVENTS_LEASE_TTL_S": LEASE_TTL_S,
            "AETERNA_GOVERNANCE_EVENTS_LEASE_TTL_S": LEASE_TTL_S,
            "AETERNA_GOVERNANCE_JOBS_LEASE_TTL_S": LEASE_TTL_S,
            # Only the writes' own events: no usage reports joining the outbox meanwhile.
            "AETERNA_USAGE_REPORT_INTERVAL_S": "0",
        },
    ) as s:
        yield s


@pytest_asyncio.fixture
async def channel(stack: DevStack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        yield ch


def bearer(stack: DevStack, tenant: str, user: str, *roles: str) -> tuple[tuple[str, str], ...]:
    token = DevAuth(stack.root / "auth").issue_token(tenant, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


def database(stack: DevStack, name: str) -> str:
    url = stack.superuser_url
    assert url is not None
    return url.rsplit("/", 1)[0] + f"/{name}"


async def retried(call: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 60) -> Any:
    """Call until it succeeds: a replica or Redis may be down for a moment (the calls carry
    their request id, so a retry never applies twice). A replica killed after its response
    started resets the stream, which the edge cannot retry and the client may (the SDK
    contract)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            transient = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ) or "RST_STREAM" in (exc.details() or "")
            if not transient:
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s} s: {what}") from exc
            await asyncio.sleep(0.1)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


async def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of ``sql`` read as the cluster's superuser (below row-level security)."""
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def lease_holder_pid(dsn: str, lease: str) -> int:
    """The process id of the lease's holder (``host:pid:random``)."""
    rows = await query(
        dsn, "SELECT owner FROM leases WHERE name = $1 AND expires_at > now()", lease
    )
    assert rows, f"nobody holds {lease}"
    return int(str(rows[0]["owner"]).split(":")[1])


def replica_index(stack: DevStack, service: str, pid: int) -> int:
    replicas = stack.replica_list if service == "memory" else stack.governance_list
    return next(i for i, r in enumerate(replicas) if r.proc is not None and r.proc.pid == pid)


async def test_every_event_of_both_services_is_audited_once_across_a_redis_crash_and_relay_loss(
    stack: DevStack, channel: grpc.aio.Channel
) -> None:
    tenant = f"ev{uuid.uuid4().hex[:8]}"
    admin = bearer(stack, tenant, "root", "TENANT_ADMIN")
    memories = msvc_grpc.MemoryServiceStub(channel)
    orgs = osvc_grpc.OrganizationServiceStub(channel)
    memory_dsn = database(stack, DATABASE)
    governance_dsn = database(stack, GOVERNANCE_DATABASE)

    async def memory_write(i: int) -> None:
        request = msvc.CreateMemoryRequest(
            parent=f"tenants/{tenant}",
            memory=mres.Memory(
                layer=layer_pb2.MEMORY_LAYER_USER,
                scope=layer_pb2.Scope(user_id="root"),
                content=f"fact number {i} about the release train",
            ),
            request_id=f"m-{i}",
        )
        # The header lets the edge retry the create on a reset too.
        keyed = (*admin, ("x-aeterna-request-id", request.request_id))
        await retried(lambda: memories.CreateMemory(request, metadata=keyed), f"memory {i}")

    async def governance_write(i: int) -> None:
        request = osvc.CreateOrgUnitRequest(
            parent=f"tenants/{tenant}",
            org_unit=gres.OrgUnit(
                kind=gres.ORG_UNIT_KIND_COMPANY if i == 0 else gres.ORG_UNIT_KIND_ORGANIZATION,
                display_name=f"unit {i}",
                parent="" if i == 0 else f"tenants/{tenant}/orgUnits/u0",
            ),
            org_unit_id=f"u{i}",
            request_id=f"g-{i}",
        )
        keyed = (*admin, ("x-aeterna-request-id", request.request_id))
        await retried(lambda: orgs.CreateOrgUnit(request, metadata=keyed), f"unit {i}")

    done: list[int] = []

    async def writes(first: int, last: int) -> None:
        for i in range(first, last):
            await asyncio.gather(memory_write(i), governance_write(i))
            done.append(i)

    async def around(fault: Callable[[], Awaitable[None]], more: int = 3) -> tuple[int, int]:
        """Write while ``fault`` happens: from the next index on, 3 writes before it, and
        until ``more`` writes have followed it (so it always falls between writes, however
        slow the machine). Returns the writes done before and after the fault began."""
        faulted = asyncio.Event()

        async def writing() -> None:
            i, left = len(done), more
            while left > 0:
                if faulted.is_set():
                    left -= 1
                await writes(i, i + 1)
                i += 1

        task = asyncio.create_task(writing())
        start = len(done)

        async def reached() -> bool:
            return len(done) >= start + 3 or task.done()

        await until(reached, 60, "3 writes before the fault")
        before = len(done)
        await fault()
        faulted.set()
        await task
        return before, len(done)

    await writes(0, 5)

    # Redis crashes (SIGKILL) while both services write, and comes back on its data.
    async def crash_redis() -> None:
        await asyncio.to_thread(stack.crash_redis)

    crashed = await around(crash_redis)

    # The replicas relaying each service's outbox die (SIGKILL) while both services write;
    # the other replicas take the relay leases over.
    async def kill_relays() -> None:
        memory_pid = await lease_holder_pid(memory_dsn, "memory:events:relay")
        governance_pid = await lease_holder_pid(governance_dsn, "governance:events:relay")
        await asyncio.to_thread(
            stack.kill_replica, replica_index(stack, "memory", memory_pid), signal.SIGKILL
        )
        await asyncio.to_thread(
            stack.kill_replica,
            replica_index(stack, "governance", governance_pid),
            signal.SIGKILL,
            service="governance",
        )

    killed = await around(kill_relays)
    await writes(len(done), len(done) + 5)
    # Both faults fell between writes: some before, at least three after each.
    assert 5 < crashed[0] and crashed[1] - crashed[0] >= 3
    assert crashed[1] < killed[0] and killed[1] - killed[0] >= 3
    total = len(done)

    async def outbox(dsn: str, service: str) -> list[str]:
        rows = await query(
            dsn, "SELECT position FROM outbox WHERE tenant_id = $1 ORDER BY position", tenant
        )
        return [f"{service}:{r['position']}" for r in rows]

    async def entries() -> list[asyncpg.Record]:
        return await query(
            governance_dsn,
            "SELECT event_id, actor FROM audit_entries WHERE tenant_id = $1 ORDER BY sequence",
            tenant,
        )

    async def chain() -> list[str]:
        return [r["event_id"] for r in await entries()]

    expected = await outbox(memory_dsn, "memory") + await outbox(governance_dsn, "governance")
    # One memory and one unit per write, and nothing else of this tenant.
    assert sum(e.startswith("memory:") for e in expected) >= total
    assert sum(e.startswith("governance:") for e in expected) == total

    async def all_audited() -> bool:
        return set(await chain()) >= set(expected)

    await until(all_audited, 60, "every outbox event in the audit chain")
    audited = await chain()
    assert len(audited) == len(set(audited)) == len(expected)
    for service in ("memory", "governance"):
        positions = [int(e.split(":")[1]) for e in audited if e.startswith(f"{service}:")]
        assert positions == sorted(positions), service
    # Each service recorded who caused each change.
    assert {r["actor"] for r in await entries()} == {"users/root"}
    verified = await asvc_grpc.AuditServiceStub(channel).VerifyAuditLog(
        asvc.VerifyAuditLogRequest(parent=f"tenants/{tenant}"), metadata=admin
    )
    assert verified.valid and verified.entries_checked == len(expected)


async def test_a_removed_role_binding_refuses_memory_writes_long_before_the_cache_ttl(
    stack: DevStack, channel: grpc.aio.Channel
) -> None:
    tenant = f"az{uuid.uuid4().hex[:8]}"
    admin = bearer(stack, tenant, "root", "TENANT_ADMIN")
    dev = bearer(stack, tenant, "dev")
    orgs = osvc_grpc.OrganizationServiceStub(channel)
    memories = msvc_grpc.MemoryServiceStub(channel)
    parent = ""
    for unit, kind in (
        ("acme", gres.ORG_UNIT_KIND_COMPANY),
        ("eng", gres.ORG_UNIT_KIND_ORGANIZATION),
        ("core", gres.ORG_UNIT_KIND_TEAM),
        ("p1", gres.ORG_UNIT_KIND_PROJECT),
    ):
        await retried(
            lambda unit=unit, kind=kind, parent=parent: orgs.CreateOrgUnit(
                osvc.CreateOrgUnitRequest(
                    parent=f"tenants/{tenant}",
                    org_unit=gres.OrgUnit(kind=kind, display_name=unit, parent=parent),
                    org_unit_id=unit,
                ),
                metadata=admin,
            ),
            f"unit {unit}",
        )
        parent = f"tenants/{tenant}/orgUnits/{unit}"
    binding = await retried(
        lambda: orgs.CreateRoleBinding(
            osvc.CreateRoleBindingRequest(
                parent=f"tenants/{tenant}",
                role_binding=gres.RoleBinding(
                    subject="users/dev",
                    role=gres.ROLE_DEVELOPER,
                    org_unit=f"tenants/{tenant}/orgUnits/p1",
                ),
            ),
            metadata=admin,
        ),
        "binding",
    )

    def write(n: int) -> Awaitable[mres.Memory]:
        return memories.CreateMemory(
            msvc.CreateMemoryRequest(
                parent=f"tenants/{tenant}",
                memory=mres.Memory(
                    layer=layer_pb2.MEMORY_LAYER_PROJECT,
                    scope=layer_pb2.Scope(project_id="p1"),
                    content=f"p1 deploys on Tuesdays, note {n}",
                ),
            ),
            metadata=dev,
        )

    # Bound as DEVELOPER at p1: dev writes p1's memories (on each memory replica, so both
    # cache the tenant's bindings).
    for n in range(4):
        assert (await write(n)).name
    await orgs.DeleteRoleBinding(osvc.DeleteRoleBindingRequest(name=binding.name), metadata=admin)
    removed = time.monotonic()
    n = 4
    while True:
        try:
            await write(n)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc
            break
        n += 1
        await asyncio.sleep(0.05)
    refused_after_s = time.monotonic() - removed
    print(f"writes refused {refused_after_s:.3f} s after the binding's removal")
    # The cache would hold the binding for CACHE_TTL_S without the event.
    assert refused_after_s < CACHE_TTL_S / 4
    # And stays refused, on every replica.
    for m in range(n, n + 4):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await write(m)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
