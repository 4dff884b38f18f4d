"""One error hierarchy for every service, mapped to ``google.rpc.Status`` in one place.

Domain code raises these; :mod:`aeterna_common.interceptors` turns them into a gRPC status
with an ``ErrorInfo`` detail (stable ``reason``, domain :data:`ERROR_DOMAIN`) and, for
:class:`InvalidArgument`, a ``BadRequest`` detail listing field violations
(https://google.aip.dev/193). Outages of a dependency (:func:`outage`: PostgreSQL unreachable
or shutting down, the embedding backend unreachable or overloaded) become ``UNAVAILABLE`` with
reason ``DATABASE_UNAVAILABLE`` or ``EMBEDDING_UNAVAILABLE``, which clients and Envoy may
retry. Anything else becomes ``INTERNAL`` without its message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from aeterna_common.embedding.port import EmbeddingUnavailableError

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


def _bad_request(violations: Sequence[FieldViolation]) -> any_pb2.Any:
    """A packed ``BadRequest`` with one field violation per entry."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=v.field, description=v.description, reason=v.reason
            )
            for v in violations
        ]
    )
    packed = any_pb2.Any()
    packed.Pack(bad)
    return packed


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
        return [*super().details(), _bad_request(self.violations)]


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


class PreconditionViolated(FailedPrecondition):
    """``FAILED_PRECONDITION`` naming the request fields whose value the stored state refuses
    (e.g. a delegation chain too deep, a section missing from an item proposed for review):
    an ``ErrorInfo`` plus a ``BadRequest`` with one violation per field, like
    :class:`InvalidArgument`.

    Args:
        violations: The refused fields; at least one.
        message: Overall message; defaults to a join of the violations.
        metadata: Extra ``ErrorInfo.metadata``.
    """

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        message: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not violations:
            raise ValueError("PreconditionViolated needs at least one field violation")
        self.violations = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(text, reason=violations[0].reason or None, metadata=metadata)

    def details(self) -> list[any_pb2.Any]:
        """``ErrorInfo`` and ``BadRequest`` details."""
        return [*super().details(), _bad_request(self.violations)]


class Aborted(AeternaError):
    """A concurrency conflict; the client may retry the whole sequence (``ABORTED``)."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class ResourceExhausted(AeternaError):
    """A quota or rate limit was hit (``RESOURCE_EXHAUSTED``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class OutOfRange(AeternaError):
    """A position past the valid range, e.g. a cursor older than a stream's retention
    (``OUT_OF_RANGE``)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Unimplemented(AeternaError):
    """A method the contract declares and this version does not serve (``UNIMPLEMENTED``)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


class Unavailable(AeternaError):
    """A dependency is down; retrying later may succeed (``UNAVAILABLE``)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


def internal_status() -> status_pb2.Status:
    """The status returned for an unexpected exception: no internals leak."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[info])


DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
"""``ErrorInfo.reason`` of a request that failed because PostgreSQL could not be reached."""

EMBEDDING_UNAVAILABLE = "EMBEDDING_UNAVAILABLE"
"""``ErrorInfo.reason`` of a request that failed because the embedding backend could not be
reached or was overloaded."""

_DATABASE_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.ConnectionDoesNotExistError,  # the connection dropped mid-call
)
"""asyncpg errors that mean the server is down, restarting or out of connections
(PostgreSQL Appendix A, error codes), not that the statement was wrong."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_in(exc: BaseException, package: str) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module == package or module.startswith(f"{package}."):
            return True
        tb = tb.tb_next
    return False


def outage(exc: BaseException) -> Unavailable | None:
    """The ``UNAVAILABLE`` error that an unexpected exception stands for, if it is an outage.

    Looks at the exception and its causes: an embedding backend that cannot be reached
    (:class:`~aeterna_common.embedding.port.EmbeddingUnavailableError`) gives reason
    ``EMBEDDING_UNAVAILABLE``; PostgreSQL down, restarting or out of connections (the
    asyncpg errors of :data:`_DATABASE_OUTAGES`, or an ``OSError``/``TimeoutError`` raised
    while asyncpg connects) gives ``DATABASE_UNAVAILABLE``. Errors of the request itself
    (constraint violations, bad SQL) are not outages.

    Args:
        exc: An exception a handler raised that is not an :class:`AeternaError`.

    Returns:
        The error to answer with, or ``None`` when ``exc`` is not an outage (then it is
        ``INTERNAL``).
    """
    for e in _chain(exc):
        if isinstance(e, EmbeddingUnavailableError):
            return Unavailable(
                "the embedding service is unavailable; retry later",
                reason=EMBEDDING_UNAVAILABLE,
            )
        if isinstance(e, _DATABASE_OUTAGES) or (
            isinstance(e, (OSError, TimeoutError)) and _raised_in(e, "asyncpg")
        ):
            return Unavailable(
                "the database is unavailable; retry later", reason=DATABASE_UNAVAILABLE
            )
    return None
