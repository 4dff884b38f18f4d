"""Helpers of the audit log tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable


def envelope(tenant: str, n: int, **extra: str) -> dict[str, str]:
    """An event envelope (all fields strings), the n-th of memory's outbox."""
    return {
        "event_id": f"memory:{n}",
        "service": "memory",
        "type": "memory.created",
        "tenant": tenant,
        "resource": f"tenants/{tenant}/memories/m{n}",
        "actor": "users/alice",
        "time": "2026-11-30T16:00:00.123456789Z",
        "position": str(n),
        "payload": json.dumps({"layer": "USER", "n": n, "ratio": 0.1 * n}),
        "traceparent": "",
        **extra,
    }


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``check`` every 50 ms until it holds; fail after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)
