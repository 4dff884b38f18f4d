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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

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


class ReadYourWrites(grpc.aio.UnaryUnaryClientInterceptor):
    """Client interceptor: session consistency on one channel.

    Remembers the highest consistency token the channel's write responses carried and sends
    it with every later call that carries none, so each read on the channel sees every
    write made through it, on any replica. Writes ignore the token.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self._position = -1

    def observe(self, token: str) -> None:
        """Keep ``token`` if it names a later position than the one kept.

        Raises:
            InvalidArgument: The token is malformed.
        """
        position = decode_token(token)
        if position > self._position:
            self._position, self.token = position, token

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        """Attach the kept token, make the call, and keep the token of its answer."""
        details = client_call_details
        pairs = list(details.metadata or ())
        if self.token is not None and all(k != CONSISTENCY_TOKEN_KEY for k, _ in pairs):
            pairs.append((CONSISTENCY_TOKEN_KEY, self.token))
            details = grpc.aio.ClientCallDetails(
                method=details.method,
                timeout=details.timeout,
                metadata=grpc.aio.Metadata(*pairs),
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            )
        call = await continuation(details, request)
        try:
            initial = await call.initial_metadata()
        except grpc.aio.AioRpcError:
            return call
        for key, value in initial or ():
            if key == CONSISTENCY_TOKEN_KEY:
                self.observe(value.decode() if isinstance(value, bytes) else str(value))
        return call
