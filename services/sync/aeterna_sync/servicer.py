"""gRPC servicer of ``aeterna.sync.v1.SyncService``: thin, protobuf ⇄ :mod:`.live` and
:mod:`.presence`.

Each method checks the parent's tenant first (another tenant is ``PERMISSION_DENIED``
before anything is read), validates the request's rooms and cursor, authorizes every room
(:mod:`.access`), and only then reads a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from aeterna.sync.v1 import resources_pb2 as res
from aeterna.sync.v1 import sync_service_pb2 as svc
from aeterna.sync.v1 import sync_service_pb2_grpc as svc_grpc
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.context import Principal
from aeterna_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
)
from aeterna_common.events import Event, MalformedEventError
from aeterna_common.names import invalid_name, parse_parent
from aeterna_common.servicing import Ctx
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from aeterna_sync.deps import Deps, Registered, ServicerSpec
from aeterna_sync.devices import DeviceSync, check_pull, check_push
from aeterna_sync.live import DELIVERED, DELIVERY_LAG_SECONDS, KEEPALIVE, Entry, Subscription
from aeterna_sync.pointers import PointerSync
from aeterna_sync.rooms import (
    Routed,
    decode_cursor,
    encode_cursor,
    entry_key,
    matching,
    parse_rooms,
    predecessor,
    route,
)

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["SyncService"].full_name

STATUS_NAME = re.compile(r"(tenants/[^/]+)/syncStatus")

CONFLICT_NAME = re.compile(r"(tenants/[^/]+)/syncConflicts/([^/]+)")

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


def _conflict_pb(tenant: str, r: Any) -> res.SyncConflict:
    """A ``sync_conflicts`` row as the proto's ``SyncConflict``."""
    c = res.SyncConflict(
        name=f"tenants/{tenant}/syncConflicts/{r['id']}",
        kind=r["kind"],
        knowledge_item=r["knowledge_item"],
        pointer_memories=r["pointer_memories"],
        detail=r["detail"],
        resolution=r["resolution"],
    )
    c.detect_time.FromDatetime(r["detected_at"])
    if r["resolved_at"] is not None:
        c.resolve_time.FromDatetime(r["resolved_at"])
    return c


_DELIVERED_LIVE = DELIVERED.labels("live")
_DELIVERED_CATCHUP = DELIVERED.labels("catchup")


def _delivered_live(commit_s: float) -> None:
    """Count a live event handed to the stream, and its commit-to-send lag in seconds
    (``commit_s``: the event's commit time, Unix seconds)."""
    _DELIVERED_LIVE.inc()
    # PostgreSQL's clock may run ahead of this replica's: a negative lag is skew, not speed.
    DELIVERY_LAG_SECONDS.observe(max(time.time() - commit_s, 0.0))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event's ``SubscribeResponse``, serialized once for every subscriber it goes to.

    Attributes:
        data: The serialized ``SubscribeResponse`` (sent as is: see :func:`_response_bytes`).
        commit_s: The event's commit time, Unix seconds (for the delivery lag).
    """

    data: bytes
    commit_s: float


def _response_bytes(message: svc.SubscribeResponse | bytes) -> bytes:
    """Subscribe's response serializer: bytes an event's fan-out serialized once go out as
    they are, other messages (the first one, keepalives) are serialized here.

    Args:
        message: A ``SubscribeResponse`` or its serialized form.

    Returns:
        The wire form of one ``SubscribeResponse``.
    """
    return message if isinstance(message, bytes) else message.SerializeToString()


FANOUT_MEMO_ENTRIES = 4096
"""Entries whose parsed event and message a replica keeps for the subscribers still to
receive them (a few seconds of a busy tenant's stream; older ones are rebuilt if needed)."""


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    memo[key] = value
    if len(memo) > FANOUT_MEMO_ENTRIES:
        del memo[next(iter(memo))]  # dicts keep insertion order: the oldest goes first


class SyncServicer(svc_grpc.SyncServiceServicer):
    """``aeterna.sync.v1.SyncService`` over :class:`Deps`."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.access = deps.access
        self.live = deps.live
        self._parse_memo: dict[tuple[str, str], tuple[Event, Routed] | None] = {}
        self._message_memo: dict[tuple[str, ...], Outgoing] = {}

    async def Subscribe(  # type: ignore[override]  # bytes too: see _add_to_server
        self, request: svc.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[svc.SubscribeResponse | bytes]:
        """See the proto. Events are yielded serialized (shared by every subscriber they go
        to); the method's response serializer (:func:`_response_bytes`) passes them on."""
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
                    out = await self._message(principal, tenant, rooms, entry)
                    position = entry[0]
                    if out is not None:
                        _DELIVERED_CATCHUP.inc()
                        yield out.data
                if len(page) < self.settings.catchup_page:
                    break
            async for message in self._follow(principal, tenant, rooms, sub, position):
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
    ) -> AsyncIterator[svc.SubscribeResponse | bytes]:
        """Live entries after ``position``, with keepalives; ends on overflow.

        The keepalive is one timer per subscription, re-armed from the last entry taken,
        not a timeout around every wait: an event would otherwise arm and cancel a timer
        for each of a replica's subscribers.
        """
        loop = asyncio.get_running_loop()
        keepalive_s = self.settings.keepalive_s
        queue = sub.queue
        last = loop.time()
        timer: asyncio.TimerHandle

        def tick() -> None:
            nonlocal timer
            idle_s = loop.time() - last
            if idle_s < keepalive_s:
                timer = loop.call_later(keepalive_s - idle_s, tick)
                return
            # A full queue has entries to send: no keepalive needed.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(KEEPALIVE)
            timer = loop.call_later(keepalive_s, tick)

        timer = loop.call_later(keepalive_s, tick)
        at = entry_key(position)
        try:
            while True:
                if sub.overflowed:
                    raise ResourceExhausted(
                        "the subscriber fell too far behind; resume from resume_cursor",
                        reason="SUBSCRIBER_TOO_SLOW",
                        metadata={"resume_cursor": encode_cursor(position)},
                    )
                entry = await queue.get()
                last = loop.time()
                if entry is KEEPALIVE:
                    yield svc.SubscribeResponse(cursor=encode_cursor(position))
                    continue
                key = entry_key(entry[0])
                if key <= at:
                    continue
                out = await self._message(principal, tenant, rooms, entry)
                position, at = entry[0], key
                if out is not None:
                    _delivered_live(out.commit_s)
                    yield out.data
        finally:
            timer.cancel()

    def _parsed(self, tenant: str, entry: Entry) -> tuple[Event, Routed] | None:
        """An entry's event and routing, parsed once per replica however many subscribers
        receive it (None: malformed)."""
        key = (tenant, entry[0])
        if key in self._parse_memo:
            return self._parse_memo[key]
        try:
            event = Event.from_fields(entry[1])
            parsed: tuple[Event, Routed] | None = (event, route(event.type, event.payload))
        except MalformedEventError:
            parsed = None
        _remember(self._parse_memo, key, parsed)
        return parsed

    async def _message(
        self, principal: Principal, tenant: str, rooms: Sequence[str], entry: Entry
    ) -> Outgoing | None:
        """The message of one stream entry for this subscription, serialized, or None when
        it is not for its rooms. A binding change re-checks the rooms first
        (PERMISSION_DENIED ends the stream). Subscribers of the same rooms share one
        serialization: the payload's conversion to a ``Struct`` and the encoding are the
        costly part of a fan-out, and neither depends on the subscriber."""
        parsed = self._parsed(tenant, entry)
        if parsed is None:
            return None
        event, routed = parsed
        if event.invalidates_authorization:
            self.access.forget(tenant)
            await self.access.require_rooms(principal, tenant, "Subscribe", rooms)
        hit = matching(rooms, routed)
        if not routed.live_type or not hit:
            return None
        key = (tenant, entry[0], *hit)
        out = self._message_memo.get(key)
        if out is None:
            live = _live_event(entry[0], event, routed.live_type, hit)
            message = svc.SubscribeResponse(event=live, cursor=live.cursor)
            out = Outgoing(message.SerializeToString(), live.commit_time.ToNanoseconds() / 1e9)
            _remember(self._message_memo, key, out)
        return out

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

    # Pointer sync (status, cycles, conflicts and their resolution), proposals (in status and
    # TriggerSync) and device sync are built.

    def _pointers(self) -> PointerSync:
        if self.deps.pointers is None:
            raise FailedPrecondition(
                "pointer sync is not configured: it needs AETERNA_SERVICE_TOKEN_FILE and the "
                "address of knowledge and memory (AETERNA_SYNC_KNOWLEDGE_URL, "
                "AETERNA_SYNC_MEMORY_URL or AETERNA_AUTHZ_DIRECTORY_URL)",
                reason="POINTER_SYNC_NOT_CONFIGURED",
            )
        return self.deps.pointers

    async def GetSyncStatus(
        self, request: svc.GetSyncStatusRequest, context: Ctx
    ) -> res.SyncStatus:
        """See the proto: the running cycle (one a dead replica left counts until it is
        resumed), pointers held, open conflicts, items waiting for a retry, memory revisions
        proposed as knowledge and those whose proposal failed."""
        principal = rc.current().principal
        m = STATUS_NAME.fullmatch(request.name)
        if m is None:
            raise invalid_name("name", "tenants/{tenant}/syncStatus")
        tenant = parse_parent(principal, m.group(1), "name")
        await self.access.require_tenant(principal, tenant, "GetSyncStatus")
        async with self.deps.db.transaction(tenant, readonly=True) as conn:
            running = await conn.fetchval(
                "SELECT id FROM sync_cycles WHERE state = $1 ORDER BY start_time DESC LIMIT 1",
                res.SYNC_CYCLE_STATE_RUNNING,
            )
            pointers = await conn.fetchval("SELECT count(*) FROM sync_pointers")
            open_conflicts = await conn.fetchval(
                "SELECT count(*) FROM sync_conflicts WHERE resolution = 0"
            )
            failed = await conn.fetchval("SELECT count(*) FROM sync_failed_items")
            ended = await conn.fetchval(
                "SELECT max(end_time) FROM sync_cycles WHERE end_time IS NOT NULL"
            )
            proposals = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE state = 'PROPOSED') AS proposed, "
                "count(*) FILTER (WHERE state = 'FAILED') AS failed FROM sync_proposals"
            ) or {"proposed": 0, "failed": 0}
        out = res.SyncStatus(
            name=request.name,
            pointer_count=pointers,
            open_conflict_count=open_conflicts,
            failed_item_count=failed,
            proposal_count=proposals["proposed"],
            failed_proposal_count=proposals["failed"],
        )
        if running is not None:
            out.running_cycle = f"tenants/{tenant}/syncCycles/{running}"
        if ended is not None:
            out.last_cycle_end_time.FromDatetime(ended)
        return out

    async def TriggerSync(self, request: svc.TriggerSyncRequest, context: Ctx) -> res.SyncCycle:
        """See the proto: runs a full reconcile now (or finishes the cycle a dead replica
        left, from its checkpoint) and answers the finished cycle, then proposes the tenant's
        memories that pass the promotion threshold
        (:meth:`aeterna_sync.proposals.Proposals.scan`).

        Raises:
            Aborted: Another replica runs the tenant's cycle (reason ``SYNC_CYCLE_RUNNING``).
            FailedPrecondition: Pointer sync is not configured.
        """
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        await self.access.require_tenant(principal, tenant, "TriggerSync")
        if len(request.request_id) > 128:
            raise InvalidArgument([FieldViolation("request_id", "at most 128 characters")])
        servicing.check_request_id_header(context, request.request_id)
        # A retried trigger runs another cycle: a cycle is idempotent (it writes only the
        # difference, and creates carry request_ids), so no request_id bookkeeping is needed.
        cycle = await self._pointers().reconcile(tenant)
        if self.deps.proposals is not None:
            # Memories → knowledge proposals (once per memory revision, so a retried trigger
            # proposes nothing twice); counted in GetSyncStatus.
            await self.deps.proposals.scan(tenant)
        return cycle.to_pb()

    async def ListSyncConflicts(
        self, request: svc.ListSyncConflictsRequest, context: Ctx
    ) -> svc.ListSyncConflictsResponse:
        """See the proto: oldest first; resolved ones only with ``show_resolved``."""
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        await self.access.require_tenant(principal, tenant, "ListSyncConflicts")
        size = servicing.page_size(request.page_size)
        fingerprint = f"{tenant}:{request.show_resolved}"
        after = servicing.decode_page_token(request.page_token, fingerprint)
        after_time, after_id = after.split("|", 1) if after else ("", "")
        async with self.deps.db.transaction(tenant, readonly=True) as conn:
            try:
                rows = await conn.fetch(
                    "SELECT id, kind, knowledge_item, pointer_memories, detail, detected_at, "
                    "resolution, resolved_at FROM sync_conflicts "
                    "WHERE ($1 OR resolution = 0) AND ($2 = '' OR (detected_at, id) > "
                    "($2::text::timestamptz, $3::text::uuid)) "
                    "ORDER BY detected_at, id LIMIT $4",
                    request.show_resolved,
                    after_time,
                    after_id or "00000000-0000-0000-0000-000000000000",
                    size + 1,
                )
            except (ValueError, asyncpg.DataError) as exc:
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a token of this list")]
                ) from exc
        out = svc.ListSyncConflictsResponse()
        out.sync_conflicts.extend(_conflict_pb(tenant, r) for r in rows[:size])
        if len(rows) > size:
            last = rows[size - 1]
            out.next_page_token = servicing.encode_page_token(
                f"{last['detected_at'].isoformat()}|{last['id']}", fingerprint
            )
        return out

    async def ResolveSyncConflict(
        self, request: svc.ResolveSyncConflictRequest, context: Ctx
    ) -> res.SyncConflict:
        """See the proto: resolve an open conflict by a call (authorized before the conflict
        is looked up); the same resolution of a resolved conflict answers it unchanged.

        Raises:
            InvalidArgument: A malformed name, no resolution, an over-long request_id.
            PermissionDenied: Another tenant, or not a tenant admin (before any lookup).
            NotFound: No such conflict.
            FailedPrecondition: Resolved otherwise already, REWRITE_POINTER of an item no
                longer ACCEPTED, or pointer sync not configured.
            Aborted: A cycle of the tenant is running (``SYNC_CYCLE_RUNNING``).
        """
        principal = rc.current().principal
        m = CONFLICT_NAME.fullmatch(request.name)
        if m is None:
            raise invalid_name("name", "tenants/{tenant}/syncConflicts/{uuid}")
        tenant = parse_parent(principal, m.group(1), "name")
        await self.access.require_tenant(principal, tenant, "ResolveSyncConflict")
        violations = []
        try:
            conflict_id = uuid.UUID(m.group(2))
        except ValueError:
            violations.append(FieldViolation("name", "the conflict id must be a UUID"))
        if request.resolution not in res.ConflictResolution.values() or (
            request.resolution == res.CONFLICT_RESOLUTION_UNSPECIFIED
        ):
            violations.append(
                FieldViolation("resolution", "one of REWRITE_POINTER, DELETE_POINTER, IGNORE")
            )
        if len(request.request_id) > 128:
            violations.append(FieldViolation("request_id", "at most 128 characters"))
        if violations:
            raise InvalidArgument(violations)
        servicing.check_request_id_header(context, request.request_id)
        # A retry is idempotent without bookkeeping: the resolved conflict answers the same
        # resolution unchanged.
        row = await self._pointers().resolve(
            tenant, conflict_id, request.resolution, principal.actor
        )
        return _conflict_pb(tenant, row)

    def _devices(self) -> DeviceSync:
        if self.deps.devices is None:
            raise FailedPrecondition(
                "device sync is not configured: it needs the address of memory "
                "(AETERNA_SYNC_MEMORY_URL, AETERNA_SYNC_KNOWLEDGE_URL or "
                "AETERNA_AUTHZ_DIRECTORY_URL)",
                reason="DEVICE_SYNC_NOT_CONFIGURED",
            )
        return self.deps.devices

    async def PushMemories(
        self, request: svc.PushMemoriesRequest, context: Ctx
    ) -> svc.PushMemoriesResponse:
        """See the proto: authorizes, refuses bad input whole (nothing written), then applies
        each entry through memory with the caller's own token (:mod:`.devices`)."""
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        await self.access.require_tenant(principal, tenant, "PushMemories")
        check_push(request, tenant, self.deps.devices_limits, datetime.now(UTC))
        return await self._devices().push(
            tenant, principal.actor, servicing.caller_authorization(context), request
        )

    async def PullMemories(
        self, request: svc.PullMemoriesRequest, context: Ctx
    ) -> svc.PullMemoriesResponse:
        """See the proto: what memory lets the caller read, oldest change first."""
        principal = rc.current().principal
        tenant = parse_parent(principal, request.parent)
        await self.access.require_tenant(principal, tenant, "PullMemories")
        since, limit = check_pull(request)
        return await self._devices().pull(
            servicing.caller_authorization(context), tenant, since, list(request.layers), limit
        )


class _Handlers:
    """Takes the generated method handlers instead of a server (to change one of them)."""

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = dict(handlers)


def _add_to_server(servicer: SyncServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, with Subscribe's responses
    serialized by :func:`_response_bytes` (events arrive serialized)."""
    taken = _Handlers()
    generated: Any = taken  # stands in for the server
    svc_grpc.add_SyncServiceServicer_to_server(servicer, generated)
    handlers = taken.handlers
    handlers["Subscribe"] = grpc.unary_stream_rpc_method_handler(
        servicer.Subscribe,
        request_deserializer=svc.SubscribeRequest.FromString,
        response_serializer=_response_bytes,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = SyncServicer(deps)
    _add_to_server(servicer, server)
    return Registered(servicer=servicer, background=[_sweeper(deps)])


def _sweeper(deps: Deps) -> Any:
    async def sweep() -> None:
        await deps.presence.run(deps.settings.presence_sweep_s)

    return sweep


SPEC = ServicerSpec(SERVICE_NAME, _build)

__all__ = ["SPEC", "SyncServicer"]
