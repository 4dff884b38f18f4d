"""Automatic promotion of memories to a broader layer (DOMAIN.md, Memory: Promotion).

AGENT→USER and SESSION→PROJECT happen automatically; promotions to TEAM and above need an
approval (governance) and are not made here. Pure functions: the job that applies them is
:meth:`aeterna_memory.adapters.lifecycle.LifecycleJobs.promote_due`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aeterna_memory.domain.model import Layer, Memory, NewMemory, Scope

DEFAULT_THRESHOLD = 0.8
"""Promotion score from which a memory is promoted (DOMAIN.md)."""

AUTOMATIC = {Layer.AGENT: Layer.USER, Layer.SESSION: Layer.PROJECT}
"""Automatic promotions: source layer → target layer (DOMAIN.md)."""

EXCLUDING_KEYS = ("sensitive", "private")
"""Metadata keys that, when set to anything but false/empty, keep a memory where it is."""

# Reviewed patterns, linear in the input (no nested quantifiers): an e-mail address is
# local@domain.tld with the characters RFC 5322's dot-atom allows in practice; a phone number
# is an optional + and 7-15 digits (E.164's maximum) with single spaces, dots, dashes or
# parentheses between digit groups.
EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+"
)
PHONE = re.compile(r"(?<![\w+])\+?(?:\(?\d{1,4}\)?[ .-]?){2,6}\d{2,4}(?!\w)")
REDACTED_EMAIL = "[email redacted]"
REDACTED_PHONE = "[phone redacted]"


def promotion_score(memory: Memory, now: datetime) -> float:
    """0.6·importance + 0.3·min(access_count/10, 1) + 0.1·max(0, 1 − days since last
    access) (DOMAIN.md; a memory never accessed gets 0 for the last term).

    Args:
        memory: The memory.
        now: The current time (timezone-aware).

    Returns:
        The score in [0, 1].
    """
    recency = 0.0
    if memory.last_accessed_at is not None:
        days = (now - memory.last_accessed_at).total_seconds() / 86_400
        recency = max(0.0, 1.0 - days)
    return 0.6 * memory.importance + 0.3 * min(memory.access_count / 10, 1.0) + 0.1 * recency


def _digits(match: re.Match[str]) -> int:
    return sum(c.isdigit() for c in match.group(0))


def redact(text: str) -> str:
    """Replace e-mail addresses and phone numbers (7-15 digits) in ``text``."""
    text = EMAIL.sub(REDACTED_EMAIL, text)
    return PHONE.sub(lambda m: REDACTED_PHONE if 7 <= _digits(m) <= 15 else m.group(0), text)


def excluded(metadata: Mapping[str, Any]) -> bool:
    """Whether the metadata marks the memory ``sensitive`` or ``private``."""
    return any(metadata.get(k) not in (None, False, "", "false", 0) for k in EXCLUDING_KEYS)


def promoted_copy(memory: Memory, score: float) -> NewMemory | None:
    """The copy of ``memory`` at its automatic target layer, or None when it has none.

    SESSION→PROJECT needs a project id: the memory's metadata ``project_id`` (a SESSION
    memory's stored scope has no project), else no promotion. The copy's content and string
    metadata values are redacted; its metadata records ``original_memory`` (the source's
    resource name), ``original_revision`` and ``promotion_score``.

    Args:
        memory: The source memory.
        score: Its promotion score.

    Returns:
        The copy to create, or None.
    """
    target = AUTOMATIC.get(memory.layer)
    if target is None or excluded(memory.metadata):
        return None
    if target is Layer.USER:
        scope = Scope(user_id=memory.scope.user_id)
    else:
        project = memory.scope.project_id or memory.metadata.get("project_id")
        if not isinstance(project, str) or not project:
            return None
        scope = Scope(project_id=project)
    metadata: dict[str, Any] = {
        k: redact(v) if isinstance(v, str) else v for k, v in memory.metadata.items()
    }
    metadata.update(
        original_memory=f"tenants/{memory.tenant_id}/memories/{memory.id}",
        original_revision=memory.revision,
        promotion_score=round(score, 6),
    )
    return NewMemory(
        layer=target,
        scope=scope,
        content=redact(memory.content),
        metadata=metadata,
        tags=list(memory.tags),
        importance=memory.importance,
        expire_at=memory.expire_at,
    )
