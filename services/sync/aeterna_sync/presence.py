"""Presence: who is in which room, kept in Redis and announced on the tenant's stream.

A heartbeat puts ``{user}|{client}`` into the sorted set ``sync:{tenant}:presence:{room}``
with its expiry (now + ``ttl_s``) as the score. A member that was not there is announced as
``sync.presence.joined`` on ``events:{tenant}``; a sweep on every replica removes members
whose expiry passed (``ZREM`` tells exactly one replica it removed one) and announces
``sync.presence.left``. Announcements travel the tenant stream, so every replica's
subscribers see them, in order with the other events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from aeterna_common.events import STREAMS_KEY, Event, StreamTrim, stream_key
from aeterna_common.events.envelope import rfc3339
from redis.exceptions import RedisError

log = structlog.get_logger("aeterna.sync.presence")

KEYS = "sync:presence:keys"
"""SET of every presence key in use (swept without ``SCAN``)."""
JOINED = "sync.presence.joined"
LEFT = "sync.presence.left"


def presence_key(tenant: str, room: str) -> str:
    """The sorted set of a room's present clients."""
    return f"sync:{tenant}:presence:{room}"


@dataclass(frozen=True, slots=True)
class Present:
    """A client present in a room.

    Attributes:
        user: ``users/{u}`` (or ``users/{u}/agents/{a}``).
        client_id: The client's id.
        room: The room.
        expires_s: Epoch seconds at which it is gone without another heartbeat.
    """

    user: str
    client_id: str
    room: str
    expires_s: float


class PresenceBook:
    """Presence of every room of every tenant.

    Args:
        redis: Redis client (``decode_responses=True``).
        ttl_s: Seconds after its last heartbeat a client is gone.
        trim: How announcements trim the tenant stream (the relays' rule).
    """

    def __init__(self, redis: aioredis.Redis, *, ttl_s: float, trim: StreamTrim) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.trim = trim

    async def _announce(self, tenant: str, kind: str, room: str, member: str) -> None:
        user, _, client = member.rpartition("|")
        # Positions of sync's announcements come from a per-tenant counter: event ids stay
        # {service}:{position} and unique.
        position = int(await self.redis.incr(f"sync:{tenant}:presence:position"))
        now = time.time()
        event = Event(
            event_id=f"sync:{position}",
            service="sync",
            type=kind,
            tenant=tenant,
            resource=f"tenants/{tenant}/presence/{room}",
            actor=user,
            time=rfc3339(datetime.fromtimestamp(now, UTC)),
            position=position,
            payload={"room": room, "user": user, "client_id": client},
        )
        key = stream_key(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, event.to_fields(), **self.trim.xadd_options(now))  # type: ignore[arg-type]
            pipe.sadd(STREAMS_KEY, key)
            await pipe.execute()

    async def heartbeat(
        self, tenant: str, user: str, client_id: str, rooms: Sequence[str]
    ) -> list[Present]:
        """Mark ``client_id`` of ``user`` present in ``rooms``; announce new arrivals.

        Returns:
            Everyone present in those rooms now.
        """
        now = time.time()
        member = f"{user}|{client_id}"
        present: list[Present] = []
        for room in rooms:
            key = presence_key(tenant, room)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zadd(key, {member: now + self.ttl_s})
                pipe.sadd(KEYS, key)
                pipe.zrangebyscore(key, now, "+inf", withscores=True)
                added, _, members = await pipe.execute()
            if added:
                await self._announce(tenant, JOINED, room, member)
            for who, score in members:
                u, _, c = str(who).rpartition("|")
                present.append(Present(u, c, room, float(score)))
        return present

    async def sweep(self) -> int:
        """Remove and announce every client gone silent; returns how many left."""
        now = time.time()
        left = 0
        for key in await self.redis.smembers(KEYS):
            tenant, _, room = str(key).removeprefix("sync:").partition(":presence:")
            gone: Any = await self.redis.zrangebyscore(key, "-inf", now)
            for member in gone:
                # Only the replica whose ZREM removed it announces it.
                if await self.redis.zrem(key, member):
                    left += 1
                    await self._announce(tenant, LEFT, room, str(member))
            if not await self.redis.exists(key):
                await self.redis.srem(KEYS, key)
        return left

    async def run(self, interval_s: float) -> None:
        """Sweep every ``interval_s`` seconds until cancelled; Redis errors are logged and the
        next sweep tries again."""
        while True:
            try:
                await self.sweep()
            except (RedisError, OSError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # A cancellation that reached redis-py mid-command: stop.
                    raise asyncio.CancelledError from exc
                log.warning("presence.sweep_failed", error=repr(exc))
            await asyncio.sleep(interval_s)
