"""Where bindings come from: the :class:`Directory` port and its per-tenant cache.

* :class:`Directory`: tenant → :class:`~aeterna_common.authz.model.Snapshot` (org units, role
  bindings, delegations, revision). Governance serves it (``GetAuthorizationSnapshot``);
  :class:`StaticDirectory` holds plain data (development without governance, tests).
* :class:`DirectoryCache`: one snapshot per tenant, invalidated within about a second by
  governance events on the tenant's stream ``events:{tenant}`` (plain ``XREAD``, fan-out: every
  replica reads every event; no consumer group), bounded by a TTL when events are lost. While
  the directory is down, a cached snapshot keeps being used up to TTL + stale grace; after
  that decisions that need bindings fail with ``UNAVAILABLE`` (reason
  ``AUTHORIZATION_DIRECTORY_UNAVAILABLE``): never allowed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from aeterna_common.authz.model import Snapshot
from aeterna_common.errors import Unavailable
from aeterna_common.redis_client import redis_client
from aeterna_common.telemetry import AUTHZ_CACHE_LOOKUPS

log = structlog.get_logger("aeterna.authz")

DIRECTORY_UNAVAILABLE = "AUTHORIZATION_DIRECTORY_UNAVAILABLE"
"""``ErrorInfo.reason`` of a decision that needed bindings the directory could not give."""

INVALIDATING_PREFIXES = (
    "governance.org_unit.",
    "governance.role_binding.",
    "governance.delegation.",
)
"""Event types that invalidate a tenant's cached snapshot (the event envelope contract)."""

RETRY_AFTER_FAILURE_S = 1.0
"""Least seconds between two fetches of one tenant after a failed one (calls in between use
the cached snapshot within its grace, or fail)."""


class Directory(Protocol):
    """Source of the tenants' authorization data."""

    async def snapshot(self, tenant_id: str) -> Snapshot:
        """The tenant's current units, bindings and delegations.

        Raises:
            Exception: Any failure to reach the source (the cache treats it as an outage).
        """
        ...


class StaticDirectory:
    """A directory of plain data, changed by :meth:`put` (development and tests).

    Args:
        snapshots: Initial snapshots by tenant; other tenants have none (an empty snapshot).
    """

    def __init__(self, snapshots: Mapping[str, Snapshot] | None = None) -> None:
        self.snapshots = dict(snapshots or {})
        self.available = True
        """False makes :meth:`snapshot` fail as an unreachable directory would."""

    def put(self, snapshot: Snapshot) -> None:
        """Replace the tenant's data."""
        self.snapshots[snapshot.tenant_id] = snapshot

    async def snapshot(self, tenant_id: str) -> Snapshot:
        """See :class:`Directory`.

        Raises:
            ConnectionError: :attr:`available` is False.
        """
        if not self.available:
            raise ConnectionError("directory unavailable")
        return self.snapshots.get(tenant_id) or Snapshot(tenant_id)


@dataclass(slots=True)
class _Entry:
    snapshot: Snapshot
    fetched_at: float
    stream_id: str
    retry_at: float = 0.0


class DirectoryCache:
    """Per-tenant cache of :class:`Directory` snapshots with event invalidation and a TTL.

    Args:
        directory: The source.
        redis_url: Redis holding the ``events:{tenant}`` streams; empty: TTL only.
        ttl_s: Seconds a snapshot is used without a refetch (bounds staleness when events
            are lost).
        stale_grace_s: Seconds past the TTL a snapshot is still used while the directory
            cannot be reached.
        block_ms: Longest ``XREAD BLOCK`` in milliseconds; a tenant newly cached is watched
            from the next read, so this bounds how late it joins (its events in between are
            read anyway, from the stream id taken before its fetch).
    """

    def __init__(
        self,
        directory: Directory,
        *,
        redis_url: str = "",
        ttl_s: float = 60.0,
        stale_grace_s: float = 30.0,
        block_ms: int = 250,
    ) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.stale_grace_s = stale_grace_s
        self.block_ms = block_ms
        self.redis: aioredis.Redis | None = (
            redis_client(redis_url, decode_responses=True) if redis_url else None
        )
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.invalidations = 0
        """Snapshots dropped because of an event (for tests and metrics)."""

    def cached(self, tenant_id: str) -> Snapshot | None:
        """The cached snapshot of ``tenant_id`` whatever its age, or None."""
        entry = self._entries.get(tenant_id)
        return entry.snapshot if entry else None

    def invalidate(self, tenant_id: str) -> None:
        """Drop the tenant's snapshot: the next decision that needs it fetches it."""
        if self._entries.pop(tenant_id, None) is not None:
            self.invalidations += 1

    async def _stream_head(self, tenant_id: str) -> str:
        # The last entry id before the fetch: events after it may postdate the snapshot.
        if self.redis is None:
            return "$"
        try:
            last = await self.redis.xrevrange(f"events:{tenant_id}", count=1)
        except RedisError as exc:
            log.warning("authz.events_unreachable", tenant=tenant_id, error=str(exc))
            return "$"
        return str(last[0][0]) if last else "0-0"

    async def get(self, tenant_id: str) -> Snapshot:
        """The tenant's snapshot: cached while younger than the TTL, else fetched.

        Raises:
            Unavailable: The directory failed and no snapshot younger than TTL + grace is
                cached (reason ``AUTHORIZATION_DIRECTORY_UNAVAILABLE``).
        """
        entry = self._entries.get(tenant_id)
        now = time.monotonic()
        if entry is not None and now - entry.fetched_at < self.ttl_s:
            AUTHZ_CACHE_LOOKUPS.labels("hit").inc()
            return entry.snapshot
        lock = self._locks.setdefault(tenant_id, asyncio.Lock())
        async with lock:
            entry = self._entries.get(tenant_id)
            now = time.monotonic()
            if entry is not None and now - entry.fetched_at < self.ttl_s:
                AUTHZ_CACHE_LOOKUPS.labels("hit").inc()
                return entry.snapshot
            if entry is not None and now < entry.retry_at:
                AUTHZ_CACHE_LOOKUPS.labels("stale").inc()
                return self._stale(tenant_id, entry, now)
            head = entry.stream_id if entry is not None else await self._stream_head(tenant_id)
            try:
                snapshot = await self.directory.snapshot(tenant_id)
            except Exception as exc:
                AUTHZ_CACHE_LOOKUPS.labels("error").inc()
                log.warning("authz.directory_failed", tenant=tenant_id, error=repr(exc))
                if entry is None:
                    raise self._unavailable() from exc
                entry.retry_at = now + RETRY_AFTER_FAILURE_S
                return self._stale(tenant_id, entry, now)
            # An event that arrived while fetching may have dropped no entry (none existed):
            # the stream id taken before the fetch makes the watcher read it and drop this one.
            self._entries[tenant_id] = _Entry(snapshot, time.monotonic(), head)
            AUTHZ_CACHE_LOOKUPS.labels("miss").inc()
            return snapshot

    def _stale(self, tenant_id: str, entry: _Entry, now: float) -> Snapshot:
        if now - entry.fetched_at < self.ttl_s + self.stale_grace_s:
            return entry.snapshot
        self._entries.pop(tenant_id, None)
        raise self._unavailable()

    @staticmethod
    def _unavailable() -> Unavailable:
        return Unavailable(
            "authorization data is unavailable; retry later", reason=DIRECTORY_UNAVAILABLE
        )

    async def watch(self) -> None:
        """Read the cached tenants' event streams and drop snapshots that events change.

        Runs until cancelled (a service's background task). Without Redis it returns at once
        (the TTL alone bounds staleness).
        """
        if self.redis is None:
            return
        while True:
            streams = {f"events:{t}": e.stream_id for t, e in self._entries.items()}
            if not streams:
                await asyncio.sleep(self.block_ms / 1000)
                continue
            try:
                # RESP2 reply with decode_responses: [[key, [(id, {field: value})]]].
                reply = cast(
                    "list[tuple[str, list[tuple[str, dict[str, str]]]]]",
                    await self.redis.xread(streams, count=500, block=self.block_ms),  # type: ignore[arg-type]
                )
            except RedisError as exc:
                log.warning("authz.events_unreachable", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for key, items in reply or []:
                tenant = str(key).removeprefix("events:")
                for entry_id, fields in items:
                    entry = self._entries.get(tenant)
                    if entry is None:
                        break
                    entry.stream_id = str(entry_id)
                    if str(fields.get("type", "")).startswith(INVALIDATING_PREFIXES):
                        event_id = fields.get("event_id")
                        log.info("authz.invalidated", tenant=tenant, event_id=event_id)
                        self.invalidate(tenant)

    async def close(self) -> None:
        """Close the Redis connection."""
        if self.redis is not None:
            await self.redis.aclose()
