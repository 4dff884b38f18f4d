"""What every servicer shares: consistency tokens, the request-id header check, page tokens
and field-mask checks (governance's and knowledge's servicers).

Consistency (``aeterna_common.consistency``): every successful write sends its commit's
consistency token (the outbox position) in initial metadata; reads accept a token and
validate it, and are already consistent with it, since every read is served by PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from aeterna_common.consistency import CONSISTENCY_TOKEN_KEY, encode_token, token_from_metadata
from aeterna_common.errors import FieldViolation, InvalidArgument, PermissionDenied

Ctx = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

REQUEST_ID_KEY = "x-aeterna-request-id"
"""Request metadata a client sends beside a body ``request_id`` (the same value) so that the
edge may retry the write on every transient failure."""

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
"""Page sizes of List methods (https://google.aip.dev/158): 0 means the default; larger
values are coerced to the maximum."""


async def send_token(context: Ctx, position: int) -> None:
    """Send the consistency token of a write's commit in the initial metadata."""
    await context.send_initial_metadata(((CONSISTENCY_TOKEN_KEY, encode_token(position)),))


def check_read_token(context: Ctx) -> None:
    """Validate a read's consistency token, if any (PostgreSQL reads always satisfy it).

    Raises:
        InvalidArgument: The token is malformed.
    """
    token_from_metadata(context.invocation_metadata())


def check_request_id_header(context: Ctx, request_id: str) -> None:
    """Refuse a write whose ``x-aeterna-request-id`` metadata disagrees with its body.

    Raises:
        InvalidArgument: The header is present and the body's ``request_id`` is empty or
            different (field ``request_id``, reason ``REQUEST_ID_MISMATCH``).
    """
    claimed = [v for k, v in context.invocation_metadata() or () if k.lower() == REQUEST_ID_KEY]
    if claimed and (
        not request_id
        or any((v.decode() if isinstance(v, bytes) else v) != request_id for v in claimed)
    ):
        raise InvalidArgument(
            [
                FieldViolation(
                    "request_id",
                    f"{REQUEST_ID_KEY} metadata requires the same request_id in the request",
                    "REQUEST_ID_MISMATCH",
                )
            ]
        )


def caller_authorization(context: Ctx) -> str:
    """The caller's own ``authorization`` header (verified by the server interceptor), to
    forward to another service so that its rules decide as for the caller (a reviewer's
    decision in governance, a device's writes in memory).

    Raises:
        PermissionDenied: The call carried no bearer token (reason ``NO_CALLER_TOKEN``).
    """
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    raise PermissionDenied("no bearer token to forward", reason="NO_CALLER_TOKEN")


def check_request_id(request_id: str) -> None:
    """Refuse a ``request_id`` longer than 128 characters (field ``request_id``)."""
    if len(request_id) > 128:
        raise InvalidArgument(
            [FieldViolation("request_id", "at most 128 characters", "REQUEST_ID_TOO_LONG")]
        )


def page_size(value: int) -> int:
    """The effective page size of a List request.

    Raises:
        InvalidArgument: Negative (field ``page_size``).
    """
    if value < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(after: str, fingerprint: str) -> str:
    """Opaque keyset page token: the last key of the page and the filters it was made for."""
    raw = json.dumps({"a": after, "f": fingerprint})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_page_token(token: str, fingerprint: str) -> str | None:
    """The key after which the page starts, or None for the first page.

    Raises:
        InvalidArgument: The token is malformed or was made for other filters (field
            ``page_token``).
    """
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, made_for = data["a"], data["f"]
        if not isinstance(after, str) or made_for != fingerprint:
            raise ValueError(made_for)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            [FieldViolation("page_token", "malformed, or made for other filters")]
        ) from exc
    return after


def cut_page(
    items: Sequence[T], size: int, fingerprint: str, key: Callable[[T], str]
) -> tuple[list[T], str]:
    """A page of at most ``size`` items from ``size + 1`` fetched, and its next page token.

    Args:
        items: What the keyset query returned (one more than a page, when there is more).
        size: The page size.
        fingerprint: The filters the token is made for.
        key: The keyset key of an item (the last one starts the next page).

    Returns:
        The page and the next page token (empty on the last page).
    """
    page = list(items[:size])
    more = len(items) > size
    return page, encode_page_token(key(page[-1]), fingerprint) if more else ""


def name_id(item: Any) -> str:
    """The last component of a resource's ``name``: the keyset key of most lists."""
    return str(item.name).rsplit("/", 1)[1]


def check_mask(paths: list[str], allowed: set[str]) -> list[str]:
    """The paths of an update mask, each one an updatable field.

    Raises:
        InvalidArgument: Empty or naming a field that cannot be updated (field
            ``update_mask``).
    """
    if not paths:
        raise InvalidArgument(
            [FieldViolation("update_mask", f"required; updatable: {', '.join(sorted(allowed))}")]
        )
    bad = [p for p in paths if p not in allowed]
    if bad:
        raise InvalidArgument(
            [
                FieldViolation(
                    "update_mask",
                    f"cannot update {', '.join(bad)}; updatable: {', '.join(sorted(allowed))}",
                    "FIELD_NOT_UPDATABLE",
                )
            ]
        )
    return paths
