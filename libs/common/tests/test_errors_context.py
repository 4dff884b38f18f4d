from __future__ import annotations

import grpc
import pytest
from aeterna_common.context import is_identifier, principal_from_claims
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


def test_principal_from_claims() -> None:
    p = principal_from_claims(
        {
            "tenant": "acme-update",
            "sub": "alice@x.io",
            "agent": "bot-1",
            "roles": "developer, TECH_LEAD",
        }
    )
    assert p.tenant_id == "acme-update" and p.agent_id == "bot-1" and not p.is_service
    assert p.roles == frozenset({"DEVELOPER", "TECH_LEAD"})
    assert p.actor == "users/alice@x.io/agents/bot-1"
    assert principal_from_claims(
        {"tenant": "a", "sub": "u", "roles": ["reader", "SERVICE"]}
    ).roles == {
        "READER",
        "SERVICE",
    }
    service = principal_from_claims({"sub": "service:memory", "roles": "SERVICE"})
    assert service.is_service and service.tenant_id == ""
    assert service.actor == "services/memory"
    # Acting in a request's tenant, it is still the service, never a user of that tenant.
    acting = service.acting_in("acme")
    assert acting.is_service and acting.tenant_id == "acme" and acting.actor == "services/memory"
    assert principal_from_claims({"tenant": "acme", "sub": "u"}).acting_in("other").tenant_id == (
        "acme"
    )
    with pytest.raises(Unauthenticated) as missing:
        principal_from_claims({"tenant": "acme"})
    assert missing.value.reason == "TOKEN_CLAIM_MISSING"
    for claims, claim in (
        ({"tenant": "a" * 101, "sub": "u"}, "tenant"),
        ({"tenant": "a", "sub": 7}, "sub"),
        ({"tenant": "a", "sub": "u", "agent": "a/b"}, "agent"),
        ({"tenant": "a", "sub": "u", "roles": "bad-role"}, "roles"),
        ({"tenant": "a", "sub": "u", "roles": {"x": 1}}, "roles"),
        ({"tenant": "a", "sub": "u", "roles": ["ok", 3]}, "roles"),
    ):
        with pytest.raises(Unauthenticated) as info:
            principal_from_claims(claims)
        assert (info.value.reason, info.value.metadata) == ("TOKEN_CLAIM_INVALID", {"claim": claim})


@pytest.mark.parametrize(
    "value",
    [
        "auth0|abc123",
        "google-oauth2|1098",
        "alice+x@example.com",
        "3f2b8c1e-9d4a-4e8f-b1c2-0a9d8e7f6c5b",
        "system:serviceaccount:aeterna:memory",
        "josé",
        "x" * 255,
    ],
)
def test_identifiers_accept_identity_provider_subjects(value: str) -> None:
    assert is_identifier(value)


@pytest.mark.parametrize(
    "value", ["", "x" * 256, "a b", "a\tb", "a\nb", "\x00", "\x7f", "a\u202eb", "a\u200bb", "a/b"]
)
def test_identifiers_reject_control_characters_and_long_ids(value: str) -> None:
    assert not is_identifier(value)
