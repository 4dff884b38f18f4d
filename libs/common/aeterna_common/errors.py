"""One error hierarchy for every service, mapped to ``google.rpc.Status`` in one place.

Domain code raises these; :mod:`aeterna_common.interceptors` turns them into a gRPC status
with an ``ErrorInfo`` detail (stable ``reason``, domain :data:`ERROR_DOMAIN`) and, for
:class:`InvalidArgument`, a ``BadRequest`` detail listing field violations
(https://google.aip.dev/193). Anything else becomes ``INTERNAL`` without its message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "aeterna.dev"
"""``ErrorInfo.domain`` of every error this project raises."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field.

    Attributes:
        field: Path of the field in the request, e.g. ``memory.scope.user_id``.
        description: What is wrong, for a human.
        reason: Optional stable UPPER_SNAKE code, e.g. ``MISSING_IDENTIFIER``.
    """

    field: str
    description: str
    reason: str = ""


class AeternaError(Exception):
    """Base of every error a service returns on purpose.

    Args:
        message: Human-readable message, safe to show to the caller.
        reason: Stable UPPER_SNAKE ``ErrorInfo.reason``; defaults to the class's.
        metadata: Extra ``ErrorInfo.metadata`` (string to string), e.g. the resource name.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        """Status details of this error: an ``ErrorInfo`` plus any subclass extras."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` of this error."""
        code_value: int = self.code.value[0]
        return status_pb2.Status(code=code_value, message=self.message, details=self.details())


class InvalidArgument(AeternaError):
    """The request is malformed: ``INVALID_ARGUMENT`` with a ``BadRequest`` detail.

    Args:
        violations: The invalid fields; at least one.
        message: Overall message; defaults to a join of the violations.
        reason: ``ErrorInfo.reason``; defaults to the first violation's reason or
            ``INVALID_ARGUMENT``.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        message: str | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(text, reason=reason or violations[0].reason or None)

    def details(self) -> list[any_pb2.Any]:
        """``ErrorInfo`` and ``BadRequest`` details."""
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description, reason=v.reason
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [*super().details(), packed]


class Unauthenticated(AeternaError):
    """No valid caller identity (``UNAUTHENTICATED``)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AeternaError):
    """The caller may not do this (``PERMISSION_DENIED``); raised before any lookup."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NotFound(AeternaError):
    """The resource does not exist for this caller (``NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(AeternaError):
    """The resource exists already (``ALREADY_EXISTS``)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AeternaError):
    """The system is not in a state that allows this (``FAILED_PRECONDITION``)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(AeternaError):
    """A concurrency conflict; the client may retry the whole sequence (``ABORTED``)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(AeternaError):
    """A quota or rate limit was hit (``RESOURCE_EXHAUSTED``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(AeternaError):
    """A dependency is down; retrying later may succeed (``UNAVAILABLE``)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


def internal_status() -> status_pb2.Status:
    """The status returned for an unexpected exception: no internals leak."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[info])
