"""ForegroundGauge: bulk work waits for tracked requests, bounded, and never otherwise."""

from __future__ import annotations

import asyncio

import pytest
from aeterna_common.admission import ForegroundGauge


async def test_nothing_in_flight_means_no_wait() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    assert await gauge.yield_to_foreground() == 0.0
    assert gauge.in_flight == 0 and gauge.waiting == 0


async def test_bulk_step_resumes_only_after_the_request_in_flight_ends() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    events: list[str] = []
    release = asyncio.Event()

    async def request() -> None:
        with gauge.track():
            await release.wait()
            events.append("request done")

    async def bulk() -> None:
        await gauge.yield_to_foreground()
        events.append("bulk step")

    req = asyncio.create_task(request())
    await asyncio.sleep(0)
    assert gauge.in_flight == 1
    step = asyncio.create_task(bulk())
    for _ in range(10):
        await asyncio.sleep(0)
    assert gauge.waiting == 1 and not step.done()
    release.set()
    await asyncio.gather(req, step)
    assert events == ["request done", "bulk step"]
    assert gauge.in_flight == 0 and gauge.waiting == 0


async def test_the_wait_is_bounded_while_requests_keep_running() -> None:
    gauge = ForegroundGauge(max_yield_s=0.01)
    with gauge.track():
        waited = await gauge.yield_to_foreground()
        assert gauge.in_flight == 1  # the request is still running: the step went on anyway
    assert waited > 0
    assert gauge.waiting == 0


async def test_zero_bound_never_waits() -> None:
    gauge = ForegroundGauge(max_yield_s=0)
    with gauge.track():
        assert await gauge.yield_to_foreground() == 0.0


async def test_a_failed_request_is_no_longer_counted() -> None:
    gauge = ForegroundGauge()
    with pytest.raises(RuntimeError), gauge.track():
        raise RuntimeError("search failed")
    assert gauge.in_flight == 0
    assert await gauge.yield_to_foreground() == 0.0


def test_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_yield_s"):
        ForegroundGauge(max_yield_s=-1)


async def test_a_request_waiting_on_bulk_work_is_not_in_flight_meanwhile() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    with gauge.track():
        with gauge.waiting_on_bulk():
            assert gauge.in_flight == 0 and gauge.blocked_on_bulk == 1
            # Bulk work does not wait for it: the request waits for the bulk work.
            assert await gauge.yield_to_foreground() == 0.0
            with gauge.waiting_on_bulk():  # nested: no second decrement
                assert gauge.in_flight == 0 and gauge.blocked_on_bulk == 1
        assert gauge.in_flight == 1 and gauge.blocked_on_bulk == 0


async def test_waiting_on_bulk_outside_a_tracked_request_changes_nothing() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    other = ForegroundGauge(max_yield_s=60)
    with gauge.waiting_on_bulk():
        assert gauge.in_flight == 0 and gauge.blocked_on_bulk == 0
    with other.track(), gauge.waiting_on_bulk():  # tracked by another gauge
        assert gauge.in_flight == 0 and other.in_flight == 1 and gauge.blocked_on_bulk == 0


async def test_tasks_started_by_a_tracked_request_count_as_that_request() -> None:
    gauge = ForegroundGauge(max_yield_s=60)

    async def wait_part() -> int:
        with gauge.waiting_on_bulk():
            return gauge.in_flight

    with gauge.track():
        assert await asyncio.gather(wait_part()) == [0]  # the child task inherits the context
        assert gauge.in_flight == 1


async def test_awaited_bulk_work_is_released_when_a_request_starts_waiting_on_it() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    with gauge.track():  # a request in flight that does not wait for the bulk work
        step = asyncio.create_task(gauge.yield_to_foreground(awaited=True))
        for _ in range(10):
            await asyncio.sleep(0)
        assert gauge.waiting == 1 and not step.done()
        with gauge.track(), gauge.waiting_on_bulk():  # another one waits for the bulk work
            await asyncio.wait_for(step, 5)
            assert gauge.in_flight == 1 and gauge.blocked_on_bulk == 1
            # While it waits, awaited bulk work does not wait at all; other bulk work does.
            assert await gauge.yield_to_foreground(awaited=True) == 0.0
            assert await gauge.yield_to_foreground(0.01) > 0
    assert gauge.waiting == 0


async def test_a_step_bound_overrides_the_gauge_bound() -> None:
    gauge = ForegroundGauge(max_yield_s=60)
    with gauge.track():
        assert await asyncio.wait_for(gauge.yield_to_foreground(0.01), 5) > 0
        assert await gauge.yield_to_foreground(0) == 0.0
        with pytest.raises(ValueError, match="max_wait_s"):
            await gauge.yield_to_foreground(-1)
