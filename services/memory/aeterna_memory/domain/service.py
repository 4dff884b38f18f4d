"""The memory domain: create, read, update, delete, search and feedback.

It talks only to ports (:mod:`aeterna_memory.ports`) and knows no gRPC and no SQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import structlog
from aeterna_common.admission import ForegroundGauge, TenantRateLimit
from aeterna_common.after_answer import AfterAnswer
from aeterna_common.authz import Authorizer, ReadableScope, Resource, denied
from aeterna_common.consistency import TOKEN_NOT_REACHED
from aeterna_common.context import Principal
from aeterna_common.embedding.port import EmbeddingPort, Embeddings
from aeterna_common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from aeterna_common.search import fusion
from aeterna_common.telemetry import tracer
from aeterna_common.vectors.port import FieldMatch, IndexFilter, ScoredId, SparseVector

from aeterna_memory.domain.indexing import IndexingPolicy, IndexTexts, build_texts, has_session
from aeterna_memory.domain.model import (
    SEARCH_IDENTIFIERS,
    UNIT_LAYERS,
    Embedded,
    FeedbackType,
    Layer,
    ListFilter,
    Memory,
    MemoryPatch,
    MetadataCondition,
    NewMemory,
    Revision,
    Scope,
    SearchHit,
    SearchQuery,
)
from aeterna_memory.domain.ranking import (
    QueryInfo,
    Ranker,
    competition_ranks,
    rank_inputs,
    rerank,
    with_event_dates,
)
from aeterna_memory.ports import EmbeddingCache, MemoryStore, SearchIndex

log = structlog.get_logger("aeterna.memory")
_TRACER = tracer("aeterna.memory")

T = TypeVar("T")

SERVICE = "aeterna.memory.v1.MemoryService"
"""Full name of the gRPC service; an action is ``{SERVICE}/{method}``."""

USER_LAYERS = frozenset({Layer.AGENT, Layer.USER, Layer.SESSION})
"""Layers of one user's own memories (keyed by ``user_id``)."""


def action(method: str) -> str:
    """The permission model's action of a MemoryService method (its full method name)."""
    return f"{SERVICE}/{method}"


def memory_resource(tenant: str, layer: Layer, scope: Scope) -> Resource:
    """The resource a memory of ``layer`` and ``scope`` belongs to: its user's space or its
    unit (a validated scope holds the layer's identifiers)."""
    if layer in USER_LAYERS:
        return Resource.user_space(tenant, scope.user_id or "")
    kind, name = UNIT_LAYERS[layer]
    return Resource.unit(tenant, kind, scope.get(name) or "")


def explicit_resources(tenant: str, layers: Sequence[Layer], scope: Scope) -> list[Resource]:
    """Resources named by the identifiers a read gives explicitly, for the layers it reads.

    An explicit ``user_id`` names that user's space, ``project_id`` that project, and so on;
    identifiers left out widen the read and are narrowed instead (:func:`narrowing`).
    """
    out: list[Resource] = []
    if scope.user_id and any(layer in USER_LAYERS for layer in layers):
        out.append(Resource.user_space(tenant, scope.user_id))
    for layer in layers:
        if layer in UNIT_LAYERS:
            kind, name = UNIT_LAYERS[layer]
            if value := scope.get(name):
                out.append(Resource.unit(tenant, kind, value))
    return out


def narrowing(
    readable: ReadableScope, layers: Sequence[Layer]
) -> dict[Layer, frozenset[str] | None]:
    """Per layer, the identifier values the caller may read (None: all of them).

    Layers of users' own memories are narrowed on ``user_id``, unit layers on the unit's
    identifier; an empty set means the layer holds nothing the caller may read.
    """
    out: dict[Layer, frozenset[str] | None] = {}
    for layer in layers:
        if readable.everything:
            out[layer] = None
        elif layer in USER_LAYERS:
            out[layer] = readable.user_ids
        else:
            kind = UNIT_LAYERS[layer][0]
            out[layer] = (
                None if kind in readable.all_units else readable.units.get(kind, frozenset())
            )
    return out


def narrowing_column(layer: Layer) -> str:
    """The scope identifier a layer is narrowed on."""
    return "user_id" if layer in USER_LAYERS else UNIT_LAYERS[layer][1]


DUPLICATE_COSINE = 0.95
"""Near-duplicates (cosine ≥ 0.95) collapse to the more specific one (DOMAIN.md, Search)."""


@dataclass(frozen=True, slots=True)
class SearchTuning:
    """Retrieval settings.

    Attributes:
        candidates: Hits taken from each of the dense and lexical rankings per layer.
        fusion_method: ``minmax`` (convex combination of min-max normalised scores, Bruch et al.,
            ACM TOIS 2023), ``dbsf`` (Qdrant's distribution-based score fusion) or ``rrf``
            (reciprocal rank fusion, Cormack et al. 2009, normalised to (0, 1]).
        dense_weight: Weight of the dense ranking in the fusion.
        lexical_weight: Weight of the lexical ranking in the fusion.
        rrf_k: Rank constant of reciprocal rank fusion (60 in Cormack et al.).
        wait_s: Longest wait, in seconds, of a search without a consistency token for the
            index to reach the tenant's latest committed change; past it the search is served
            and marked stale.
        token_wait_s: Longest wait, in seconds, of a read with a consistency token for the
            index to reach the token's position; past it the read fails with ``UNAVAILABLE``
            (reason ``CONSISTENCY_TOKEN_NOT_REACHED``) so that the edge retries elsewhere.
        rerank_depth: First-stage candidates handed to the second-stage ranker
            (:mod:`aeterna_memory.domain.ranking`); the rest keep their fused order after them.
        expand_hits: Best first-stage candidates whose session neighbours join the ranker's
            pool before ranking (episode expansion; 0 turns it off).
        expand_before: Neighbours taken just before each expanded hit in its session.
        expand_after: Neighbours taken just after each expanded hit in its session.

    The defaults (min-max, 0.4 dense / 0.6 lexical) weigh the stronger ranking more: on LoCoMo
    dev conversations BM25F with context beats dense alone by ~0.16 recall@10, and every
    dense weight in 0.2-0.5 stays within 0.015 of the best (``bench/locomo_eval.py``).
    """

    candidates: int = 50
    fusion_method: str = "minmax"
    dense_weight: float = 0.4
    lexical_weight: float = 0.6
    rrf_k: float = fusion.RRF_K
    wait_s: float = 0.1
    token_wait_s: float = 2.0
    rerank_depth: int = 50
    expand_hits: int = 10
    expand_before: int = 2
    expand_after: int = 1


@dataclass(frozen=True, slots=True)
class SearchResult:
    """What a search found and how fresh the index was.

    Attributes:
        hits: The ranked hits.
        stale: The index had not applied the tenant's latest change (searches without a
            consistency token only).
        applied_position: The outbox position the index had applied when it was queried.
    """

    hits: list[SearchHit]
    stale: bool
    applied_position: int


def model_id(name: str, dimension: int) -> str:
    """The id of an embedding space: model name (with its precision) and dimension.

    Args:
        name: Model name as the embedder reports it, e.g. ``all-MiniLM-L6-v2-int8``.
        dimension: Vector length.

    Returns:
        ``{name}/{dimension}``, e.g. ``all-MiniLM-L6-v2-int8/384``.
    """
    return f"{name}/{dimension}"


def request_hash(*parts: object) -> str:
    """Fingerprint of a request, to refuse a ``request_id`` reused for another request.

    Canonical JSON (sorted keys), so the same request hashes the same in every process
    whatever the order of its metadata keys.
    """

    def plain(value: object) -> object:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    text = json.dumps(plain(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class MemoryDomain:
    """Use cases of the memory service.

    Args:
        store: Source of truth.
        index: Search side of the vector index.
        embedder: Dense embedding model.
        cache: Embedding cache.
        encode_query: Text → BM25 query vector.
        indexing: What is indexed with each memory.
        tuning: Retrieval settings.
        authz: Decides every call before any lookup; the default knows no bindings (own
            memories only).
        foreground: Searches in flight in this process; batch creates yield the event loop
            to them between steps (:mod:`aeterna_common.admission`). The default waits at
            most 20 ms per step.
        bulk_step: Memories per step of a create (authorization, embedding, rows sent to
            the store); 0 does each create in one step.
        ranker: Second-stage ranker of search candidates; None keeps the fused order.
        batch_limit: Per-tenant admission limit of BatchCreateMemories items
            (``RESOURCE_EXHAUSTED`` with ``RetryInfo`` past it); None admits every batch.
    """

    def __init__(
        self,
        store: MemoryStore,
        index: SearchIndex,
        embedder: EmbeddingPort,
        cache: EmbeddingCache,
        encode_query: Callable[[str], SparseVector],
        *,
        indexing: IndexingPolicy | None = None,
        tuning: SearchTuning | None = None,
        authz: Authorizer | None = None,
        foreground: ForegroundGauge | None = None,
        bulk_step: int = 20,
        ranker: Ranker | None = None,
        batch_limit: TenantRateLimit | None = None,
    ) -> None:
        if bulk_step < 0:
            raise ValueError(f"bulk_step must be >= 0, got {bulk_step}")
        self.store = store
        self.index = index
        self.embedder = embedder
        self.cache = cache
        self.encode_query = encode_query
        self.indexing = indexing or IndexingPolicy()
        self.tuning = tuning or SearchTuning()
        self.authz = authz or Authorizer()
        self.foreground = foreground or ForegroundGauge()
        self.bulk_step = bulk_step
        self.ranker = ranker
        self.batch_limit = batch_limit
        self.model_mismatch: str | None = None
        """Set while stored vectors are of another model: searches are refused with it."""
        self._after_answer = AfterAnswer()
        self.embedding_cap: Callable[[str], Awaitable[None]] | None = None
        """Raises ``RESOURCE_EXHAUSTED`` for a tenant whose budget is spent (hard cap), before
        the model embeds documents (:class:`aeterna_common.usage.EmbeddingCap`)."""

    # ---- access counts ---------------------------------------------------------------

    def touch_after_answer(
        self, tenant_id: str, ids: Sequence[str], *, query_tokens: int = 0
    ) -> None:
        """Count one access of each returned memory, after the answer has been sent.

        The access count only feeds promotion and decay (DOMAIN.md, Memory), which read it
        hours later: its transaction (three database round trips) need not delay the answer.
        The write runs as a task of its own; a failure is logged, not raised (the search
        has been answered). :meth:`drain_touches` waits for the pending ones at shutdown.

        Args:
            tenant_id: The tenant.
            ids: Memory ids the search returned.
            query_tokens: Tokens the model read to embed the query (billed with the search,
                :mod:`aeterna_common.usage`); 0 when its vector came from the cache.
        """
        self._after_answer.spawn(
            self.store.touch(tenant_id, list(ids), query_tokens=query_tokens),
            "search.access_count_not_written",
            tenant=tenant_id,
            hits=len(ids),
        )

    async def drain_touches(self) -> None:
        """Wait until every pending access-count write has finished (at shutdown)."""
        await self._after_answer.drain()

    # ---- embeddings ------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The embedding model's id, ``{name}/{dimension}`` (see :func:`model_id`)."""
        return model_id(self.embedder.model, self.embedder.dimension)

    async def embed(
        self, tenant_id: str, texts: Sequence[str], *, query: bool = False
    ) -> Embeddings:
        """Vectors of ``texts``: from the cache where possible, the model otherwise.

        The cache is keyed by the model id, and a cached vector whose length is not the
        model's dimension (a corrupt or foreign entry) counts as a miss and is overwritten.

        Args:
            tenant_id: The tenant (the cache is per tenant).
            texts: Texts to embed.
            query: Search queries: embedded on the model's query lane, which never waits
                behind document batches (:meth:`EmbeddingPort.embed_query`).

        Returns:
            One vector per text, in input order, with the tokens the model read for it in
            this call (what is billed): at least 1 for a text the model embedded, counted at
            its first occurrence; 0 for a repeat and for a vector from the cache.

        Raises:
            EmbeddingError: The model failed (``EmbeddingUnavailableError`` when it cannot
                be reached).
        """
        model = self.model_id
        dimension = self.embedder.dimension
        cached = [
            v if v is not None and len(v) == dimension else None
            for v in await self.cache.get_many(tenant_id, model, texts)
        ]
        missing = sorted({t for t, v in zip(texts, cached, strict=True) if v is None})
        fresh: dict[str, list[float]] = {}
        read: dict[str, int] = {}
        if missing and not query and self.embedding_cap is not None:
            # New documents only: searches of what is stored stay available.
            await self.embedding_cap(tenant_id)
        if missing:
            embed = self.embedder.embed_query if query else self.embedder.embed
            vectors = await embed(missing)
            fresh = dict(zip(missing, vectors, strict=True))
            # At least 1: a call is billed exactly when its text has tokens.
            read = {t: max(1, n) for t, n in zip(missing, vectors.tokens, strict=True)}
            await self.cache.put_many(tenant_id, model, list(fresh.items()))
        return Embeddings(
            [v if v is not None else fresh[t] for t, v in zip(texts, cached, strict=True)],
            [read.pop(t, 0) for t in texts],
        )

    # ---- writes ----------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        memories: Sequence[NewMemory],
        *,
        method: str,
        request_id: str,
    ) -> tuple[list[Memory], int]:
        """Create memories atomically (all or none, permission included); idempotent on
        ``request_id`` per principal.

        Returns:
            The memories and the outbox position of their commit (the consistency token).

        Raises:
            PermissionDenied: The caller may not write one of the memories' scopes (reason
                ``ACTION_NOT_ALLOWED``); nothing is written.
            FailedPrecondition: ``request_id`` reused for another request.
            CommitOutcomeUnknown: the commit's outcome is unknown and there is no request id.
            RateLimited: A BatchCreateMemories over the tenant's admission limit
                (``RESOURCE_EXHAUSTED`` with ``RetryInfo``), checked after the permission
                and after a replay of a request id (a retry of a done batch costs nothing);
                nothing is written.
        """
        tenant = principal.tenant_id
        resources = list(dict.fromkeys(memory_resource(tenant, m.layer, m.scope) for m in memories))
        # Every scope is checked before anything is written (all or none), a step at a time.
        for part in self._steps(resources):
            await self.authz.authorize(principal, action(method), *part)
        return await self.create_unchecked(
            principal, memories, method=method, request_id=request_id
        )

    async def create_unchecked(
        self,
        principal: Principal,
        memories: Sequence[NewMemory],
        *,
        method: str,
        request_id: str,
    ) -> tuple[list[Memory], int]:
        """:meth:`create` without the permission check, for the service's own background
        work (promotion), which no caller started."""
        tenant = principal.tenant_id
        fingerprint = request_hash(method, memories)
        # Resolved event dates join the metadata after the fingerprint: a retry matches.
        memories = [with_event_dates(m) for m in memories]
        if request_id:
            replay = await self.store.idempotent_result(
                tenant, principal.actor, method, request_id, fingerprint
            )
            if replay is not None:
                return replay
        if self.batch_limit is not None and method == "BatchCreateMemories":
            self.batch_limit.admit(tenant, len(memories))
        prepared = await self._prepare(tenant, memories)
        return await self.store.create(
            tenant,
            prepared,
            model=self.model_id,
            actor=principal.actor,
            method=method,
            request_id=request_id,
            request_hash=fingerprint,
            step=self.bulk_step,
            between_steps=self._between_steps,
        )

    def _steps(self, items: Sequence[T]) -> list[Sequence[T]]:
        """``items`` cut into steps of ``bulk_step`` (one step when 0 or fewer items)."""
        size = self.bulk_step or len(items) or 1
        return [items[i : i + size] for i in range(0, len(items), size)] or [items]

    async def _between_steps(self) -> None:
        """Yield the event loop to in-flight searches (bounded) between two bulk steps."""
        await self.foreground.yield_to_foreground()

    async def _prepare(self, tenant: str, memories: Sequence[NewMemory]) -> list[Embedded]:
        need = self.indexing.context_needed
        keys = [
            (m.scope.user_id or "", m.scope.session_id or "") if need and has_session(m) else None
            for m in memories
        ]
        history = await self.store.recent_contents(
            tenant, list(dict.fromkeys(k for k in keys if k is not None)), need
        )
        texts: list[IndexTexts] = []
        for m, key in zip(memories, keys, strict=True):
            previous = history[key] if key is not None else []
            texts.append(build_texts(m, previous, self.indexing))
            # Later memories of the same session in this batch see this one as context.
            previous.append(m.content)
        vectors = Embeddings()
        for i, part in enumerate(self._steps([t.dense for t in texts])):
            if i:
                await self._between_steps()
            step = await self.embed(tenant, part)
            vectors.extend(step)
            vectors.tokens.extend(step.tokens)
        return [
            Embedded(memory=m, lexical_context=t.lexical_context, embedding=v, tokens=n)
            for m, t, v, n in zip(memories, texts, vectors, vectors.tokens, strict=True)
        ]

    async def update(
        self, principal: Principal, memory_id: str, patch: MemoryPatch
    ) -> tuple[Memory, int]:
        """Apply a field-masked update; returns the memory and its commit's position.

        A change of content or metadata rebuilds the memory's index texts: the BM25 context
        (indexed metadata values such as ``session_time`` and the session turns that
        preceded the memory, by creation order) and, when the content or the dense text
        changes, the vector.

        Raises:
            PermissionDenied: The caller may not update it, or could not read it if it
                existed (reason ``ACTION_NOT_ALLOWED``).
            NotFound: no live memory of that name (callers with tenant-wide read only).
            Aborted: a concurrent change won.
        """
        tenant = principal.tenant_id
        current = await self.checked(principal, "UpdateMemory", memory_id, include_deleted=False)
        lexical_context: tuple[str, ...] | None = None
        embedding: list[float] | None = None
        tokens = 0
        content_changed = "content" in patch.fields and patch.content is not None
        if content_changed or "metadata" in patch.fields:
            new = NewMemory(
                layer=current.layer,
                scope=current.scope,
                content=patch.content if content_changed and patch.content else current.content,
                metadata=(patch.metadata or {}) if "metadata" in patch.fields else current.metadata,
            )
            previous: list[str] = []
            if self.indexing.context_needed and has_session(new):
                previous = await self.store.preceding_contents(
                    tenant, memory_id, self.indexing.context_needed
                )
            texts = build_texts(new, previous, self.indexing)
            lexical_context = texts.lexical_context
            if content_changed or self.indexing.dense_metadata:
                embedded = await self.embed(tenant, [texts.dense])
                embedding, tokens = embedded[0], embedded.tokens[0]
        return await self.store.update(
            tenant,
            memory_id,
            patch,
            expected_revision=current.revision,
            lexical_context=lexical_context,
            embedding=embedding,
            actor=principal.actor,
            model=self.model_id if embedding is not None else None,
            embedding_tokens=tokens,
        )

    async def delete(self, principal: Principal, memory_id: str) -> tuple[Memory, int]:
        """Soft-delete (idempotent); returns the memory and its commit's position.

        Raises:
            PermissionDenied, NotFound: As :meth:`checked`.
        """
        await self.checked(principal, "DeleteMemory", memory_id)
        return await self.store.delete(principal.tenant_id, memory_id, actor=principal.actor)

    async def feedback(
        self,
        principal: Principal,
        memory_id: str,
        kind: FeedbackType,
        reward: float,
        request_id: str,
    ) -> tuple[Memory, int]:
        """Record a reward; importance = clamp((old + reward) / 2, 0, 1).

        Returns:
            The memory and the outbox position of the commit.

        Raises:
            PermissionDenied, NotFound: As :meth:`checked`.
        """
        await self.checked(principal, "RecordMemoryFeedback", memory_id)
        return await self.store.record_feedback(
            principal.tenant_id,
            memory_id,
            kind,
            reward,
            actor=principal.actor,
            request_id=request_id,
            request_hash=request_hash("feedback", memory_id, kind, reward),
        )

    # ---- admin -----------------------------------------------------------------------

    async def reembed(
        self,
        principal: Principal,
        *,
        target_model: str = "",
        max_memories: int = 0,
        per_second: float = 50.0,
        batch_size: int = 32,
    ) -> tuple[int, int]:
        """Re-embed the tenant's live memories whose vectors are of another model.

        Each memory is re-embedded from its content (and its stored session context)
        through the normal update path: a new revision (changed field ``embedding``), an
        outbox event that the indexes follow, and the model id stored with the vector in the
        same transaction. That stored model id is the persisted cursor: an interrupted run
        leaves every finished memory done, and the next run continues with the rest. A
        memory changed concurrently (revision moved on) is skipped in this run and counted in
        ``remaining`` if its writer did not re-embed it. Writes are paced to ``per_second``.

        Args:
            principal: The caller; needs ``memory:admin`` (TENANT_ADMIN, PLATFORM_ADMIN).
            target_model: Expected model id; empty means this replica's.
            max_memories: Stop after this many (0: all).
            per_second: Rate limit in memories per second (> 0).
            batch_size: Memories embedded per model call.

        Returns:
            ``(re-embedded, remaining)``: memories re-embedded by this call and live
            memories of the tenant still embedded with another model.

        Raises:
            PermissionDenied: The caller may not re-embed (reason ``ACTION_NOT_ALLOWED``).
            FailedPrecondition: ``target_model`` is not this replica's model (reason
                ``EMBEDDING_MODEL_MISMATCH``).
            InvalidArgument: ``max_memories`` is negative.
        """
        await self.authz.authorize(
            principal, action("ReembedMemories"), Resource.tenant(principal.tenant_id)
        )
        model = self.model_id
        if target_model and target_model != model:
            raise FailedPrecondition(
                f"this replica embeds with {model!r}, not {target_model!r}; call a replica "
                f"configured for {target_model!r}",
                reason="EMBEDDING_MODEL_MISMATCH",
                metadata={"replica_model": model, "target_model": target_model},
            )
        if max_memories < 0:
            raise InvalidArgument([FieldViolation("max_memories", "must be >= 0")])
        tenant = principal.tenant_id
        done = 0
        after: str | None = None  # keyset position within this run
        started = time.monotonic()
        # Batches no larger than a second's worth, so the model is not run far ahead.
        batch_size = max(1, min(batch_size, int(per_second)))
        while not max_memories or done < max_memories:
            want = batch_size if not max_memories else min(batch_size, max_memories - done)
            page = await self.store.stale_embeddings(tenant, model, want, after)
            if not page:
                break
            after = page[-1][0].id
            texts = [self.dense_text(m, ctx) for m, ctx in page]
            vectors = await self.embed(tenant, texts)
            for (memory, _), vector, tokens in zip(page, vectors, vectors.tokens, strict=True):
                # Rate limit: the n-th write of this call waits until n / per_second seconds.
                ahead = done / per_second - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
                try:
                    await self.store.update(
                        tenant,
                        memory.id,
                        MemoryPatch(fields=frozenset()),
                        expected_revision=memory.revision,
                        lexical_context=None,
                        embedding=vector,
                        actor=principal.actor,
                        model=model,
                        embedding_tokens=tokens,
                    )
                    done += 1
                except (Aborted, NotFound):
                    pass  # changed or deleted meanwhile: left to its writer or a later run
        remaining = await self.store.count_stale_embeddings(tenant, model)
        log.info("reembed", tenant=tenant, model=model, reembedded=done, remaining=remaining)
        return done, remaining

    def dense_text(self, memory: Memory, index_context: Sequence[str]) -> str:
        """The dense text of a stored memory, as :func:`build_texts` made it at write time
        (the preceding turns come from the stored BM25 context, so a dense context longer
        than the lexical one sees only those turns)."""
        new = NewMemory(
            layer=memory.layer, scope=memory.scope, content=memory.content, metadata=memory.metadata
        )
        values = build_texts(new, [], self.indexing).lexical_context
        previous = list(index_context[len(values) :]) if has_session(new) else []
        return build_texts(new, previous, self.indexing).dense

    # ---- reads -----------------------------------------------------------------------

    async def checked(
        self, principal: Principal, method: str, memory_id: str, *, include_deleted: bool = True
    ) -> Memory:
        """Read a memory by name for ``method``, permission before existence (AIP-211).

        First a coarse check before any lookup (may the caller call ``method`` in its tenant
        at all), then the row (RLS-bound read), then the fine check on the row's layer and
        scope. A missing memory and a forbidden one give the same ``PERMISSION_DENIED``,
        except to callers who may read every memory of the tenant (they learn ``NOT_FOUND``).

        Raises:
            PermissionDenied: Refused, or missing for a caller without tenant-wide read
                (reason ``ACTION_NOT_ALLOWED``).
            NotFound: Missing, for a caller with tenant-wide read.
        """
        tenant = principal.tenant_id
        name = action(method)
        await self.authz.authorize(principal, name, Resource.tenant(tenant))
        try:
            memory = await self.store.get(tenant, memory_id, include_deleted=include_deleted)
        except NotFound:
            if await self.authz.allowed(principal, name, Resource.tenant_data(tenant)):
                raise
            raise denied(name) from None
        await self.authz.authorize(
            principal, name, memory_resource(tenant, memory.layer, memory.scope)
        )
        return memory

    async def get(self, principal: Principal, memory_id: str) -> Memory:
        """One memory (deleted ones too, with their delete time); see :meth:`checked`."""
        return await self.checked(principal, "GetMemory", memory_id)

    async def list_page(
        self, principal: Principal, flt: ListFilter, page_size: int, page_token: str
    ) -> tuple[list[Memory], str]:
        """A page of memories the caller may read.

        Identifiers given in the filter must be readable (else ``PERMISSION_DENIED``); what
        the filter leaves open is narrowed in the query to what the caller may read.
        """
        tenant = principal.tenant_id
        name = action("ListMemories")
        layers = [flt.layer] if flt.layer is not None else list(Layer)
        await self.authz.authorize(
            principal, name, Resource.tenant(tenant), *explicit_resources(tenant, layers, flt.scope)
        )
        readable = await self.authz.readable_scope(principal, name)
        narrow = None if readable.everything else narrowing(readable, layers)
        return await self.store.list_page(tenant, flt, page_size, page_token, narrow=narrow)

    async def revisions(
        self, principal: Principal, memory_id: str, page_size: int, after: int
    ) -> tuple[list[Revision], bool]:
        """Revisions of one memory; see :meth:`checked`."""
        await self.checked(principal, "ListMemoryRevisions", memory_id)
        return await self.store.revisions(principal.tenant_id, memory_id, page_size, after)

    # ---- search ----------------------------------------------------------------------

    async def search(
        self, principal: Principal, query: SearchQuery, *, min_position: int | None = None
    ) -> SearchResult:
        """Hybrid search (DOMAIN.md, Search).

        With ``min_position`` (a consistency token's position) the search waits until the
        index has applied it, at most ``tuning.token_wait_s``, and fails rather than serve a
        stale answer. Without it the search waits at most ``tuning.wait_s`` for the tenant's
        latest committed change and, past that, is served and marked stale.

        Every reached layer is searched concurrently with a dense and a BM25 ranking. All
        candidates of all layers then go into one fused ranking (:func:`fuse_layers`): the
        raw scores are normalised over the union of the layers, so a layer's best hit only
        scores high when it is good compared with every other layer's hits. ``min_score``
        applies to that one ranking; layer precedence only breaks near-ties
        (:data:`NEAR_TIE`). With a ranker, the first ``tuning.rerank_depth`` candidates are
        then re-read and reordered by the second stage (:mod:`aeterna_memory.domain.ranking`:
        time, participant, episode and neighbour features of those candidates only); hits
        keep their fused score. Hits are re-read from the source of truth (so a stale index never
        returns deleted, expired or foreign rows) and near-duplicates of another layer
        (cosine ≥ 0.95, or the same content) collapse to the more specific copy; within one
        layer only identical contents collapse.

        Args:
            principal: The caller; its tenant scopes everything.
            query: The validated query.

            min_position: Outbox position the index must have applied, or None.

        Returns:
            At most ``query.top_k`` hits, best first, with fused scores in [0, 1], and the
            index's state.

        Only what the caller may read is searched: identifiers the query gives must be
        readable (else ``PERMISSION_DENIED``), and layers the query leaves open are narrowed
        in the index filter itself (so ``top_k`` counts readable hits only).

        Raises:
            PermissionDenied: An explicit scope the caller may not read (reason
                ``ACTION_NOT_ALLOWED``).
            Unavailable: the index did not reach ``min_position`` in time (reason
                ``CONSISTENCY_TOKEN_NOT_REACHED``).
        """
        with self.foreground.track():
            return await self._search(principal, query, min_position)

    async def _search(
        self, principal: Principal, query: SearchQuery, min_position: int | None
    ) -> SearchResult:
        tenant = principal.tenant_id
        name = action("SearchMemories")
        await self.authz.authorize(
            principal,
            name,
            Resource.tenant(tenant),
            *explicit_resources(tenant, query.layers, query.scope),
        )
        readable = await self.authz.readable_scope(principal, name)
        narrow = {} if readable.everything else narrowing(readable, query.layers)
        layers = [layer for layer in query.layers if narrow.get(layer, None) != frozenset()]
        if self.model_mismatch is not None:
            raise FailedPrecondition(self.model_mismatch, reason="EMBEDDING_MODEL_MISMATCH")
        t0 = time.perf_counter()

        async def caught_up() -> bool:
            if min_position is not None:
                if not await self.index.wait_for(min_position, self.tuning.token_wait_s):
                    raise Unavailable(
                        "this replica's index has not reached the consistency token yet; "
                        "retry (another replica may have)",
                        reason=TOKEN_NOT_REACHED,
                        metadata={"applied_position": str(self.index.applied_position)},
                    )
                return True
            position = await self.store.latest_position(tenant)
            return await self.index.wait_for(position, self.tuning.wait_s)

        # Embedding the query overlaps with waiting for the index to reach the latest write.
        # BM25 encoding runs in a worker thread, off the event loop.
        async def embed_query() -> Embeddings:
            with _TRACER.start_as_current_span(
                "memory.search.embed", attributes={"aeterna.tenant": tenant}
            ):
                return await self.embed(tenant, [query.text], query=True)

        fresh, vectors, sparse_q = await asyncio.gather(
            caught_up(),
            embed_query(),
            asyncio.to_thread(self.encode_query, query.text),
        )
        applied = self.index.applied_position
        dense_q = vectors[0]
        per_layer = await asyncio.gather(
            *(
                self._search_layer(tenant, layer, query, dense_q, sparse_q, narrow.get(layer))
                for layer in layers
            )
        )
        ranking = fuse_layers(list(zip(layers, per_layer, strict=True)), self.tuning)
        candidates = {c.id: c for c in ranking if c.score >= query.min_score}
        ranked = list(candidates)
        read: dict[str, tuple[Memory, list[float]]] = {}
        # Vectors only tell duplicates of different layers apart (``_keep``): a one-layer
        # search reads none.
        with_vectors = len(layers) > 1
        if self.ranker is not None and ranked:
            ranked, candidates, read = await self._second_stage(
                tenant, query, ranked, candidates, with_vectors
            )
        # Re-read candidates from the source of truth in rank order, a chunk at a time, until
        # top_k survive (deleted, expired and duplicate candidates drop out).
        chunk = max(2 * query.top_k, 20)
        kept: list[_Kept] = []
        for start in range(0, len(ranked), chunk):
            ids = ranked[start : start + chunk]
            unread = [i for i in ids if i not in read]
            rows = {i: read[i] for i in ids if i in read}
            if unread:
                with _TRACER.start_as_current_span(
                    "memory.search.reread",
                    attributes={"aeterna.tenant": tenant, "aeterna.search.candidates": len(unread)},
                ) as span:
                    rows |= await self.store.read_hits(tenant, unread, vectors=with_vectors)
                    span.set_attribute("aeterna.search.rows", len(rows))
            for mid in ids:
                if mid not in rows:
                    continue
                memory, vector = rows[mid]
                _keep(kept, _Kept(candidates[mid], memory, np.asarray(vector, dtype=np.float32)))
                if len(kept) == query.top_k:
                    break
            if len(kept) == query.top_k:
                break
        # A more specific duplicate may have replaced a kept hit: restore the ranking order
        # (the ranked list's, which the second stage may have changed; a candidate's own
        # ``order`` is its first-stage position).
        position = {mid: i for i, mid in enumerate(ranked)}
        kept.sort(key=lambda k: position[k.candidate.id])
        self.touch_after_answer(
            tenant, [k.candidate.id for k in kept], query_tokens=vectors.tokens[0]
        )
        log.debug("search", hits=len(kept), ms=round((time.perf_counter() - t0) * 1000, 2))
        hits = [
            SearchHit(
                memory=k.memory,
                score=k.candidate.score,
                dense_score=k.candidate.dense_score,
                lexical_score=k.candidate.lexical_score,
            )
            for k in kept
        ]
        return SearchResult(hits=hits, stale=not fresh, applied_position=applied)

    async def _second_stage(
        self,
        tenant: str,
        query: SearchQuery,
        ranked: list[str],
        candidates: dict[str, Candidate],
        vectors: bool,
    ) -> tuple[list[str], dict[str, Candidate], dict[str, tuple[Memory, list[float]]]]:
        """Re-rank the first ``rerank_depth`` candidates, grown by their hits' session
        neighbours, with the ranker; the rest keep their fused order after them.

        The pool is what the caller may read: the index filter narrowed the candidates, and
        a neighbour shares its hit's layer and whole scope (so the same authorization
        decision covers it) and is read under RLS. Expansion is skipped when the query
        filters on tags or metadata (a neighbour need not match them) or sets a
        ``min_score`` (a neighbour has no first-stage score). An expanded memory that was
        not a candidate enters with first-stage scores 0: the ranker's episode and
        neighbour features carry its hit's score to it.

        Returns:
            The new order of every candidate id, the candidates (grown by the expanded
            neighbours; ``order`` stays the first-stage position), and the rows read by id
            (memory and vector, ``[]`` without ``vectors``).
        """
        pool = ranked[: self.tuning.rerank_depth]
        expand = (
            pool[: self.tuning.expand_hits]
            if not query.tags and not query.metadata and query.min_score <= 0
            else []
        )
        with _TRACER.start_as_current_span(
            "memory.search.reread",
            attributes={"aeterna.tenant": tenant, "aeterna.search.candidates": len(pool)},
        ) as span:
            read, near = await self.store.read_pool(
                tenant,
                pool,
                expand,
                self.tuning.expand_before,
                self.tuning.expand_after,
                vectors=vectors,
            )
            span.set_attribute("aeterna.search.rows", len(read) + len(near))
        layers = set(query.layers)
        in_pool = set(pool)
        for mid in sorted(near):
            memory = near[mid][0]
            if mid in in_pool or memory.layer not in layers:
                continue
            read[mid] = near[mid]
            if mid not in candidates:
                candidates[mid] = Candidate(
                    id=mid,
                    layer=memory.layer,
                    score=0.0,
                    dense_score=0.0,
                    lexical_score=0.0,
                    order=len(candidates),
                )
            pool.append(mid)
        live = [candidates[m] for m in pool if m in read]
        items = rank_inputs(live, [read[c.id][0] for c in live])
        # Inline: a few ms of numpy on the event loop cost less than a worker-thread hop.
        assert self.ranker is not None
        order = rerank(self.ranker, QueryInfo.of(query.text), items)
        head = [live[k].id for k in order]
        taken = set(head)
        ranked = head + [m for m in ranked[self.tuning.rerank_depth :] if m not in taken]
        return ranked, candidates, read

    async def _search_layer(
        self,
        tenant: str,
        layer: Layer,
        query: SearchQuery,
        dense_q: Sequence[float],
        sparse_q: SparseVector,
        readable: frozenset[str] | None,
    ) -> tuple[list[ScoredId], list[ScoredId]]:
        flt = layer_filter(tenant, layer, query, readable)
        n = max(self.tuning.candidates, query.top_k)
        with _TRACER.start_as_current_span(
            "memory.search.index",
            attributes={
                "aeterna.tenant": tenant,
                "aeterna.layer": layer.name,
                "aeterna.search.limit": n,
            },
        ) as span:
            dense, lexical = await asyncio.gather(
                self.index.search_dense(dense_q, flt, n),
                self.index.search_sparse(sparse_q, flt, n) if sparse_q.indices else _no_hits(),
            )
            span.set_attribute("aeterna.search.dense_candidates", len(dense))
            span.set_attribute("aeterna.search.lexical_candidates", len(lexical))
        return dense, lexical


NEAR_TIE = 0.01
"""Largest fused-score gap (on the [0, 1] scale) that layer precedence may overturn.

A hit of a more specific layer ranks above a less specific one whose fused score is higher by
less than ``NEAR_TIE × (layer distance) / 7``; larger gaps are decided by relevance alone
(DOMAIN.md, Search: precedence breaks near-ties, it is not the primary sort). 0.01 is below
the score differences that separate relevant from irrelevant hits on LoCoMo, so single-layer
rankings are unchanged and cross-layer rankings stay relevance-first.
"""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One entry of the fused cross-layer ranking.

    Attributes:
        id: Memory id.
        layer: The memory's layer.
        score: Fused score in [0, 1], comparable across layers.
        dense_score: Raw dense (cosine) score, 0 when not among the dense hits.
        lexical_score: Raw BM25 score, 0 when not among the lexical hits.
        order: Position in the ranking (0 = best).
        dense_rank: 1-based rank in the pooled dense list, 0 when absent.
        lexical_rank: 1-based rank in the pooled lexical list, 0 when absent.
    """

    id: str
    layer: Layer
    score: float
    dense_score: float
    lexical_score: float
    order: int
    dense_rank: int = 0
    lexical_rank: int = 0


def fuse_layers(
    per_layer: Sequence[tuple[Layer, tuple[Sequence[ScoredId], Sequence[ScoredId]]]],
    tuning: SearchTuning,
) -> list[Candidate]:
    """One ranking of every layer's dense and lexical hits.

    The dense hits of all layers are pooled into one list by raw cosine score, and the
    lexical hits likewise by raw BM25 score (one index, one IDF: raw scores are comparable
    across layers); the two pooled lists are then fused with the configured method. So the
    normalisation spans all layers: only the overall best hit of a list maps to 1, never
    each layer's best. With a single layer this is exactly the per-layer fusion.

    The order is by fused score, except that a more specific layer wins near-ties
    (:data:`NEAR_TIE`).

    Args:
        per_layer: For each searched layer, its dense and lexical hits (best first).
        tuning: Fusion method and weights.

    Returns:
        Candidates best first, each with its position in ``order``.
    """
    layer_of: dict[str, Layer] = {}
    dense_pool: list[ScoredId] = []
    lexical_pool: list[ScoredId] = []
    for layer, (dense, lexical) in per_layer:
        for hit in (*dense, *lexical):
            layer_of.setdefault(hit.id, layer)
        dense_pool.extend(dense)
        lexical_pool.extend(lexical)
    # Stable sorts: equal raw scores keep the more specific layer (query.layers order) first.
    dense_pool.sort(key=lambda h: -h.score)
    lexical_pool.sort(key=lambda h: -h.score)
    dense_scores = {h.id: h.score for h in dense_pool}
    lexical_scores = {h.id: h.score for h in lexical_pool}
    dense_ranks = competition_ranks([(h.id, h.score) for h in dense_pool])
    lexical_ranks = competition_ranks([(h.id, h.score) for h in lexical_pool])
    rankings = [[(h.id, h.score) for h in dense_pool], [(h.id, h.score) for h in lexical_pool]]
    weights = [tuning.dense_weight, tuning.lexical_weight]
    if tuning.fusion_method == "rrf":
        fused = fusion.rrf(rankings, k=tuning.rrf_k, weights=weights, normalize=True)
    elif tuning.fusion_method == "dbsf":
        fused = fusion.dbsf(rankings, weights=weights)
    else:
        fused = fusion.minmax(rankings, weights=weights)
    n_layers = len(Layer)

    def key(item: tuple[str, float]) -> float:
        mid, score = item
        # Bonus < NEAR_TIE: the most specific layer gets the most.
        return -(score + NEAR_TIE * (n_layers - layer_of[mid]) / n_layers)

    ordered = sorted(fused, key=key)
    return [
        Candidate(
            id=mid,
            layer=layer_of[mid],
            score=score,
            dense_score=dense_scores.get(mid, 0.0),
            lexical_score=lexical_scores.get(mid, 0.0),
            order=i,
            dense_rank=dense_ranks.get(mid, 0),
            lexical_rank=lexical_ranks.get(mid, 0),
        )
        for i, (mid, score) in enumerate(ordered)
    ]


@dataclass(slots=True)
class _Kept:
    candidate: Candidate
    memory: Memory
    vector: np.ndarray


def _keep(kept: list[_Kept], new: _Kept) -> None:
    """Add ``new`` to ``kept`` unless it duplicates a kept hit.

    Identical contents (same hash) are duplicates in any layer. A cosine ≥
    :data:`DUPLICATE_COSINE` makes a duplicate only across layers, so two different facts of
    one layer ("moved to Tuesday", "moved to Thursday") both survive. Of two duplicates the
    more specific layer's copy is kept (it replaces a less specific kept one).
    """
    for i, old in enumerate(kept):
        same = old.memory.content_hash == new.memory.content_hash
        if not same and old.memory.layer != new.memory.layer:
            same = float(new.vector @ old.vector) >= DUPLICATE_COSINE
        if same:
            if new.memory.layer < old.memory.layer:
                kept[i] = new
            return
    kept.append(new)


async def _no_hits() -> list[ScoredId]:
    return []


def layer_filter(
    tenant: str, layer: Layer, query: SearchQuery, readable: frozenset[str] | None = None
) -> IndexFilter:
    """The index filter of one layer of a search: the layer, its given identifiers (an
    empty one widens), the identifier values the caller may read (``readable``; None: no
    narrowing), tags (any-of) and metadata conditions."""
    must: list[FieldMatch] = [FieldMatch("layer", value=layer.name)]
    if readable is not None:
        must.append(FieldMatch(narrowing_column(layer), any_of=sorted(readable)))
    for name in SEARCH_IDENTIFIERS[layer]:
        value = query.scope.get(name)
        if value:
            must.append(FieldMatch(name, value=value))
    if query.tags:
        must.append(FieldMatch("tags", any_of=list(query.tags)))
    must.extend(metadata_match(c) for c in query.metadata)
    return IndexFilter(tenant_id=tenant, must=must)


def metadata_match(cond: MetadataCondition) -> FieldMatch:
    """Translate a metadata condition to a payload condition on ``metadata.{key}``."""
    key = f"metadata.{cond.key}"
    if cond.contains is not None:
        return FieldMatch(key, value=cond.contains)
    if cond.any_of is not None:
        return FieldMatch(key, any_of=[_keyword(v) for v in cond.any_of])
    if cond.gte is not None or cond.lte is not None:
        return FieldMatch(key, gte=cond.gte, lte=cond.lte)
    assert cond.equals is not None
    if isinstance(cond.equals, float) and not cond.equals.is_integer():
        return FieldMatch(key, gte=cond.equals, lte=cond.equals)
    return FieldMatch(key, value=_keyword(cond.equals))


def _keyword(value: str | int | float | bool) -> str | int | bool:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        return str(value)
    return value
