"""Domain types of the memory service (DOMAIN.md, Memory). No gRPC, no SQL."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aeterna_common.authz import UnitKind


class Layer(enum.IntEnum):
    """Memory layers; the value is the precedence (1 = most specific)."""

    AGENT = 1
    USER = 2
    SESSION = 3
    PROJECT = 4
    TEAM = 5
    ORG = 6
    COMPANY = 7


SCOPE_FIELDS = (
    "agent_id",
    "user_id",
    "session_id",
    "project_id",
    "team_id",
    "org_id",
    "company_id",
)

REQUIRED_IDENTIFIERS: Mapping[Layer, tuple[str, ...]] = {
    Layer.AGENT: ("agent_id", "user_id"),
    Layer.USER: ("user_id",),
    Layer.SESSION: ("user_id", "session_id"),
    Layer.PROJECT: ("project_id",),
    Layer.TEAM: ("team_id",),
    Layer.ORG: ("org_id",),
    Layer.COMPANY: ("company_id",),
}
"""Identifiers a write to each layer needs (DOMAIN.md, Memory)."""

SEARCH_IDENTIFIERS: Mapping[Layer, tuple[str, ...]] = {
    Layer.AGENT: ("agent_id", "user_id"),
    Layer.USER: ("user_id",),
    Layer.SESSION: ("user_id", "session_id"),
    Layer.PROJECT: ("project_id",),
    Layer.TEAM: ("team_id",),
    Layer.ORG: ("org_id",),
    Layer.COMPANY: ("company_id",),
}
"""Identifiers that narrow a search of each layer; any of them left empty widens it."""

REACHING_IDENTIFIER: Mapping[Layer, str] = {
    Layer.AGENT: "agent_id",
    Layer.USER: "user_id",
    Layer.SESSION: "user_id",
    Layer.PROJECT: "project_id",
    Layer.TEAM: "team_id",
    Layer.ORG: "org_id",
    Layer.COMPANY: "company_id",
}
"""A search with no explicit layers covers each layer whose identifier here is given."""

UNIT_LAYERS: Mapping[Layer, tuple[UnitKind, str]] = {
    Layer.PROJECT: (UnitKind.PROJECT, "project_id"),
    Layer.TEAM: (UnitKind.TEAM, "team_id"),
    Layer.ORG: (UnitKind.ORGANIZATION, "org_id"),
    Layer.COMPANY: (UnitKind.COMPANY, "company_id"),
}
"""Org-unit layers: the unit kind and the scope identifier that is the unit's id."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Scope identifiers; ``None`` means not given."""

    agent_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    project_id: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    company_id: str | None = None

    def get(self, name: str) -> str | None:
        """The identifier called ``name`` (one of :data:`SCOPE_FIELDS`)."""
        value: str | None = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, str]:
        """The given identifiers only."""
        return {f: v for f in SCOPE_FIELDS if (v := self.get(f))}

    def for_layer(self, layer: Layer) -> Scope:
        """Keep only the identifiers the layer is keyed by (others are not stored)."""
        keep = REQUIRED_IDENTIFIERS[layer]
        return Scope(**{f: self.get(f) for f in keep})


@dataclass(frozen=True, slots=True)
class NewMemory:
    """A validated create request.

    Attributes:
        layer: The layer.
        scope: The layer's identifiers.
        content: UTF-8 text.
        metadata: JSON object.
        tags: Labels.
        importance: In [0, 1].
        expire_at: Optional expiry.
    """

    layer: Layer
    scope: Scope
    content: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    tags: Sequence[str] = ()
    importance: float = 0.5
    expire_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Memory:
    """A stored memory as the source of truth holds it."""

    tenant_id: str
    id: str
    layer: Layer
    scope: Scope
    content: str
    content_hash: str
    metadata: Mapping[str, Any]
    tags: Sequence[str]
    importance: float
    access_count: int
    last_accessed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    expire_at: datetime | None
    deleted_at: datetime | None
    revision: int
    embedding_model: str
    embedding_dimension: int

    @property
    def name(self) -> str:
        """Resource name ``tenants/{tenant}/memories/{id}``."""
        return f"tenants/{self.tenant_id}/memories/{self.id}"


class RevisionAction(enum.IntEnum):
    """What a revision did."""

    ADD = 1
    UPDATE = 2
    DELETE = 3


@dataclass(frozen=True, slots=True)
class Revision:
    """One change of a memory."""

    memory_id: str
    revision: int
    action: RevisionAction
    old_content: str | None
    new_content: str | None
    changed_fields: Sequence[str]
    actor: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MemoryPatch:
    """A validated update: only fields in ``fields`` change."""

    fields: frozenset[str]
    content: str | None = None
    metadata: Mapping[str, Any] | None = None
    tags: Sequence[str] | None = None
    importance: float | None = None
    expire_at: datetime | None = None


class FeedbackType(enum.IntEnum):
    """Kinds of feedback (DOMAIN.md, Feedback)."""

    HELPFUL = 1
    IRRELEVANT = 2
    OUTDATED = 3
    INACCURATE = 4
    DUPLICATE = 5


@dataclass(frozen=True, slots=True)
class MetadataCondition:
    """A condition on one top-level metadata key; exactly one of the value fields is set."""

    key: str
    equals: str | int | float | bool | None = None
    any_of: Sequence[str | int | float] | None = None
    gte: float | None = None
    lte: float | None = None
    contains: str | None = None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated search request.

    Attributes:
        text: Query text.
        scope: Identifiers; empty ones widen.
        layers: Layers to search (already resolved from the scope when not given).
        tags: Any-of tag filter.
        metadata: Conditions that all must hold.
        top_k: Results wanted, 1-100.
        min_score: Fused-score threshold in [0, 1].
    """

    text: str
    scope: Scope
    layers: Sequence[Layer]
    tags: Sequence[str] = ()
    metadata: Sequence[MetadataCondition] = ()
    top_k: int = 10
    min_score: float = 0.0


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result: the memory re-read from the source of truth and its scores."""

    memory: Memory
    score: float
    dense_score: float
    lexical_score: float


def new_importance(old: float | None, reward: float) -> float:
    """Importance after feedback: ``clamp((old or 0.5) + reward) / 2, 0, 1)``.

    DOMAIN.md, Feedback: new = clamp((old or 0.5 + reward)/2, 0, 1), read as the mean of the
    old importance (0.5 when unset) and the reward.

    Args:
        old: Current importance in [0, 1] or ``None``.
        reward: Feedback score in [-1, 1].
    """
    base = 0.5 if old is None else old
    return min(1.0, max(0.0, (base + reward) / 2))


@dataclass(frozen=True, slots=True)
class Embedded:
    """A new memory with what the index needs, computed before the transaction.

    Attributes:
        memory: The validated create.
        lexical_context: Context texts of the BM25F encoding, beside the content.
        embedding: L2-normalised dense vector of the dense index text.
    """

    memory: NewMemory
    lexical_context: Sequence[str]
    embedding: Sequence[float]


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Filters of ListMemories."""

    layer: Layer | None
    scope: Scope
    tags: Sequence[str]
    show_deleted: bool
    by_update_time: bool = False
    """Oldest change first (``order_by`` ``update_time``) instead of newest created first."""
    min_update_time: datetime | None = None
    """Only memories last changed at or after this time."""

    def fingerprint(self) -> str:
        """Short hash that ties a page token to the filter that produced it."""
        parts: list[object] = [self.layer, self.scope.as_dict(), sorted(self.tags)]
        parts.append(self.show_deleted)
        if self.by_update_time:
            since = self.min_update_time.isoformat() if self.min_update_time else None
            parts.append(["update_time", since])
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
