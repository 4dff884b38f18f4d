"""The event envelope on Redis Streams, shared by every producer and consumer.

Stream key per tenant ``events:{tenant}``; dead letters ``events:{tenant}:dead``; the SET
``events:streams`` lists every tenant stream (the relay adds each key it writes), so
consumers discover streams without ``SCAN``. Every entry carries the string fields of
:class:`Event`; ``event_id`` (``{service}:{position}``) is stable across re-publication and
is the consumers' idempotency key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import propagate

STREAMS_KEY = "events:streams"
"""Redis SET of the tenant stream keys written so far."""

STREAM_PREFIX = "events:"
DEAD_SUFFIX = ":dead"

FIELDS = (
    "event_id",
    "service",
    "type",
    "tenant",
    "resource",
    "actor",
    "time",
    "position",
    "payload",
    "traceparent",
)
"""The envelope's fields, in the order they are written."""

AUTHZ_INVALIDATING_PREFIXES = (
    "governance.org_unit.",
    "governance.role_binding.",
    "governance.delegation.",
)
"""Event types with these prefixes invalidate their tenant's authorization cache."""


class MalformedEventError(ValueError):
    """A stream entry lacks envelope fields or holds invalid values."""


def stream_key(tenant: str) -> str:
    """The stream of ``tenant``'s events: ``events:{tenant}``."""
    return f"{STREAM_PREFIX}{tenant}"


def dead_letter_key(stream: str) -> str:
    """The dead-letter stream beside a tenant stream: ``events:{tenant}:dead``."""
    return f"{stream}{DEAD_SUFFIX}"


def rfc3339(moment: datetime) -> str:
    """``moment`` as RFC 3339 UTC with microseconds and a ``Z`` suffix.

    Raises:
        ValueError: ``moment`` is naive (no time zone).
    """
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no defined instant")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span (empty without one), for an outbox row
    written while handling a traced request."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


@dataclass(frozen=True, slots=True)
class Event:
    """One event as carried on a tenant stream.

    Attributes:
        event_id: ``{service}:{position}``, globally unique and stable across
            re-publication: the idempotency key of every consumer.
        service: Producing service (``memory``, ``governance``, ``knowledge``, ``sync``).
        type: Dotted, service-prefixed, lower case (``memory.created``).
        tenant: Tenant id.
        resource: Resource name the event is about (``tenants/t/memories/<uuid>``).
        actor: ``users/{u}``, ``users/{u}/agents/{a}`` or ``services/{name}``; empty when
            unknown.
        time: RFC 3339 UTC commit time of the outbox row.
        position: Outbox position in the producing service.
        payload: JSON object (never memory content).
        traceparent: W3C trace context, or empty.
    """

    event_id: str
    service: str
    type: str
    tenant: str
    resource: str
    actor: str
    time: str
    position: int
    payload: dict[str, Any]
    traceparent: str = ""

    def to_fields(self) -> dict[str, str]:
        """The entry's fields, all strings, as XADD writes them."""
        return {
            "event_id": self.event_id,
            "service": self.service,
            "type": self.type,
            "tenant": self.tenant,
            "resource": self.resource,
            "actor": self.actor,
            "time": self.time,
            "position": str(self.position),
            "payload": json.dumps(self.payload, separators=(",", ":"), sort_keys=True),
            "traceparent": self.traceparent,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Event:
        """Parse a stream entry's fields.

        Raises:
            MalformedEventError: A field is missing, ``position`` is not a decimal integer,
                ``payload`` is not a JSON object, or ``event_id`` is not
                ``{service}:{position}``.
        """
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise MalformedEventError(f"missing fields: {', '.join(missing)}")
        try:
            position = int(fields["position"])
            payload = json.loads(fields["payload"])
        except ValueError as exc:
            raise MalformedEventError(f"invalid position or payload: {exc}") from exc
        if not isinstance(payload, dict):
            raise MalformedEventError("payload is not a JSON object")
        if fields["event_id"] != f"{fields['service']}:{position}":
            raise MalformedEventError("event_id is not {service}:{position}")
        return cls(
            event_id=fields["event_id"],
            service=fields["service"],
            type=fields["type"],
            tenant=fields["tenant"],
            resource=fields["resource"],
            actor=fields["actor"],
            time=fields["time"],
            position=position,
            payload=payload,
            traceparent=fields["traceparent"],
        )

    @property
    def invalidates_authorization(self) -> bool:
        """Whether this event invalidates its tenant's authorization cache."""
        return self.type.startswith(AUTHZ_INVALIDATING_PREFIXES)
