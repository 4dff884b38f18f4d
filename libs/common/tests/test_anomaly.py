"""The anomaly detector on synthetic series with injected spikes and level shifts.

Each signal kind gets series of 600 one-minute points with its own noise (Poisson request
rates and usage, binomial error ratios, log-normal latencies) and a slow daily cycle, and in
each series three injected events at random places: a one-point spike, a level shift that
persists, and a second spike at the shifted level. Magnitudes (:data:`EVENTS`) are what an
operator would want paged: a rate ×2.5 for a minute, an error ratio 20 points above its level
(1 %, or 10 % after the shift), a latency ×3, usage ×2; shifts ×1.6, to 10 %, ×1.6, ×1.5.

Scoring is by event: an alert (an episode's first detection) is a true positive when it falls
in an injected event's window (its onset to :data:`TOLERANCE` points later), else a false
positive; an event is found when any alert falls in its window. Precision = true alerts /
alerts, recall = events found / events, per signal and overall, printed and asserted against
:data:`aeterna_common.anomaly.TARGET_PRECISION` (0.9) and ``TARGET_RECALL`` (0.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from aeterna_common.anomaly import (
    ANOMALIES,
    SIGNAL_DEFAULTS,
    TARGET_PRECISION,
    TARGET_RECALL,
    Anomaly,
    AnomalyMonitor,
    DetectorConfig,
    Kind,
    RobustDetector,
    Signal,
    TenantTraffic,
    feed,
)

LENGTH = 600
SERIES = 30
TOLERANCE = 10
"""Points after an event's onset in which an alert counts for it."""

EVENTS = {
    # signal: (spike factor or added ratio, shift factor or ratio)
    Signal.REQUEST_RATE: (2.5, 1.6),
    Signal.ERROR_RATIO: (0.2, 0.10),
    Signal.LATENCY: (3.0, 1.6),
    Signal.USAGE: (2.0, 1.5),
}


@dataclass
class Series:
    values: list[float]
    onsets: list[int]


def synthetic(signal: Signal, rng: np.random.Generator) -> Series:
    """One series with a spike, a lasting shift and a spike after it."""
    t = np.arange(LENGTH)
    cycle = 1 + 0.2 * np.sin(2 * math.pi * (t / 1440 + rng.random()))
    spike1 = int(rng.integers(80, 200))
    shift = int(rng.integers(240, 360))
    spike2 = int(rng.integers(420, 580))
    spike_m, shift_m = EVENTS[signal]
    level = np.ones(LENGTH)
    level[shift:] = shift_m
    if signal is Signal.ERROR_RATIO:
        p = np.full(LENGTH, 0.01)
        p[shift:] = shift_m
        p[spike1] += spike_m
        p[spike2] += spike_m
        n = rng.poisson(200 * cycle)
        values = rng.binomial(np.maximum(n, 1), p) / np.maximum(n, 1)
    elif signal is Signal.LATENCY:
        base = 0.05 * cycle * level
        base[spike1] *= spike_m
        base[spike2] *= spike_m
        values = base * rng.lognormal(0.0, 0.08, LENGTH)
    else:
        mean = (100.0 if signal is Signal.REQUEST_RATE else 500.0) * cycle * level
        mean[spike1] *= spike_m
        mean[spike2] *= spike_m
        values = rng.poisson(mean).astype(float)
    return Series([float(v) for v in values], [spike1, shift, spike2])


def score(signal: Signal, config: DetectorConfig, seed: int) -> tuple[int, int, int, int]:
    """(true alerts, alerts, events found, events) over :data:`SERIES` series."""
    rng = np.random.default_rng(seed)
    true_alerts = alerts = found = events = 0
    for _ in range(SERIES):
        s = synthetic(signal, rng)
        detector = RobustDetector(config)
        starts = [i for i, v in enumerate(s.values) if Kind.SPIKE in detector.observe(v).new]
        alerts += len(starts)
        true_alerts += sum(any(o <= i <= o + TOLERANCE for o in s.onsets) for i in starts)
        events += len(s.onsets)
        found += sum(any(o <= i <= o + TOLERANCE for i in starts) for o in s.onsets)
    return true_alerts, alerts, found, events


def test_precision_and_recall_on_synthetic_series() -> None:
    totals = [0, 0, 0, 0]
    for n, signal in enumerate(Signal):
        t, a, f, e = score(signal, SIGNAL_DEFAULTS[signal], seed=1000 + n)
        print(
            f"{signal.value:>13}: precision {t / max(a, 1):.3f} ({t}/{a} alerts), "
            f"recall {f / e:.3f} ({f}/{e} events)"
        )
        assert t / max(a, 1) >= TARGET_PRECISION, signal
        assert f / e >= TARGET_RECALL, signal
        totals = [x + y for x, y in zip(totals, (t, a, f, e), strict=True)]
    t, a, f, e = totals
    print(f"{'all':>13}: precision {t / a:.3f}, recall {f / e:.3f}")
    assert t / a >= TARGET_PRECISION
    assert f / e >= TARGET_RECALL


def test_a_naive_three_sigma_detector_does_worse() -> None:
    """The baseline: mean ± 3 standard deviations of the window, no robust statistics and
    no episode logic. It must lose on precision, or the robust machinery earns nothing."""
    rng = np.random.default_rng(7)
    alerts = true_alerts = 0
    for _ in range(SERIES):
        s = synthetic(Signal.REQUEST_RATE, rng)
        for i in range(60, LENGTH):
            window = np.asarray(s.values[i - 60 : i])
            if abs(s.values[i] - window.mean()) > 3 * window.std():
                alerts += 1
                true_alerts += any(o <= i <= o + TOLERANCE for o in s.onsets)
    robust_t, robust_a, _, _ = score(
        Signal.REQUEST_RATE, SIGNAL_DEFAULTS[Signal.REQUEST_RATE], seed=7
    )
    print(f"naive 3-sigma precision {true_alerts / alerts:.3f} vs robust {robust_t / robust_a:.3f}")
    assert true_alerts / alerts < robust_t / robust_a


def test_a_level_shift_is_one_episode_and_rebaselines() -> None:
    detector = RobustDetector(DetectorConfig(min_history=10, min_scale=1.0))
    rng = np.random.default_rng(3)
    news: list[tuple[int, tuple[Kind, ...]]] = []
    for i in range(200):
        value = float(rng.poisson(100 if i < 100 else 200))
        verdict = detector.observe(value)
        if verdict.new:
            news.append((i, verdict.new))
    assert [k for _, ks in news for k in ks] == [Kind.SPIKE, Kind.LEVEL_SHIFT]
    assert news[0][0] == 100
    assert detector.level is not None and 180 < detector.level < 220


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        DetectorConfig(alpha=0)
    with pytest.raises(ValueError):
        DetectorConfig(shift_confirm=1)


async def test_monitor_emits_to_its_sink_and_counts_the_metric() -> None:
    seen: list[Anomaly] = []

    async def sink(anomaly: Anomaly) -> None:
        seen.append(anomaly)

    monitor = AnomalyMonitor("memory", sink)
    before = ANOMALIES.labels("memory", "usage", "SPIKE")._value.get()
    for i in range(40):
        await monitor.observe("t-a", Signal.USAGE, float(i), 100.0 + (i % 3))
        await monitor.observe("t-b", Signal.USAGE, float(i), 100.0 + (i % 3))
    await monitor.observe("t-a", Signal.USAGE, 40.0, 1000.0)
    assert [(a.tenant_id, a.kind, a.value) for a in seen] == [("t-a", Kind.SPIKE, 1000.0)]
    assert seen[0].payload()["signal"] == "usage"
    assert ANOMALIES.labels("memory", "usage", "SPIKE")._value.get() == before + 1


async def test_traffic_feeds_rate_error_ratio_and_latency_per_tenant() -> None:
    """The interceptor's tally, drained each interval: a tenant whose calls start failing
    (INTERNAL) is flagged on its error ratio; refusals (PERMISSION_DENIED) are not faults; a
    tenant that falls silent is flagged on its rate."""
    seen: list[Anomaly] = []

    async def sink(anomaly: Anomaly) -> None:
        seen.append(anomaly)

    monitor = AnomalyMonitor("memory", sink)
    traffic = TenantTraffic()
    for minute in range(30):
        for i in range(50):
            traffic.record("steady", "PERMISSION_DENIED" if i % 10 == 0 else "OK", 0.02)
            if minute < 29:
                traffic.record("quiet", "OK", 0.01)
            failing = minute == 25 and i % 2 == 0
            traffic.record("flaky", "INTERNAL" if failing else "OK", 0.03)
        traffic.record("", "OK", 0.01)  # no tenant: not counted
        await feed(monitor, traffic, float(minute))
    assert {(a.tenant_id, a.signal) for a in seen} == {
        ("flaky", Signal.ERROR_RATIO),
        ("quiet", Signal.REQUEST_RATE),
    }
    assert monitor.tenants(Signal.REQUEST_RATE) == {"steady", "quiet", "flaky"}
