"""Promotion of memories to a broader layer (DOMAIN.md, Memory: Promotion).

AGENT→USER and SESSION→PROJECT happen automatically (:func:`promoted_copy`); USER→TEAM,
PROJECT→TEAM, TEAM→ORG and ORG→COMPANY need an approval by governance at the target unit
(:func:`approval_targets`, :func:`approved_copy`, :class:`PromotionRequest`). Pure
functions and values: the jobs that apply them are
:meth:`aeterna_memory.adapters.lifecycle.LifecycleJobs.promote_due` and
:class:`aeterna_memory.adapters.team_promotion.TeamPromotions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aeterna_common import promotion as rules
from aeterna_common.authz import Snapshot
from aeterna_common.promotion import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD  # re-exported
from aeterna_common.promotion import excluded, redact

from aeterna_memory.domain.model import UNIT_LAYERS, Layer, Memory, NewMemory, Scope

AUTOMATIC = {Layer.AGENT: Layer.USER, Layer.SESSION: Layer.PROJECT}
"""Automatic promotions: source layer → target layer (DOMAIN.md)."""

APPROVED = {
    Layer.USER: Layer.TEAM,
    Layer.PROJECT: Layer.TEAM,
    Layer.TEAM: Layer.ORG,
    Layer.ORG: Layer.COMPANY,
}
"""Promotions made once governance approves them: source layer → target layer (DOMAIN.md)."""

USER_TEAM_KEY = "team_id"
"""Metadata key naming a USER memory's target team (a USER memory's scope has no team)."""

NOUNS = {
    Layer.USER: "user",
    Layer.PROJECT: "project",
    Layer.TEAM: "team",
    Layer.ORG: "organization",
    Layer.COMPANY: "company",
}
"""How approval request titles name the units of each layer."""

TITLE_MAX = 200
"""Longest approval request title governance accepts (its contract: 1-200 characters)."""


def promotion_score(memory: Memory, now: datetime) -> float:
    """The memory's promotion score in [0, 1] (:func:`aeterna_common.promotion.score`).

    Args:
        memory: The memory.
        now: The current time (timezone-aware).
    """
    return rules.score(memory.importance, memory.access_count, memory.last_accessed_at, now)


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


def approved_copy(
    memory: Memory, score: float, target_unit: str, *, approval_request: str = ""
) -> NewMemory | None:
    """The copy of ``memory`` at its approved target layer (:data:`APPROVED`), or None when
    the memory is not promotable (another layer, or ``sensitive``/``private``).

    Redacted and recorded as :func:`promoted_copy`'s copies, plus ``approval_request`` (the
    governance request that approved it) when given.

    Args:
        memory: The USER, PROJECT, TEAM or ORG memory.
        score: Its promotion score when it was asked for (rounded to 6 decimals, as stored).
        target_unit: The target unit's id (:func:`approval_targets`), which is the copy's
            scope identifier of the target layer (``team_id``, ``org_id``, ``company_id``).
        approval_request: ``tenants/{tenant}/approvalRequests/{id}``, or empty while asking.

    Returns:
        The copy to create, or None.
    """
    target = APPROVED.get(memory.layer)
    if target is None or excluded(memory.metadata):
        return None
    extra = {"approval_request": approval_request} if approval_request else {}
    scope = Scope(**{UNIT_LAYERS[target][1]: target_unit})
    return _copy(memory, score, target, scope, extra)


def approval_key(memory: Memory) -> str | None:
    """What :func:`approval_targets` keys a memory's target by: a USER memory's metadata
    ``team_id``, else the memory's own unit id (its layer's scope identifier); None when
    the memory has none or its layer has no approved promotion."""
    if memory.layer is Layer.USER:
        team = memory.metadata.get(USER_TEAM_KEY)
        return team if isinstance(team, str) and team else None
    if memory.layer not in APPROVED:
        return None
    return memory.scope.get(UNIT_LAYERS[memory.layer][1]) or None


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


def approval_targets(snapshot: Snapshot) -> dict[Layer, dict[str, str]]:
    """The target unit of each approved promotion in an authorization snapshot: source
    layer → :func:`approval_key` → target unit id.

    USER→TEAM: the team named in the memory's metadata, when it is a TEAM unit. PROJECT→TEAM,
    TEAM→ORG, ORG→COMPANY: the memory's unit's parent, when the unit is of the source layer's
    kind and its parent of the target layer's (a unit id is the scope identifier of its
    layer). A key that is not in the map has no target: its memories are not promoted.
    """
    units = {u.id: u for u in snapshot.units}
    targets: dict[Layer, dict[str, str]] = {layer: {} for layer in APPROVED}
    for unit in snapshot.units:
        if unit.kind is UNIT_LAYERS[Layer.TEAM][0]:
            targets[Layer.USER][unit.id] = unit.id
        parent = units.get(unit.parent_id or "")
        for source, target in APPROVED.items():
            if (
                source in UNIT_LAYERS
                and unit.kind is UNIT_LAYERS[source][0]
                and parent is not None
                and parent.kind is UNIT_LAYERS[target][0]
            ):
                targets[source][unit.id] = parent.id
    return targets


@dataclass(frozen=True, slots=True)
class PromotionRequest:
    """What governance is asked to approve: one revision of a memory copied to its target
    unit (:data:`APPROVED`, :func:`approval_targets`).

    Attributes:
        tenant_id: The tenant.
        memory_id: The memory's id.
        revision: Its revision when asked (a later revision is asked for anew).
        source_layer: Its layer (USER, PROJECT, TEAM or ORG).
        source_id: Its user or unit id (its layer's scope identifier).
        target_layer: The layer of the copy.
        target_unit: The target unit's id, whose approvers decide.
        score: Its promotion score, rounded to 6 decimals (recorded in the copy).
        content_sha256: Hex SHA-256 of the copy's redacted content: what is approved.
    """

    tenant_id: str
    memory_id: str
    revision: int
    source_layer: Layer
    source_id: str
    target_layer: Layer
    target_unit: str
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
        source, target = NOUNS[self.source_layer], NOUNS[self.target_layer]
        return (f"Promote a memory of {source} {self.source_id} to {target} {self.target_unit}")[
            :TITLE_MAX
        ]

    def payload(self) -> dict[str, Any]:
        """The request's payload: ``memory``, ``revision``, ``target_layer`` (its name) and
        ``content_sha256``; never the content (approvers read the memory itself)."""
        return {
            "memory": self.memory,
            "revision": self.revision,
            "target_layer": self.target_layer.name,
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
