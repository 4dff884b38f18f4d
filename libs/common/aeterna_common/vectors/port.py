"""The vector index port: what a service needs from a vector store, whatever the backend.

Two adapters implement it: :mod:`aeterna_common.vectors.edge` (Qdrant's embedded engine,
``qdrant-edge-py``, one index per process) and :mod:`aeterna_common.vectors.qdrant`
(``qdrant-client`` against a Qdrant server, or its local mode in tests). One contract suite
runs against both.

Each point carries a named dense vector (cosine) and a named sparse vector whose values are
BM25 term weights; the store applies the IDF part itself (Qdrant ``Modifier.IDF``), so the
sparse score of a query whose weights are all 1 is the BM25 score of Robertson & Zaragoza,
"The Probabilistic Relevance Framework: BM25 and Beyond" (2009), eq. 3.15.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DENSE_VECTOR = "dense"
"""Name of the dense vector in every collection (cosine distance)."""

SPARSE_VECTOR = "bm25"
"""Name of the sparse vector in every collection (IDF modifier)."""


@dataclass(frozen=True, slots=True)
class SparseVector:
    """A sparse vector.

    Attributes:
        indices: Term ids (unsigned 32-bit), unique within the vector.
        values: One weight per index, same length as ``indices``.
    """

    indices: Sequence[int]
    values: Sequence[float]


@dataclass(frozen=True, slots=True)
class IndexPoint:
    """One point to upsert.

    Attributes:
        id: The point id, a UUID string (the resource's own id).
        dense: The dense embedding, L2-normalised, ``dimension`` floats.
        sparse: The lexical (BM25 term weight) vector.
        payload: JSON-serialisable payload. Always has ``tenant_id``; the filterable keys are
            listed in :class:`IndexFilter`.
    """

    id: str
    dense: Sequence[float]
    sparse: SparseVector
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """A payload condition on one key.

    Exactly one of ``value``, ``any_of``, ``gte``/``lte`` (a range, either end open) is set.
    ``key`` may be a dotted path into a nested object (``metadata.speaker``). For an array
    payload value, ``value``/``any_of`` match when any element matches (Qdrant semantics).

    Attributes:
        key: Payload key or dotted path.
        value: Match this exact keyword, integer or boolean.
        any_of: Match any of these keywords or integers.
        gte: Range lower bound, inclusive (numbers).
        lte: Range upper bound, inclusive (numbers).
        negate: Invert the condition (``must_not``).
    """

    key: str
    value: str | int | bool | None = None
    any_of: Sequence[str | int] | None = None
    gte: float | None = None
    lte: float | None = None
    negate: bool = False


@dataclass(frozen=True, slots=True)
class IndexFilter:
    """A conjunction of conditions, always scoped to one tenant.

    ``should_groups`` is a list of disjunctions: a point matches when, for each group, at least
    one of the group's conjunctions (a sequence of :class:`FieldMatch`) holds. It expresses
    "layer AGENT with these ids OR layer USER with those ids ...".

    Attributes:
        tenant_id: The tenant every returned point belongs to.
        must: Conditions that all must hold.
        should_groups: Disjunctions of conjunctions, each of which must hold.
    """

    tenant_id: str
    must: Sequence[FieldMatch] = ()
    should_groups: Sequence[Sequence[Sequence[FieldMatch]]] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ScoredId:
    """A search hit: the point id and the store's score (cosine in [-1, 1] for dense; BM25,
    unbounded and non-negative, for sparse)."""

    id: str
    score: float


@runtime_checkable
class VectorIndex(Protocol):
    """A tenant-filtered hybrid vector index.

    All methods are coroutines; an adapter whose backend is synchronous runs the call in a
    worker thread. Writes are idempotent: upserting the same point twice or deleting a missing
    id is not an error.
    """

    async def ensure_collection(self, dimension: int) -> None:
        """Create the collection and its payload indexes if they do not exist.

        Args:
            dimension: Dense vector size (384 for all-MiniLM-L6-v2).
        """
        ...

    async def upsert(self, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points (vectors and payload)."""
        ...

    async def delete(self, ids: Sequence[str]) -> None:
        """Delete points by id; missing ids are ignored."""
        ...

    async def search_dense(
        self, vector: Sequence[float], flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Nearest neighbours by cosine similarity, best first, at most ``limit``."""
        ...

    async def search_sparse(
        self, vector: SparseVector, flt: IndexFilter, limit: int
    ) -> list[ScoredId]:
        """Best BM25 matches (dot product of IDF-weighted sparse vectors), best first."""
        ...

    async def retrieve_dense(self, ids: Sequence[str]) -> dict[str, list[float]]:
        """Dense vectors of the given points that exist, keyed by id."""
        ...

    async def count(self, flt: IndexFilter) -> int:
        """Exact number of points matching the filter."""
        ...

    async def all_ids(self, tenant_id: str | None = None) -> set[str]:
        """Every point id (of one tenant, or of all): used by the reconciler."""
        ...

    async def payload_values(self, key: str) -> dict[str, Any]:
        """Every point id with its payload value under top-level ``key`` (``None`` where the
        point has none): used by the reconciler to compare revisions."""
        ...

    async def optimize(self) -> None:
        """Build indexes / merge segments where the backend needs it (may be slow)."""
        ...

    async def close(self) -> None:
        """Flush and release the store; the adapter is unusable afterwards."""
        ...
