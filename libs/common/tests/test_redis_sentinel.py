"""Redis Sentinel failover under load (Debian ``redis-server`` and ``redis-sentinel``): one
master, two replicas and three Sentinels on loopback. Clients from
:func:`aeterna_common.redis_client.redis_client` with a ``redis+sentinel://`` URL keep
working through the master's death: every idempotent call (``SET`` of a fixed value, retried
on a connection error as the services' callers do) succeeds, and the client ends on the
promoted replica without being told."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from aeterna_common.redis_client import parse_sentinel_url, redis_client
from aeterna_devstack.servers import SentinelSet
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

MASTER = "aeterna"
RETRY_WINDOW_S = 30.0
"""How long one call may keep retrying (the services' Redis callers retry with backoff)."""


@pytest.fixture
def sentinel_set() -> Iterator[tuple[list[int], list[int], list[subprocess.Popen[bytes]]]]:
    with SentinelSet(MASTER) as s:
        yield s.data_ports, s.sentinel_ports, s.procs


def test_sentinel_urls_are_parsed() -> None:
    assert parse_sentinel_url("redis+sentinel://:pw@a:1,b:2/m/3") == (
        [("a", 1), ("b", 2)],
        "m",
        3,
        "pw",
    )
    assert parse_sentinel_url("redis+sentinel://a/m") == ([("a", 26379)], "m", 0, None)
    with pytest.raises(ValueError):
        parse_sentinel_url("redis+sentinel://a:1")
    with pytest.raises(ValueError):
        parse_sentinel_url("redis://a:1/0")


async def _until(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)


async def test_failover_under_load_fails_no_idempotent_call(
    sentinel_set: tuple[list[int], list[int], list[subprocess.Popen[bytes]]],
) -> None:
    data_ports, sentinel_ports, procs = sentinel_set
    replicas = [aioredis.Redis(port=p) for p in data_ports[1:]]

    async def linked() -> bool:
        infos = [await r.info("replication") for r in replicas]
        return all(i.get("master_link_status") == "up" for i in infos)

    # A replica that never synced could be promoted empty (TOOLING.md, Redis).
    await _until(linked, 30, "both replicas linked to the master")
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in sentinel_ports) + f"/{MASTER}"
    client = redis_client(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    written: dict[str, str] = {}
    retried = 0
    stop = asyncio.Event()

    async def idempotent_set(key: str, value: str) -> None:
        nonlocal retried
        deadline = time.monotonic() + RETRY_WINDOW_S
        while True:
            try:
                await client.set(key, value)
                written[key] = value
                return
            except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError):
                # ReadOnlyError: the old master came back as a replica for a moment.
                retried += 1
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            await idempotent_set(f"w{worker}:{n}", f"value {n}")
            n += 1
            await asyncio.sleep(0.01)

    workers = [asyncio.create_task(load(w)) for w in range(8)]
    await asyncio.sleep(1.0)
    before = len(written)
    procs[0].send_signal(signal.SIGKILL)  # the master
    killed = time.monotonic()

    async def promoted() -> bool:
        try:
            _, port = await client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        except RedisConnectionError:  # MasterNotFoundError: the Sentinels are failing over
            return False
        return int(port) != data_ports[0]

    await _until(promoted, 30, "a replica promoted")
    failover_s = time.monotonic() - killed
    after = len(written)
    await _until(lambda: _more(written, after + 200), 30, "writes going on after the failover")
    stop.set()
    # Every call returned: none failed after its retries.
    await asyncio.gather(*workers)
    assert len(written) > before
    new_master = aioredis.Redis(port=(await client.connection_pool.get_master_address())[1])  # type: ignore[attr-defined]
    role = (await new_master.info("replication"))["role"]
    assert role == "master"
    # What was written after the failover is on the new master.
    late = list(written.items())[after:]
    values = await new_master.mget([k for k, _ in late])
    assert [v.decode() if v else None for v in values] == [v for _, v in late]
    print(
        f"failover {failover_s:.1f} s after the kill; {len(written)} idempotent writes, "
        f"{retried} retried, 0 failed"
    )
    await client.aclose()
    await new_master.aclose()
    for r in replicas:
        await r.aclose()


async def _more(written: dict[str, str], n: int) -> bool:
    return len(written) >= n
