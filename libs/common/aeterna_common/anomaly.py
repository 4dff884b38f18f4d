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

import enum
import statistics
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

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
    """

    tenant_id: str
    service: str
    signal: Signal
    kind: Kind
    value: float
    level: float
    score: float
    at: float

    def payload(self) -> dict[str, object]:
        """The ``anomaly.detected`` event payload."""
        return {
            "signal": self.signal.value,
            "kind": self.kind.value,
            "value": self.value,
            "level": self.level,
            "score": round(self.score, 3),
            "at": self.at,
        }


Sink = Callable[[Anomaly], Awaitable[None]]
"""Receives each detection (e.g. appends it to the outbox)."""


class AnomalyMonitor:
    """A :class:`RobustDetector` per (tenant, signal) of one service.

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
        self._detectors: dict[tuple[str, Signal], RobustDetector] = {}

    async def observe(self, tenant_id: str, signal: Signal, at: float, value: float) -> Verdict:
        """Feed one point of a tenant's signal; emits what it detects.

        Args:
            tenant_id: The tenant.
            signal: The signal.
            at: The point's time, seconds since the epoch.
            value: The value.

        Returns:
            The detector's verdict.
        """
        key = (tenant_id, signal)
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
                    tenant_id, self.service, signal, kind, value, level or 0.0, verdict.score, at
                )
            )
        return verdict
