from __future__ import annotations

import grpc
import pytest
from aeterna_common.context import principal_from_metadata
from aeterna_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    internal_status,
)
from google.rpc import code_pb2, error_details_pb2


def test_invalid_argument_status_has_error_info_and_bad_request() -> None:
    err = InvalidArgument([FieldViolation("memory.content", "too long", "CONTENT_TOO_LARGE")])
    status = err.to_status()
    assert status.code == code_pb2.INVALID_ARGUMENT
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert info.reason == "CONTENT_TOO_LARGE" and info.domain == "aeterna.dev"
    assert [(v.field, v.reason) for v in bad.field_violations] == [
        ("memory.content", "CONTENT_TOO_LARGE")
    ]
    with pytest.raises(ValueError):
        InvalidArgument([])


def test_not_found_and_internal() -> None:
    status = NotFound("gone", reason="MEMORY_NOT_FOUND", metadata={"name": "n"}).to_status()
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    internal = internal_status()
    assert internal.code == code_pb2.INTERNAL and internal.message == "internal error"


def test_principal_from_metadata() -> None:
    p = principal_from_metadata(
        [
            ("x-aeterna-tenant", "acme-update"),
            ("x-aeterna-user", "alice@x.io"),
            ("x-aeterna-agent", b"bot-1"),
            ("x-aeterna-roles", "developer, TECH_LEAD"),
        ]
    )
    assert p.tenant_id == "acme-update" and p.agent_id == "bot-1"
    assert p.roles == frozenset({"DEVELOPER", "TECH_LEAD"})
    assert p.actor == "users/alice@x.io/agents/bot-1"
    with pytest.raises(Unauthenticated):
        principal_from_metadata([("x-aeterna-tenant", "acme")])
    with pytest.raises(InvalidArgument) as info:
        principal_from_metadata(
            [
                ("x-aeterna-tenant", "a" * 101),
                ("x-aeterna-user", "u"),
                ("x-aeterna-roles", "bad-role"),
            ]
        )
    fields = [v.field for v in info.value.violations]
    assert fields == ["x-aeterna-tenant", "x-aeterna-roles"]
