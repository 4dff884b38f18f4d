"""Memory → knowledge proposals end to end: real memory, governance, knowledge and sync
replicas behind the gateway Envoy. Team and project memories whose promotion score passes
the threshold become PROPOSED knowledge drafts (PATTERN or HINDSIGHT, redacted, with their
required sections) from memory events and from ``TriggerSync``, exactly once per memory
revision under repeated triggers, concurrent scans and a crash between knowledge's write
and sync's commit; sensitive, private, low-scoring and user memories never do.

The replicas' threshold is 0.55 (a memory created with importance 1.0 scores 0.6 before any
access); the scans run by the test itself use 0.3 over memories of importance 0.6 (0.36),
which the replicas leave alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.sync.v1 import sync_service_pb2 as ssvc
from aeterna.sync.v1 import sync_service_pb2_grpc as ssvc_grpc
from aeterna.type.v1 import layer_pb2
from aeterna_common.auth import ServiceCredentials
from aeterna_common.db import Database
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.pytest_plugin import while_aborted
from aeterna_devstack.stack import DevStack, throwaway_stack
from aeterna_sync.proposals import Proposals, State
from google.protobuf import field_mask_pb2, struct_pb2

TENANT = "prop"
WAIT_S = 60.0
PARENT = f"tenants/{TENANT}"


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    with throwaway_stack(
        "aeterna-e2e-proposals-",
        replicas=1,
        governance_replicas=1,
        knowledge_replicas=1,
        sync_replicas=1,
        env={"AETERNA_SYNC_PROPOSAL_THRESHOLD": "0.55"},
    ) as s:
        yield s


def _md(stack: DevStack, user: str = "root", roles: tuple[str, ...] = ("TENANT_ADMIN",)) -> Any:
    token = DevAuth(stack.root / "auth").issue_token(TENANT, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


@pytest_asyncio.fixture(scope="module")
async def channel(stack: DevStack) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the gateway, after the tenant's org tree is created."""
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        orgs = osvc_grpc.OrganizationServiceStub(ch)
        for unit, kind, parent in [
            ("acme", gres.ORG_UNIT_KIND_COMPANY, ""),
            ("eng", gres.ORG_UNIT_KIND_ORGANIZATION, "acme"),
            ("payments", gres.ORG_UNIT_KIND_TEAM, "eng"),
            ("checkout", gres.ORG_UNIT_KIND_PROJECT, "payments"),
        ]:
            await orgs.CreateOrgUnit(
                osvc.CreateOrgUnitRequest(
                    parent=PARENT,
                    org_unit_id=unit,
                    org_unit=gres.OrgUnit(
                        kind=kind,
                        display_name=unit,
                        parent=f"{PARENT}/orgUnits/{parent}" if parent else "",
                    ),
                ),
                metadata=_md(stack),
            )
        yield ch


async def _remember(
    ch: grpc.aio.Channel,
    md: Any,
    content: str,
    importance: float,
    layer: int = layer_pb2.MEMORY_LAYER_TEAM,
    scope: layer_pb2.Scope | None = None,
    tags: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
) -> mres.Memory:
    meta = struct_pb2.Struct()
    meta.update(metadata or {})
    memory = mres.Memory(
        layer=layer,  # type: ignore[arg-type]
        scope=scope or layer_pb2.Scope(team_id="payments"),
        content=content,
        importance=importance,
        tags=list(tags),
        metadata=meta,
    )
    created = await msvc_grpc.MemoryServiceStub(ch).CreateMemory(
        msvc.CreateMemoryRequest(parent=PARENT, memory=memory), metadata=md
    )
    return created  # type: ignore[no-any-return]


async def _drafts(ch: grpc.aio.Channel, md: Any) -> dict[str, list[kres.KnowledgeItem]]:
    """Drafts proposed from memories, by original memory."""
    knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
    out: dict[str, list[kres.KnowledgeItem]] = {}
    token = ""
    while True:
        page = await knowledge.ListKnowledgeItems(
            ksvc.ListKnowledgeItemsRequest(parent=PARENT, page_size=500, page_token=token),
            metadata=md,
        )
        for item in page.knowledge_items:
            if item.path.startswith("memories/"):
                out.setdefault(str(item.metadata["original_memory"]), []).append(item)
        token = page.next_page_token
        if not token:
            return out


async def _trigger(sync: Any, md: Any) -> None:
    """TriggerSync, again while another cycle holds the tenant's lease (ABORTED)."""
    await while_aborted(
        lambda: sync.TriggerSync(ssvc.TriggerSyncRequest(parent=PARENT), metadata=md), 30.0
    )


async def _until(
    ch: grpc.aio.Channel, md: Any, names: set[str], count: int = 1
) -> dict[str, list[Any]]:
    """Poll until every memory in ``names`` has ``count`` drafts, all PROPOSED (a draft is
    created, then proposed: two writes), within :data:`WAIT_S`."""
    async with asyncio.timeout(WAIT_S):
        while True:
            drafts = await _drafts(ch, md)
            if all(
                len(drafts.get(n, [])) == count
                and all(d.status == kres.KNOWLEDGE_STATUS_PROPOSED for d in drafts[n])
                for n in names
            ):
                return drafts
            await asyncio.sleep(0.2)


async def test_valuable_memories_become_proposed_drafts_once_per_revision(
    stack: DevStack, channel: grpc.aio.Channel
) -> None:
    md = _md(stack)
    sync = ssvc_grpc.SyncServiceStub(channel)
    pattern = await _remember(
        channel,
        md,
        "Retry Stripe webhooks with an idempotency key. Page ops@acme.io or call "
        "+1 415 555 0100 when the queue backs up.",
        1.0,
        tags=("webhooks",),
    )
    hindsight = await _remember(
        channel,
        md,
        "Checkout timed out because the tax service had no deadline; set 2 s deadlines.",
        1.0,
        layer=layer_pb2.MEMORY_LAYER_PROJECT,
        scope=layer_pb2.Scope(project_id="checkout"),
        tags=("incident",),
    )
    never = [
        await _remember(channel, md, "The payroll export key lives in vault.", 1.0,
                        metadata={"sensitive": True}),
        await _remember(channel, md, "Dana prefers async reviews.", 1.0,
                        metadata={"private": "yes"}),
        await _remember(channel, md, "We tried tabs once.", 0.2),
        await _remember(channel, md, "My editor is helix.", 1.0,
                        layer=layer_pb2.MEMORY_LAYER_USER,
                        scope=layer_pb2.Scope(user_id="root")),
    ]  # fmt: skip

    # Memory events alone bring the two valuable memories to review.
    drafts = await _until(channel, md, {pattern.name, hindsight.name})
    [p] = drafts[pattern.name]
    assert p.type == kres.KNOWLEDGE_TYPE_PATTERN and p.status == kres.KNOWLEDGE_STATUS_PROPOSED
    assert p.layer == kres.KNOWLEDGE_LAYER_TEAM and p.org_unit == f"{PARENT}/orgUnits/payments"
    assert "## Problem" in p.content and "## Solution" in p.content
    assert "ops@acme.io" not in p.content and "555 0100" not in p.content
    # Knowledge records the writer as Principal.actor: the sync service.
    assert p.author == "services/sync"
    [h] = drafts[hindsight.name]
    assert h.type == kres.KNOWLEDGE_TYPE_HINDSIGHT and h.status == kres.KNOWLEDGE_STATUS_PROPOSED
    assert h.layer == kres.KNOWLEDGE_LAYER_PROJECT and h.org_unit.endswith("/checkout")

    # Repeated triggers propose nothing twice; nothing from the others.
    for _ in range(2):
        await _trigger(sync, md)
    drafts = await _drafts(channel, md)
    assert {k: len(v) for k, v in drafts.items()} == {pattern.name: 1, hindsight.name: 1}
    assert not {m.name for m in never} & drafts.keys()
    status = await sync.GetSyncStatus(
        ssvc.GetSyncStatusRequest(name=f"{PARENT}/syncStatus"), metadata=md
    )
    assert status.proposal_count == 2 and status.failed_proposal_count == 0

    # A new revision is proposed once more (its own draft), the old one stays.
    edited = pattern
    edited.content = "Retry Stripe webhooks with an idempotency key and exponential backoff."
    updated = await msvc_grpc.MemoryServiceStub(channel).UpdateMemory(
        msvc.UpdateMemoryRequest(
            memory=edited, update_mask=field_mask_pb2.FieldMask(paths=["content"])
        ),
        metadata=md,
    )
    assert updated.revision > pattern.revision
    await _until(channel, md, {pattern.name}, count=2)
    await _trigger(sync, md)
    revisions = sorted(
        int(d.metadata["original_revision"]) for d in (await _drafts(channel, md))[pattern.name]
    )
    assert revisions == [pattern.revision, updated.revision]


class Crash(Exception):
    """The replica died after knowledge wrote the draft, before sync committed."""


class CrashingProposals(Proposals):
    async def _write(self, tenant_id: str, memory: mres.Memory, item: kres.KnowledgeItem) -> str:
        await super()._write(tenant_id, memory, item)
        raise Crash


async def test_concurrent_scans_and_a_crash_before_commit_propose_each_revision_once(
    stack: DevStack, channel: grpc.aio.Channel
) -> None:
    md = _md(stack)
    env = stack.sync_list[0].env
    db = Database(env["AETERNA_DATABASE_URL"], min_size=1, max_size=8)
    await db.open()
    credentials = ServiceCredentials(env["AETERNA_SERVICE_TOKEN_FILE"])
    # One channel per scan, as separate replicas would have.
    channels = [grpc.aio.insecure_channel(stack.endpoint) for _ in range(5)]
    scans = [
        Proposals(
            db,
            ksvc_grpc.KnowledgeServiceStub(ch),
            msvc_grpc.MemoryServiceStub(ch),
            credentials,
            threshold=0.3,
        )
        for ch in channels[:4]
    ]
    crashing = CrashingProposals(
        db,
        ksvc_grpc.KnowledgeServiceStub(channels[4]),
        msvc_grpc.MemoryServiceStub(channels[4]),
        credentials,
        0.3,
    )
    try:
        memories = [
            await _remember(channel, md, f"Pin the Go toolchain per service ({i}).", 0.6)
            for i in range(5)
        ]
        names = {m.name for m in memories}
        # The first scan dies right after knowledge wrote its first draft.
        with pytest.raises(Crash):
            await crashing.scan(TENANT)
        # Four scans at once (as four replicas would), then one more.
        results = await asyncio.gather(*(s.scan(TENANT) for s in scans))
        assert sum(r.proposed for r in results) <= len(names)
        assert all(r.failed == 0 and r.listed for r in results)
        await scans[0].scan(TENANT)

        drafts = await _drafts(channel, md)
        assert {n: len(drafts.get(n, [])) for n in names} == dict.fromkeys(names, 1)
        assert all(d[0].status == kres.KNOWLEDGE_STATUS_PROPOSED for n, d in drafts.items()
                   if n in names)  # fmt: skip
        async with db.transaction(TENANT, readonly=True) as conn:
            rows = await conn.fetch(
                "SELECT memory, state, knowledge_item FROM sync_proposals "
                "WHERE memory = ANY($1::text[])",
                list(names),
            )
        assert sorted(r["memory"] for r in rows) == sorted(names)
        assert {r["state"] for r in rows} == {State.PROPOSED.value}
        assert {r["knowledge_item"] for r in rows} == {drafts[n][0].name for n in names}
    finally:
        for ch in channels:
            await ch.close()
        await db.close()
