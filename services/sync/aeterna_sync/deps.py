"""What the sync servicer is built from, and how a servicer is registered
(:data:`aeterna_sync.app.SERVICERS`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aeterna_common.config import CommonSettings
from aeterna_common.db import Database

from aeterna_sync.access import Access
from aeterna_sync.devices import DeviceLimits, DeviceSync
from aeterna_sync.live import LiveEvents
from aeterna_sync.pointers import PointerSync
from aeterna_sync.presence import PresenceBook
from aeterna_sync.proposals import Proposals
from aeterna_sync.settings import SyncSettings

Job = Callable[[], Coroutine[Any, Any, None]]


@dataclass(kw_only=True)
class Deps:
    """What servicers are built from.

    Attributes:
        common: Shared settings.
        settings: Sync settings.
        db: Pool of the application role (tenant transactions under RLS).
        access: The authorization checks (the shared permission model).
        live: The replica's tenant feeds.
        presence: Presence of rooms.
        pointers: Knowledge → memory pointer sync; None without service credentials or an
            address of knowledge and memory.
        devices: Device push and pull; None without an address of memory.
        devices_limits: Bounds of device pushes and pulls.
        proposals: Memory → knowledge proposals; None when pointer sync is (same needs).
    """

    common: CommonSettings
    settings: SyncSettings
    db: Database
    access: Access
    live: LiveEvents
    presence: PresenceBook
    pointers: PointerSync | None = None
    devices: DeviceSync | None = None
    devices_limits: DeviceLimits = field(default_factory=DeviceLimits)
    proposals: Proposals | None = None


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
    """One gRPC service of sync.

    Attributes:
        service_name: Full proto name (health status and reflection).
        build: Builds the servicer from :class:`Deps` and adds it to the server.
    """

    service_name: str
    build: Callable[[Deps, grpc.aio.Server], Registered]
