"""Errors of governance beyond :mod:`aeterna_common.errors`."""

from __future__ import annotations

from collections.abc import Sequence

from aeterna_common.errors import FailedPrecondition, FieldViolation
from google.protobuf import any_pb2
from google.rpc import error_details_pb2


class PreconditionViolated(FailedPrecondition):
    """``FAILED_PRECONDITION`` naming the request fields whose value the stored state refuses
    (e.g. a delegation chain too deep): an ``ErrorInfo`` plus a ``BadRequest`` with one
    violation per field, like :class:`aeterna_common.errors.InvalidArgument`.

    Args:
        violations: The refused fields; at least one.
        message: Overall message; defaults to a join of the violations.
    """

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        if not violations:
            raise ValueError("PreconditionViolated needs at least one field violation")
        self.violations = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(text, reason=violations[0].reason or None)

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
