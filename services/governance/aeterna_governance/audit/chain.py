"""Audit entries, their canonical form and hash, and events as they arrive.

An entry's hash is the hex SHA-256 of its canonical form: the RFC 8785 (JSON
Canonicalization Scheme) serialisation, in UTF-8, of the JSON object

``{"tenant", "sequence", "event_id", "event_type", "service", "resource", "actor",
"event_time", "append_time", "payload", "previous_hash"}``

with times as RFC 3339 UTC strings with six fractional digits (``2026-11-30T16:00:00.000000Z``,
PostgreSQL's precision), ``sequence`` a number and ``payload`` the event's JSON object.
``previous_hash`` is the previous entry's hash, :data:`GENESIS_HASH` for the first, so
changing any entry changes every hash after it. RFC 8785 fixes key order, whitespace,
string escapes and number formatting, so any implementation can recompute the hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import rfc8785

GENESIS_HASH = "0" * 64
"""``previous_hash`` of a tenant's first entry."""

ENVELOPE_FIELDS = ("event_id", "service", "type", "tenant", "resource", "actor", "time", "payload")
"""Envelope fields an audit entry needs (the event envelope contract; ``position`` and
``traceparent`` are not kept)."""

MAX_EVENT_ID_CHARS = 200
"""Longest event id (``audit_entries.event_id``'s CHECK)."""

MAX_PAYLOAD_BYTES = 64 << 10
"""Largest event payload kept, in bytes of JSON (events carry no content, only ids and
changed fields)."""


class InvalidEventError(ValueError):
    """An envelope that cannot become an audit entry (a missing field, a payload that is not
    an I-JSON object, a bad time); appending it again can never succeed."""


@dataclass(frozen=True, slots=True)
class Event:
    """An event to append, parsed from its envelope.

    Attributes:
        tenant: The tenant id.
        event_id: ``{service}:{position}``, the idempotency key.
        event_type: E.g. ``memory.created``.
        service: The producing service.
        resource: The resource the event is about.
        actor: Who caused it, or empty.
        event_time: The producer's commit time (aware, microseconds).
        payload: Canonical JSON text of the payload object (RFC 8785).
    """

    tenant: str
    event_id: str
    event_type: str
    service: str
    resource: str
    actor: str
    event_time: datetime
    payload: str


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored entry of a tenant's chain.

    Attributes:
        tenant: The tenant id.
        sequence: Position in the chain, from 1.
        event_id: The event id.
        event_type: The event type.
        service: The producing service.
        resource: The resource.
        actor: The actor.
        event_time: The producer's commit time.
        append_time: When it was appended (PostgreSQL's clock).
        payload: Canonical JSON text of the payload.
        previous_hash: Hash of the entry before, or :data:`GENESIS_HASH`.
        hash: This entry's hash as stored.
    """

    tenant: str
    sequence: int
    event_id: str
    event_type: str
    service: str
    resource: str
    actor: str
    event_time: datetime
    append_time: datetime
    payload: str
    previous_hash: str
    hash: str


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_payload(payload: Any) -> str:
    """RFC 8785 text of a payload object.

    Raises:
        InvalidEventError: Not an object, or not I-JSON (an integer beyond ±2^53, NaN).
    """
    if not isinstance(payload, dict):
        raise InvalidEventError("payload is not a JSON object")
    try:
        text = rfc8785.dumps(payload).decode("utf-8")
    except rfc8785.CanonicalizationError as exc:
        raise InvalidEventError(f"payload is not I-JSON: {exc}") from None
    if "\\u0000" in text:  # PostgreSQL's jsonb (the column's CHECK) refuses NUL
        raise InvalidEventError("payload holds a NUL character")
    return text


def canonical_form(event: Event, sequence: int, append_time: datetime, previous_hash: str) -> bytes:
    """The bytes an entry's hash covers (see the module docstring)."""
    return rfc8785.dumps(
        {
            "tenant": event.tenant,
            "sequence": sequence,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "service": event.service,
            "resource": event.resource,
            "actor": event.actor,
            "event_time": rfc3339(event.event_time),
            "append_time": rfc3339(append_time),
            "payload": json.loads(event.payload),
            "previous_hash": previous_hash,
        }
    )


def entry_hash(event: Event, sequence: int, append_time: datetime, previous_hash: str) -> str:
    """Hex SHA-256 of :func:`canonical_form`."""
    return hashlib.sha256(canonical_form(event, sequence, append_time, previous_hash)).hexdigest()


def recompute(record: AuditRecord) -> str:
    """The hash a stored entry should have, from its stored fields."""
    event = Event(
        record.tenant,
        record.event_id,
        record.event_type,
        record.service,
        record.resource,
        record.actor,
        record.event_time,
        record.payload,
    )
    try:
        return entry_hash(event, record.sequence, record.append_time, record.previous_hash)
    except (ValueError, rfc8785.CanonicalizationError):
        return ""  # a payload altered into something that is not I-JSON hashes to nothing


def parse_envelope(fields: Mapping[str, str]) -> Event:
    """An event from its stream envelope (all fields strings, the envelope contract).

    Args:
        fields: The entry's fields, decoded.

    Returns:
        The event; the payload canonicalised, the time at microsecond precision.

    Raises:
        InvalidEventError: A field is missing or empty (``actor`` may be empty) or holds a
            NUL (PostgreSQL text cannot), the event id is longer than
            :data:`MAX_EVENT_ID_CHARS`, the payload is not an I-JSON object of at most
            :data:`MAX_PAYLOAD_BYTES`, or the time is not RFC 3339 with a zone.
    """
    missing = [f for f in ENVELOPE_FIELDS if f not in fields]
    empty = [f for f in ENVELOPE_FIELDS if f != "actor" and f in fields and not fields[f]]
    if missing or empty:
        raise InvalidEventError(f"envelope lacks {', '.join(missing + empty)}")
    if any("\x00" in fields[f] for f in ENVELOPE_FIELDS):
        raise InvalidEventError("envelope field holds a NUL character")
    if len(fields["event_id"]) > MAX_EVENT_ID_CHARS:
        raise InvalidEventError(f"event_id longer than {MAX_EVENT_ID_CHARS} characters")
    if len(fields["payload"]) > MAX_PAYLOAD_BYTES:
        raise InvalidEventError(f"payload over {MAX_PAYLOAD_BYTES} bytes")
    try:
        payload = json.loads(fields["payload"])
        event_time = datetime.fromisoformat(fields["time"])
    except ValueError as exc:
        raise InvalidEventError(f"malformed envelope: {exc}") from None
    if event_time.tzinfo is None:
        raise InvalidEventError("time has no zone")
    return Event(
        tenant=fields["tenant"],
        event_id=fields["event_id"],
        event_type=fields["type"],
        service=fields["service"],
        resource=fields["resource"],
        actor=fields["actor"],
        event_time=event_time.astimezone(UTC),
        payload=canonical_payload(payload),
    )
