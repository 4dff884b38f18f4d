"""Memory → knowledge proposals (issue 9, DOMAIN.md "Sync").

A memory of the PROJECT, TEAM or ORG layer whose promotion score
(:func:`aeterna_common.promotion.score`, DOMAIN.md) reaches the threshold (default 0.8)
becomes a knowledge draft at the matching layer and unit (PROJECT→PROJECT, TEAM→TEAM,
ORG→ORG), created and then proposed (status PROPOSED) for review. Memories are read and
drafts written over memory's and knowledge's gRPC APIs as this service's principal
(``service:sync``; Cedar rules ``memory-sync-proposals-read`` and
``knowledge-sync-proposals``), never from their tables.

Never proposed: memories whose metadata marks them ``sensitive`` or ``private``, pointer
memories (they mirror knowledge already), deleted ones. E-mail addresses and phone numbers
are redacted from everything copied (:func:`aeterna_common.promotion.redact`).

The type, by a stated rule (:func:`knowledge_type`): HINDSIGHT when the memory is a lesson
from a failure (a tag in :data:`HINDSIGHT_TAGS` or an ``error_signature`` in its
metadata), PATTERN otherwise. The content is drafted extractively (no language model), with
the sections the type needs (DOMAIN.md: a pattern needs Problem and Solution): Problem is the
memory's first sentence (what it is about), Solution (Resolution for a hindsight) its whole
text, then where it came from.

**Exactly once per memory revision.** The key (tenant, memory, revision) is recorded in
``sync_proposals`` with the score that decided, before knowledge is called; the transaction
that proposes locks that row (``FOR UPDATE``) and marks it PROPOSED, so a concurrent cycle
waits and then finds it done. Knowledge's create and propose carry request ids derived from
the memory and its revision and the draft's path is derived from them too, so a cycle that
crashed between knowledge's write and sync's commit gets knowledge's first answer back (or,
once knowledge forgot the request id, finds the draft by its path) and never writes a second
draft. A failure is recorded (state FAILED, with the reason) and tried again by the next
cycle or event delivery.

Triggered by memory events on the bus (``memory.created``, ``memory.updated``,
``memory.feedback_recorded`` on ``events:{tenant}``, consumer group :data:`GROUP`) and by
``TriggerSync`` (a scan of every memory of those layers).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import structlog
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as ksvc_grpc
from aeterna.knowledge.v1 import resources_pb2 as kres
from aeterna.memory.v1 import memory_service_pb2 as msvc
from aeterna.memory.v1 import memory_service_pb2_grpc as msvc_grpc
from aeterna.memory.v1 import resources_pb2 as mres
from aeterna.type.v1 import layer_pb2
from aeterna_common import promotion
from aeterna_common.auth import ServiceCredentials
from aeterna_common.db import Database
from aeterna_common.events import Event
from google.protobuf import json_format, struct_pb2
from prometheus_client import Counter

from aeterna_sync.pointers import POINTER_TAG

if TYPE_CHECKING:
    # Only the generated .pyi knows the async stub types; at run time they are the same.
    KnowledgeStub: TypeAlias = ksvc_grpc.KnowledgeServiceAsyncStub
    MemoryStub: TypeAlias = msvc_grpc.MemoryServiceAsyncStub
else:
    KnowledgeStub = ksvc_grpc.KnowledgeServiceStub
    MemoryStub = msvc_grpc.MemoryServiceStub

log = structlog.get_logger("aeterna.sync.proposals")

CALL_TIMEOUT_S = 10.0
"""Deadline in seconds of one call to knowledge or memory."""

GROUP = "sync-proposals"
"""Consumer group of the memory events that trigger proposals."""

EVENT_TYPES = frozenset({"memory.created", "memory.updated", "memory.feedback_recorded"})
"""Memory events after which a memory's score or revision may have changed."""

LAYERS: Mapping[int, tuple[int, str]] = {
    layer_pb2.MEMORY_LAYER_PROJECT: (kres.KNOWLEDGE_LAYER_PROJECT, "project_id"),
    layer_pb2.MEMORY_LAYER_TEAM: (kres.KNOWLEDGE_LAYER_TEAM, "team_id"),
    layer_pb2.MEMORY_LAYER_ORG: (kres.KNOWLEDGE_LAYER_ORG, "org_id"),
}
"""Memory layers proposed from → the knowledge layer of the draft and the scope field naming
its unit (issue 9: PROJECT/TEAM/ORG)."""

HINDSIGHT_TAGS = frozenset({"hindsight", "error", "incident", "postmortem", "failure", "bug"})
"""Tags that mark a memory as a lesson from a failure: its draft is a HINDSIGHT."""

HINDSIGHT_KEY = "error_signature"
"""Metadata key (set by error tracking, DOMAIN.md "Hindsight") that makes a HINDSIGHT."""

FROM_MEMORY_TAG = "from-memory"
"""Tag of every draft proposed from a memory."""

TAG = re.compile(r"[a-z0-9._:-]{1,64}")
"""A knowledge tag (knowledge's contract); memory tags that are not are left out."""

MAX_TAGS = 32
TITLE_CHARS = 120
SUMMARY_CHARS = 500
"""Knowledge's limits are 32 tags, 300-character titles and 2,000-character summaries;
titles and summaries are kept short, as a reviewer reads them in lists."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

PROPOSALS = Counter(
    "aeterna_sync_proposals_total",
    "Memory revisions considered for a knowledge proposal, by outcome.",
    ["outcome"],
)


class Outcome(enum.StrEnum):
    """What considering one memory revision did."""

    PROPOSED = "proposed"
    """A draft was created and proposed now."""
    DONE = "done"
    """Already proposed earlier."""
    SKIPPED = "skipped"
    """Not eligible (layer, score, sensitive/private, pointer, deleted)."""
    FAILED = "failed"
    """Knowledge refused or could not be reached; recorded and retried later."""


class State(enum.StrEnum):
    """``sync_proposals.state``."""

    PENDING = "PENDING"
    PROPOSED = "PROPOSED"
    FAILED = "FAILED"


@dataclass
class ScanResult:
    """What one scan of a tenant's memories did (counts of memory revisions)."""

    examined: int = 0
    proposed: int = 0
    failed: int = 0
    listed: bool = True
    """False when memory could not be listed (the scan stopped early)."""


def metadata_of(memory: mres.Memory) -> dict[str, Any]:
    """The memory's metadata as plain values."""
    return json_format.MessageToDict(memory.metadata)


def memory_score(memory: mres.Memory, now: datetime) -> float:
    """The memory's promotion score from memory's API values (DOMAIN.md formula,
    :func:`aeterna_common.promotion.score`); an unset importance counts as 0."""
    last = memory.last_access_time.ToDatetime(UTC) if memory.HasField("last_access_time") else None
    importance = memory.importance if memory.HasField("importance") else 0.0
    return promotion.score(importance, memory.access_count, last, now)


def knowledge_type(memory: mres.Memory) -> int:
    """HINDSIGHT when the memory is a lesson from a failure (a tag in
    :data:`HINDSIGHT_TAGS`, or :data:`HINDSIGHT_KEY` in its metadata), else PATTERN."""
    tags = {t.lower() for t in memory.tags}
    if tags & HINDSIGHT_TAGS or metadata_of(memory).get(HINDSIGHT_KEY):
        return kres.KNOWLEDGE_TYPE_HINDSIGHT
    return kres.KNOWLEDGE_TYPE_PATTERN


def unit_of(memory: mres.Memory) -> str:
    """The memory's unit id at its layer (empty when the layer is not proposed from)."""
    mapped = LAYERS.get(memory.layer)
    return str(getattr(memory.scope, mapped[1])) if mapped else ""


def eligible(memory: mres.Memory) -> bool:
    """Whether the memory may be proposed at all, whatever its score: a live memory of a
    proposed-from layer with its unit, not ``sensitive``/``private``, not a pointer."""
    return (
        not memory.HasField("delete_time")
        and bool(unit_of(memory))
        and POINTER_TAG not in memory.tags
        and not promotion.excluded(metadata_of(memory))
    )


def _first_sentence(text: str) -> str:
    for part in _SENTENCE_END.split(text.strip()):
        line = part.strip().lstrip("#>*- ").strip()
        if line:
            return line
    return text.strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def memory_id(memory: mres.Memory) -> str:
    """The id part of ``tenants/{tenant}/memories/{id}``."""
    return str(memory.name.rsplit("/", 1)[-1])


def item_path(memory: mres.Memory) -> str:
    """The draft's path: one per memory revision (``memories/{id}/r{revision}``), unique at
    its layer and unit, so a draft written by an earlier attempt is found again."""
    return f"memories/{memory_id(memory).lower()}/r{memory.revision}"


def request_ids(memory: mres.Memory) -> tuple[str, str]:
    """Knowledge's idempotency keys of the create and the propose of this revision (at most
    128 ASCII characters)."""
    base = f"{memory_id(memory)}:{memory.revision}"
    return f"sync-proposal:{base}"[:128], f"sync-proposal-propose:{base}"[:128]


def draft(memory: mres.Memory, score: float) -> kres.KnowledgeItem:
    """The knowledge draft of an eligible memory revision.

    Args:
        memory: The memory (PROJECT, TEAM or ORG layer, with its unit).
        score: The promotion score that decided (recorded in the draft's metadata).

    Returns:
        The item to create: type by :func:`knowledge_type`, the matching layer and unit,
        redacted title, summary and content with the type's required sections.

    Raises:
        KeyError: The memory's layer is not proposed from.
    """
    tenant = memory.name.split("/")[1]
    k_layer, _ = LAYERS[memory.layer]
    kind = knowledge_type(memory)
    text = promotion.redact(memory.content.strip())
    sentence = _first_sentence(text)
    noun = "Hindsight" if kind == kres.KNOWLEDGE_TYPE_HINDSIGHT else "Pattern"
    answer = "Resolution" if kind == kres.KNOWLEDGE_TYPE_HINDSIGHT else "Solution"
    title = _clip(f"{noun}: {sentence}", TITLE_CHARS)
    content = (
        f"# {title}\n\n## Problem\n\n{sentence}\n\n## {answer}\n\n{text}\n\n## Source\n\n"
        f"Proposed from memory `{memory.name}` revision {memory.revision} (promotion score "
        f"{score:.3f}); drafted extractively from its text, without a language model.\n"
    )
    tags = sorted({t for t in memory.tags if TAG.fullmatch(t)} - {POINTER_TAG})
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "original_memory": memory.name,
            "original_revision": memory.revision,
            "promotion_score": round(score, 6),
            "drafted": "extractive",
        }
    )
    return kres.KnowledgeItem(
        type=kind,  # type: ignore[arg-type]
        layer=k_layer,  # type: ignore[arg-type]
        org_unit=f"tenants/{tenant}/orgUnits/{unit_of(memory)}",
        path=item_path(memory),
        title=title,
        summary=_clip(sentence, SUMMARY_CHARS),
        content=content,
        tags=[FROM_MEMORY_TAG, *tags][:MAX_TAGS],
        metadata=metadata,
    )


class Proposals:
    """Proposes a tenant's valuable memories as knowledge drafts, once per revision.

    Args:
        db: Pool of the application role (``sync_proposals`` under RLS).
        knowledge: Stub of knowledge (the channel pointer sync opened; its owner closes it).
        memory: Stub of memory (likewise).
        credentials: This service's own token (principal ``service:sync``).
        threshold: Promotion score from which a memory is proposed, in [0, 1] (DOMAIN.md:
            0.8).
    """

    def __init__(
        self,
        db: Database,
        knowledge: KnowledgeStub,
        memory: MemoryStub,
        credentials: ServiceCredentials,
        threshold: float = promotion.DEFAULT_THRESHOLD,
    ) -> None:
        self.db = db
        self.knowledge = knowledge
        self.memory = memory
        self.credentials = credentials
        self.threshold = threshold

    async def scan(self, tenant_id: str) -> ScanResult:
        """Consider every live memory of the tenant's PROJECT, TEAM and ORG layers.

        Returns:
            Counts of what was examined, proposed and failed (failures are recorded and
            retried by the next scan or event); ``listed`` is False when memory could not be
            listed.
        """
        out = ScanResult()
        known = await self._states(tenant_id)
        for layer in LAYERS:
            token = ""
            while True:
                try:
                    page = await self.memory.ListMemories(
                        msvc.ListMemoriesRequest(
                            parent=f"tenants/{tenant_id}",
                            layer=layer,  # type: ignore[arg-type]
                            page_size=1000,
                            page_token=token,
                        ),
                        metadata=await self.credentials.metadata(),
                        timeout=CALL_TIMEOUT_S,
                    )
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "sync.proposals_list_failed", tenant=tenant_id, code=exc.code().name
                    )
                    out.listed = False
                    return out
                for memory in page.memories:
                    out.examined += 1
                    outcome = await self.consider(
                        tenant_id, memory, known.get((memory.name, memory.revision))
                    )
                    out.proposed += outcome is Outcome.PROPOSED
                    out.failed += outcome is Outcome.FAILED
                token = page.next_page_token
                if not token:
                    break
        return out

    async def handle_batch(self, events: Sequence[Event]) -> None:
        """:meth:`handle` for each of one read's events in turn, so that the consumer
        acknowledges the read with one ``XACK`` (most events of a stream are not proposal
        candidates, and each cost an acknowledgement and a span).

        Raises:
            grpc.aio.AioRpcError: As :meth:`handle` (the consumer then goes one by one;
                the events handled before are proposed once all the same).
            ProposalFailedError: Likewise.
        """
        for event in events:
            await self.handle(event)

    async def handle(self, event: Event) -> None:
        """Consider the memory of one memory event (a consumer group handler: idempotent,
        since a revision is proposed once whatever the number of deliveries).

        Raises:
            grpc.aio.AioRpcError: Memory could not be read: the entry stays pending and is
                delivered again.
            ProposalFailedError: The proposal failed (recorded first): delivered again too.
        """
        if event.type not in EVENT_TYPES or event.payload.get("layer") not in LAYERS:
            return
        try:
            memory = await self.memory.GetMemory(
                msvc.GetMemoryRequest(name=event.resource),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            # Gone since (memory answers PERMISSION_DENIED for a missing memory to a caller
            # without tenant-wide read): nothing to propose.
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                # Logged: a refusal of a memory that exists would mean the Cedar rule
                # memory-sync-proposals-read no longer admits this service.
                log.info("sync.proposal_memory_gone", memory=event.resource, code=exc.code().name)
                return
            raise
        state = await self._state(event.tenant, memory.name, memory.revision)
        outcome = await self.consider(event.tenant, memory, state)
        if outcome is Outcome.FAILED:
            raise ProposalFailedError(memory.name, memory.revision)

    async def consider(
        self, tenant_id: str, memory: mres.Memory, state: State | None = None
    ) -> Outcome:
        """Propose one memory revision when it qualifies and was not proposed yet.

        A revision already decided (a recorded row, PENDING or FAILED) is proposed whatever
        its score now; an undecided one needs a score at or above the threshold.

        Args:
            tenant_id: The tenant.
            memory: The memory as memory's API returned it.
            state: Its revision's recorded state, when the caller already read it.

        Returns:
            What was done.
        """
        if state is State.PROPOSED:
            return Outcome.DONE
        if not eligible(memory):
            return self._count(Outcome.SKIPPED)
        score = memory_score(memory, datetime.now(UTC))
        if state is None and score < self.threshold:
            return self._count(Outcome.SKIPPED)
        try:
            proposed = await self._propose(tenant_id, memory, min(max(score, 0.0), 1.0))
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details() or ''}"
            log.warning("sync.proposal_failed", memory=memory.name, error=detail)
            async with self.db.transaction(tenant_id) as conn:
                await conn.execute(
                    "UPDATE sync_proposals SET state = $4, attempts = attempts + 1, "
                    "detail = $5, updated_at = clock_timestamp() WHERE tenant_id = $1 AND "
                    "memory = $2 AND revision = $3 AND state <> $6",
                    tenant_id,
                    memory.name,
                    memory.revision,
                    State.FAILED.value,
                    detail[:2000],
                    State.PROPOSED.value,
                )
            return self._count(Outcome.FAILED)
        return self._count(Outcome.PROPOSED if proposed else Outcome.DONE)

    @staticmethod
    def _count(outcome: Outcome) -> Outcome:
        PROPOSALS.labels(outcome.value).inc()
        return outcome

    async def _propose(self, tenant_id: str, memory: mres.Memory, score: float) -> bool:
        """Record the revision's key, then propose it in the transaction that holds it.

        Returns:
            True when this call proposed it, False when it was proposed already.

        Raises:
            grpc.aio.AioRpcError: Knowledge refused or could not be reached (nothing is
                marked PROPOSED).
        """
        kind = knowledge_type(memory)
        # Committed first: the key and the score that decided, which every retry reuses
        # (the draft, hence knowledge's request hash, stays the same across attempts).
        async with self.db.transaction(tenant_id) as conn:
            await conn.execute(
                "INSERT INTO sync_proposals (tenant_id, memory, revision, score, state, "
                "knowledge_type) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                tenant_id,
                memory.name,
                memory.revision,
                score,
                State.PENDING.value,
                kind,
            )
        async with self.db.transaction(tenant_id) as conn:
            # A concurrent cycle on this revision waits here until this one commits.
            row = await conn.fetchrow(
                "SELECT state, score FROM sync_proposals WHERE tenant_id = $1 AND memory = $2 "
                "AND revision = $3 FOR UPDATE",
                tenant_id,
                memory.name,
                memory.revision,
            )
            if row is None or row["state"] == State.PROPOSED.value:
                return False
            item = await self._write(tenant_id, memory, draft(memory, row["score"]))
            await conn.execute(
                "UPDATE sync_proposals SET state = $4, knowledge_item = $5, "
                "attempts = attempts + 1, detail = '', updated_at = clock_timestamp() "
                "WHERE tenant_id = $1 AND memory = $2 AND revision = $3",
                tenant_id,
                memory.name,
                memory.revision,
                State.PROPOSED.value,
                item,
            )
        log.info("sync.proposed", memory=memory.name, revision=memory.revision, item=item)
        return True

    async def _write(self, tenant_id: str, memory: mres.Memory, item: kres.KnowledgeItem) -> str:
        """Create the draft and propose it; retries get knowledge's first answers.

        Returns:
            The item's name.
        """
        create_id, propose_id = request_ids(memory)
        try:
            created = await self.knowledge.CreateKnowledgeItem(
                ksvc.CreateKnowledgeItemRequest(
                    parent=f"tenants/{tenant_id}", knowledge_item=item, request_id=create_id
                ),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # Written by an attempt whose request id knowledge has forgotten since.
            found = await self._by_path(tenant_id, item)
            if found is None:
                raise
            created = found
        if created.status != kres.KNOWLEDGE_STATUS_DRAFT:
            return str(created.name)
        try:
            await self.knowledge.ProposeKnowledgeItem(
                ksvc.ProposeKnowledgeItemRequest(
                    name=created.name,
                    reason=f"promotion score of {memory.name} reached {self.threshold}",
                    request_id=propose_id,
                ),
                metadata=await self.credentials.metadata(),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # Proposed already by an attempt whose request id knowledge has forgotten (a
            # draft still in DRAFT was refused for another reason, e.g. missing sections).
            now = await self._by_path(tenant_id, item)
            if now is None or now.status == kres.KNOWLEDGE_STATUS_DRAFT:
                raise
        return str(created.name)

    async def _by_path(self, tenant_id: str, item: kres.KnowledgeItem) -> kres.KnowledgeItem | None:
        """The live item at the draft's layer, unit and path, if any."""
        page = await self.knowledge.ListKnowledgeItems(
            ksvc.ListKnowledgeItemsRequest(
                parent=f"tenants/{tenant_id}",
                layer=item.layer,
                org_unit=item.org_unit,
                path=item.path,
                page_size=1,
            ),
            metadata=await self.credentials.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        return page.knowledge_items[0] if page.knowledge_items else None

    async def _states(self, tenant_id: str) -> dict[tuple[str, int], State]:
        """Every recorded revision's state: (memory, revision) → state."""
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            rows = await conn.fetch("SELECT memory, revision, state FROM sync_proposals")
        return {(r["memory"], r["revision"]): State(r["state"]) for r in rows}

    async def _state(self, tenant_id: str, memory: str, revision: int) -> State | None:
        async with self.db.transaction(tenant_id, readonly=True) as conn:
            got = await conn.fetchval(
                "SELECT state FROM sync_proposals WHERE tenant_id = $1 AND memory = $2 "
                "AND revision = $3",
                tenant_id,
                memory,
                revision,
            )
        return State(got) if got is not None else None


class ProposalFailedError(Exception):
    """A memory revision's proposal failed (recorded in ``sync_proposals``); raised to the
    event consumer so the event is delivered again."""

    def __init__(self, memory: str, revision: int) -> None:
        super().__init__(f"proposing {memory} revision {revision} failed")
