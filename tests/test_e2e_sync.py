"""Live events end to end: a knowledge replica writes, its relay publishes to the tenant
stream, two sync replicas serve subscribers behind the gateway Envoy (the Subscribe route
has no per-try timeout, an idle timeout and keepalive). The serving sync replica is
SIGKILLed while 300 changes are written; the subscriber reconnects with its cursor through
Envoy and receives every change exactly once, in commit order. ``aeterna events tail``
resumes from its cursor file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.sync.v1 import resources_pb2 as sres
from aeterna.sync.v1 import sync_service_pb2 as ssvc
from aeterna.sync.v1 import sync_service_pb2_grpc as ssvc_grpc
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.stack import DevStack, throwaway_stack
from google.protobuf import field_mask_pb2

TENANT = "sy"
ROOM = "team:payments"
OUTAGE_WRITES = 300
WAIT_S = 60.0
ADR = "# Luxon\n\n## Context\nc\n\n## Decision\nd\n\n## Consequences\nq\n"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-sync-",
        replicas=0,
        governance_replicas=1,
        knowledge_replicas=1,
        sync_replicas=2,
        env={"AETERNA_SYNC_KEEPALIVE_S": "2"},
    ) as s:
        yield s


def _admin(stack: DevStack) -> tuple[tuple[str, str], ...]:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, "root", roles=("TENANT_ADMIN",))
    return (("authorization", f"Bearer {token}"),)


def _subscribers(stack: DevStack, i: int) -> float:
    """The replica's ``aeterna_sync_subscribers`` gauge (its open Subscribe streams)."""
    url = f"http://127.0.0.1:{stack.sync_list[i].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("aeterna_sync_subscribers "):
                return float(line.split()[1])
    return 0.0


class Stream:
    """A Subscribe call through the gateway, read message by message."""

    def __init__(self, ch: grpc.aio.Channel, md: Any, after: str = "") -> None:
        self.call: Any = ssvc_grpc.SyncServiceStub(ch).Subscribe(
            ssvc.SubscribeRequest(parent=f"tenants/{TENANT}", rooms=[ROOM], after_cursor=after),
            metadata=md,
        )

    async def next(self) -> ssvc.SubscribeResponse:
        async with asyncio.timeout(WAIT_S):
            got = await self.call.read()
        assert got is not grpc.aio.EOF
        return got  # type: ignore[no-any-return]

    async def events(self, n: int) -> list[sres.LiveEvent]:
        out: list[sres.LiveEvent] = []
        while len(out) < n:
            got = await self.next()
            if got.HasField("event"):
                out.append(got.event)
        return out


async def _setup(ch: grpc.aio.Channel, md: Any) -> kres.KnowledgeItem:
    orgs = osvc_grpc.OrganizationServiceStub(ch)
    for unit, kind, parent in [
        ("acme", gres.ORG_UNIT_KIND_COMPANY, ""),
        ("eng", gres.ORG_UNIT_KIND_ORGANIZATION, "acme"),
        ("payments", gres.ORG_UNIT_KIND_TEAM, "eng"),
    ]:
        await orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=f"tenants/{TENANT}",
                org_unit_id=unit,
                org_unit=gres.OrgUnit(
                    kind=kind,
                    display_name=unit,
                    parent=f"tenants/{TENANT}/orgUnits/{parent}" if parent else "",
                ),
            ),
            metadata=md,
        )
    return await ksvc_grpc.KnowledgeServiceStub(ch).CreateKnowledgeItem(  # type: ignore[no-any-return]
        ksvc.CreateKnowledgeItemRequest(
            parent=f"tenants/{TENANT}",
            knowledge_item=kres.KnowledgeItem(
                type=kres.KNOWLEDGE_TYPE_ADR,
                layer=kres.KNOWLEDGE_LAYER_TEAM,
                org_unit=f"tenants/{TENANT}/orgUnits/payments",
                path="adr/0001-luxon",
                title="Use Luxon",
                content=ADR,
            ),
        ),
        metadata=md,
    )


async def _touch(ch: grpc.aio.Channel, md: Any, name: str, n: int) -> None:
    await ksvc_grpc.KnowledgeServiceStub(ch).UpdateKnowledgeItem(
        ksvc.UpdateKnowledgeItemRequest(
            knowledge_item=kres.KnowledgeItem(name=name, summary=f"edit {n}"),
            update_mask=field_mask_pb2.FieldMask(paths=["summary"]),
        ),
        metadata=md,
    )


async def test_subscribe_receive_and_resume_after_sigkill_exactly_once(stack: DevStack) -> None:
    md = _admin(stack)
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        first = Stream(ch, md)
        start = await first.next()
        assert not start.HasField("event") and start.cursor
        item = await _setup(ch, md)
        created = (await first.events(1))[0]
        assert created.type == sres.EVENT_TYPE_KNOWLEDGE_UPDATED
        assert created.resource == item.name and created.source_type == "knowledge.created"
        assert list(created.rooms) == [ROOM]
        # SIGKILL the replica serving the stream, then write while nobody follows.
        serving = [i for i in range(2) if _subscribers(stack, i) >= 1]
        assert len(serving) == 1
        stack.kill_replica(serving[0], signal.SIGKILL, service="sync")
        with pytest.raises(grpc.aio.AioRpcError):
            async with asyncio.timeout(WAIT_S):
                while await first.call.read() is not grpc.aio.EOF:
                    pass
        for n in range(OUTAGE_WRITES):
            await _touch(ch, md, item.name, n)
        # Reconnect with the cursor: the surviving replica serves it through Envoy.
        second = Stream(ch, md, after=created.cursor)
        got = await second.events(OUTAGE_WRITES)
        assert [e.payload["version"] for e in got] == list(range(2, OUTAGE_WRITES + 2))
        assert len({e.event_id for e in got}) == OUTAGE_WRITES
        # Nothing twice afterwards: the next event is the next write.
        await _touch(ch, md, item.name, OUTAGE_WRITES)
        (after,) = await second.events(1)
        assert after.payload["version"] == OUTAGE_WRITES + 2
        second.call.cancel()
    stack.start_replica(stack.sync_list[serving[0]])
    stack.wait_healthy(stack.sync_list[serving[0]])


async def test_cli_events_tail_prints_live_and_resumes_from_its_cursor_file(
    stack: DevStack, tmp_path: Path
) -> None:
    md = _admin(stack)
    env = {
        **os.environ,
        "AETERNA_ENDPOINT": stack.endpoint,
        "AETERNA_STATE_DIR": str(stack.root),
        "XDG_STATE_HOME": str(tmp_path),
    }
    args = [
        sys.executable, "-m", "aeterna_cli.main", "events", "tail", "--room", ROOM,
        "--tenant", TENANT, "--user", "root", "--roles", "TENANT_ADMIN", "--json",
    ]  # fmt: skip

    async def tail(count: int) -> tuple[asyncio.subprocess.Process, Path]:
        proc = await asyncio.create_subprocess_exec(
            *args, "--count", str(count), env=env, stdout=asyncio.subprocess.PIPE
        )
        # Live once the cursor file exists (written from the first message).
        files = tmp_path / "aeterna" / "cursors"
        async with asyncio.timeout(WAIT_S):
            while not (files.exists() and any(files.iterdir())):  # noqa: ASYNC110 (a file)
                await asyncio.sleep(0.1)
        return proc, next(files.iterdir())

    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        items = ksvc_grpc.KnowledgeServiceStub(ch)
        found = await items.ListKnowledgeItems(
            ksvc.ListKnowledgeItemsRequest(parent=f"tenants/{TENANT}"), metadata=md
        )
        name = found.knowledge_items[0].name
        proc, _ = await tail(2)
        await _touch(ch, md, name, 1000)
        await _touch(ch, md, name, 1001)
        async with asyncio.timeout(WAIT_S):
            out, _ = await proc.communicate()
        assert proc.returncode == 0
        first = [json.loads(line) for line in out.decode().splitlines()]
        # While no tail runs: one more change, which the next tail prints first.
        await _touch(ch, md, name, 1002)
        proc, _ = await tail(1)
        async with asyncio.timeout(WAIT_S):
            out, _ = await proc.communicate()
        (resumed,) = [json.loads(line) for line in out.decode().splitlines()]
    versions = [e["payload"]["version"] for e in [*first, resumed]]
    assert versions == [versions[0], versions[0] + 1, versions[0] + 2]
