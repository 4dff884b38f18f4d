"""Rooms, cursors and the routing of bus events (pure functions)."""

from __future__ import annotations

import pytest
from aeterna.sync.v1 import resources_pb2 as res
from aeterna_common.authz import Resource, UnitKind
from aeterna_common.errors import InvalidArgument
from aeterna_sync.rooms import (
    decode_cursor,
    encode_cursor,
    entry_key,
    parse_rooms,
    predecessor,
    room_resource,
    route,
)


def test_cursor_round_trip_and_malformed_cursors() -> None:
    assert decode_cursor(encode_cursor("1700000000000-7")) == "1700000000000-7"
    for bad in ("", "x", encode_cursor("1-2")[:-2], "djE6YWJj", "%%%"):  # djE6YWJj = "v1:abc"
        with pytest.raises(InvalidArgument) as caught:
            decode_cursor(bad)
        assert caught.value.reason == "MALFORMED_CURSOR"


def test_predecessor_is_the_largest_smaller_entry_id() -> None:
    assert predecessor("5-3") == "5-2"
    assert entry_key(predecessor("5-0")) < entry_key("5-0") < entry_key("5-1")
    assert predecessor("0-0") == "0-0"


def test_rooms_are_validated_and_deduplicated() -> None:
    assert parse_rooms(["team:a", "tenant", "team:a"], 16) == ["team:a", "tenant"]
    for rooms in ([], ["team:"], ["galaxy:x"], ["team:a b"], ["x"] * 17):
        with pytest.raises(InvalidArgument):
            parse_rooms(rooms, 16)


def test_room_resources() -> None:
    assert room_resource("t", "tenant") == Resource.tenant_data("t")
    assert room_resource("t", "user:u") == Resource.user_space("t", "u")
    assert room_resource("t", "org:eng") == Resource.unit("t", UnitKind.ORGANIZATION, "eng")


def test_routing_by_payload_never_by_lookup() -> None:
    assert route("memory.created", {"layer": 5, "team_id": "a"}).rooms == {"tenant", "team:a"}
    assert route("memory.updated", {"layer": 3, "user_id": "u"}).rooms == {"tenant", "user:u"}
    knowledge = route(
        "knowledge.created", {"layer": "KNOWLEDGE_LAYER_ORG", "org_unit": "tenants/t/orgUnits/eng"}
    )
    assert knowledge.rooms == {"tenant", "org:eng"}
    assert knowledge.live_type == res.EVENT_TYPE_KNOWLEDGE_UPDATED
    assert route("memory.deleted", {}).live_type == res.EVENT_TYPE_MEMORY_DELETED
    assert route("memory.feedback_recorded", {}).live_type == res.EVENT_TYPE_MEMORY_UPDATED
    for operational in ("memory.usage.reported", "knowledge.anomaly.detected"):
        assert route(operational, {}).live_type == 0
    assert route("governance.policy.created", {}).live_type == res.EVENT_TYPE_POLICY_CHANGED
    decided = route("governance.approval_request.decided", {})
    assert decided.live_type == res.EVENT_TYPE_APPROVAL_DECIDED
    assert route("governance.role_binding.created", {}).live_type == 0
    assert route("sync.presence.joined", {"room": "team:a"}).rooms == {"tenant", "team:a"}
