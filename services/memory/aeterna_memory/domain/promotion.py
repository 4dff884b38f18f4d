"""Promotion of memories to a broader layer (DOMAIN.md, Memory: Promotion).

AGENT→USER and SESSION→PROJECT happen automatically (:func:`promoted_copy`); PROJECT→TEAM
needs an approval by governance (:func:`team_copy`, :class:`PromotionRequest`); USER→TEAM,
TEAM→ORG and ORG→COMPANY are not made. Pure functions and values: the jobs that apply them
are :meth:`aeterna_memory.adapters.lifecycle.LifecycleJobs.promote_due` and
:class:`aeterna_memory.adapters.team_promotion.TeamPromotions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aeterna_common.authz import Snapshot, UnitKind

from aeterna_memory.domain.model import Layer, Memory, NewMemory, Scope

DEFAULT_THRESHOLD = 0.8
"""Promotion score from which a memory is promoted (DOMAIN.md)."""

AUTOMATIC = {Layer.AGENT: Layer.USER, Layer.SESSION: Layer.PROJECT}
"""Automatic promotions: source layer → target layer (DOMAIN.md)."""

APPROVED = {Layer.PROJECT: Layer.TEAM}
"""Promotions made once governance approves them: source layer → target layer."""

TITLE_MAX = 200
"""Longest approval request title governance accepts (its contract: 1-200 characters)."""

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
    return _copy(memory, score, target, scope)


def team_copy(
    memory: Memory, score: float, team_id: str, *, approval_request: str = ""
) -> NewMemory | None:
    """The TEAM copy of a PROJECT memory, or None when the memory is not promotable
    (another layer, or ``sensitive``/``private``).

    Redacted and recorded as :func:`promoted_copy`'s copies, plus ``approval_request`` (the
    governance request that approved it) when given.

    Args:
        memory: The PROJECT memory.
        score: Its promotion score when it was asked for (rounded to 6 decimals, as stored).
        team_id: The project's team (its parent unit in the org tree).
        approval_request: ``tenants/{tenant}/approvalRequests/{id}``, or empty while asking.

    Returns:
        The copy to create, or None.
    """
    if APPROVED.get(memory.layer) is not Layer.TEAM or excluded(memory.metadata):
        return None
    extra = {"approval_request": approval_request} if approval_request else {}
    return _copy(memory, score, Layer.TEAM, Scope(team_id=team_id), extra)


def _copy(
    memory: Memory,
    score: float,
    target: Layer,
    scope: Scope,
    extra: Mapping[str, Any] | None = None,
) -> NewMemory:
    metadata: dict[str, Any] = {
        k: redact(v) if isinstance(v, str) else v for k, v in memory.metadata.items()
    }
    metadata.update(
        original_memory=f"tenants/{memory.tenant_id}/memories/{memory.id}",
        original_revision=memory.revision,
        promotion_score=round(score, 6),
        **(extra or {}),
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


def project_teams(snapshot: Snapshot) -> dict[str, str]:
    """Each PROJECT unit's TEAM (its parent, when that is a TEAM) in an authorization
    snapshot: project id → team id. A unit id is the scope identifier of its layer."""
    units = {u.id: u for u in snapshot.units}
    teams: dict[str, str] = {}
    for unit in snapshot.units:
        parent = units.get(unit.parent_id or "")
        if unit.kind is UnitKind.PROJECT and parent is not None and parent.kind is UnitKind.TEAM:
            teams[unit.id] = parent.id
    return teams


@dataclass(frozen=True, slots=True)
class PromotionRequest:
    """What governance is asked to approve: one revision of a PROJECT memory copied to its
    project's TEAM.

    Attributes:
        tenant_id: The tenant.
        memory_id: The PROJECT memory's id.
        revision: Its revision when asked (a later revision is asked for anew).
        project_id: Its project.
        team_id: The project's team, whose approvers decide.
        score: Its promotion score, rounded to 6 decimals (recorded in the copy).
        content_sha256: Hex SHA-256 of the copy's redacted content: what is approved.
    """

    tenant_id: str
    memory_id: str
    revision: int
    project_id: str
    team_id: str
    score: float
    content_sha256: str

    @property
    def memory(self) -> str:
        """The memory's resource name (the request's target)."""
        return f"tenants/{self.tenant_id}/memories/{self.memory_id}"

    @property
    def request_id(self) -> str:
        """Governance's idempotency key: one request per memory revision."""
        return f"promote-{self.memory_id}-{self.revision}"

    @property
    def title(self) -> str:
        """A short title for the approvers (at most :data:`TITLE_MAX` characters)."""
        return f"Promote a memory of project {self.project_id} to team {self.team_id}"[:TITLE_MAX]

    def payload(self) -> dict[str, Any]:
        """The request's payload: ``memory``, ``revision``, ``target_layer`` (``TEAM``) and
        ``content_sha256``; never the content (approvers read the memory itself)."""
        return {
            "memory": self.memory,
            "revision": self.revision,
            "target_layer": Layer.TEAM.name,
            "content_sha256": self.content_sha256,
        }


@dataclass(frozen=True, slots=True)
class Approval:
    """Governance's approval request as memory reads it.

    Attributes:
        name: ``tenants/{tenant}/approvalRequests/{id}``.
        type: ``MEMORY_PROMOTION``, ``POLICY``, ... (governance's ``ApprovalType`` name).
        state: ``PENDING``, ``APPROVED``, ``REJECTED``, ``EXPIRED`` or ``CANCELLED``.
        target: The resource it is about.
        payload: Its payload (JSON object).
    """

    name: str
    type: str
    state: str
    target: str
    payload: Mapping[str, Any] = field(default_factory=dict)
