"""Consistency tokens: read-your-writes across replicas.

Every write response carries, in its initial metadata under :data:`CONSISTENCY_TOKEN_KEY`, a
token naming the outbox position of the write's commit. A read that sends the token back in
request metadata under the same key is answered only by a replica whose secondary index has
applied that position (it waits, bounded); a replica that cannot reach it answers
``UNAVAILABLE`` with reason :data:`TOKEN_NOT_REACHED`, which Envoy retries on another replica.
A search without a token is served as before and, when the index had not yet applied the
tenant's latest change, marked with :data:`INDEX_STALE_KEY` (and :data:`INDEX_POSITION_KEY`).

The token is opaque to clients: URL-safe base64 (no padding) of a version byte (1) and the
position as an unsigned 64-bit big-endian integer. Anything else is ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable

from aeterna_common.errors import FieldViolation, InvalidArgument

CONSISTENCY_TOKEN_KEY = "x-aeterna-consistency-token"
"""Metadata key of the token, in write responses and read requests (part of the contract)."""

INDEX_STALE_KEY = "x-aeterna-index-stale"
"""Response metadata of a search served without a token by an index that had not applied the
tenant's latest change: ``"true"``."""

INDEX_POSITION_KEY = "x-aeterna-index-position"
"""Response metadata beside :data:`INDEX_STALE_KEY`: the position the index had applied."""

TOKEN_NOT_REACHED = "CONSISTENCY_TOKEN_NOT_REACHED"
"""``ErrorInfo.reason`` when this replica's index did not reach the token's position in time."""

_VERSION = 1
_FORMAT = ">BQ"


def encode_token(position: int) -> str:
    """The consistency token of an outbox position.

    Args:
        position: Outbox position of a commit (>= 0).

    Returns:
        An opaque ASCII token (12 characters for version 1).

    Raises:
        ValueError: ``position`` is negative or does not fit in 64 bits.
    """
    if not 0 <= position < 2**64:
        raise ValueError(f"position out of range: {position}")
    raw = struct.pack(_FORMAT, _VERSION, position)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_token(token: str) -> int:
    """The outbox position a token names.

    Args:
        token: A token made by :func:`encode_token`.

    Returns:
        The position.

    Raises:
        InvalidArgument: The token is malformed or of an unknown version (field
            ``x-aeterna-consistency-token``, reason ``INVALID_CONSISTENCY_TOKEN``).
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, position = struct.unpack(_FORMAT, raw)
        if version != _VERSION:
            raise ValueError(version)
    except (binascii.Error, ValueError, struct.error) as exc:
        raise InvalidArgument(
            [
                FieldViolation(
                    CONSISTENCY_TOKEN_KEY,
                    "malformed consistency token: send back the value a write returned",
                    "INVALID_CONSISTENCY_TOKEN",
                )
            ]
        ) from exc
    return int(position)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The position of the consistency token in call metadata, if there is one.

    Several tokens (e.g. a client merging the tokens of several writes) are allowed: the
    highest position counts.

    Args:
        metadata: Invocation (request) metadata as ``(key, value)`` pairs.

    Returns:
        The position, or ``None`` without a token.

    Raises:
        InvalidArgument: A token is malformed.
    """
    positions = [
        decode_token(value.decode("ascii", "replace") if isinstance(value, bytes) else value)
        for key, value in metadata or ()
        if key.lower() == CONSISTENCY_TOKEN_KEY
    ]
    return max(positions) if positions else None
