"""Embedding cache on Redis (DOMAIN.md, Embedding cache).

Keys are exact: ``emb:{tenant}:{model}:{sha256(text)}`` with a 24 h TTL, the vector stored as
little-endian float32 bytes. An unavailable Redis degrades to "no cache": every lookup is a
miss and writes are dropped; the error is logged and counted, never raised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import cast

import numpy as np
import structlog
from aeterna_common.redis_client import redis_client
from prometheus_client import Counter
from redis.exceptions import RedisError

log = structlog.get_logger("aeterna.memory.cache")

DEFAULT_TTL_S = 24 * 3600
"""Exact-key TTL in seconds (DOMAIN.md: 24 h)."""

CACHE_LOOKUPS = Counter(
    "aeterna_embedding_cache_lookups_total",
    "Embedding cache lookups by result (hit, miss, error).",
    ["result"],
)
"""No tenant label: tenants are unbounded, and every label value is a time series kept for the
life of the process. Per-tenant figures go to the ``embedding_cache.lookup`` log event."""


def cache_key(tenant_id: str, model: str, text: str) -> str:
    """``emb:{tenant}:{model}:{sha256(text)}``."""
    return f"emb:{tenant_id}:{model}:{hashlib.sha256(text.encode()).hexdigest()}"


class RedisEmbeddingCache:
    """Exact-match embedding cache.

    Args:
        url: Redis URL (``redis://host:port/db``).
        ttl_s: Entry lifetime in seconds.
        timeout_s: Socket timeout in seconds; a slow Redis counts as unavailable.
    """

    def __init__(self, url: str, *, ttl_s: int = DEFAULT_TTL_S, timeout_s: float = 0.25) -> None:
        self.ttl_s = ttl_s
        self.client = redis_client(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def get_many(
        self, tenant_id: str, model: str, texts: Sequence[str]
    ) -> list[list[float] | None]:
        """Cached vectors in input order, ``None`` for a miss (all ``None`` if Redis is down)."""
        if not texts:
            return []
        try:
            raw = await self.client.mget([cache_key(tenant_id, model, t) for t in texts])
        except (RedisError, OSError) as exc:
            log.warning("embedding_cache.unavailable", error=str(exc))
            CACHE_LOOKUPS.labels("error").inc(len(texts))
            return [None] * len(texts)
        out: list[list[float] | None] = [
            np.frombuffer(cast(bytes, v), dtype="<f4").tolist() if v else None for v in raw
        ]
        hits = sum(v is not None for v in out)
        CACHE_LOOKUPS.labels("hit").inc(hits)
        CACHE_LOOKUPS.labels("miss").inc(len(out) - hits)
        log.debug("embedding_cache.lookup", tenant=tenant_id, hits=hits, misses=len(out) - hits)
        return out

    async def put_many(
        self, tenant_id: str, model: str, items: Sequence[tuple[str, Sequence[float]]]
    ) -> None:
        """Store ``(text, vector)`` pairs; errors are logged and ignored."""
        if not items:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for text, vector in items:
                    pipe.set(
                        cache_key(tenant_id, model, text),
                        np.asarray(vector, dtype="<f4").tobytes(),
                        ex=self.ttl_s,
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("embedding_cache.unavailable", error=str(exc))

    async def delete_many(self, tenant_id: str, model: str, texts: Sequence[str]) -> None:
        """Delete the entries of ``texts``.

        Raises:
            redis.exceptions.RedisError: Redis could not be reached (the purge retries later).
            OSError: The connection failed.
        """
        if texts:
            await self.client.delete(*[cache_key(tenant_id, model, t) for t in texts])

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


class NoCache:
    """The cache used when no Redis is configured: always a miss."""

    async def get_many(
        self, tenant_id: str, model: str, texts: Sequence[str]
    ) -> list[list[float] | None]:
        """All misses."""
        return [None] * len(texts)

    async def put_many(
        self, tenant_id: str, model: str, items: Sequence[tuple[str, Sequence[float]]]
    ) -> None:
        """Drop everything."""

    async def delete_many(self, tenant_id: str, model: str, texts: Sequence[str]) -> None:
        """Nothing is stored, so nothing to delete."""

    async def close(self) -> None:
        """Nothing to close."""
