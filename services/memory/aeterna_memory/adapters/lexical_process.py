"""BM25 encoding of documents in a lowered child process, off the serving process's GIL.

Every replica applies every tenant's changes to its own index, and the index follower encodes
each applied memory's BM25F vector (:func:`aeterna_common.search.lexical.encode_document`):
pure Python, about 0.4 ms per memory with its context on a busy 2-core machine (measured
here), so a 20,000-memory import in another tenant holds each replica's GIL for ~8 s. A
thread holding the GIL makes the event loop wait up to the interpreter's switch interval
(5 ms, ``sys.getswitchinterval``) every time it needs the GIL back, and a search needs it
back after every await. In a child process the encoding shares no GIL with the searches, and
it runs at the background nice value (:mod:`aeterna_common.priority`), so it takes only the
CPU that requests leave.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import structlog
from aeterna_common.priority import init_background_child, stop_background_pool
from aeterna_common.search.lexical import encode_document
from aeterna_common.vectors.port import SparseVector

log = structlog.get_logger("aeterna.memory.lexical")

Document = tuple[str, Sequence[str]]
"""``(content, context)`` of one memory, as :func:`encode_document` takes them."""


class ProcessDocumentEncoder:
    """BM25F document vectors computed by ``workers`` spawned child processes.

    Construction spawns the children and waits until each has started (about a second):
    build it at startup, off the event loop. A child that dies is replaced on the next call;
    the batch it held is encoded in the calling process instead, so callers never fail for it.

    Args:
        nice: Nice increment (0-19) of the children.
        workers: Child processes (default 1).
        idle: Run the children under ``SCHED_IDLE`` instead of ``nice``
            (:func:`aeterna_common.priority.idle_scheduling`).

    Raises:
        ValueError: ``workers`` below 1 or ``nice`` outside 0-19.
    """

    def __init__(self, nice: int, workers: int = 1, *, idle: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0-19, got {nice}")
        self._nice = nice
        self._workers = workers
        self._idle = idle
        self._pool = self._start()
        for f in [self._pool.submit(_child_ready) for _ in range(workers)]:
            f.result(timeout=120)

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent runs gRPC and event loop threads.
        return ProcessPoolExecutor(
            self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_background_child,
            initargs=(self._nice, 1.0, self._idle),
        )

    def process_ids(self) -> list[int]:
        """Process ids of the live children.

        Returns:
            Their pids, sorted.
        """
        return sorted(int(pid) for pid in (getattr(self._pool, "_processes", None) or {}))

    async def encode(self, documents: Sequence[Document]) -> list[SparseVector]:
        """BM25F vectors of ``documents``, in order (see :func:`encode_document`).

        Args:
            documents: ``n`` pairs of content and context turns.

        Returns:
            ``n`` sparse vectors, the same as :func:`encode_document` gives.
        """
        if not documents:
            return []
        pool = self._pool
        docs = [(content, list(context)) for content, context in documents]
        try:
            parts = await asyncio.get_running_loop().run_in_executor(pool, _encode_batch, docs)
        except BrokenProcessPool:
            log.warning("lexical_process.died", documents=len(docs))
            if pool is self._pool:
                self._pool = self._start()
            stop_background_pool(pool)
            return await asyncio.to_thread(lambda: [encode_document(c, x) for c, x in docs])
        return [SparseVector(indices=i, values=v) for i, v in parts]

    def close(self) -> None:
        """Stop the children (pending calls are cancelled)."""
        stop_background_pool(self._pool)


def _encode_batch(docs: list[tuple[str, list[str]]]) -> list[tuple[list[int], list[float]]]:
    out = []
    for content, context in docs:
        vector = encode_document(content, context)
        out.append((list(vector.indices), list(vector.values)))
    return out


def _child_ready() -> bool:
    return True
