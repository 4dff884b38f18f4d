"""Anomaly detection on per-tenant, per-service signals (issue 10, item 5).

A :class:`RobustDetector` watches one series (say, tenant ``acme``'s search rate on memory, one
point a minute). Each point is compared with the recent normal history:

* **Level**: an exponentially weighted moving average (EWMA) of the accepted points, seeded
  with the history's median: it follows slow drift (daily cycles) without being pulled by
  outliers, because anomalous points are never fed into it.
* **Spread**: the median absolute deviation (MAD) of the last ``window`` accepted points around
  their median, scaled by 1.4826 so that it estimates the standard deviation of normal data
  (Leys et al., "Detecting outliers: Do not use standard deviation around the mean, use
  absolute deviation around the median", J. Exp. Soc. Psychol. 49(4), 2013), floored by
  ``min_scale`` and ``min_relative_scale`` × level so that a near-constant or sparse series
  (error ratios of zero) does not flag every wiggle.
* **Score**: ``(x - level) / spread``, a robust z-score; ``|score| > threshold`` (default 5:
  Leys et al. suggest 2.5-3 for "moderately conservative"; per-minute operational series are
  heavy-tailed, and the synthetic evaluation below meets precision 0.9 there) is anomalous.

One anomalous point opens an **episode** and emits one :class:`Anomaly` (kind ``SPIKE``); the
episode lasts while points stay anomalous and emits nothing more. When ``shift_confirm``
consecutive points are anomalous on the same side, the series has moved: the detector
re-baselines on those points (level and window) and reports the episode as a
``LEVEL_SHIFT`` (one more :class:`Anomaly`, same episode). So a spike costs one alert and a
level shift at most two, which the evaluation counts as one event.

:class:`AnomalyMonitor` keeps a detector per (tenant, service, signal), counts detections in the
metric ``aeterna_anomalies_total{service, signal, kind}`` (no tenant label: bounded
cardinality) and hands each :class:`Anomaly` to a sink, which services use to append an
``{service}.anomaly.detected`` event (``ANOMALY_DETECTED``) to their outbox.

Evaluation (``libs/common/tests/test_anomaly.py``): synthetic series of each signal kind
with injected spikes and level shifts; precision and recall over events must reach
:data:`TARGET_PRECISION` and :data:`TARGET_RECALL`.
"""

from __future__ import annotations

import asyncio
import enum
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger("aeterna.anomaly")

TARGET_PRECISION = 0.9
"""Precision the detector must reach on the synthetic benchmark (alerts that are real)."""

TARGET_RECALL = 0.8
"""Recall the detector must reach on the synthetic benchmark (injected events found)."""

MAD_TO_SIGMA = 1.4826
"""1 / Φ⁻¹(3/4): MAD × 1.4826 estimates σ of normal data (Leys et al. 2013)."""

ANOMALY_EVENT = "anomaly.detected"
"""Suffix of the event type: ``{service}.anomaly.detected`` (``ANOMALY_DETECTED``)."""

ANOMALIES = Counter(
    "aeterna_anomalies_total",
    "Anomalies detected on per-tenant signals (the tenant is in the event, not a label).",
    ["service", "signal", "kind"],
)


class Signal(enum.StrEnum):
    """What a series measures."""

    REQUEST_RATE = "request_rate"
    """Requests per interval."""
    ERROR_RATIO = "error_ratio"
    """Failed / all requests in the interval, in [0, 1]."""
    LATENCY = "latency"
    """A latency quantile of the interval, in seconds."""
    USAGE = "usage"
    """Billable units per interval (:mod:`aeterna_common.usage`)."""


class Kind(enum.StrEnum):
    """What kind of anomaly."""

    SPIKE = "SPIKE"
    """A point far from the level (opens an episode)."""
    LEVEL_SHIFT = "LEVEL_SHIFT"
    """The level moved: ``shift_confirm`` anomalous points on one side."""


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Tuning of a :class:`RobustDetector`.

    Attributes:
        window: Accepted points kept for the MAD.
        min_history: Points before the first detection (warm-up).
        alpha: EWMA weight of a new accepted point, in (0, 1].
        threshold: Robust z-score beyond which a point is anomalous.
        min_scale: Floor of the spread, in the series' unit.
        min_relative_scale: Floor of the spread as a fraction of the level.
        shift_confirm: Consecutive same-side anomalous points that mean a level shift.
    """

    window: int = 60
    min_history: int = 20
    alpha: float = 0.1
    threshold: float = 5.0
    min_scale: float = 0.0
    min_relative_scale: float = 0.02
    shift_confirm: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1 or self.window < 3 or self.min_history < 3:
            raise ValueError("alpha must be in (0, 1], window and min_history >= 3")
        if self.threshold <= 0 or self.shift_confirm < 2:
            raise ValueError("threshold must be > 0 and shift_confirm >= 2")


SIGNAL_DEFAULTS: dict[Signal, DetectorConfig] = {
    Signal.REQUEST_RATE: DetectorConfig(min_scale=1.0),
    Signal.ERROR_RATIO: DetectorConfig(min_scale=0.01, min_relative_scale=0.0),
    Signal.LATENCY: DetectorConfig(min_scale=0.001, min_relative_scale=0.05),
    Signal.USAGE: DetectorConfig(min_scale=1.0),
}
"""Per-signal floors: a request rate or usage moves by whole units; an error ratio by at least
one point in a hundred; a latency by at least 1 ms or 5 %."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the detector made of one point.

    Attributes:
        score: Robust z-score (0 during warm-up).
        anomalous: Beyond the threshold.
        new: The detections this point caused (empty for most points).
    """

    score: float
    anomalous: bool
    new: tuple[Kind, ...] = ()


@dataclass
class RobustDetector:
    """EWMA level, MAD spread, episodes and re-baselining (see the module docstring).

    Args:
        config: Tuning.
    """

    config: DetectorConfig = field(default_factory=DetectorConfig)
    _window: deque[float] = field(init=False)
    _level: float | None = field(init=False, default=None)
    _pending: list[float] = field(init=False, default_factory=list)
    _side: int = field(init=False, default=0)
    _in_episode: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._window = deque(maxlen=self.config.window)

    @property
    def level(self) -> float | None:
        """The current level (None during warm-up)."""
        return self._level

    def spread(self) -> float:
        """The current spread (σ estimate, floored)."""
        c = self.config
        values = list(self._window)
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        level = abs(self._level if self._level is not None else median)
        return max(MAD_TO_SIGMA * mad, c.min_scale, c.min_relative_scale * level, 1e-12)

    def observe(self, value: float) -> Verdict:
        """Feed one point.

        Args:
            value: The series' next value.

        Returns:
            The verdict; ``new`` names the anomalies to emit.
        """
        c = self.config
        if len(self._window) < c.min_history:
            self._window.append(value)
            if len(self._window) == c.min_history:
                self._level = statistics.median(self._window)
            return Verdict(0.0, False)
        assert self._level is not None
        score = (value - self._level) / self.spread()
        if abs(score) <= c.threshold:
            self._accept(value)
            self._pending.clear()
            self._side = 0
            self._in_episode = False
            return Verdict(score, False)
        side = 1 if score > 0 else -1
        new: list[Kind] = []
        if not self._in_episode:
            self._in_episode = True
            new.append(Kind.SPIKE)
        if side != self._side:
            self._pending.clear()
            self._side = side
        self._pending.append(value)
        if len(self._pending) >= c.shift_confirm:
            # The series moved: the anomalous points are its new normal.
            self._window.clear()
            self._window.extend(self._pending)
            self._level = statistics.median(self._pending)
            self._pending.clear()
            self._side = 0
            new.append(Kind.LEVEL_SHIFT)
        return Verdict(score, True, tuple(new))

    def _accept(self, value: float) -> None:
        self._window.append(value)
        assert self._level is not None
        self._level += self.config.alpha * (value - self._level)


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One detection.

    Attributes:
        tenant_id: The tenant.
        service: The service whose signal it is.
        signal: What the series measures.
        kind: Spike or level shift.
        value: The point's value.
        level: The level it was compared with.
        score: Its robust z-score.
        at: The point's time (seconds since the epoch).
        metric: For :attr:`Signal.USAGE`, the billable metric
            (:data:`aeterna_common.usage.METRICS`); empty otherwise.
    """

    tenant_id: str
    service: str
    signal: Signal
    kind: Kind
    value: float
    level: float
    score: float
    at: float
    metric: str = ""

    def payload(self) -> dict[str, object]:
        """The ``anomaly.detected`` event payload (``metric`` only for a usage series)."""
        out: dict[str, object] = {
            "signal": self.signal.value,
            "kind": self.kind.value,
            "value": self.value,
            "level": self.level,
            "score": round(self.score, 3),
            "at": self.at,
        }
        if self.metric:
            out["metric"] = self.metric
        return out


Sink = Callable[[Anomaly], Awaitable[None]]
"""Receives each detection (e.g. appends it to the outbox)."""


class AnomalyMonitor:
    """A :class:`RobustDetector` per (tenant, signal, metric) of one service (the metric names
    one of several series of a signal, e.g. each billable usage metric; empty otherwise).

    Args:
        service: The service.
        sink: Receives each :class:`Anomaly`.
        configs: Per-signal tuning (default :data:`SIGNAL_DEFAULTS`).
        max_series: Most series kept; the least recently fed is dropped beyond it (memory
            bound for many tenants).
    """

    def __init__(
        self,
        service: str,
        sink: Sink,
        *,
        configs: dict[Signal, DetectorConfig] | None = None,
        max_series: int = 100_000,
    ) -> None:
        self.service = service
        self.sink = sink
        self.configs = {**SIGNAL_DEFAULTS, **(configs or {})}
        self.max_series = max_series
        self._detectors: dict[tuple[str, Signal, str], RobustDetector] = {}

    def tenants(self, signal: Signal) -> set[str]:
        """Tenants with a series of ``signal``."""
        return {t for t, s, _ in self._detectors if s is signal}

    def series(self, signal: Signal) -> set[tuple[str, str]]:
        """(tenant, metric) of every series of ``signal``."""
        return {(t, m) for t, s, m in self._detectors if s is signal}

    async def observe(
        self, tenant_id: str, signal: Signal, at: float, value: float, *, metric: str = ""
    ) -> Verdict:
        """Feed one point of a tenant's signal; emits what it detects.

        Args:
            tenant_id: The tenant.
            signal: The signal.
            at: The point's time, seconds since the epoch.
            value: The value.
            metric: Which series of the signal (a usage metric); empty for the others.

        Returns:
            The detector's verdict.
        """
        key = (tenant_id, signal, metric)
        detector = self._detectors.pop(key, None)
        if detector is None:
            detector = RobustDetector(self.configs[signal])
            if len(self._detectors) >= self.max_series:
                self._detectors.pop(next(iter(self._detectors)))
        self._detectors[key] = detector  # most recently fed last
        level = detector.level
        verdict = detector.observe(value)
        for kind in verdict.new:
            ANOMALIES.labels(self.service, signal.value, kind.value).inc()
            await self.sink(
                Anomaly(
                    tenant_id,
                    self.service,
                    signal,
                    kind,
                    value,
                    level or 0.0,
                    verdict.score,
                    at,
                    metric,
                )
            )
        return verdict


FAULT_CODES = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"})
"""gRPC codes that count as errors in the error ratio: the service's faults, not the caller's
(a refusal such as PERMISSION_DENIED or INVALID_ARGUMENT is a correct answer)."""

LATENCY_SAMPLE = 2048
"""Latencies kept per tenant and interval for the p95 (a uniform reservoir beyond it)."""


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


class TenantTraffic:
    """Requests per tenant in the current interval, fed by the request interceptor
    (:mod:`aeterna_common.interceptors`) and drained by :func:`run_monitor`. In process: each
    replica watches its own share of the traffic (the gateway balances it evenly)."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}

    def record(self, tenant_id: str, code: str, seconds: float) -> None:
        """Count one finished call.

        Args:
            tenant_id: The caller's tenant ("" for none: not counted).
            code: The gRPC status code name.
            seconds: Handling time.
        """
        if not tenant_id:
            return
        tally = self._tallies.setdefault(tenant_id, _Tally())
        tally.requests += 1
        tally.errors += code in FAULT_CODES
        if len(tally.latencies) < LATENCY_SAMPLE:
            tally.latencies.append(seconds)
        else:
            # Reservoir sampling (Vitter's algorithm R): each call kept with equal chance.
            slot = random.randrange(tally.requests)
            if slot < LATENCY_SAMPLE:
                tally.latencies[slot] = seconds

    def drain(self) -> dict[str, tuple[int, int, float]]:
        """The interval's figures per tenant, and a new interval.

        Returns:
            Tenant → (requests, errors, p95 latency in seconds).
        """
        tallies, self._tallies = self._tallies, {}
        out: dict[str, tuple[int, int, float]] = {}
        for tenant_id, t in tallies.items():
            ordered = sorted(t.latencies)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else 0.0
            out[tenant_id] = (t.requests, t.errors, p95)
        return out


TRAFFIC = TenantTraffic()
"""This process's tally (one server per process)."""


async def feed(monitor: AnomalyMonitor, traffic: TenantTraffic, at: float) -> int:
    """Feed one interval of ``traffic`` to ``monitor``: request rate, error ratio and p95
    latency per tenant; a tenant seen before and silent now gets a rate of 0 (a stop is an
    anomaly too).

    Returns:
        Tenants fed.
    """
    figures = traffic.drain()
    known = monitor.tenants(Signal.REQUEST_RATE)
    for tenant_id in sorted(known - set(figures)):
        await monitor.observe(tenant_id, Signal.REQUEST_RATE, at, 0.0)
    for tenant_id, (requests, errors, p95) in sorted(figures.items()):
        await monitor.observe(tenant_id, Signal.REQUEST_RATE, at, float(requests))
        await monitor.observe(tenant_id, Signal.ERROR_RATIO, at, errors / requests)
        await monitor.observe(tenant_id, Signal.LATENCY, at, p95)
    return len(known | set(figures))


class UsageWindow:
    """Each tenant's billable usage per interval, read from the service's ``usage_hourly`` rows
    (:mod:`aeterna_common.usage`), which hold running totals per tenant, hour and metric, or
    from another table of that shape (governance's ledger ``tenant_usage_hourly``, whose rows
    per producing service are summed).

    :meth:`drain` reads the rows of the current and the previous hour (the previous one still
    grows for work whose transaction began before the hour turned) and returns what each row
    gained since the last drain. The first drain only takes the baseline: usage recorded before
    the job started is not one interval's worth. Every replica reads the whole table, so every
    replica sees the same figures (unlike :class:`TenantTraffic`, which is its own share).

    Args:
        indexer: A pool of the indexer role (cross-tenant SELECT on ``table``).
        table: The table: ``tenant_id``, ``hour``, ``metric`` and ``quantity`` columns, the
            quantity a running total per hour.
        metrics: Only these metrics; None: every metric.

    Raises:
        ValueError: ``table`` is not a plain identifier.
    """

    def __init__(
        self, indexer: Any, table: str = "usage_hourly", metrics: Sequence[str] | None = None
    ) -> None:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        self.indexer = indexer
        self.table = table
        self.metrics = list(metrics) if metrics is not None else None
        self._seen: dict[tuple[str, Any, str], int] = {}
        self._primed = False

    async def drain(self) -> dict[str, dict[str, int]]:
        """Usage gained since the last drain.

        Returns:
            Tenant → metric → units gained (only tenants and metrics that gained some; empty
            on the first call).
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, hour, metric, sum(quantity) AS quantity "
                f"FROM {self.table} WHERE hour >= date_trunc('hour', now()) - interval '1 hour' "
                "AND ($1::text[] IS NULL OR metric = ANY($1)) GROUP BY tenant_id, hour, metric",
                self.metrics,
            )
        seen: dict[tuple[str, Any, str], int] = {}
        gained: dict[str, dict[str, int]] = {}
        for r in rows:
            key = (r["tenant_id"], r["hour"], r["metric"])
            seen[key] = int(r["quantity"])
            delta = seen[key] - self._seen.get(key, 0)
            if self._primed and delta > 0:
                per_tenant = gained.setdefault(r["tenant_id"], {})
                per_tenant[r["metric"]] = per_tenant.get(r["metric"], 0) + delta
        # Rows older than the previous hour no longer change: forget them.
        self._seen = seen
        self._primed = True
        return gained


async def feed_usage(monitor: AnomalyMonitor, usage: UsageWindow, at: float) -> int:
    """Feed one interval of ``usage`` to ``monitor``: one :attr:`Signal.USAGE` series per tenant
    and billable metric (embedding tokens, searches, bytes stored...); a series seen before and
    silent now gets 0.

    Returns:
        Series fed.
    """
    gained = await usage.drain()
    points = {(t, m): float(q) for t, metrics in gained.items() for m, q in metrics.items()}
    for tenant_id, metric in monitor.series(Signal.USAGE) - set(points):
        points[(tenant_id, metric)] = 0.0
    for (tenant_id, metric), value in sorted(points.items()):
        await monitor.observe(tenant_id, Signal.USAGE, at, value, metric=metric)
    return len(points)


async def run_monitor(
    monitor: AnomalyMonitor, interval_s: float, usage: UsageWindow | None = None
) -> None:
    """Feed :data:`TRAFFIC` (and ``usage``, when given) to ``monitor`` every ``interval_s``
    seconds until cancelled (0 disables). A failing read or sink is logged and the loop goes
    on."""
    if not interval_s:
        return
    if usage is not None:
        try:
            await usage.drain()  # the baseline
        except Exception:
            log.exception("anomaly.usage_failed", service=monitor.service)
    while True:
        await asyncio.sleep(interval_s)
        at = time.time()
        try:
            await feed(monitor, TRAFFIC, at)
        except Exception:
            log.exception("anomaly.feed_failed", service=monitor.service)
        if usage is None:
            continue
        try:
            await feed_usage(monitor, usage, at)
        except Exception:
            log.exception("anomaly.usage_failed", service=monitor.service)


def outbox_sink(db: Any, channel: str, service: str) -> Sink:
    """A sink appending ``{service}.anomaly.detected`` to the service's outbox, in a
    transaction of the anomaly's tenant (so it reaches the bus like every event).

    Args:
        db: The service's :class:`aeterna_common.db.Database` (application role).
        channel: The service's outbox NOTIFY channel.
        service: The service.
    """
    from aeterna_common.writes import append_event

    async def sink(anomaly: Anomaly) -> None:
        async def work(conn: Any) -> int:
            return await append_event(
                conn,
                channel,
                anomaly.tenant_id,
                f"{service}.{ANOMALY_EVENT}",
                f"tenants/{anomaly.tenant_id}",
                f"services/{service}",
                anomaly.payload(),
            )

        await db.run(anomaly.tenant_id, work)

    return sink


def monitor_job(
    db: Any, channel: str, service: str, indexer: Any = None, usage: UsageWindow | None = None
) -> Callable[[], Coroutine[Any, Any, None]]:
    """The background job of a service: an :class:`AnomalyMonitor` over its traffic and its
    tenants' usage, every ``AETERNA_ANOMALY_INTERVAL_S`` seconds (:class:`AnomalySettings`),
    detections to the outbox.

    Args:
        db: The service's application pool (the outbox sink).
        channel: Its outbox NOTIFY channel.
        service: The service.
        indexer: The indexer pool of a service that keeps ``usage_hourly``: its usage is read
            from there (:class:`UsageWindow`).
        usage: Another usage window (governance's ledger); overrides ``indexer``.

    Returns:
        The job, run until cancelled.
    """
    settings = AnomalySettings()
    monitor = AnomalyMonitor(service, outbox_sink(db, channel, service))
    if usage is None and indexer is not None:
        usage = UsageWindow(indexer)

    async def job() -> None:
        await run_monitor(monitor, settings.interval_s, usage)

    return job


class AnomalySettings(BaseSettings):
    """Anomaly detection of a service (environment prefix ``AETERNA_ANOMALY_``).

    Attributes:
        interval_s: Seconds per point of every series (0 disables detection).
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_ANOMALY_", extra="ignore")

    interval_s: float = Field(default=60.0, ge=0)
