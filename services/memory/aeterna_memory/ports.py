"""Ports of the memory domain: what it needs from storage, embeddings, cache and index, and
from governance's approvals."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from aeterna_common.vectors.port import IndexFilter, ScoredId, SparseVector

from aeterna_memory.domain.model import (
    Embedded,
    FeedbackType,
    Layer,
    ListFilter,
    Memory,
    MemoryPatch,
    Revision,
)
from aeterna_memory.domain.promotion import Approval, PromotionRequest


class EmbeddingCache(Protocol):
    """Exact-match embedding cache keyed by tenant, model and text."""

    async def get_many(
        self, tenant_id: str, model: str, texts: Sequence[str]
    ) -> list[list[float] | None]:
        """Cached vectors in input order, ``None`` for misses."""
        ...

    async def put_many(
        self, tenant_id: str, model: str, items: Sequence[tuple[str, Sequence[float]]]
    ) -> None:
        """Store vectors; never raises for an unavailable cache."""
        ...

    async def delete_many(self, tenant_id: str, model: str, texts: Sequence[str]) -> None:
        """Remove the entries of ``texts`` (purge); raises when the cache cannot be reached,
        so that the caller keeps the source of the keys until it can."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class SearchIndex(Protocol):
    """The search side of a vector index kept in step with the source of truth."""

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Wait (bounded) until the index has applied ``position``."""
        ...

    @property
    def applied_position(self) -> int:
        """The last outbox position the index has applied."""
        ...

    async def search_dense(
        self, vector: Sequence[float], flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Cosine nearest neighbours, best first."""
        ...

    async def search_sparse(
        self, vector: SparseVector, flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """BM25 matches, best first."""
        ...


class MemoryStore(Protocol):
    """The source of truth (PostgreSQL under row-level security)."""

    async def get(self, tenant_id: str, memory_id: str, *, include_deleted: bool = True) -> Memory:
        """One memory; raises NotFound."""
        ...

    async def recent_contents(
        self, tenant_id: str, sessions: Sequence[tuple[str, str]], limit: int
    ) -> dict[tuple[str, str], list[str]]:
        """Latest contents of each ``(user_id, session_id)``, oldest first."""
        ...

    async def preceding_contents(self, tenant_id: str, memory_id: str, limit: int) -> list[str]:
        """Contents of the latest ``limit`` live memories of the memory's session created
        before it, oldest first."""
        ...

    async def revisions(
        self, tenant_id: str, memory_id: str, page_size: int, after: int
    ) -> tuple[list[Revision], bool]:
        """Revisions after ``after`` and whether more follow."""
        ...

    async def latest_position(self, tenant_id: str) -> int:
        """The tenant's latest committed outbox position."""
        ...

    async def read_hits(
        self, tenant_id: str, ids: Sequence[str], *, vectors: bool = True
    ) -> dict[str, tuple[Memory, list[float]]]:
        """Live memories among ``ids`` with their vectors (``[]`` without ``vectors``)."""
        ...

    async def read_pool(
        self,
        tenant_id: str,
        ids: Sequence[str],
        expand: Sequence[str],
        before: int,
        after: int,
        *,
        vectors: bool = True,
    ) -> tuple[dict[str, tuple[Memory, list[float]]], dict[str, tuple[Memory, list[float]]]]:
        """Live memories among ``ids``, and apart the live memories just before/after each of
        ``expand`` in its session (same layer and scope), with vectors (``[]`` without)."""
        ...

    async def touch(self, tenant_id: str, ids: Sequence[str], *, query_tokens: int = 0) -> None:
        """Count an access of each memory, and the search (with its query's embedding when
        the model read ``query_tokens`` > 0 tokens for it) as billable usage."""
        ...

    async def update(
        self,
        tenant_id: str,
        memory_id: str,
        patch: MemoryPatch,
        *,
        expected_revision: int,
        lexical_context: Sequence[str] | None,
        embedding: Sequence[float] | None,
        actor: str,
        model: str | None = None,
        embedding_tokens: int = 0,
    ) -> tuple[Memory, int]:
        """Apply a patch atomically (optimistic on the revision); a new ``embedding`` is
        stored with its ``model`` id; the bytes it changes and its embedding (when the model
        read ``embedding_tokens`` > 0 tokens) are billed with it; with the commit's
        position."""
        ...

    async def stale_embeddings(
        self, tenant_id: str, model: str, limit: int, after: str | None = None
    ) -> list[tuple[Memory, list[str]]]:
        """Up to ``limit`` live memories embedded with another model, with their BM25 context,
        in id order after ``after``."""
        ...

    async def count_stale_embeddings(self, tenant_id: str, model: str) -> int:
        """How many live memories are embedded with another model than ``model``."""
        ...

    async def delete(self, tenant_id: str, memory_id: str, *, actor: str) -> tuple[Memory, int]:
        """Soft delete, idempotent; with the commit's position."""
        ...

    async def record_feedback(
        self,
        tenant_id: str,
        memory_id: str,
        feedback: FeedbackType,
        reward: float,
        *,
        actor: str,
        request_id: str,
        request_hash: str,
    ) -> tuple[Memory, int]:
        """Apply a reward once per request id; with the commit's position."""
        ...

    async def idempotent_result(
        self, tenant_id: str, principal: str, method: str, request_id: str, request_hash: str
    ) -> tuple[list[Memory], int] | None:
        """What an earlier call of this principal with this request id returned, if any,
        with a position at or after its commit."""
        ...

    async def create(
        self,
        tenant_id: str,
        items: Sequence[Embedded],
        *,
        model: str,
        actor: str,
        method: str,
        request_id: str,
        request_hash: str,
        step: int = 0,
        between_steps: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[list[Memory], int]:
        """Insert memories atomically (idempotent on ``request_id``); with the commit's
        position. The rows may be sent ``step`` at a time (0: at once), awaiting
        ``between_steps`` in between, inside the one transaction."""
        ...

    async def list_page(
        self,
        tenant_id: str,
        flt: ListFilter,
        page_size: int,
        page_token: str,
        *,
        narrow: Mapping[Layer, frozenset[str] | None] | None = None,
    ) -> tuple[list[Memory], str]:
        """A page, newest first, and the next token; ``narrow``: per readable layer, the
        identifier values the caller may read (None: all)."""
        ...


class PromotionApprovals(Protocol):
    """Governance's approval requests for promotions that need one (USER→TEAM,
    PROJECT→TEAM, TEAM→ORG, ORG→COMPANY)."""

    async def ask(self, request: PromotionRequest) -> Approval:
        """Open the approval request of ``request`` (idempotent by its ``request_id``:
        asking again returns the request opened first, in whatever state it is now).

        Raises:
            Exception: Governance refused or could not be reached.
        """
        ...

    async def get(self, name: str) -> Approval:
        """The approval request ``name`` as it stands.

        Raises:
            Exception: Governance refused or could not be reached.
        """
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...
