"""gRPC servicer of ``aeterna.sync.v1.SyncService``: thin, protobuf ⇄ :mod:`.live` and
:mod:`.presence`.

Each method checks the parent's tenant first (another tenant is ``PERMISSION_DENIED``
before anything is read), validates the request's rooms and cursor, authorizes every room
(:mod:`.access`), and only then reads a stream.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.sync.v1 import sync_service_pb2_grpc as svc_grpc
from aeterna_common import context as rc
from aeterna_common.context import Principal
from aeterna_common.errors import (
    FieldViolation,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from aeterna_common.events import Event, MalformedEventError
from aeterna_common.names import parse_parent
from aeterna_common.servicing import Ctx
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from aeterna_sync.deps import Deps, Registered, ServicerSpec
from aeterna_sync.live import DELIVERED, DELIVERY_LAG_SECONDS, Entry, Subscription, newer
from aeterna_sync.rooms import (
    decode_cursor,
    encode_cursor,
    entry_key,
    matching,
    parse_rooms,
    predecessor,
    route,
)

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["SyncService"].full_name

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _live_event(entry_id: str, event: Event, kind: int, rooms: Sequence[str]) -> res.LiveEvent:
    when = timestamp_pb2.Timestamp()
    when.FromJsonString(event.time)
    payload = struct_pb2.Struct()
    json_format.ParseDict(event.payload, payload)
    return res.LiveEvent(
        cursor=encode_cursor(entry_id),
        type=kind,  # type: ignore[arg-type]
        rooms=rooms,
        resource=event.resource,
        actor=event.actor,
        commit_time=when,
        source_type=event.type,
        payload=payload,
        event_id=event.event_id,
    )


def _delivered_live(event: res.LiveEvent) -> None:
    """Count a live event handed to the stream, and its commit-to-send lag in seconds."""
    DELIVERED.labels("live").inc()
    lag_s = time.time() - event.commit_time.ToNanoseconds() / 1e9
    # PostgreSQL's clock may run ahead of this replica's: a negative lag is skew, not speed.
    DELIVERY_LAG_SECONDS.observe(max(lag_s, 0.0))


class SyncServicer(svc_grpc.SyncServiceServicer):
    """``aeterna.sync.v1.SyncService`` over :class:`Deps`."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.access = deps.access
        self.live = deps.live

    async def Subscribe(
        self, request: svc.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[svc.SubscribeResponse]:
        """See the proto."""
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        rooms = parse_rooms(request.rooms, self.settings.max_rooms)
        after = decode_cursor(request.after_cursor) if request.after_cursor else None
        await self.access.require_rooms(principal, tenant, "Subscribe", rooms)
        sub = await self.live.open(tenant)
        try:
            position = after if after is not None else sub.start
            if after is not None:
                oldest = await self.live.oldest(tenant)
                if oldest is not None and entry_key(after) < entry_key(predecessor(oldest)):
                    resume = encode_cursor(predecessor(oldest))
                    raise OutOfRange(
                        "the cursor is older than the event stream's retention; resume from "
                        "oldest_cursor (events in between are gone)",
                        reason="CURSOR_EXPIRED",
                        metadata={"oldest_cursor": resume},
                    )
            # The first message says the subscription is live and where it stands.
            yield svc.SubscribeResponse(cursor=encode_cursor(position))
            # Backlog after the cursor, then the live queue (skipping what was sent).
            while after is not None:
                page = await self.live.backlog(tenant, position, self.settings.catchup_page)
                for entry in page:
                    message = await self._message(principal, tenant, rooms, entry)
                    position = entry[0]
                    if message is not None:
                        DELIVERED.labels("catchup").inc()
                        yield message
                if len(page) < self.settings.catchup_page:
                    break
            async for message, _ in self._follow(principal, tenant, rooms, sub, position):
                if message.HasField("event"):
                    _delivered_live(message.event)
                yield message
        finally:
            await self.live.close(sub)

    async def _follow(
        self,
        principal: Principal,
        tenant: str,
        rooms: Sequence[str],
        sub: Subscription,
        position: str,
    ) -> AsyncIterator[tuple[svc.SubscribeResponse, str]]:
        """Live entries after ``position``, with keepalives; ends on overflow."""
        while True:
            if sub.overflowed:
                raise ResourceExhausted(
                    "the subscriber fell too far behind; resume from resume_cursor",
                    reason="SUBSCRIBER_TOO_SLOW",
                    metadata={"resume_cursor": encode_cursor(position)},
                )
            try:
                async with asyncio.timeout(self.settings.keepalive_s):
                    entry = await sub.queue.get()
            except TimeoutError:
                yield svc.SubscribeResponse(cursor=encode_cursor(position)), position
                continue
            if not newer(entry[0], position):
                continue
            message = await self._message(principal, tenant, rooms, entry)
            position = entry[0]
            if message is not None:
                yield message, position

    async def _message(
        self, principal: Principal, tenant: str, rooms: Sequence[str], entry: Entry
    ) -> svc.SubscribeResponse | None:
        """The message of one stream entry for this subscription, or None when it is not
        for its rooms. A binding change re-checks the rooms first (PERMISSION_DENIED ends the
        stream)."""
        entry_id, fields = entry
        try:
            event = Event.from_fields(fields)
        except MalformedEventError:
            return None
        if event.invalidates_authorization:
            self.access.forget(tenant)
            await self.access.require_rooms(principal, tenant, "Subscribe", rooms)
        routed = route(event.type, event.payload)
        hit = matching(rooms, routed)
        if not routed.live_type or not hit:
            return None
        return svc.SubscribeResponse(
            event=_live_event(entry_id, event, routed.live_type, hit),
            cursor=encode_cursor(entry_id),
        )

    async def Heartbeat(self, request: svc.HeartbeatRequest, context: Ctx) -> svc.HeartbeatResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        rooms = parse_rooms(request.rooms, self.settings.max_rooms)
        if not CLIENT_ID.fullmatch(request.client_id):
            raise InvalidArgument([FieldViolation("client_id", "1-100 of [A-Za-z0-9_.:-]")])
        await self.access.require_rooms(principal, tenant, "Heartbeat", rooms)
        present = await self.deps.presence.heartbeat(
            tenant, principal.actor, request.client_id, rooms
        )
        out = []
        for p in present:
            seen = timestamp_pb2.Timestamp()
            seen.FromSeconds(int(p.expires_s - self.settings.presence_ttl_s))
            out.append(
                res.Presence(user=p.user, client_id=p.client_id, room=p.room, last_seen_time=seen)
            )
        return svc.HeartbeatResponse(
            present=out, interval_seconds=max(1, round(self.settings.presence_interval_s))
        )

    # Pointer sync, proposals and device sync are declared in the contract and not built
    # yet: UNIMPLEMENTED, after the same authorization as they will have.

    async def _unbuilt(self, parent: str, rpc: str) -> Any:
        principal = rc.current().principal
        tenant = parse_parent(principal, parent.split("/syncStatus")[0].split("/syncConflicts")[0])
        await self.access.require_tenant(principal, tenant, rpc)
        raise Unimplemented(f"{rpc} is not implemented yet")

    async def GetSyncStatus(
        self, request: svc.GetSyncStatusRequest, context: Ctx
    ) -> res.SyncStatus:
        """Not implemented yet."""
        return await self._unbuilt(request.name, "GetSyncStatus")  # type: ignore[no-any-return]

    async def TriggerSync(self, request: svc.TriggerSyncRequest, context: Ctx) -> res.SyncCycle:
        """Not implemented yet."""
        return await self._unbuilt(request.parent, "TriggerSync")  # type: ignore[no-any-return]

    async def ListSyncConflicts(
        self, request: svc.ListSyncConflictsRequest, context: Ctx
    ) -> svc.ListSyncConflictsResponse:
        """Not implemented yet."""
        return await self._unbuilt(request.parent, "ListSyncConflicts")  # type: ignore[no-any-return]

    async def ResolveSyncConflict(
        self, request: svc.ResolveSyncConflictRequest, context: Ctx
    ) -> res.SyncConflict:
        """Not implemented yet."""
        return await self._unbuilt(request.name, "ResolveSyncConflict")  # type: ignore[no-any-return]

    async def PushMemories(
        self, request: svc.PushMemoriesRequest, context: Ctx
    ) -> svc.PushMemoriesResponse:
        """Not implemented yet."""
        return await self._unbuilt(request.parent, "PushMemories")  # type: ignore[no-any-return]

    async def PullMemories(
        self, request: svc.PullMemoriesRequest, context: Ctx
    ) -> svc.PullMemoriesResponse:
        """Not implemented yet."""
        return await self._unbuilt(request.parent, "PullMemories")  # type: ignore[no-any-return]


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = SyncServicer(deps)
    svc_grpc.add_SyncServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer, background=[_sweeper(deps)])


def _sweeper(deps: Deps) -> Any:
    async def sweep() -> None:
        await deps.presence.run(deps.settings.presence_sweep_s)

    return sweep


SPEC = ServicerSpec(SERVICE_NAME, _build)

__all__ = ["SPEC", "SyncServicer"]
