"""Writes that need not delay an answer run after it, as tasks of their own.

A search's bookkeeping (access counts for promotion and decay, usage for billing) is read
minutes or hours later; waiting for its transaction would add its database round trips to
every search's latency. :class:`AfterAnswer` starts each such write as a task, keeps a
reference to it (the event loop holds only weak references to tasks, see
``asyncio.create_task``), logs a failure instead of raising it (the caller has its answer),
and waits for the pending ones when the service stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("aeterna.after_answer")


class AfterAnswer:
    """Background writes of one component, drained at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, write: Coroutine[Any, Any, None], event: str, **fields: Any) -> None:
        """Run ``write`` as a task; a failure is logged as ``event`` with ``fields``.

        Args:
            write: The write (a coroutine not yet awaited).
            event: Log event of a failure (e.g. ``search.usage_not_written``).
            **fields: Log fields of a failure (tenant, counts; never content).
        """
        task = asyncio.get_running_loop().create_task(self._run(write, event, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _run(write: Coroutine[Any, Any, None], event: str, fields: dict[str, Any]) -> None:
        try:
            await write
        except Exception as exc:
            log.warning(event, error=type(exc).__name__, **fields)

    @property
    def pending(self) -> int:
        """Writes started and not yet finished."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every pending write has finished (at shutdown; failures are logged)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
