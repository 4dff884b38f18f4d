"""Leases in PostgreSQL: one holder at a time per name, with an epoch as fencing token.

A lease is a row of the ``leases`` table (a migration of each service creates it; the
application role may SELECT, INSERT and UPDATE it): ``name``, ``owner``, ``epoch`` and
``expires_at``. Every time comes from PostgreSQL's clock (``now()``), never from a replica's.

* :func:`acquire` takes a free or expired lease; taking one over increments its epoch.
* :func:`renew` extends the holder's lease while it is still the holder and unexpired.
* :func:`release` expires it at once, so the next replica need not wait for the expiry.
* :func:`check` (inside the caller's transaction) is the fence: it locks the lease row
  ``FOR SHARE`` and raises :class:`LeaseLostError` unless it still holds ``epoch = $mine``
  with time to spare. A write made in that transaction then commits only while the lease
  is held: a takeover's ``UPDATE`` waits for it, and a deposed holder's write fails.

:class:`LeaseKeeper` holds a lease for a replica: it acquires, renews every
``ttl_s / 3`` (well before expiry), and reports loss to its holder (an ``on_change``
callback, and :attr:`LeaseKeeper.held` turning false as soon as the lease may have expired by
the holder's own monotonic clock, even while PostgreSQL cannot be reached).
:func:`run_periodic_under_lease` runs a periodic job on one replica at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog

from aeterna_common.telemetry import job_run

log = structlog.get_logger("aeterna.leases")

DEFAULT_TTL_S = 15.0
"""Lease time to live in seconds: a deposed or crashed holder is replaced after at most this
long (plus one renewal attempt of a contender)."""

RENEW_FRACTION = 3
"""The holder renews every ``ttl_s / RENEW_FRACTION`` seconds: two renewals may fail before
the lease expires."""


class LeaseLostError(RuntimeError):
    """The caller no longer holds the lease (taken over, released or expired)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease.

    Attributes:
        name: The lease name (one row of ``leases``).
        owner: The holder's id.
        epoch: Fencing token: increases by one on every change of holder.
        ttl_s: Time to live in seconds, from each acquisition or renewal.
    """

    name: str
    owner: str
    epoch: int
    ttl_s: float


def new_owner_id() -> str:
    """A holder id unique to this process and call: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")


async def acquire(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, owner: str, ttl_s: float
) -> Lease | None:
    """Take the lease ``name`` if nobody holds it or its holder let it expire.

    Args:
        conn: A connection or pool of a role that may write ``leases``.
        name: Lease name.
        owner: The caller's holder id (see :func:`new_owner_id`).
        ttl_s: Seconds until it expires unless renewed.

    Returns:
        The lease (epoch 1 for a new name, the previous epoch + 1 on a takeover), or
        ``None`` when another holder's lease has not expired.

    Raises:
        ValueError: ``ttl_s`` is not positive.
    """
    _check_ttl(ttl_s)
    epoch = await conn.fetchval(
        "INSERT INTO leases AS l (name, owner, epoch, expires_at) "
        "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
        "ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, epoch = l.epoch + 1, "
        "acquired_at = now(), renewed_at = now(), expires_at = EXCLUDED.expires_at "
        "WHERE l.expires_at <= now() RETURNING epoch",
        name,
        owner,
        ttl_s,
    )
    if epoch is None:
        return None
    log.info("lease.acquired", lease=name, owner=owner, epoch=int(epoch))
    return Lease(name=name, owner=owner, epoch=int(epoch), ttl_s=ttl_s)


async def renew(conn: asyncpg.Connection | asyncpg.Pool, lease: Lease) -> None:
    """Extend ``lease`` by its ``ttl_s`` from now.

    Args:
        conn: A connection or pool of a role that may write ``leases``.
        lease: The lease held.

    Raises:
        LeaseLostError: It expired or another holder took it over.
    """
    status = await conn.execute(
        "UPDATE leases SET expires_at = now() + make_interval(secs => $4), renewed_at = now() "
        "WHERE name = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()",
        lease.name,
        lease.owner,
        lease.epoch,
        lease.ttl_s,
    )
    if status != "UPDATE 1":
        raise LeaseLostError(f"lease {lease.name!r} epoch {lease.epoch} is no longer held")


async def release(conn: asyncpg.Connection | asyncpg.Pool, lease: Lease) -> bool:
    """Expire ``lease`` now, so another replica can take it without waiting.

    Args:
        conn: A connection or pool of a role that may write ``leases``.
        lease: The lease held.

    Returns:
        Whether it was still held (and is now released).
    """
    status = await conn.execute(
        "UPDATE leases SET expires_at = now() "
        "WHERE name = $1 AND owner = $2 AND epoch = $3 AND expires_at > now()",
        lease.name,
        lease.owner,
        lease.epoch,
    )
    return bool(status == "UPDATE 1")


async def check(conn: asyncpg.Connection, lease: Lease, *, margin_s: float = 0.0) -> None:
    """Fence: within the caller's transaction, assert ``lease`` is still held.

    Locks the lease row ``FOR SHARE`` until the transaction ends, so no takeover commits
    in between; writes made in the same transaction are therefore fenced by the epoch.

    Args:
        conn: A connection inside a transaction (a role that may update ``leases``).
        lease: The lease the caller believes it holds.
        margin_s: Required time left before expiry, in seconds (PostgreSQL's
            ``clock_timestamp()``).

    Raises:
        LeaseLostError: The epoch changed, or the lease expires within ``margin_s``.
    """
    held = await conn.fetchval(
        "SELECT true FROM leases WHERE name = $1 AND owner = $2 AND epoch = $3 "
        "AND expires_at > clock_timestamp() + make_interval(secs => $4) FOR SHARE",
        lease.name,
        lease.owner,
        lease.epoch,
        margin_s,
    )
    if not held:
        raise LeaseLostError(f"lease {lease.name!r} epoch {lease.epoch} is no longer held")


class LeaseKeeper:
    """Holds one lease for this replica: acquires it when free, renews it, reports loss.

    Run :meth:`run` as a background task. :attr:`held` is true only while the lease is held
    with at least ``ttl_s / RENEW_FRACTION`` seconds left by the holder's own monotonic
    clock, counted from the moment the last acquisition or renewal was *sent* (PostgreSQL's
    expiry is later than that), so a holder cut off from the database stops acting before
    anybody else can take the lease over.

    Args:
        pool: A pool of a role that may write ``leases`` (the application role).
        name: Lease name.
        ttl_s: Time to live in seconds.
        owner: Holder id; a fresh :func:`new_owner_id` when omitted.
        on_change: Called with the new :class:`Lease` on acquisition and with ``None`` on
            loss or release.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        name: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        owner: str | None = None,
        on_change: Callable[[Lease | None], None] | None = None,
    ) -> None:
        _check_ttl(ttl_s)
        self.pool = pool
        self.name = name
        self.ttl_s = ttl_s
        self.owner = owner or new_owner_id()
        self.on_change = on_change
        self.lease: Lease | None = None
        self._valid_until = 0.0
        self._changed = asyncio.Event()

    @property
    def renew_every_s(self) -> float:
        """Seconds between renewals (and between acquisition attempts)."""
        return self.ttl_s / RENEW_FRACTION

    @property
    def held(self) -> bool:
        """Whether the lease is held with time to spare (see the class docstring)."""
        return self.lease is not None and time.monotonic() < self._valid_until

    def current(self, *, margin_s: float = 0.0) -> Lease:
        """The held lease, for fencing a write.

        Args:
            margin_s: Required time left, in seconds by the local monotonic clock.

        Raises:
            LeaseLostError: Not held, or not for ``margin_s`` more seconds.
        """
        if self.lease is None or time.monotonic() + margin_s >= self._valid_until:
            raise LeaseLostError(f"lease {self.name!r} is not held")
        return self.lease

    def lost(self, reason: str) -> None:
        """Record that the lease is no longer held (e.g. a fenced write was refused)."""
        if self.lease is None:
            return
        log.warning("lease.lost", lease=self.name, epoch=self.lease.epoch, reason=reason)
        self.lease = None
        self._valid_until = 0.0
        self._notify(None)

    def _notify(self, lease: Lease | None) -> None:
        self._changed.set()
        if self.on_change is not None:
            self.on_change(lease)

    async def try_acquire(self) -> bool:
        """One acquisition attempt (no-op while held).

        Returns:
            Whether the lease is held afterwards.
        """
        if self.lease is not None:
            return self.held
        sent = time.monotonic()
        lease = await acquire(self.pool, self.name, self.owner, self.ttl_s)
        if lease is not None:
            self.lease = lease
            self._valid_until = sent + self.ttl_s - self.renew_every_s
            self._notify(lease)
        return lease is not None

    async def renew_once(self) -> None:
        """One renewal of the held lease.

        Raises:
            LeaseLostError: The lease was lost (recorded, and reported to ``on_change``).
        """
        lease = self.lease
        if lease is None:
            raise LeaseLostError(f"lease {self.name!r} is not held")
        sent = time.monotonic()
        try:
            await renew(self.pool, lease)
        except LeaseLostError:
            self.lost("renewal refused")
            raise
        if self.lease is lease:
            self._valid_until = sent + self.ttl_s - self.renew_every_s

    async def run(self) -> None:
        """Acquire, renew and re-acquire until cancelled; never raises for a database error
        (the next round retries; :attr:`held` turns false when time runs out)."""
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with its inner call finishing, and this loop
                # would then never stop.
                async with asyncio.timeout(self.renew_every_s):
                    if self.lease is None:
                        await self.try_acquire()
                    else:
                        await self.renew_once()
            except LeaseLostError:
                pass
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("lease.unreachable", lease=self.name, error=repr(exc))
            if self.lease is not None and not self.held:
                self.lost("not renewed in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_every_s):
                    await self._changed.wait()

    async def release(self) -> None:
        """Give the lease up (best effort: it expires anyway)."""
        lease, self.lease = self.lease, None
        self._valid_until = 0.0
        if lease is None:
            return
        try:
            await release(self.pool, lease)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("lease.release_failed", lease=self.name, error=repr(exc))
        self._notify(None)


async def run_periodic_under_lease(
    pool: asyncpg.Pool,
    name: str,
    job: Callable[[Lease], Awaitable[object]],
    *,
    interval_s: float,
    ttl_s: float = DEFAULT_TTL_S,
    owner: str | None = None,
) -> None:
    """Run ``job`` every ``interval_s`` seconds on the one replica holding lease ``name``.

    Every replica calls this; the lease holder runs the job, the others only contend for the
    lease. The job gets the :class:`Lease` to fence its writes with :func:`check` (jobs must
    be idempotent: a holder may lose the lease mid-run, and its successor runs the job
    again). A job's exception is logged and the next round runs as usual. Runs until
    cancelled, then releases the lease.

    Args:
        pool: A pool of a role that may write ``leases``.
        name: Lease name, one per job (e.g. ``memory:purge``).
        job: The periodic work.
        interval_s: Seconds between runs.
        ttl_s: Lease time to live in seconds.
        owner: Holder id; fresh when omitted.

    Raises:
        ValueError: ``interval_s`` or ``ttl_s`` is not positive.
    """
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    keeper = LeaseKeeper(pool, name, ttl_s=ttl_s, owner=owner)
    keeping = asyncio.create_task(keeper.run(), name=f"lease:{name}")
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await asyncio.shield(keeping)
            if keeping.done():  # the keeper never returns; surface what stopped it
                keeping.result()
            if not keeper.held:
                continue
            try:
                with job_run(name):
                    await job(keeper.current())
            except LeaseLostError as exc:
                keeper.lost(str(exc))
            except Exception:
                log.exception("lease.job_failed", lease=name)
    finally:
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        await keeper.release()
