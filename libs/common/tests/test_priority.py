"""Background child processes: stopping a pool abandons the work its children hold."""

from __future__ import annotations

import asyncio
import sys

SCRIPT = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from aeterna_common.priority import init_background_child, stop_background_pool

if __name__ == "__main__":
    pool = ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_background_child,
        initargs=(0, 1.0, True),
    )
    print(pool.submit(os.getpid).result(timeout=60), flush=True)
    pool.submit(time.sleep, 600)
    time.sleep(1)  # the child has taken the work item
    stop_background_pool(pool)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_stopped_pool_does_not_hold_its_process_exit_behind_a_busy_child() -> None:
    # shutdown(wait=False) alone leaves the interpreter's exit joining a child that holds a
    # 600 s work item; a service stopping on SIGTERM would wait that long (under load, a
    # SCHED_IDLE child in the middle of a batch is as slow).
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    try:
        async with asyncio.timeout(60):
            child = int(await parent.stdout.readline())
            assert await parent.wait() == 0
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    async with asyncio.timeout(30):
        while _alive(child):  # noqa: ASYNC110 (polls /proc)
            await asyncio.sleep(0.1)
