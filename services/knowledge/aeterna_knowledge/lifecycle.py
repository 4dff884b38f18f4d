"""The lifecycle of a knowledge item (DOMAIN.md, Knowledge): allowed status transitions and
which items are immutable."""

from __future__ import annotations

from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.errors import FailedPrecondition

S = res.KnowledgeStatus

TRANSITIONS: dict[int, frozenset[int]] = {
    S.KNOWLEDGE_STATUS_DRAFT: frozenset({S.KNOWLEDGE_STATUS_PROPOSED, S.KNOWLEDGE_STATUS_REJECTED}),
    S.KNOWLEDGE_STATUS_PROPOSED: frozenset(
        {S.KNOWLEDGE_STATUS_ACCEPTED, S.KNOWLEDGE_STATUS_REJECTED}
    ),
    S.KNOWLEDGE_STATUS_ACCEPTED: frozenset(
        {S.KNOWLEDGE_STATUS_DEPRECATED, S.KNOWLEDGE_STATUS_SUPERSEDED}
    ),
    S.KNOWLEDGE_STATUS_DEPRECATED: frozenset(),
    S.KNOWLEDGE_STATUS_SUPERSEDED: frozenset(),
    S.KNOWLEDGE_STATUS_REJECTED: frozenset(),
}
"""Status → the statuses it may move to: draft→proposed, draft→rejected, proposed→accepted,
proposed→rejected, accepted→deprecated, accepted→superseded (DOMAIN.md); nothing else."""

IMMUTABLE_WHEN_ACCEPTED = frozenset({res.KNOWLEDGE_TYPE_ADR, res.KNOWLEDGE_TYPE_SPEC})
"""Types whose ACCEPTED items are never edited, only superseded (DOMAIN.md)."""


def status_name(status: int) -> str:
    """``ACCEPTED`` for ``KNOWLEDGE_STATUS_ACCEPTED``."""
    return S.Name(status).removeprefix("KNOWLEDGE_STATUS_")  # type: ignore[arg-type]


def check_transition(name: str, current: int, target: int) -> None:
    """Refuse a move from ``current`` to ``target`` that DOMAIN.md does not allow.

    Raises:
        FailedPrecondition: Reason ``INVALID_TRANSITION``; ``ErrorInfo.metadata`` holds the
            item, ``from``, ``to`` and ``allowed`` (the allowed next statuses, comma-separated,
            empty when the status is final).
    """
    allowed = TRANSITIONS[current]
    if target not in allowed:
        raise FailedPrecondition(
            f"{name} is {status_name(current)}: it cannot become {status_name(target)}",
            reason="INVALID_TRANSITION",
            metadata={
                "name": name,
                "from": status_name(current),
                "to": status_name(target),
                "allowed": ",".join(sorted(status_name(s) for s in allowed)),
            },
        )


def check_mutable(name: str, item_type: int, status: int) -> None:
    """Refuse an edit of an ACCEPTED ADR or SPEC.

    Raises:
        FailedPrecondition: Reason ``IMMUTABLE_ITEM``.
    """
    if status == S.KNOWLEDGE_STATUS_ACCEPTED and item_type in IMMUTABLE_WHEN_ACCEPTED:
        kind = res.KnowledgeType.Name(item_type).removeprefix("KNOWLEDGE_TYPE_")  # type: ignore[arg-type]
        raise FailedPrecondition(
            f"{name} is an accepted {kind} and is immutable: supersede it with a new item",
            reason="IMMUTABLE_ITEM",
            metadata={"name": name},
        )
