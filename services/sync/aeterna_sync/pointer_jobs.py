"""When pointer cycles run besides a call (issue 9): on knowledge's events, and on schedule.

* :class:`KnowledgeEvents` follows every tenant stream of the bus (``events:{tenant}``, the
  keys listed in ``events:streams``) from the moment the replica starts, and runs a tenant's
  cycle shortly after a ``knowledge.*`` event (created, updated, status changed, promoted),
  so an accepted item gets its pointer within seconds without a call. Every replica follows;
  the tenant's lease lets one cycle run, and a replica that finds it taken tries again a
  moment later (the running cycle may have listed knowledge before the event).
* :func:`scheduled` reconciles every tenant on a schedule, one replica at a time (lease
  ``sync:pointers-reconcile``): it catches whatever events were missed (a replica down, a
  stream trimmed), resumes the cycles a dead replica left RUNNING, and deletes failed items
  older than the retention.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import structlog
from aeterna_common import leases
from aeterna_common.context import TENANT_PATTERN
from aeterna_common.db import Database
from aeterna_common.errors import Aborted
from aeterna_common.events import STREAMS_KEY
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential_jitter

from aeterna_sync.pointers import PointerSync
from aeterna_sync.settings import SyncSettings

log = structlog.get_logger("aeterna.sync.pointer_jobs")

RECONCILE_LEASE = "sync:pointers-reconcile"
"""Lease of the scheduled reconcile."""

STREAM_PREFIX = "events:"

IGNORED_PREFIXES = ("knowledge.usage.", "knowledge.anomaly.")
"""Knowledge events that change no item."""

BUSY_RETRY_S = 1.0
"""Seconds before a tenant whose cycle was running elsewhere is tried again."""

STREAMS_REFRESH_S = 5.0
"""Seconds between reads of the set of tenant streams (new tenants)."""


def tenant_of(key: str) -> str | None:
    """The tenant of a stream key ``events:{tenant}`` (None for dead-letter streams)."""
    tenant = key.removeprefix(STREAM_PREFIX)
    if key == tenant or not TENANT_PATTERN.fullmatch(tenant):
        return None
    return tenant


def changes_items(event_type: str) -> bool:
    """Whether an event type is a change of a knowledge item."""
    return event_type.startswith("knowledge.") and not event_type.startswith(IGNORED_PREFIXES)


async def tenants(redis: aioredis.Redis) -> list[str]:
    """Every tenant with a stream on the bus, sorted."""
    keys: Any = await redis.smembers(STREAMS_KEY)
    return sorted({t for k in keys if (t := tenant_of(str(k))) is not None})


class KnowledgeEvents:
    """Runs a tenant's pointer cycle after knowledge's events (see the module docstring).

    Args:
        pointers: The pointer sync.
        redis: Redis client (``decode_responses=True``).
        settings: Debounce and block time.
    """

    def __init__(
        self, pointers: PointerSync, redis: aioredis.Redis, settings: SyncSettings
    ) -> None:
        self.pointers = pointers
        self.redis = redis
        self.settings = settings
        self.dirty: set[str] = set()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Follow and work until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_forever())
            group.create_task(self._work())

    async def _follow_forever(self) -> None:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((RedisError, OSError)),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            stop=stop_never,
            reraise=True,
        ):
            with attempt:
                await self._follow()

    async def _follow(self) -> None:
        positions: dict[Any, Any] = {}
        refreshed = -STREAMS_REFRESH_S
        loop = asyncio.get_running_loop()
        first = True
        while True:
            if loop.time() - refreshed >= STREAMS_REFRESH_S:
                refreshed = loop.time()
                for tenant in await tenants(self.redis):
                    key = f"{STREAM_PREFIX}{tenant}"
                    if key in positions:
                        continue
                    if first:
                        # From the stream's last entry now ("$" would skip entries added
                        # between two reads; the scheduled reconcile covers the past).
                        last: Any = await self.redis.xrevrange(key, count=1)
                        positions[key] = str(last[0][0]) if last else "0-0"
                    else:
                        positions[key] = "0-0"  # a stream born since: all of it is new
                first = False
            if not positions:
                await asyncio.sleep(STREAMS_REFRESH_S)
                continue
            got: Any = await self.redis.xread(positions, block=self.settings.block_ms, count=1000)
            for key, entries in got or ():
                for entry_id, fields in entries:
                    positions[str(key)] = str(entry_id)
                    changed = tenant_of(str(key))
                    if changed is not None and changes_items(str(fields.get("type", ""))):
                        self.dirty.add(changed)
                        self._wake.set()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.settings.event_debounce_s)
            due, self.dirty = self.dirty, set()
            for tenant in sorted(due):
                try:
                    await self.pointers.reconcile(tenant, reason="event")
                except Aborted:
                    self.dirty.add(tenant)
                except Exception:
                    log.exception("sync.event_cycle_failed", tenant=tenant)
            if self.dirty:
                await asyncio.sleep(BUSY_RETRY_S)
                self._wake.set()


async def scheduled(
    db: Database, pointers: PointerSync, redis: aioredis.Redis, settings: SyncSettings
) -> None:
    """Reconcile every tenant every ``settings.reconcile_interval_s`` on one replica at a
    time, and delete failed items past the retention. Runs until cancelled."""

    async def job(lease: leases.Lease) -> None:
        for tenant in await tenants(redis):
            try:
                await pointers.reconcile(tenant, reason="schedule")
            except Aborted:
                continue  # running elsewhere: that cycle covers it
            purged = await pointers.purge_failed(tenant)
            if purged:
                log.info("sync.failed_items_purged", tenant=tenant, count=purged)

    await leases.run_periodic_under_lease(
        db.pool,
        RECONCILE_LEASE,
        job,
        interval_s=settings.reconcile_interval_s,
        ttl_s=settings.jobs_lease_ttl_s,
    )
