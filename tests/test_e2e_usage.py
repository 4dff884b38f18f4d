"""Usage and cost end to end: memory, knowledge and governance replicas behind the gateway
(as ``make run`` starts them, one replica each), each service recording usage in the
transaction of its work and reporting it through the outbox and Redis Streams to governance's
ledger.

* Rollups add up under concurrent writes: concurrent creates (each sent twice with its
  request id), searches and knowledge creates; governance's ``GetTenantUsage`` ends with exactly
  the counts and bytes sent, and the tenant's own usage only. Embedding tokens are the model
  tokenizer's counts of the texts embedded ([CLS] and [SEP] included), recounted here.
* Content updates are billed (bytes written, the new text's embedding: memory's
  ``UpdateMemory``, knowledge's item update and its chunks' re-embedding by the index
  follower), and an update sent again bills nothing more.
* Budgets and the hard cap: a tenant with a tiny monthly budget gets the
  ``governance.budget.threshold_reached`` events at 80 % and 100 % (seen in its audit log),
  then memory
  refuses its new memories with ``RESOURCE_EXHAUSTED`` (reason
  ``EMBEDDING_BUDGET_EXHAUSTED``) while its searches still work.
* Refusals: another tenant's usage and a non-admin caller are ``PERMISSION_DENIED``; a
  malformed name is ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import pytest
from aeterna.governance.v1 import audit_service_pb2 as asvc
from aeterna.governance.v1 import audit_service_pb2_grpc as asvc_grpc
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import organization_service_pb2_grpc as osvc_grpc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.governance.v1 import usage_service_pb2 as usvc
from aeterna.governance.v1 import usage_service_pb2_grpc as usvc_grpc
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.type.v1 import layer_pb2
from aeterna_common import usage
from aeterna_common.embedding.onnx_minilm import TOKENIZER_FILE, configure_tokenizer
from aeterna_devstack.auth import DevAuth
from aeterna_devstack.servers import free_port
from aeterna_devstack.stack import DevStack, require_model, throwaway_stack
from aeterna_knowledge.search_chunks import chunk_item, chunk_text
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokenizers import Tokenizer

CAPPED = "capped"
"""The tenant with a tiny budget and the hard cap on."""

BUDGET = 2e-6
"""CAPPED's monthly budget (USD): a handful of memories at the default prices."""


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    port = free_port()
    with throwaway_stack(
        "aeterna-e2e-usage-",
        replicas=1,
        governance_replicas=1,
        knowledge_replicas=1,
        port=port,
        env={
            "AETERNA_AUTHZ_DIRECTORY_URL": f"127.0.0.1:{port}",
            "AETERNA_USAGE_REPORT_INTERVAL_S": "0.5",
            "AETERNA_USAGE_CAP_CHECK_S": "0.5",
            "AETERNA_GOVERNANCE_USAGE_BUDGETS": json.dumps({CAPPED: BUDGET}),
            "AETERNA_GOVERNANCE_USAGE_HARD_CAP": "true",
            "AETERNA_GOVERNANCE_JOBS_LEASE_TTL_S": "2",
        },
    ) as s:
        yield s


def tokens(*texts: str) -> int:
    """The model's token count of ``texts``, [CLS] and [SEP] included (what is billed)."""
    tokenizer = Tokenizer.from_file(str(require_model() / TOKENIZER_FILE))
    configure_tokenizer(tokenizer)
    return sum(len(tokenizer.encode(t).ids) for t in texts)


def chunk_texts(title: str, content: str) -> list[str]:
    """The texts knowledge's index follower embeds for an item (no summary)."""
    return [chunk_text(title, c) for c in chunk_item(title, "", content)]


def bearer(stack: DevStack, tenant: str, user: str, *roles: str) -> tuple[tuple[str, str], ...]:
    token = DevAuth(stack.root / "auth").issue_token(tenant, user, roles=roles)
    return (("authorization", f"Bearer {token}"),)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.2)


def totals(reply: usvc.TenantUsage) -> dict[tuple[str, str], int]:
    return {(line.service, line.metric): line.quantity for line in reply.lines}


def reason(exc: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def company(ch: grpc.aio.Channel, tenant: str, admin: tuple[tuple[str, str], ...]) -> None:
    await osvc_grpc.OrganizationServiceStub(ch).CreateOrgUnit(
        osvc.CreateOrgUnitRequest(
            parent=f"tenants/{tenant}",
            org_unit_id="acme",
            org_unit=gres.OrgUnit(kind=gres.ORG_UNIT_KIND_COMPANY, display_name="acme"),
        ),
        metadata=admin,
    )


async def test_rollups_add_up_under_concurrent_writes(stack: DevStack) -> None:
    tenant = "usage-sum"
    admin = bearer(stack, tenant, "root", "TENANT_ADMIN")
    user = bearer(stack, tenant, "alice")
    contents = [f"alice note {i}: the deploy window is {'x' * (i % 7)} Tuesday" for i in range(24)]
    queries = [f"when is deploy window {i}" for i in range(10)]
    knowledge_queries = [f"which decision covers item {i}" for i in range(4)]
    items = [
        f"# Item {i}\n\n## Context\nc{i}\n\n## Decision\nd\n\n## Consequences\nq\n"
        for i in range(6)
    ]
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        await company(ch, tenant, admin)
        memories = msvc_grpc.MemoryServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        usage_stub = usvc_grpc.UsageServiceStub(ch)

        async def create(i: int) -> None:
            request_id = f"m-{i}"
            request = msvc.CreateMemoryRequest(
                parent=f"tenants/{tenant}",
                memory=mres.Memory(
                    layer=layer_pb2.MEMORY_LAYER_USER,
                    scope=layer_pb2.Scope(user_id="alice"),
                    content=contents[i],
                ),
                request_id=request_id,
            )
            keyed = (*user, ("x-aeterna-request-id", request_id))
            await memories.CreateMemory(request, metadata=keyed)
            # A retry with the same request id changes nothing, usage included.
            await memories.CreateMemory(request, metadata=keyed)

        async def search(q: str) -> None:
            await memories.SearchMemories(
                msvc.SearchMemoriesRequest(
                    parent=f"tenants/{tenant}",
                    query=q,
                    scope=layer_pb2.Scope(user_id="alice"),
                    top_k=3,
                ),
                metadata=user,
            )

        async def knowledge_item(i: int) -> None:
            await knowledge.CreateKnowledgeItem(
                ksvc.CreateKnowledgeItemRequest(
                    parent=f"tenants/{tenant}",
                    knowledge_item=kres.KnowledgeItem(
                        type=kres.KNOWLEDGE_TYPE_ADR,
                        layer=kres.KNOWLEDGE_LAYER_COMPANY,
                        org_unit=f"tenants/{tenant}/orgUnits/acme",
                        path=f"adr/{i:04d}-item",
                        title=f"Item {i}",
                        content=items[i],
                    ),
                    request_id=f"k-{i}",
                ),
                metadata=(*admin, ("x-aeterna-request-id", f"k-{i}")),
            )

        async def knowledge_search(q: str) -> None:
            await knowledge.SearchKnowledge(
                ksvc.SearchKnowledgeRequest(parent=f"tenants/{tenant}", query=q, page_size=3),
                metadata=admin,
            )

        await asyncio.gather(
            *(create(i) for i in range(len(contents))),
            *(search(q) for q in queries),
            *(knowledge_item(i) for i in range(len(items))),
            *(knowledge_search(q) for q in knowledge_queries),
        )
        dimension = 384
        chunks = [t for i, c in enumerate(items) for t in chunk_texts(f"Item {i}", c)]
        want = {
            ("memory", usage.MEMORIES_STORED): len(contents),
            ("memory", usage.MEMORY_BYTES): sum(len(c.encode()) + 4 * dimension for c in contents),
            ("memory", usage.SEARCHES): len(queries),
            ("memory", usage.EMBEDDING_CALLS): len(contents) + len(queries),
            ("memory", usage.EMBEDDING_TOKENS): tokens(*contents, *queries),
            ("knowledge", usage.KNOWLEDGE_ITEMS): len(items),
            ("knowledge", usage.KNOWLEDGE_BYTES): sum(len(t.encode()) for t in items),
            ("knowledge", usage.KNOWLEDGE_SEARCHES): len(knowledge_queries),
            ("knowledge", usage.EMBEDDING_CALLS): len(chunks) + len(knowledge_queries),
            ("knowledge", usage.EMBEDDING_TOKENS): tokens(*chunks, *knowledge_queries),
        }
        reply = usvc.TenantUsage()

        async def added_up() -> bool:
            nonlocal reply
            reply = await usage_stub.GetTenantUsage(
                usvc.GetTenantUsageRequest(name=f"tenants/{tenant}/usage"), metadata=admin
            )
            got = totals(reply)
            return all(got.get(k, 0) >= v for k, v in want.items())

        await until(added_up, 90, "the usage reached governance")
        got = totals(reply)
        # Exactly, not at least: nothing counted twice (retried creates, re-delivered events).
        assert {k: got.get(k, 0) for k in want} == want
        # Every memory and knowledge event is counted as delivered (each create is one).
        assert got[("memory", usage.EVENTS_DELIVERED)] >= len(contents)
        assert reply.total_cost == pytest.approx(sum(line.cost for line in reply.lines))
        assert reply.total_cost > 0 and reply.currency == "USD"

        # The CLI prints the same figures (as JSON here).
        done = await asyncio.to_thread(
            subprocess.run,
            [
                *(sys.executable, "-m", "aeterna_cli.main", "usage", "--tenant", tenant),
                *("--user", "root", "--roles", "TENANT_ADMIN", "--since", "1d", "--json"),
            ],
            env={
                **os.environ,
                "AETERNA_ENDPOINT": stack.endpoint,
                "AETERNA_STATE_DIR": str(stack.root),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        shown = json.loads(done.stdout)
        assert {
            (x["service"], x["metric"]): int(x["quantity"]) for x in shown["lines"]
        }.items() >= want.items()

        # Refusals: another tenant's usage, a caller who is no admin, a malformed name.
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await usage_stub.GetTenantUsage(
                usvc.GetTenantUsageRequest(name=f"tenants/{CAPPED}/usage"), metadata=admin
            )
        assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as member:
            await usage_stub.GetTenantUsage(
                usvc.GetTenantUsageRequest(name=f"tenants/{tenant}/usage"), metadata=user
            )
        assert member.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await usage_stub.GetTenantUsage(
                usvc.GetTenantUsageRequest(name=f"tenants/{tenant}/usages"), metadata=admin
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_updates_are_billed_once(stack: DevStack) -> None:
    tenant = "usage-upd"
    admin = bearer(stack, tenant, "root", "TENANT_ADMIN")
    user = bearer(stack, tenant, "alice")
    first, second = "alice prefers tea in the morning", "alice switched to green tea"
    changed = "alice now drinks coffee after lunch on weekdays"
    draft = "# Cache\n\n## Context\nslow reads\n\n## Decision\nRedis\n"
    revised = "# Cache\n\n## Context\nslow reads at peak\n\n## Decision\nRedis, 5 min TTL\n"
    dimension = 384
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        await company(ch, tenant, admin)
        memories = msvc_grpc.MemoryServiceStub(ch)
        knowledge = ksvc_grpc.KnowledgeServiceStub(ch)
        usage_stub = usvc_grpc.UsageServiceStub(ch)

        async def reached(want: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
            got: dict[tuple[str, str], int] = {}

            async def check() -> bool:
                nonlocal got
                reply = await usage_stub.GetTenantUsage(
                    usvc.GetTenantUsageRequest(name=f"tenants/{tenant}/usage"), metadata=admin
                )
                got = totals(reply)
                return all(got.get(k, 0) >= v for k, v in want.items())

            await until(check, 90, f"usage {want}")
            return {k: got.get(k, 0) for k in want}

        created = []
        for content in (first, second):
            created.append(
                await memories.CreateMemory(
                    msvc.CreateMemoryRequest(
                        parent=f"tenants/{tenant}",
                        memory=mres.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="alice"),
                            content=content,
                        ),
                    ),
                    metadata=user,
                )
            )
        item = await knowledge.CreateKnowledgeItem(
            ksvc.CreateKnowledgeItemRequest(
                parent=f"tenants/{tenant}",
                knowledge_item=kres.KnowledgeItem(
                    type=kres.KNOWLEDGE_TYPE_ADR,
                    layer=kres.KNOWLEDGE_LAYER_COMPANY,
                    org_unit=f"tenants/{tenant}/orgUnits/acme",
                    path="adr/0001-cache",
                    title="Cache",
                    content=draft,
                ),
            ),
            metadata=admin,
        )
        # The follower has embedded the draft's chunks before the update (else it may
        # embed only the revised text).
        drafted = chunk_texts("Cache", draft)
        await reached({("knowledge", usage.EMBEDDING_CALLS): len(drafted)})

        # Each update twice: memory's is sent again as is (UpdateMemory has no request id),
        # knowledge's with its request id.
        for _ in range(2):
            await memories.UpdateMemory(
                msvc.UpdateMemoryRequest(
                    memory=mres.Memory(name=created[0].name, content=changed),
                    update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                ),
                metadata=user,
            )
            await knowledge.UpdateKnowledgeItem(
                ksvc.UpdateKnowledgeItemRequest(
                    knowledge_item=kres.KnowledgeItem(name=item.name, content=revised),
                    update_mask=field_mask_pb2.FieldMask(paths=["content"]),
                    request_id="k-revise",
                ),
                metadata=(*admin, ("x-aeterna-request-id", "k-revise")),
            )
        revised_chunks = chunk_texts("Cache", revised)
        want = {
            ("memory", usage.MEMORIES_STORED): 2,
            ("memory", usage.EMBEDDING_CALLS): 3,
            ("memory", usage.EMBEDDING_TOKENS): tokens(first, second, changed),
            ("memory", usage.MEMORY_BYTES): sum(
                len(c.encode()) + 4 * dimension for c in (first, second, changed)
            ),
            ("knowledge", usage.KNOWLEDGE_ITEMS): 1,
            ("knowledge", usage.KNOWLEDGE_BYTES): len(draft.encode()) + len(revised.encode()),
            ("knowledge", usage.EMBEDDING_CALLS): len(drafted) + len(revised_chunks),
            ("knowledge", usage.EMBEDDING_TOKENS): tokens(*drafted, *revised_chunks),
        }
        assert await reached(want) == want
        # Usage of a later search arrives: anything the updates recorded, which committed
        # before it, has been reported by then, and the totals are still exact.
        await memories.SearchMemories(
            msvc.SearchMemoriesRequest(
                parent=f"tenants/{tenant}", query="tea", scope=layer_pb2.Scope(user_id="alice")
            ),
            metadata=user,
        )
        after = {**want, ("memory", usage.SEARCHES): 1}
        after[("memory", usage.EMBEDDING_CALLS)] += 1
        after[("memory", usage.EMBEDDING_TOKENS)] += tokens("tea")
        assert await reached(after) == after


async def test_budget_thresholds_and_the_hard_cap(stack: DevStack) -> None:
    admin = bearer(stack, CAPPED, "root", "TENANT_ADMIN")
    user = bearer(stack, CAPPED, "bob")
    async with grpc.aio.insecure_channel(stack.endpoint) as ch:
        await company(ch, CAPPED, admin)
        memories = msvc_grpc.MemoryServiceStub(ch)
        usage_stub = usvc_grpc.UsageServiceStub(ch)
        refused: grpc.aio.AioRpcError | None = None
        written = 0
        deadline = time.monotonic() + 120
        # Each memory costs about 0.4e-6 (tokens and bytes): the budget is spent after a few,
        # and the cap takes effect once governance has folded the report (about a second).
        while refused is None:
            assert time.monotonic() < deadline, "the hard cap never refused a write"
            try:
                await memories.CreateMemory(
                    msvc.CreateMemoryRequest(
                        parent=f"tenants/{CAPPED}",
                        memory=mres.Memory(
                            layer=layer_pb2.MEMORY_LAYER_USER,
                            scope=layer_pb2.Scope(user_id="bob"),
                            content=f"bob's fact {written}: " + "the budget is small " * 3,
                        ),
                    ),
                    metadata=user,
                )
                written += 1
                await asyncio.sleep(0.1)
            except grpc.aio.AioRpcError as exc:
                refused = exc
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert reason(refused) == usage.EMBEDDING_BUDGET_EXHAUSTED
        assert written >= 3
        report = await usage_stub.GetTenantUsage(
            usvc.GetTenantUsageRequest(name=f"tenants/{CAPPED}/usage"), metadata=admin
        )
        assert report.embeddings_capped and report.budget_used_ratio >= 1.0
        assert report.monthly_budget == pytest.approx(BUDGET)
        # Searches of what is stored still work.
        await memories.SearchMemories(
            msvc.SearchMemoriesRequest(
                parent=f"tenants/{CAPPED}", query="budget", scope=layer_pb2.Scope(user_id="bob")
            ),
            metadata=user,
        )

        # Both thresholds were announced once, as events (here: through the audit log,
        # which every event of the tenant's stream reaches).
        audit = asvc_grpc.AuditServiceStub(ch)
        found: list[int] = []

        async def announced() -> bool:
            page = await audit.ListAuditEntries(
                asvc.ListAuditEntriesRequest(parent=f"tenants/{CAPPED}", page_size=1000),
                metadata=admin,
            )
            found[:] = [
                int(e.payload["threshold_percent"])
                for e in page.audit_entries
                if e.event_type == "governance.budget.threshold_reached"
            ]
            return sorted(found) == [80, 100]

        await until(announced, 60, "both budget thresholds announced")
