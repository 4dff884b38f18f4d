"""Rooms, cursors and the mapping of bus events to live events.

A **room** names a slice of a tenant's events: ``tenant`` (all of them), ``user:{id}`` (the
user's USER, SESSION and AGENT memories, and its presence), ``project:{id}``, ``team:{id}``,
``org:{id}`` and ``company:{id}`` (the unit's memories, knowledge and policies). A room is
authorized as the resource whose data it shows (:func:`room_resource`).

A **cursor** is the Redis Streams entry id (``{ms}-{seq}``) of the last event a subscriber
received, opaque to clients: ``base64url("v1:" + id)`` without padding. Entry ids grow
strictly within a stream, so "after the cursor" is exactly the events not yet received.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aeterna.sync.v1 import resources_pb2 as res
from aeterna_common.authz import Resource, UnitKind
from aeterna_common.errors import FieldViolation, InvalidArgument

ROOM = re.compile(r"tenant|(user|project|team|org|company):([A-Za-z0-9_.-]{1,100})")
"""A room: ``tenant`` or ``{kind}:{id}`` (ids as the memory scope identifiers)."""

UNIT_ROOMS: Mapping[str, UnitKind] = {
    "project": UnitKind.PROJECT,
    "team": UnitKind.TEAM,
    "org": UnitKind.ORGANIZATION,
    "company": UnitKind.COMPANY,
}
"""The org unit kind of each unit room."""

ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
CURSOR_VERSION = "v1:"

MEMORY_LAYER_ROOM = {4: "project", 5: "team", 6: "org", 7: "company"}
"""Memory layers PROJECT..COMPANY (aeterna.type.v1.MemoryLayer numbers) → unit room kind;
AGENT (1), USER (2) and SESSION (3) memories go to the room of their user."""
MEMORY_SCOPE_FIELD = {4: "project_id", 5: "team_id", 6: "org_id", 7: "company_id"}

KNOWLEDGE_LAYER_ROOM = {
    "KNOWLEDGE_LAYER_PROJECT": "project",
    "KNOWLEDGE_LAYER_TEAM": "team",
    "KNOWLEDGE_LAYER_ORG": "org",
    "KNOWLEDGE_LAYER_COMPANY": "company",
}


def parse_rooms(rooms: Sequence[str], max_rooms: int, field: str = "rooms") -> list[str]:
    """Validate the rooms of a request; duplicates are dropped, order kept.

    Raises:
        InvalidArgument: None, more than ``max_rooms``, or an unknown room (reason
            ``UNKNOWN_ROOM``), with one field violation per bad room.
    """
    if not rooms:
        raise InvalidArgument(
            [FieldViolation(field, "at least one room")],
            "at least one room is required",
        )
    if len(rooms) > max_rooms:
        raise InvalidArgument(
            [FieldViolation(field, f"at most {max_rooms} rooms")],
            f"at most {max_rooms} rooms",
        )
    bad = [
        FieldViolation(
            f"{field}[{i}]",
            "tenant, user:{id}, project:{id}, team:{id}, org:{id} or company:{id}",
            "UNKNOWN_ROOM",
        )
        for i, room in enumerate(rooms)
        if not ROOM.fullmatch(room)
    ]
    if bad:
        raise InvalidArgument(bad, "unknown room", reason="UNKNOWN_ROOM")
    return list(dict.fromkeys(rooms))


def room_resource(tenant_id: str, room: str) -> Resource:
    """The resource a room is authorized as (the data it shows)."""
    if room == "tenant":
        return Resource.tenant_data(tenant_id)
    kind, _, ident = room.partition(":")
    if kind == "user":
        return Resource.user_space(tenant_id, ident)
    return Resource.unit(tenant_id, UNIT_ROOMS[kind], ident)


@functools.lru_cache(maxsize=16384)
def entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id as a comparable ``(ms, seq)`` (cached: every subscriber of a replica
    compares the same entries).

    Raises:
        ValueError: Not ``{ms}-{seq}``.
    """
    m = ENTRY_ID.fullmatch(entry_id)
    if not m:
        raise ValueError(f"not a stream entry id: {entry_id!r}")
    return int(m.group(1)), int(m.group(2))


def encode_cursor(entry_id: str) -> str:
    """The opaque cursor of a stream entry id."""
    raw = (CURSOR_VERSION + entry_id).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, field: str = "after_cursor") -> str:
    """The stream entry id of a cursor.

    Raises:
        InvalidArgument: Not a cursor this service issued (reason ``MALFORMED_CURSOR``).
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raw = ""
    entry_id = raw.removeprefix(CURSOR_VERSION)
    if not raw.startswith(CURSOR_VERSION) or not ENTRY_ID.fullmatch(entry_id):
        raise InvalidArgument(
            [FieldViolation(field, "a cursor from this API", "MALFORMED_CURSOR")],
            "malformed cursor",
            reason="MALFORMED_CURSOR",
        )
    return entry_id


def predecessor(entry_id: str) -> str:
    """The largest entry id below ``entry_id`` (resuming after it starts at ``entry_id``)."""
    ms, seq = entry_key(entry_id)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{2**64 - 1}" if ms else "0-0"


EVENT_TYPES: Sequence[tuple[str, int]] = (
    # Operational events of every service (usage reports, anomaly alerts) are not changes of
    # memories or knowledge: never delivered (0).
    ("memory.usage.", 0),
    ("memory.anomaly.", 0),
    ("knowledge.usage.", 0),
    ("knowledge.anomaly.", 0),
    ("memory.created", res.EVENT_TYPE_MEMORY_ADDED),
    ("memory.batch_created", res.EVENT_TYPE_MEMORY_ADDED),
    ("memory.deleted", res.EVENT_TYPE_MEMORY_DELETED),
    ("memory.purged", res.EVENT_TYPE_MEMORY_DELETED),
    ("memory.", res.EVENT_TYPE_MEMORY_UPDATED),
    ("knowledge.", res.EVENT_TYPE_KNOWLEDGE_UPDATED),
    ("governance.policy.", res.EVENT_TYPE_POLICY_CHANGED),
    ("governance.suppression.", res.EVENT_TYPE_POLICY_CHANGED),
    ("governance.approval_request.decided", res.EVENT_TYPE_APPROVAL_DECIDED),
    ("sync.presence.", res.EVENT_TYPE_PRESENCE),
)
"""Bus event type (exact, or a prefix ending in ``.``) → live event type; the first match
wins. Other events (org units, role bindings, …) are not delivered; they still move the
subscriber's cursor (keepalives carry it)."""


def live_type(event_type: str) -> int:
    """The live :class:`EventType` number of a bus event type, or 0 when not delivered."""
    for pattern, live in EVENT_TYPES:
        if event_type == pattern or (pattern.endswith(".") and event_type.startswith(pattern)):
            return live
    return 0


def _unit_id(value: Any) -> str:
    """``p1`` from ``tenants/t/orgUnits/p1`` or ``p1``."""
    return str(value).rsplit("/", 1)[-1] if value else ""


@dataclass(frozen=True, slots=True)
class Routed:
    """Where a bus event goes.

    Attributes:
        live_type: Live event type number (0: not delivered).
        rooms: Rooms it belongs to (``tenant`` always).
    """

    live_type: int
    rooms: frozenset[str]


def route(event_type: str, payload: Mapping[str, Any]) -> Routed:
    """The live type and rooms of a bus event from its type and payload (never a lookup).

    Memory events carry the memory's ``layer`` and scope identifiers; knowledge events the
    item's ``layer`` and ``org_unit``; governance policy and approval events their unit when
    they have one (``org_unit``/``unit_id``); presence events their ``room``.
    """
    rooms = {"tenant"}
    kind = live_type(event_type)
    if event_type.startswith("memory."):
        layer = payload.get("layer")
        if isinstance(layer, int) and layer in MEMORY_LAYER_ROOM:
            ident = payload.get(MEMORY_SCOPE_FIELD[layer])
            if ident:
                rooms.add(f"{MEMORY_LAYER_ROOM[layer]}:{ident}")
        elif payload.get("user_id"):
            rooms.add(f"user:{payload['user_id']}")
    elif event_type.startswith("knowledge."):
        room = KNOWLEDGE_LAYER_ROOM.get(str(payload.get("layer", "")))
        unit = _unit_id(payload.get("org_unit"))
        if room and unit:
            rooms.add(f"{room}:{unit}")
    elif event_type.startswith("sync.presence."):
        room = str(payload.get("room", ""))
        if ROOM.fullmatch(room):
            rooms.add(room)
    elif event_type.startswith("governance."):
        unit = _unit_id(payload.get("org_unit") or payload.get("unit_id") or "")
        unit_kind = str(payload.get("unit_kind", "")).lower()
        for kind_name in UNIT_ROOMS:
            if unit and unit_kind.startswith(kind_name):
                rooms.add(f"{kind_name}:{unit}")
    return Routed(kind, frozenset(rooms))


def matching(rooms: Iterable[str], routed: Routed) -> list[str]:
    """The subscription's rooms an event belongs to, in the subscription's order."""
    return [r for r in rooms if r in routed.rooms]
