"""Protobuf ⇄ domain conversion with validation at the edge.

Every check here raises :class:`InvalidArgument` with one field violation per bad field, named
by its path in the request (https://google.aip.dev/193), before anything is read or written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.memory.v1 import resources_pb2 as res
from aeterna.type.v1 import layer_pb2
from aeterna_common.context import IDENTIFIER_RULE, is_identifier
from aeterna_common.errors import FieldViolation, InvalidArgument
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from aeterna_memory.domain.model import (
    REACHING_IDENTIFIER,
    REQUIRED_IDENTIFIERS,
    SCOPE_FIELDS,
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

MAX_CONTENT_BYTES = 32 * 1024
"""Content limit, bytes of UTF-8 (DOMAIN.md: 32 KiB by default)."""
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_METADATA_BYTES = 16 * 1024
MAX_BATCH = 1000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_TOP_K = 100
DEFAULT_TOP_K = 10
MAX_REQUEST_ID = 128
MAX_METADATA_FILTERS = 16
"""Most metadata conditions in one search: each is one more payload condition per layer."""
MAX_ANY_OF = 100
"""Most values in one ``any_of`` metadata condition."""
UPDATABLE = ("content", "metadata", "tags", "importance", "expire_time")


class Violations:
    """Collects field violations; :meth:`raise_if_any` raises them together."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str, reason: str = "") -> None:
        """Record one violation."""
        self.items.append(FieldViolation(field, description, reason))

    def raise_if_any(self) -> None:
        """Raise :class:`InvalidArgument` if anything was recorded."""
        if self.items:
            raise InvalidArgument(self.items)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be stored
        return False
    return "\x00" not in text  # PostgreSQL text cannot hold NUL


def check_content(v: Violations, field: str, content: str) -> None:
    """Non-empty, valid UTF-8 without NUL, at most 32 KiB."""
    if not content.strip():
        v.add(field, "must not be empty", "EMPTY_CONTENT")
    elif not _utf8_ok(content):
        v.add(field, "must be valid UTF-8 without NUL characters", "INVALID_UTF8")
    elif len(content.encode()) > MAX_CONTENT_BYTES:
        v.add(field, f"must be at most {MAX_CONTENT_BYTES} bytes", "CONTENT_TOO_LARGE")


def check_request_id(v: Violations, field: str, request_id: str) -> None:
    """At most 128 printable ASCII characters."""
    if (
        len(request_id) > MAX_REQUEST_ID
        or not request_id.isascii()
        or not (request_id.isprintable())
    ):
        v.add(field, f"must be at most {MAX_REQUEST_ID} printable ASCII characters")


def _tags(v: Violations, field: str, tags: Sequence[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        v.add(field, f"at most {MAX_TAGS} tags", "TOO_MANY_TAGS")
    out: list[str] = []
    for i, t in enumerate(tags[:MAX_TAGS]):
        if not t or len(t) > MAX_TAG_CHARS or not _utf8_ok(t) or not t.isprintable():
            v.add(f"{field}[{i}]", f"must be 1-{MAX_TAG_CHARS} printable characters")
        elif t not in out:
            out.append(t)
    return out


def _normalise_numbers(value: Any) -> Any:
    # protobuf Struct carries every number as a double; keep integers integral.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise_numbers(x) for k, x in value.items()}
    if isinstance(value, list):
        return [_normalise_numbers(x) for x in value]
    return value


def _metadata(v: Violations, field: str, md: struct_pb2.Struct) -> dict[str, Any]:
    data: dict[str, Any] = _normalise_numbers(json_format.MessageToDict(md))
    if len(md.SerializeToString()) > MAX_METADATA_BYTES:
        v.add(field, f"must be at most {MAX_METADATA_BYTES} bytes")
    for key in data:
        if not key or len(key) > 64 or not _utf8_ok(key):
            v.add(f"{field}.{key}", "keys must be 1-64 characters of valid UTF-8")
    return data


def _scope(v: Violations, field: str, scope: layer_pb2.Scope) -> Scope:
    values: dict[str, str | None] = {}
    for name in SCOPE_FIELDS:
        value: str = getattr(scope, name)
        if value and not is_identifier(value):
            v.add(f"{field}.{name}", f"must be {IDENTIFIER_RULE}")
        values[name] = value or None
    return Scope(**values)


def _layer(v: Violations, field: str, value: int) -> Layer | None:
    if value == layer_pb2.MEMORY_LAYER_UNSPECIFIED:
        v.add(field, "must be set", "MISSING_LAYER")
        return None
    try:
        return Layer(value)
    except ValueError:
        v.add(field, f"unknown layer {value}")
        return None


def _timestamp(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def new_memory(v: Violations, field: str, m: res.Memory) -> NewMemory | None:
    """Validate a memory to create (``field`` prefixes violation paths)."""
    layer = _layer(v, f"{field}.layer", m.layer)
    scope = _scope(v, f"{field}.scope", m.scope)
    check_content(v, f"{field}.content", m.content)
    tags = _tags(v, f"{field}.tags", list(m.tags))
    metadata = _metadata(v, f"{field}.metadata", m.metadata)
    importance = m.importance if m.HasField("importance") else 0.5
    if not (0.0 <= importance <= 1.0) or math.isnan(importance):
        v.add(f"{field}.importance", "must be in [0, 1]")
    expire_at = _timestamp(m.expire_time) if m.HasField("expire_time") else None
    if expire_at is not None and expire_at <= datetime.now(UTC):
        v.add(f"{field}.expire_time", "must be in the future")
    if layer is None:
        return None
    for ident in REQUIRED_IDENTIFIERS[layer]:
        if not scope.get(ident):
            v.add(
                f"{field}.scope.{ident}",
                f"required for layer {layer.name}",
                "MISSING_IDENTIFIER",
            )
    return NewMemory(
        layer=layer,
        scope=scope.for_layer(layer),
        content=m.content,
        metadata=metadata,
        tags=tags,
        importance=importance,
        expire_at=expire_at,
    )


def create_request(req: svc.CreateMemoryRequest, prefix: str = "") -> NewMemory:
    """Validate CreateMemory (the parent is checked separately, before this)."""
    v = Violations()
    if not req.HasField("memory"):
        v.add(f"{prefix}memory", "required")
        v.raise_if_any()
    check_request_id(v, f"{prefix}request_id", req.request_id)
    memory = new_memory(v, f"{prefix}memory", req.memory)
    v.raise_if_any()
    assert memory is not None
    return memory


def batch_request(req: svc.BatchCreateMemoriesRequest) -> list[NewMemory]:
    """Validate BatchCreateMemories: 1-1000 children, each with an empty or equal parent."""
    v = Violations()
    if not req.requests:
        v.add("requests", "at least one create is required")
    if len(req.requests) > MAX_BATCH:
        v.add("requests", f"at most {MAX_BATCH} creates per batch")
    check_request_id(v, "request_id", req.request_id)
    out: list[NewMemory] = []
    for i, child in enumerate(req.requests[:MAX_BATCH]):
        field = f"requests[{i}]"
        if child.parent and child.parent != req.parent:
            v.add(f"{field}.parent", "must be empty or equal to the batch parent")
        if not child.HasField("memory"):
            v.add(f"{field}.memory", "required")
            continue
        m = new_memory(v, f"{field}.memory", child.memory)
        if m is not None:
            out.append(m)
    v.raise_if_any()
    return out


def page_size(v: Violations, value: int) -> int:
    """0 → default; 1-1000 kept; anything else is a violation."""
    if value < 0 or value > MAX_PAGE_SIZE:
        v.add("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def list_filter(req: svc.ListMemoriesRequest) -> tuple[ListFilter, int]:
    """Validate ListMemories filters and page size."""
    v = Violations()
    size = page_size(v, req.page_size)
    layer = None
    if req.layer:
        layer = _layer(v, "layer", req.layer)
    scope = _scope(v, "scope", req.scope)
    tags = _tags(v, "tags", list(req.tags))
    if req.order_by not in ("", "update_time"):
        v.add("order_by", "must be empty or `update_time`")
    since = None
    if req.HasField("min_update_time"):
        if req.order_by != "update_time":
            v.add("min_update_time", "needs order_by `update_time`")
        since = req.min_update_time.ToDatetime(tzinfo=UTC)
    v.raise_if_any()
    return ListFilter(
        layer=layer,
        scope=scope,
        tags=tags,
        show_deleted=req.show_deleted,
        by_update_time=req.order_by == "update_time",
        min_update_time=since,
    ), size


def update_request(req: svc.UpdateMemoryRequest) -> MemoryPatch:
    """Validate UpdateMemory: a non-empty mask of updatable fields and their new values."""
    v = Violations()
    paths = list(req.update_mask.paths)
    if not paths:
        v.add("update_mask", "must name at least one field", "EMPTY_UPDATE_MASK")
    if "*" in paths:
        paths = list(UPDATABLE)
    for p in paths:
        if p not in UPDATABLE:
            v.add("update_mask", f"{p!r} cannot be updated; updatable: {', '.join(UPDATABLE)}")
    m = req.memory
    fields = frozenset(paths)
    content = tags = metadata = importance = expire_at = None
    if "content" in fields:
        check_content(v, "memory.content", m.content)
        content = m.content
    if "tags" in fields:
        tags = _tags(v, "memory.tags", list(m.tags))
    if "metadata" in fields:
        metadata = _metadata(v, "memory.metadata", m.metadata)
    if "importance" in fields:
        importance = m.importance if m.HasField("importance") else 0.5
        if not (0.0 <= importance <= 1.0) or math.isnan(importance):
            v.add("memory.importance", "must be in [0, 1]")
    if "expire_time" in fields and m.HasField("expire_time"):
        expire_at = _timestamp(m.expire_time)
    v.raise_if_any()
    return MemoryPatch(
        fields=fields,
        content=content,
        metadata=metadata,
        tags=tags,
        importance=importance,
        expire_at=expire_at,
    )


def _value(v: Violations, field: str, value: struct_pb2.Value) -> str | int | float | bool | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() else n
    if kind == "bool_value":
        return value.bool_value
    v.add(field, "must be a string, number or boolean")
    return None


def search_request(req: svc.SearchMemoriesRequest) -> SearchQuery:
    """Validate SearchMemories and resolve the layers the scope reaches."""
    v = Violations()
    if not req.query.strip():
        v.add("query", "must not be empty", "EMPTY_QUERY")
    elif not _utf8_ok(req.query) or len(req.query.encode()) > MAX_CONTENT_BYTES:
        v.add("query", f"must be valid UTF-8 of at most {MAX_CONTENT_BYTES} bytes")
    scope = _scope(v, "scope", req.scope)
    layers: list[Layer] = []
    for i, value in enumerate(req.layers):
        layer = _layer(v, f"layers[{i}]", value)
        if layer is not None and layer not in layers:
            layers.append(layer)
    if not layers:
        layers = [layer for layer in Layer if scope.get(REACHING_IDENTIFIER[layer])]
        if not layers:
            layers = list(Layer)
    layers.sort()
    tags = _tags(v, "tags", list(req.tags))
    if req.top_k < 0 or req.top_k > MAX_TOP_K:
        v.add("top_k", f"must be between 0 and {MAX_TOP_K}")
    if not (0.0 <= req.min_score <= 1.0):
        v.add("min_score", "must be in [0, 1]")
    conditions: list[MetadataCondition] = []
    if len(req.metadata_filters) > MAX_METADATA_FILTERS:
        v.add(
            "metadata_filters",
            f"at most {MAX_METADATA_FILTERS} conditions",
            "TOO_MANY_FILTERS",
        )
    for i, f in enumerate(req.metadata_filters[:MAX_METADATA_FILTERS]):
        field = f"metadata_filters[{i}]"
        if not f.key or len(f.key) > 64 or not all(c.isalnum() or c in "_-" for c in f.key):
            v.add(f"{field}.key", "must be 1-64 characters of [A-Za-z0-9_-]")
        kind = f.WhichOneof("condition")
        if kind is None:
            v.add(field, "needs one of equals, any_of, range, contains")
        elif kind == "equals":
            conditions.append(
                MetadataCondition(f.key, equals=_value(v, f"{field}.equals", f.equals))
            )
        elif kind == "any_of":
            if len(f.any_of.values) > MAX_ANY_OF:
                v.add(f"{field}.any_of", f"at most {MAX_ANY_OF} values", "TOO_MANY_VALUES")
            values = [
                _value(v, f"{field}.any_of[{j}]", x)
                for j, x in enumerate(f.any_of.values[:MAX_ANY_OF])
            ]
            if not values:
                v.add(f"{field}.any_of", "must not be empty")
            if any(isinstance(x, bool) for x in values):
                v.add(f"{field}.any_of", "must hold strings or numbers")
            conditions.append(
                MetadataCondition(
                    f.key, any_of=[x for x in values if x is not None and not isinstance(x, bool)]
                )
            )
        elif kind == "range":
            gte = f.range.gte if f.range.HasField("gte") else None
            lte = f.range.lte if f.range.HasField("lte") else None
            if gte is None and lte is None:
                v.add(f"{field}.range", "needs gte or lte")
            elif gte is not None and lte is not None and gte > lte:
                v.add(f"{field}.range", "gte must not exceed lte")
            conditions.append(MetadataCondition(f.key, gte=gte, lte=lte))
        else:
            if not f.contains:
                v.add(f"{field}.contains", "must not be empty")
            conditions.append(MetadataCondition(f.key, contains=f.contains))
    v.raise_if_any()
    return SearchQuery(
        text=req.query,
        scope=scope,
        layers=layers,
        tags=tags,
        metadata=conditions,
        top_k=req.top_k or DEFAULT_TOP_K,
        min_score=req.min_score,
    )


def feedback_request(req: svc.RecordMemoryFeedbackRequest) -> tuple[FeedbackType, float]:
    """Validate RecordMemoryFeedback: a known type and a score in [-1, 1]."""
    v = Violations()
    kind: FeedbackType | None = None
    try:
        kind = FeedbackType(req.type)
    except ValueError:
        v.add("type", "must be one of HELPFUL, IRRELEVANT, OUTDATED, INACCURATE, DUPLICATE")
    if not (-1.0 <= req.score <= 1.0) or math.isnan(req.score):
        v.add("score", "must be in [-1, 1]")
    check_request_id(v, "request_id", req.request_id)
    v.raise_if_any()
    assert kind is not None
    return kind, req.score


# ---- domain → protobuf ---------------------------------------------------------------


def _ts(value: datetime | None, target: timestamp_pb2.Timestamp) -> None:
    if value is not None:
        target.FromDatetime(value)


def memory_pb(m: Memory) -> res.Memory:
    """The protobuf of a memory."""
    out = res.Memory(
        name=m.name,
        layer=layer_pb2.MemoryLayer.ValueType(m.layer.value),
        scope=layer_pb2.Scope(**m.scope.as_dict()),
        content=m.content,
        tags=list(m.tags),
        importance=m.importance,
        access_count=m.access_count,
        content_hash=m.content_hash,
        embedding_model=m.embedding_model,
        embedding_dimension=m.embedding_dimension,
        revision=m.revision,
    )
    out.metadata.update(dict(m.metadata))
    _ts(m.last_accessed_at, out.last_access_time)
    _ts(m.created_at, out.create_time)
    _ts(m.updated_at, out.update_time)
    _ts(m.expire_at, out.expire_time)
    _ts(m.deleted_at, out.delete_time)
    return out


def revision_pb(tenant_id: str, r: Revision) -> res.MemoryRevision:
    """The protobuf of a revision."""
    out = res.MemoryRevision(
        name=f"tenants/{tenant_id}/memories/{r.memory_id}/revisions/{r.revision}",
        revision=r.revision,
        action=res.RevisionAction.ValueType(r.action.value),
        old_content=r.old_content or "",
        new_content=r.new_content or "",
        actor=r.actor,
        changed_fields=list(r.changed_fields),
    )
    out.create_time.FromDatetime(r.created_at)
    return out


def hit_pb(h: SearchHit) -> res.SearchResult:
    """The protobuf of a search hit."""
    return res.SearchResult(
        memory=memory_pb(h.memory),
        score=h.score,
        dense_score=h.dense_score,
        lexical_score=h.lexical_score,
    )
