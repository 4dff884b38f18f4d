"""Transactions of the governance service: the outbox, idempotency keys and the write runner
of :mod:`aeterna_common.writes`, with governance's LISTEN/NOTIFY channel."""

from __future__ import annotations

from typing import Any

import asyncpg
from aeterna_common import writes
from aeterna_common.writes import (
    M,
    Work,
    WriteKey,
    gc_idempotency_keys,
    latest_position,
    request_hash,
    run_write,
)

__all__ = [
    "NOTIFY_CHANNEL",
    "M",
    "Work",
    "WriteKey",
    "append_event",
    "gc_idempotency_keys",
    "latest_position",
    "request_hash",
    "run_write",
]

NOTIFY_CHANNEL = "aeterna_governance_changes"
"""LISTEN/NOTIFY channel woken by every outbox append; the payload is the last position."""


async def append_event(
    conn: asyncpg.Connection,
    tenant_id: str,
    event_type: str,
    resource: str,
    actor: str,
    payload: dict[str, Any] | None = None,
) -> int:
    """:func:`aeterna_common.writes.append_event` on :data:`NOTIFY_CHANNEL`."""
    return await writes.append_event(
        conn, NOTIFY_CHANNEL, tenant_id, event_type, resource, actor, payload
    )
