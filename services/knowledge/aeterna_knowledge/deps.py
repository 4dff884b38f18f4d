"""What the knowledge servicer is built from, and how a servicer is registered
(:data:`aeterna_knowledge.app.SERVICERS`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database

from aeterna_knowledge.access import Access
from aeterna_knowledge.promotion import PromotionApprovals
from aeterna_knowledge.settings import KnowledgeSettings

if TYPE_CHECKING:
    from aeterna_knowledge.search import KnowledgeSearch

Job = Callable[[], Coroutine[Any, Any, None]]


@dataclass(kw_only=True)
class Deps:
    """What servicers are built from.

    Attributes:
        common: Shared settings.
        settings: Knowledge settings.
        db: Pool of the application role (tenant transactions under RLS).
        access: The authorization checks (the shared permission model).
        search: This replica's search (its index and follower), None in tools that build
            servicers without one.
        approvals: Governance's approval requests (promotions), or None where governance is
            not configured.
    """

    common: CommonSettings
    settings: KnowledgeSettings
    db: Database
    access: Access
    search: KnowledgeSearch | None = None
    approvals: PromotionApprovals | None = None


@dataclass(frozen=True, kw_only=True)
class Registered:
    """A servicer added to the server.

    Attributes:
        servicer: The servicer instance.
        background: Its background jobs.
    """

    servicer: object
    background: Sequence[Job] = ()


@dataclass(frozen=True)
class ServicerSpec:
    """One gRPC service of knowledge.

    Attributes:
        service_name: Full proto name (health status and reflection).
        build: Builds the servicer from :class:`Deps` and adds it to the server.
    """

    service_name: str
    build: Callable[[Deps, grpc.aio.Server], Registered]
