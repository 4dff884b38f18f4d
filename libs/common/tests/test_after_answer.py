"""Writes run after the answer: started at once, never raised, drained at shutdown."""

from __future__ import annotations

import asyncio

from aeterna_common.after_answer import AfterAnswer
from structlog.testing import capture_logs


async def test_writes_run_after_the_caller_returns_and_drain_waits_for_them() -> None:
    after = AfterAnswer()
    gate = asyncio.Event()
    done: list[str] = []

    async def write(name: str) -> None:
        await gate.wait()
        done.append(name)

    async def failing() -> None:
        await gate.wait()
        raise ConnectionError("database gone")

    after.spawn(write("a"), "test.not_written", tenant="t1")
    after.spawn(failing(), "test.not_written", tenant="t2")
    after.spawn(write("b"), "test.not_written", tenant="t3")
    await asyncio.sleep(0)
    assert after.pending == 3 and done == []  # the caller was not held up
    with capture_logs() as logs:
        gate.set()
        await after.drain()
    assert sorted(done) == ["a", "b"] and after.pending == 0
    assert logs == [
        {
            "event": "test.not_written",
            "log_level": "warning",
            "error": "ConnectionError",
            "tenant": "t2",
        }
    ]
