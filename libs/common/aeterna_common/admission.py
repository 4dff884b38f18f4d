"""Admission control for bulk work: a batch import yields the event loop to searches, and
each tenant's bulk writes are limited to a rate (:class:`TenantRateLimit`).

A service process runs every request on one event loop. A batch import's steps that run on
the loop (authorizing 100 scopes, encoding 100 rows with their vectors for PostgreSQL, reading
them back) take tens of milliseconds each, and a search that becomes ready meanwhile waits for
the whole step: measured with ``py-spy`` on a replica during a 4,000-memory import in another
tenant, the loop was busy 57 % of the time, a quarter of it in ``BatchCreateMemories``, and
by-user search p95 grew 7x while the search's own work did not grow (every await of the search
simply resumed late). Lowering the embedding threads' CPU priority
(:mod:`aeterna_common.priority`) does not help there: that work runs on the loop itself.

So bulk work (a batch create; a replica's index follower applying another tenant's import)
is done in steps of a few memories, and between two steps it calls
:meth:`ForegroundGauge.yield_to_foreground`: while latency-bound requests (searches) are in
flight in this process it waits until none is, at most ``max_yield_s`` per step, so that the
search's callbacks run between the steps instead of after the whole batch; with none in flight
it only gives the loop one turn. The bound keeps the import moving under a continuous stream
of searches (the loss of rate is measured by ``make bench-scale``, ``during_ingest``).

A tracked request that is itself waiting for bulk work (a search waiting for the index to
apply a consistency token's position) is not in flight while it waits
(:meth:`ForegroundGauge.waiting_on_bulk`): bulk work yielding to it would only delay the very
thing it waits for. The index follower goes further (``awaited=True``): it defers each of its
steps, the first included, with a bound of its own, and stops deferring as soon as any
request waits for it, whatever else is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator, Mapping

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from prometheus_client import Counter

from aeterna_common.errors import ResourceExhausted

BULK_YIELD_SECONDS = Counter(
    "aeterna_bulk_yield_seconds",
    "Seconds bulk work (batch imports) waited for in-flight searches to finish.",
)

DEFAULT_MAX_YIELD_S = 0.02
"""Longest wait per bulk step, in seconds: about one idle by-user search (p95 ~20 ms in
``bench/results/scale.json``), so a search that arrives mid-import finishes before the next
step, and a step of a few memories (a few milliseconds of work) is delayed by at most this."""


_TRACKED: contextvars.ContextVar[ForegroundGauge | None] = contextvars.ContextVar(
    "aeterna_foreground_tracked", default=None
)
"""The gauge counting the current task (and the tasks it starts) as in flight, if any."""


class ForegroundGauge:
    """Counts latency-bound requests in flight; bulk work yields to them between its steps.

    One per process (the composition root builds it), shared by the requests it tracks and
    the bulk work that yields. Event-loop only: not thread-safe.

    Args:
        max_yield_s: Longest wait of one :meth:`yield_to_foreground` call, in seconds
            (0: never wait, only give the loop a turn).

    Raises:
        ValueError: ``max_yield_s`` is negative.
    """

    def __init__(self, max_yield_s: float = DEFAULT_MAX_YIELD_S) -> None:
        if max_yield_s < 0:
            raise ValueError(f"max_yield_s must be >= 0, got {max_yield_s}")
        self.max_yield_s = max_yield_s
        self._in_flight = 0
        self._waiting = 0
        self._blocked = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set while nothing is in flight or some tracked request waits on bulk work: what
        # releases bulk work that the waiting request depends on (the index follower).
        self._idle_or_awaited = asyncio.Event()
        self._idle_or_awaited.set()

    @property
    def in_flight(self) -> int:
        """Tracked requests now in flight."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Bulk steps now waiting for tracked requests to finish."""
        return self._waiting

    @property
    def blocked_on_bulk(self) -> int:
        """Tracked requests now waiting for bulk work (not counted in :attr:`in_flight`)."""
        return self._blocked

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed request as in flight (also when it fails or is cancelled)."""
        self._enter()
        token = _TRACKED.set(self)
        try:
            yield
        finally:
            _TRACKED.reset(token)
            self._leave()

    @contextlib.contextmanager
    def waiting_on_bulk(self) -> Iterator[None]:
        """While the enclosed code waits for bulk work, its tracked request is not in flight.

        For a search waiting until the index has applied a position: bulk work (the index
        follower) must not yield to the request that waits for it. Outside a request tracked
        by this gauge (or nested in this context manager) it changes nothing.
        """
        if _TRACKED.get() is not self:
            yield
            return
        self._leave()
        self._blocked += 1
        self._update()
        token = _TRACKED.set(None)
        try:
            yield
        finally:
            _TRACKED.reset(token)
            self._blocked -= 1
            self._enter()

    def _enter(self) -> None:
        self._in_flight += 1
        self._update()

    def _leave(self) -> None:
        self._in_flight -= 1
        self._update()

    def _update(self) -> None:
        for event, state in (
            (self._idle, self._in_flight == 0),
            (self._idle_or_awaited, self._in_flight == 0 or self._blocked > 0),
        ):
            if state:
                event.set()
            else:
                event.clear()

    async def yield_to_foreground(
        self, max_wait_s: float | None = None, *, awaited: bool = False
    ) -> float:
        """Before a step of bulk work: let in-flight requests run first (bounded).

        Args:
            max_wait_s: Longest wait in seconds (``None``: the gauge's ``max_yield_s``).
            awaited: The bulk work is what a request waiting in :meth:`waiting_on_bulk`
                waits for (the index follower): it does not wait while such a request
                exists, and stops waiting as soon as one appears, so that read-your-writes
                waits progress at full speed.

        Returns:
            Seconds waited (0.0 when nothing was in flight).

        Raises:
            ValueError: ``max_wait_s`` is negative.
        """
        bound = self.max_yield_s if max_wait_s is None else max_wait_s
        if bound < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {bound}")
        release = self._idle_or_awaited if awaited else self._idle
        if release.is_set() or bound == 0:
            await asyncio.sleep(0)
            return 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        # asyncio.timeout, not wait_for (Python 3.11 cancellation semantics).
        self._waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(bound):
                    await release.wait()
        finally:
            self._waiting -= 1
        waited = loop.time() - start
        BULK_YIELD_SECONDS.inc(waited)
        return waited


RATE_LIMITED = "RATE_LIMITED"
"""``ErrorInfo.reason`` of a request refused by a per-tenant rate limit."""

ADMISSION_REFUSED = Counter(
    "aeterna_admission_refused_total",
    "Bulk write requests refused by the per-tenant rate limit (RESOURCE_EXHAUSTED).",
)


class RateLimited(ResourceExhausted):
    """``RESOURCE_EXHAUSTED`` with ``RetryInfo``: the tenant's share of bulk writes is spent.

    Args:
        message: Message for the caller.
        retry_after_s: When the request would be admitted, in seconds from now
            (``RetryInfo.retry_delay``).
        metadata: Extra ``ErrorInfo.metadata``.
    """

    def __init__(
        self, message: str, *, retry_after_s: float, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, reason=RATE_LIMITED, metadata=metadata)
        self.retry_after_s = retry_after_s

    def details(self) -> list[any_pb2.Any]:
        """``ErrorInfo`` and ``RetryInfo`` details."""
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, math.ceil(self.retry_after_s * 1e9)))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [*super().details(), packed]


class TenantRateLimit:
    """Per-tenant admission limit of bulk write items: one token bucket per tenant.

    A noisy neighbour's import must not take a replica's CPU from every other tenant's
    searches (each imported memory costs its embedding, its rows, and one apply on every
    replica's index). Each tenant's bucket refills at ``rate`` items per second up to
    ``burst``; a request of ``n`` items is admitted while the bucket holds ``min(n, burst)``
    and then takes all ``n`` (the balance may go negative, so that a batch larger than the
    burst is admitted at the same average rate: the generic cell rate algorithm's
    behaviour, ITU-T I.371). A refused request is told when it would be admitted
    (``RetryInfo``), and nothing is written.

    The buckets live in this process: with ``r`` replicas behind the edge, a tenant's total
    is about ``r * rate``. Event-loop only: not thread-safe.

    Args:
        rate: Items per second per tenant (0: no limit).
        burst: Bucket size in items (>= 1).
        clock: Monotonic clock in seconds (tests).

    Raises:
        ValueError: ``rate`` negative or ``burst`` below 1.
    """

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        """tenant -> (balance in items, clock at that balance)."""

    def admit(self, tenant: str, items: int) -> None:
        """Take ``items`` from ``tenant``'s bucket, or refuse the request.

        Args:
            tenant: The tenant id (from the verified token).
            items: Items the request writes (>= 1).

        Raises:
            RateLimited: The bucket holds less than ``min(items, burst)``; its
                ``retry_after_s`` is the wait until it will, at ``rate``.
        """
        if self.rate == 0:
            return
        now = self._clock()
        balance, then = self._buckets.get(tenant, (self.burst, now))
        balance = min(self.burst, balance + (now - then) * self.rate)
        need = min(items, self.burst)
        if balance + 1e-9 < need:  # a retry after exactly the delay is admitted (rounding)
            self._buckets[tenant] = (balance, now)
            ADMISSION_REFUSED.inc()
            raise RateLimited(
                f"tenant {tenant} is over its bulk write rate ({self.rate:g} items/s per "
                "replica); retry after the delay in RetryInfo",
                retry_after_s=(need - balance) / self.rate,
                metadata={"limit_items_per_s": f"{self.rate:g}"},
            )
        self._buckets[tenant] = (balance - items, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (they equal a new one): memory stays bounded
        by the tenants active within ``burst / rate`` seconds."""
        for tenant, (balance, then) in list(self._buckets.items()):
            if balance + (now - then) * self.rate >= self.burst:
                del self._buckets[tenant]


_MAX_BUCKETS = 10_000
"""Buckets kept before the full ones are dropped."""
