"""Parts every outbox follower of an embedded index shares: the cursor file beside the index
and the HNSW graph build on a copy that never blocks searches.

A follower keeps a replica's embedded index (:class:`~aeterna_common.vectors.edge.
EdgeVectorIndex`) equal to PostgreSQL by applying the service's outbox in order. What it
applies is the service's own (memory points, knowledge chunks); how its position is kept and
how its index gets HNSW graphs is the same everywhere, and lives here.

Memory's follower (``aeterna_memory.adapters.index_follower``) still holds its own copies of
:class:`FileCursor`, :class:`CopyBuildIndex` and the build sequence of
:func:`build_graph_on_copy`; knowledge uses these.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, cast

import structlog

from aeterna_common.vectors.port import VectorIndex

log = structlog.get_logger("aeterna.index")


class FileCursor:
    """The applied outbox position in a JSON file beside an embedded index, with the id of
    the database it belongs to (cluster system identifier and database oid), written
    atomically. An index built from another database must be rebuilt, not resumed.

    Args:
        path: The file (its directory must exist).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def load(self, database: str) -> int | None:
        """The stored position.

        Args:
            database: The id of the database the follower reads.

        Returns:
            The position; ``None`` when the file is missing, unreadable or of another
            database.
        """
        try:
            data = json.loads(self.path.read_text())
            if data["database"] != database:
                log.warning("index.other_database", stored=data["database"], now=database)
                return None
            return int(data["position"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    async def save(self, position: int, database: str) -> None:
        """Write via a temporary file and rename (atomic on POSIX), off the event loop (it
        runs after every applied batch; a busy disk must not hold up requests).

        Args:
            position: The applied outbox position.
            database: The id of the database it belongs to.
        """
        await asyncio.to_thread(self._save, position, database)

    def _save(self, position: int, database: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"database": database, "position": position}))
        os.replace(tmp, self.path)


class CopyBuildIndex(VectorIndex, Protocol):
    """An index that builds its search graphs on a copy while it keeps serving
    (:class:`~aeterna_common.vectors.edge.EdgeVectorIndex`)."""

    async def unindexed_points(self) -> int:
        """Points not yet in a search graph."""
        ...

    async def build_copy(self) -> Any:
        """A copy of the live points with its graphs built (an index of the same kind)."""
        ...

    async def swap_in(self, copy: Any) -> None:
        """Serve from ``copy`` from now on."""
        ...

    async def discard(self, copy: Any) -> None:
        """Close and delete a copy that will not be swapped in."""
        ...


def copy_buildable(index: VectorIndex) -> CopyBuildIndex | None:
    """``index`` as a :class:`CopyBuildIndex` when it builds graphs on a copy, else ``None``
    (a Qdrant server builds its own)."""
    methods = ("unindexed_points", "build_copy", "swap_in", "discard")
    return cast(CopyBuildIndex, index) if all(hasattr(index, m) for m in methods) else None


Replay = Callable[[VectorIndex, int, int], Awaitable[int]]
"""``replay(copy, after, upto)``: apply the outbox changes in ``(after, upto]`` to ``copy``
(re-reading current state, so a change applied twice is harmless); returns the position
reached."""


async def build_graph_on_copy(
    index: VectorIndex,
    lock: asyncio.Lock,
    applied: Callable[[], int],
    generation: Callable[[], int],
    replay: Replay,
    min_unindexed: int,
) -> bool:
    """Build the index's HNSW graphs without blocking searches, when at least
    ``min_unindexed`` points lack one.

    The index copies its points into a second shard and builds the graphs there (in a child
    process) while the live shard serves searches and takes changes. The changes the
    follower applied since the copy began are then replayed into the copy, first outside the
    apply lock, then the last few under it, and the copy is swapped in under the lock: no
    change is lost, and a search never waits for the build.

    Args:
        index: The follower's index; nothing happens unless it is :func:`copy_buildable`.
        lock: The follower's apply lock (held while it applies a batch or rebuilds).
        applied: The follower's applied outbox position, read when called.
        generation: A number the follower increments whenever it rebuilds the index from
            PostgreSQL; a rebuild during the build abandons the copy.
        replay: Applies outbox changes to the copy (see :data:`Replay`).
        min_unindexed: Least number of points without a graph that starts a build (0 never
            builds).

    Returns:
        Whether a copy was built and swapped in.

    Raises:
        Exception: Whatever the copy, the build or the replay raised; the copy is discarded
            and the live shard stays in use.
    """
    buildable = copy_buildable(index)
    if buildable is None or min_unindexed <= 0:
        return False
    if await buildable.unindexed_points() < min_unindexed:
        return False
    async with lock:
        # Everything up to this position is in the live shard before the copy begins.
        start, rebuilds = applied(), generation()
    began = time.perf_counter()
    copy = await buildable.build_copy()
    try:
        position = await replay(copy, start, applied())
        async with lock:
            if generation() != rebuilds:
                log.warning("index.graph_build_abandoned", reason="index rebuilt meanwhile")
                await buildable.discard(copy)
                return False
            await replay(copy, position, applied())
            await buildable.swap_in(copy)
    except BaseException:
        await buildable.discard(copy)
        raise
    log.info(
        "index.graph_built",
        seconds=round(time.perf_counter() - began, 1),
        replayed_from=start,
        position=applied(),
    )
    return True
