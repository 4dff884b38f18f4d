"""CPU priority of background threads: bulk work yields the CPU to request handling.

A service process mixes latency-bound work (a search: a few milliseconds of CPU spread over
the event loop, the query embedding and the index) with bulk work that would take every
core it can get (embedding a 20,000-memory import). The kernel's scheduler shares the CPU
fairly between runnable threads, so on a small machine a search queues behind the bulk work
at every step. On Linux each thread is a task with its own nice value
(``setpriority(PRIO_PROCESS, tid)``, see ``sched(7)``: "the nice value is a per-thread
attribute"), and CFS weighs a task's share by it (nice 10 weighs 110 against nice 0's
1024, ``sched_prio_to_weight`` in ``kernel/sched/core.c``): a bulk thread at nice 10 still
uses all the CPU nothing else wants, and gives way within a scheduling period when a
request needs it.

Only threads that spend their time outside the GIL should be lowered (ONNX Runtime's
``Session.run`` releases it): a lowered thread holding the GIL while it waits for the CPU
would hold the event loop up with it.

A child process that does bulk work shares no GIL with the serving process, so it can go
further: ``SCHED_IDLE`` (``sched(7)``: "for running very low priority background jobs"; a
``SCHED_IDLE`` task weighs 3 against nice 0's 1024 and nice 19's 15, ``WEIGHT_IDLEPRIO`` in
``kernel/sched/sched.h``), so that a search's threads in any process of the machine preempt
it at once. An unprivileged process may switch itself to ``SCHED_IDLE`` (Linux 2.6.39 and
later); where that is refused the child falls back to the nice increment.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import structlog

log = structlog.get_logger("aeterna.priority")


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (lower its CPU priority).

    Raising a nice value needs no privilege; it cannot be undone without one, so call this
    only on threads dedicated to bulk work.

    Args:
        increment: Nice increment, 0-19 (0 does nothing).

    Returns:
        Whether the priority was changed (False on 0 and where threads have no nice value of
        their own, i.e. outside Linux, or when the kernel refused).

    Raises:
        ValueError: ``increment`` outside 0-19.
    """
    if not 0 <= increment <= 19:
        raise ValueError(f"nice increment must be 0-19, got {increment}")
    if increment == 0 or not hasattr(os, "setpriority") or not os.uname().sysname == "Linux":
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:
        log.warning("priority.not_lowered", thread=threading.current_thread().name, error=str(exc))
        return False
    return True


def background_executor(name: str, workers: int, nice: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run at ``nice`` above the process's priority.

    Args:
        name: Thread name prefix (shown by ``py-spy``, ``top -H``).
        workers: Number of threads (>= 1).
        nice: Nice increment of every thread, 0-19 (0: normal priority).

    Returns:
        The executor; shut it down with the component that owns it.

    Raises:
        ValueError: ``workers`` below 1 or ``nice`` outside 0-19.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0 <= nice <= 19:
        raise ValueError(f"nice increment must be 0-19, got {nice}")
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_thread_priority, initargs=(nice,)
    )


def idle_scheduling() -> bool:
    """Switch the calling thread to ``SCHED_IDLE`` (threads it starts afterwards inherit it).

    For a child process's main thread before it starts any other: the whole child then runs
    only on CPU time that no normal task wants (see the module's docstring). Cannot be undone
    without ``CAP_SYS_NICE``.

    Returns:
        Whether the policy was set (False outside Linux or when the kernel refused).
    """
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("priority.not_idle", error=str(exc))
        return False
    return True


def init_background_child(nice: int, poll_s: float = 1.0, idle: bool = False) -> None:
    """Initializer of a child process that does a service's bulk work (a process pool's).

    Lowers the child to ``nice`` (threads started afterwards inherit it), or to
    ``SCHED_IDLE`` when ``idle`` (the nice increment where the kernel refuses), and makes it exit
    when its parent is gone: a ``ProcessPoolExecutor`` child holds both ends of its own call
    queue, so it never sees end-of-file when the parent is killed (SIGKILL, out of memory)
    and would otherwise live on as an orphan with a copy of the model. A daemon thread
    checks every ``poll_s`` seconds whether the child was re-parented.

    Args:
        nice: Nice increment, 0-19.
        poll_s: Seconds between two checks of the parent.
        idle: Run the child under ``SCHED_IDLE`` (:func:`idle_scheduling`).

    Raises:
        ValueError: ``nice`` outside 0-19.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"nice increment must be 0-19, got {nice}")
    if not (idle and idle_scheduling()):
        lower_thread_priority(nice)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)  # the parent is gone: nobody will read a result

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def stop_background_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool of background children now, abandoning the work they hold.

    ``shutdown(wait=False)`` alone lets each child finish the work item it holds, and the
    interpreter's exit then joins them (``_python_exit`` in ``concurrent/futures/process.py``):
    a ``SCHED_IDLE`` child in the middle of a batch on a busy machine gets almost no CPU, so a
    service stopping on SIGTERM would wait minutes for a result nobody reads. Background work
    is redone from durable state (an outbox cursor, a retried call), so the children are
    killed (SIGKILL) after pending calls are cancelled.

    Args:
        pool: The pool to stop; calls still pending on it are cancelled and running ones
            fail with ``BrokenProcessPool``.
    """
    # Read before shutdown(), which drops the pool's reference to its processes.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
