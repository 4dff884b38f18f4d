"""Backend-neutral translation of :class:`~aeterna_common.vectors.port.IndexFilter`.

Both adapters express the same boolean structure with different classes (``qdrant_edge`` and
``qdrant_client.models``). This module normalises an :class:`IndexFilter` once (validates each
:class:`FieldMatch`, folds conditions that are trivially true or false) and then builds the
backend's filter through a small :class:`FilterBuilder` each adapter implements, so the two
cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from aeterna_common.vectors.port import FieldMatch, IndexFilter, SparseVector

IdfScope = Literal["tenant", "collection"]
"""Population the sparse IDF is computed over: the searching tenant's points, or all points."""

SCROLL_PAGE = 10_000
"""Points per page when listing ids."""

TENANT_FIELD = "tenant_id"
"""Payload key holding the tenant; indexed with ``is_tenant=True`` by both adapters."""

C = TypeVar("C")
"""A backend condition (field condition or nested filter)."""


class FilterBuilder(Protocol[C]):
    """Constructors for one backend's filter classes."""

    def match_value(self, key: str, value: str | int | bool) -> C:
        """Condition ``key == value`` (any element, for an array payload)."""
        ...

    def match_any(self, key: str, values: list[str] | list[int]) -> C:
        """Condition ``key in values`` (any element, for an array payload)."""
        ...

    def range(self, key: str, gte: float | None, lte: float | None) -> C:
        """Condition ``gte <= key <= lte``, either end open when ``None``."""
        ...

    def filter(self, must: Sequence[C], should: Sequence[C], must_not: Sequence[C]) -> C:
        """Build a nested filter, usable as a condition."""
        ...


@dataclass(frozen=True, slots=True)
class _Conjunction:
    """Validated conditions of one conjunction, split by polarity."""

    positive: tuple[FieldMatch, ...]
    negative: tuple[FieldMatch, ...]


def _validate(fm: FieldMatch) -> None:
    """Check that exactly one match form is set.

    Raises:
        ValueError: If none or several of ``value``, ``any_of``, ``gte``/``lte`` are set, or
            the key is empty.

    """
    if not fm.key:
        raise ValueError("FieldMatch.key must not be empty")
    forms = (
        (fm.value is not None)
        + (fm.any_of is not None)
        + (fm.gte is not None or fm.lte is not None)
    )
    if forms != 1:
        raise ValueError(
            f"FieldMatch on {fm.key!r} must set exactly one of value, any_of or gte/lte"
        )


def _truth(fm: FieldMatch) -> bool | None:
    """Constant truth value of a condition, or ``None`` when it depends on the point.

    ``any_of=[]`` matches nothing, so it is false (true when negated); Qdrant would reject or
    misread an empty ``MatchAny``, hence the folding here.
    """
    if fm.any_of is not None and len(fm.any_of) == 0:
        return fm.negate
    return None


def _conjunction(conds: Sequence[FieldMatch]) -> _Conjunction | None:
    """Fold a conjunction; ``None`` when it can never hold."""
    pos: list[FieldMatch] = []
    neg: list[FieldMatch] = []
    for fm in conds:
        _validate(fm)
        truth = _truth(fm)
        if truth is False:
            return None
        if truth is True:
            continue
        (neg if fm.negate else pos).append(fm)
    return _Conjunction(tuple(pos), tuple(neg))


def _homogeneous(key: str, values: Sequence[str | int]) -> list[str] | list[int]:
    """Check ``any_of`` holds only keywords or only integers (Qdrant ``MatchAny``)."""
    if all(isinstance(v, str) for v in values):
        return [str(v) for v in values]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [int(v) for v in values]
    raise ValueError(f"FieldMatch.any_of on {key!r} must be all strings or all integers")


def _condition(builder: FilterBuilder[C], fm: FieldMatch) -> C:
    if fm.value is not None:
        return builder.match_value(fm.key, fm.value)
    if fm.any_of is not None:
        return builder.match_any(fm.key, _homogeneous(fm.key, fm.any_of))
    return builder.range(fm.key, fm.gte, fm.lte)


def _conjunction_filter(builder: FilterBuilder[C], conj: _Conjunction) -> C:
    return builder.filter(
        [_condition(builder, fm) for fm in conj.positive],
        [],
        [_condition(builder, fm) for fm in conj.negative],
    )


class TranslatedFilter(Generic[C]):
    """The result of :func:`translate`.

    Attributes:
        condition: The backend filter, or ``None`` when the filter can match no point (an
            empty ``should`` group, ``any_of=[]``): the adapter then answers without a query.
        tenant: The backend filter that selects the tenant alone (the sparse IDF corpus).

    """

    __slots__ = ("condition", "tenant")

    def __init__(self, condition: C | None, tenant: C) -> None:
        self.condition = condition
        self.tenant = tenant


def tenant_filter(builder: FilterBuilder[C], tenant_id: str) -> C:
    """Build the backend filter selecting one tenant's points.

    Raises:
        ValueError: If ``tenant_id`` is empty.

    """
    if not tenant_id:
        raise ValueError("IndexFilter.tenant_id must not be empty")
    return builder.filter([builder.match_value(TENANT_FIELD, tenant_id)], [], [])


def translate(builder: FilterBuilder[C], flt: IndexFilter) -> TranslatedFilter[C]:
    """Translate an :class:`IndexFilter` into a backend filter.

    The tenant condition and ``must`` go into ``must``/``must_not`` of the top-level filter;
    each ``should_group`` becomes one nested filter whose ``should`` lists one nested filter
    per conjunction (Qdrant: a nested filter's ``should`` holds when at least one item does).

    Args:
        builder: The backend's filter constructors.
        flt: The filter to translate.

    Returns:
        The translated filter and the tenant-only filter.

    Raises:
        ValueError: If the tenant id is empty or a :class:`FieldMatch` is malformed.

    """
    tenant = tenant_filter(builder, flt.tenant_id)
    top = _conjunction(flt.must)
    groups: list[C] = []
    satisfiable = top is not None
    for group in flt.should_groups:
        alternatives: list[_Conjunction] = []
        always = False
        for conds in group:
            conj = _conjunction(conds)
            if conj is None:
                continue
            if not conj.positive and not conj.negative:
                always = True
            alternatives.append(conj)
        if always:
            continue
        if not alternatives:
            satisfiable = False
            continue
        should = [_conjunction_filter(builder, c) for c in alternatives]
        groups.append(builder.filter([], should, []))
    if not satisfiable or top is None:
        return TranslatedFilter(None, tenant)
    must = [builder.match_value(TENANT_FIELD, flt.tenant_id)]
    must += [_condition(builder, fm) for fm in top.positive]
    must += groups
    must_not = [_condition(builder, fm) for fm in top.negative]
    return TranslatedFilter(builder.filter(must, [], must_not), tenant)


def normalize_id(point_id: str) -> str:
    """Canonical form of a point id (lower-case hyphenated UUID), as both backends return it.

    Raises:
        ValueError: If ``point_id`` is not a UUID string.

    """
    try:
        return str(uuid.UUID(point_id))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"point id {point_id!r} is not a UUID string") from exc


def sparse_parts(vector: SparseVector) -> tuple[list[int], list[float]]:
    """Return the indices and values of a sparse vector as plain lists.

    Raises:
        ValueError: If ``indices`` and ``values`` differ in length.

    """
    indices = [int(i) for i in vector.indices]
    values = [float(v) for v in vector.values]
    if len(indices) != len(values):
        raise ValueError(
            f"sparse vector has {len(indices)} indices but {len(values)} values; "
            "the length must match"
        )
    return indices, values
