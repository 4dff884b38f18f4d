"""Redis clients from ``AETERNA_REDIS_URL``, a plain server or one watched by Sentinel.

``redis://host:port/db`` (or ``rediss://``) is one server. ``redis+sentinel://h1:p1,h2:p2,h3:p3
/mymaster/0`` names the Sentinels, the monitored master's name and the database: the client
asks a Sentinel for the current master at each (re)connection (redis-py's
``SentinelConnectionPool``), so after a failover the next command, or the retry of a failed
one, reaches the promoted replica (Redis documentation, "Sentinel client guidelines").
A password in the URL (``redis+sentinel://:secret@h1:p1,.../mymaster``) is the data nodes'
password; Sentinels are reached without one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """Split a ``redis+sentinel://`` URL.

    Args:
        url: ``redis+sentinel://[:password@]host:port[,host:port...]/master[/db]``.

    Returns:
        ``(sentinels, master name, db, password)``.

    Raises:
        ValueError: Not such a URL, no Sentinel, or no master name.
    """
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    creds, _, hosts = parts.netloc.rpartition("@")
    password = unquote(creds.partition(":")[2]) if creds else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":")
        sentinels.append((host or item, int(port) if host else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path:
        raise ValueError("a Sentinel URL needs host:port of the Sentinels and a master name")
    return sentinels, path[0], int(path[1]) if len(path) > 1 else 0, password or None


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """A client for ``url`` (see the module docstring).

    Args:
        url: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``.
        **options: Client options (``decode_responses``, ``socket_timeout``, ...), applied to
            the data connections.

    Returns:
        The client; with Sentinel, one that follows the master across failovers.
    """
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return aioredis.Redis.from_url(url, **options)
    sentinels, master, db, password = parse_sentinel_url(url)
    timeout = options.get("socket_connect_timeout", 2.0)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    )
    client: aioredis.Redis = sentinel.master_for(master, db=db, password=password, **options)
    return client
