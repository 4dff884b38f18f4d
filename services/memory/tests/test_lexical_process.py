"""BM25 encoding of applied memories in a lowered child process (the shipped default)."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from aeterna_common.search.lexical import encode_document
from aeterna_memory.adapters.lexical_process import ProcessDocumentEncoder
from memory_testkit import MemoryEnv

DOCS = [
    ("Melanie ran a charity race for mental health", ["Session time: 1:56 pm on 8 May, 2023"]),
    ("The deploy moved to Friday", []),
    ("", ["only context here"]),
    ("Ünïcode façade — naïve café's menu", ["I'm sure we'll go", "don't"]),
]


async def test_child_process_encodes_like_the_library_at_lower_priority() -> None:
    enc = ProcessDocumentEncoder(nice=5)
    try:
        (child,) = enc.process_ids()
        assert child != os.getpid()
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, child) == min(19, base + 5)
        assert await enc.encode(DOCS) == [encode_document(c, x) for c, x in DOCS]
        assert await enc.encode([]) == []
        # A dead child: the batch is encoded here instead, and a new child takes over.
        os.kill(child, 9)
        for _ in range(3):
            assert await enc.encode(DOCS) == [encode_document(c, x) for c, x in DOCS]
        assert enc.process_ids() and enc.process_ids() != [child]
    finally:
        enc.close()
    with pytest.raises(ValueError, match="nice"):
        ProcessDocumentEncoder(nice=20)


async def test_shared_replica_applies_through_the_child_processes(env: MemoryEnv) -> None:
    # The session's replica runs the shipped default: its follower encodes in a child, and
    # its documents are embedded in another, both under SCHED_IDLE (CPU time no normal task
    # wants); the serving process keeps the normal policy.
    assert env.follower.encode_documents is not None
    children = env.domain.embedder.process_ids()
    assert children
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    for child in children:
        assert os.sched_getscheduler(child) == os.SCHED_IDLE


async def test_idle_child_encodes_the_same() -> None:
    enc = ProcessDocumentEncoder(nice=5, idle=True)
    try:
        (child,) = enc.process_ids()
        assert os.sched_getscheduler(child) == os.SCHED_IDLE
        assert await enc.encode(DOCS) == [encode_document(c, x) for c, x in DOCS]
    finally:
        enc.close()


async def test_child_exits_when_its_replica_is_killed() -> None:
    # A pool's child holds both ends of its call queue and would outlive a SIGKILLed parent.
    script = (
        "import time\n"
        "from aeterna_memory.adapters.lexical_process import ProcessDocumentEncoder\n"
        "enc = ProcessDocumentEncoder(nice=0)\n"
        "print(enc.process_ids()[0], flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    try:
        async with asyncio.timeout(120):
            child = int(await parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        await parent.wait()
    async with asyncio.timeout(60):  # the child notices within its 1 s poll
        while True:
            if not _alive(child):
                break
            await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
