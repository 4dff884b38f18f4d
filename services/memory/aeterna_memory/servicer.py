"""gRPC servicer: thin, protobuf ⇄ domain. Names and the tenant are checked first, then the
request is validated, then the domain runs (permission before existence).

Consistency (``aeterna_common.consistency``): every successful write sends its commit's
consistency token in initial metadata (``x-aeterna-consistency-token``); Get, List,
ListMemoryRevisions and Search accept it in request metadata. Gets and Lists read PostgreSQL,
so the token is validated and already satisfied; a search waits for its position. A write
sent with ``x-aeterna-request-id`` must carry the same ``request_id`` in its body: the edge
retries such writes broadly, so the header may not claim an idempotency the body lacks."""

from __future__ import annotations

import base64
from typing import Any

import grpc
from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import memory_service_pb2_grpc as svc_grpc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common.consistency import INDEX_POSITION_KEY, INDEX_STALE_KEY, token_from_metadata
from aeterna_common.errors import FieldViolation, InvalidArgument
from aeterna_common.servicing import check_request_id_header, send_token

from aeterna_memory import convert
from aeterna_memory.domain.names import check_parent, parse_memory_name
from aeterna_memory.domain.service import MemoryDomain

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["MemoryService"].full_name

Ctx = grpc.aio.ServicerContext[Any, Any]


def read_token(context: Ctx) -> int | None:
    """The position of the request's consistency token, if any.

    Raises:
        InvalidArgument: The token is malformed.
    """
    return token_from_metadata(context.invocation_metadata())


def _revision_token(after: int) -> str:
    return base64.urlsafe_b64encode(f"r:{after}".encode()).decode()


def _revision_after(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "r":
            raise ValueError(kind)
        return int(value)
    except ValueError as exc:
        raise InvalidArgument([FieldViolation("page_token", "malformed page token")]) from exc


class MemoryServicer(svc_grpc.MemoryServiceServicer):
    """``aeterna.memory.v1.MemoryService`` over :class:`MemoryDomain`."""

    def __init__(self, domain: MemoryDomain, *, reembed_per_s: float = 50.0) -> None:
        self.domain = domain
        self.reembed_per_s = reembed_per_s

    async def CreateMemory(self, request: svc.CreateMemoryRequest, context: Ctx) -> res.Memory:
        """See the proto."""
        principal = rc.current().principal
        principal = principal.acting_in(check_parent(principal, request.parent))
        check_request_id_header(context, request.request_id)
        memory = convert.create_request(request)
        created, position = await self.domain.create(
            principal, [memory], method="CreateMemory", request_id=request.request_id
        )
        await send_token(context, position)
        return convert.memory_pb(created[0])

    async def BatchCreateMemories(
        self, request: svc.BatchCreateMemoriesRequest, context: Ctx
    ) -> svc.BatchCreateMemoriesResponse:
        """See the proto."""
        principal = rc.current().principal
        principal = principal.acting_in(check_parent(principal, request.parent))
        check_request_id_header(context, request.request_id)
        memories = convert.batch_request(request)
        created, position = await self.domain.create(
            principal, memories, method="BatchCreateMemories", request_id=request.request_id
        )
        await send_token(context, position)
        return svc.BatchCreateMemoriesResponse(memories=[convert.memory_pb(m) for m in created])

    async def GetMemory(self, request: svc.GetMemoryRequest, context: Ctx) -> res.Memory:
        """See the proto."""
        principal = rc.current().principal
        tenant, memory_id = parse_memory_name(principal, request.name)
        principal = principal.acting_in(tenant)
        read_token(context)  # validated; PostgreSQL already holds every committed write
        return convert.memory_pb(await self.domain.get(principal, memory_id))

    async def ListMemories(
        self, request: svc.ListMemoriesRequest, context: Ctx
    ) -> svc.ListMemoriesResponse:
        """See the proto."""
        principal = rc.current().principal
        principal = principal.acting_in(check_parent(principal, request.parent))
        read_token(context)  # validated; PostgreSQL already holds every committed write
        flt, size = convert.list_filter(request)
        memories, token = await self.domain.list_page(principal, flt, size, request.page_token)
        return svc.ListMemoriesResponse(
            memories=[convert.memory_pb(m) for m in memories], next_page_token=token
        )

    async def UpdateMemory(self, request: svc.UpdateMemoryRequest, context: Ctx) -> res.Memory:
        """See the proto."""
        principal = rc.current().principal
        tenant, memory_id = parse_memory_name(principal, request.memory.name, "memory.name")
        principal = principal.acting_in(tenant)
        patch = convert.update_request(request)
        memory, position = await self.domain.update(principal, memory_id, patch)
        await send_token(context, position)
        return convert.memory_pb(memory)

    async def DeleteMemory(self, request: svc.DeleteMemoryRequest, context: Ctx) -> res.Memory:
        """See the proto."""
        principal = rc.current().principal
        tenant, memory_id = parse_memory_name(principal, request.name)
        principal = principal.acting_in(tenant)
        memory, position = await self.domain.delete(principal, memory_id)
        await send_token(context, position)
        return convert.memory_pb(memory)

    async def SearchMemories(
        self, request: svc.SearchMemoriesRequest, context: Ctx
    ) -> svc.SearchMemoriesResponse:
        """See the proto."""
        principal = rc.current().principal
        principal = principal.acting_in(check_parent(principal, request.parent))
        min_position = read_token(context)
        query = convert.search_request(request)
        found = await self.domain.search(principal, query, min_position=min_position)
        if found.stale:
            await context.send_initial_metadata(
                (
                    (INDEX_STALE_KEY, "true"),
                    (INDEX_POSITION_KEY, str(found.applied_position)),
                )
            )
        return svc.SearchMemoriesResponse(results=[convert.hit_pb(h) for h in found.hits])

    async def ListMemoryRevisions(
        self, request: svc.ListMemoryRevisionsRequest, context: Ctx
    ) -> svc.ListMemoryRevisionsResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant, memory_id = parse_memory_name(principal, request.name)
        principal = principal.acting_in(tenant)
        read_token(context)  # validated; PostgreSQL already holds every committed write
        v = convert.Violations()
        size = convert.page_size(v, request.page_size)
        v.raise_if_any()
        after = _revision_after(request.page_token)
        revisions, more = await self.domain.revisions(principal, memory_id, size, after)
        token = _revision_token(revisions[-1].revision) if more and revisions else ""
        return svc.ListMemoryRevisionsResponse(
            revisions=[convert.revision_pb(tenant, r) for r in revisions], next_page_token=token
        )

    async def RecordMemoryFeedback(
        self, request: svc.RecordMemoryFeedbackRequest, context: Ctx
    ) -> res.Memory:
        """See the proto."""
        principal = rc.current().principal
        tenant, memory_id = parse_memory_name(principal, request.name)
        principal = principal.acting_in(tenant)
        check_request_id_header(context, request.request_id)
        kind, score = convert.feedback_request(request)
        memory, position = await self.domain.feedback(
            principal, memory_id, kind, score, request.request_id
        )
        await send_token(context, position)
        return convert.memory_pb(memory)

    async def ReembedMemories(
        self, request: svc.ReembedMemoriesRequest, context: Ctx
    ) -> svc.ReembedMemoriesResponse:
        """See the proto."""
        principal = rc.current().principal
        principal = principal.acting_in(check_parent(principal, request.parent))
        done, remaining = await self.domain.reembed(
            principal,
            target_model=request.target_model,
            max_memories=request.max_memories,
            per_second=self.reembed_per_s,
        )
        return svc.ReembedMemoriesResponse(
            model=self.domain.model_id, reembedded_count=done, remaining_count=remaining
        )
