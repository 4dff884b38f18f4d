"""The usage ledger on PostgreSQL: each event folds once (a re-delivered or older event counts
nothing), malformed usage reports are refused whole, prices make the cost, budget thresholds
are announced once each with their outbox event, one tenant never sees another's usage, and
governance's own usage feeds its anomaly detector."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest
from aeterna_common import usage
from aeterna_common.anomaly import (
    AnomalyMonitor,
    Kind,
    Signal,
    UsageWindow,
    feed_usage,
    outbox_sink,
)
from aeterna_common.db import Database
from aeterna_common.events import Event
from aeterna_governance.store import NOTIFY_CHANNEL
from aeterna_governance.usage.ledger import BUDGET_EVENT, UsageLedger
from aeterna_governance.usage.settings import UsageSettings
from governance_testkit import GovernanceEnv, new_tenant

HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def report(tenant: str, position: int, **deltas: int) -> Event:
    """A memory ``usage.reported`` event at outbox ``position``."""
    return Event(
        event_id=f"memory:{position}",
        service="memory",
        type=f"memory.{usage.REPORTED_EVENT}",
        tenant=tenant,
        resource=f"tenants/{tenant}",
        actor="services/memory",
        time=HOUR.isoformat().replace("+00:00", "Z"),
        position=position,
        payload={
            "deltas": [
                {"hour": HOUR.isoformat(), "metric": m.replace("_", "."), "quantity": q}
                for m, q in deltas.items()
            ]
        },
    )


async def test_each_event_counts_once_and_prices_make_the_cost(gov: GovernanceEnv) -> None:
    tenant, other = new_tenant(), new_tenant()
    settings = UsageSettings(prices={usage.EMBEDDING_TOKENS: 0.001, usage.SEARCHES: 0.5})
    ledger = UsageLedger(gov.app.deps.db, settings)
    assert await ledger.fold(report(tenant, 10, embedding_tokens=100, memory_searches=2))
    # Delivered again (at least once), and an older position: neither counts.
    assert not await ledger.fold(report(tenant, 10, embedding_tokens=100, memory_searches=2))
    assert not await ledger.fold(report(tenant, 9, embedding_tokens=7))
    assert await ledger.fold(report(tenant, 11, embedding_tokens=50))
    # Any other event counts as one delivered event of its service.
    created = dataclasses.replace(report(tenant, 12), type="memory.created", payload={})
    assert await ledger.fold(created)
    assert await ledger.fold(report(other, 13, memory_searches=1000))
    got = await ledger.report(tenant, None, None)
    lines = {(x.service, x.metric): (x.quantity, x.cost) for x in got.lines}
    assert lines == {
        ("memory", usage.EMBEDDING_TOKENS): (150, pytest.approx(0.15)),
        ("memory", usage.SEARCHES): (2, pytest.approx(1.0)),
        ("memory", usage.EVENTS_DELIVERED): (1, pytest.approx(0.01 / 1000)),
    }
    assert got.total_cost == pytest.approx(1.15 + 0.01 / 1000)
    assert got.monthly_budget == 0 and not got.embeddings_capped


async def test_a_batch_folds_as_single_folds_would(gov: GovernanceEnv) -> None:
    one, many = new_tenant(), new_tenant()
    settings = UsageSettings(prices={usage.EMBEDDING_TOKENS: 0.001, usage.SEARCHES: 0.5})
    ledger = UsageLedger(gov.app.deps.db, settings)

    def events(tenant: str) -> list[Event]:
        created = dataclasses.replace(report(tenant, 12), type="memory.created", payload={})
        from_sync = dataclasses.replace(
            report(tenant, 3, memory_searches=4), event_id="sync:3", service="sync"
        )
        return [
            report(tenant, 10, embedding_tokens=100, memory_searches=2),
            report(tenant, 10, embedding_tokens=100, memory_searches=2),  # again
            report(tenant, 9, embedding_tokens=7),  # older than the cursor
            from_sync,  # another service's cursor
            report(tenant, 11, embedding_tokens=50),
            created,
        ]

    singly = [await ledger.fold(e) for e in events(one)]
    assert await ledger.fold_many(events(many)) == sum(singly) == 4
    assert await ledger.fold_many(events(many)) == 0  # delivered again

    def lines(tenant: str) -> object:
        return {(x.service, x.metric, x.quantity) for x in got[tenant].lines}

    got = {t: await ledger.report(t, None, None) for t in (one, many)}
    assert lines(one) == lines(many) != set()
    assert got[one].total_cost == pytest.approx(got[many].total_cost)
    # A malformed report in a batch folds nothing of it (the consumer goes one by one).
    bad = dataclasses.replace(report(many, 20), payload={"deltas": "x"})
    with pytest.raises(ValueError):
        await ledger.fold_many([report(many, 19, memory_searches=1), bad])
    assert lines(many) == {
        (x.service, x.metric, x.quantity) for x in (await ledger.report(many, None, None)).lines
    }


async def test_a_malformed_report_counts_nothing(gov: GovernanceEnv) -> None:
    tenant = new_tenant()
    ledger = UsageLedger(gov.app.deps.db, UsageSettings())
    bad = report(tenant, 20, embedding_tokens=5)
    bad.payload["deltas"].append({"hour": HOUR.isoformat(), "metric": "bitcoin", "quantity": 1})
    with pytest.raises(ValueError):
        await ledger.fold(bad)
    assert (await ledger.report(tenant, None, None)).lines == []


async def test_budget_thresholds_are_announced_once(gov: GovernanceEnv) -> None:
    tenant = new_tenant()
    settings = UsageSettings(prices={usage.SEARCHES: 1.0}, budgets={tenant: 10.0}, hard_cap=True)
    ledger = UsageLedger(gov.app.deps.db, settings)
    await ledger.fold(report(tenant, 30, memory_searches=5))  # 50 %
    await ledger.fold(report(tenant, 31, memory_searches=3))  # 80 %
    await ledger.fold(report(tenant, 32, memory_searches=1))  # 90 %
    state = await ledger.report(tenant, None, None)
    assert state.budget_used_ratio == pytest.approx(0.9) and not state.embeddings_capped
    await ledger.fold(report(tenant, 33, memory_searches=4))  # 130 %
    await ledger.fold(report(tenant, 34, memory_searches=1))
    state = await ledger.report(tenant, None, None)
    assert state.embeddings_capped

    async def events(conn: object) -> list[dict[str, object]]:
        rows = await conn.fetch(  # type: ignore[attr-defined]
            "SELECT payload FROM outbox WHERE tenant_id = $1 AND event_type = $2 ORDER BY position",
            tenant,
            BUDGET_EVENT,
        )
        return [json.loads(r["payload"]) for r in rows]

    announced = await gov.app.deps.db.run(tenant, events, readonly=True)
    assert [e["threshold_percent"] for e in announced] == [80, 100]
    assert announced[1]["budget"] == 10.0


def test_settings_refuse_unknown_metrics_and_negative_budgets() -> None:
    with pytest.raises(ValueError):
        UsageSettings(prices={"bitcoin": 1.0})
    with pytest.raises(ValueError):
        UsageSettings(budgets={"t": -1.0})


async def test_governance_usage_feeds_its_anomaly_detector(gov: GovernanceEnv) -> None:
    # Governance's own usage (the events it counts as delivered, per tenant) is a usage
    # series of its detector, read from the ledger across tenants as the indexer role; a
    # hundredfold burst of one tenant's events is one governance.anomaly.detected.
    spiky, steady = new_tenant(), new_tenant()
    ledger = UsageLedger(gov.app.deps.db, UsageSettings())
    indexer = Database(gov.urls.indexer, min_size=1, max_size=1)
    await indexer.open()
    positions = iter(range(1, 1_000_000))

    async def deliver(tenant: str, n: int) -> None:
        for _ in range(n):
            event = dataclasses.replace(
                report(tenant, next(positions)), type="memory.created", payload={}
            )
            assert await ledger.fold(event)

    try:
        monitor = AnomalyMonitor(
            "governance", outbox_sink(gov.app.deps.db, NOTIFY_CHANNEL, "governance")
        )
        window = UsageWindow(indexer, "tenant_usage_hourly", metrics=[usage.EVENTS_DELIVERED])
        await deliver(spiky, 1)  # before the first read: the baseline
        await feed_usage(monitor, window, 0.0)
        for i in range(monitor.configs[Signal.USAGE].min_history + 5):
            await deliver(spiky, 2 + i % 2)
            await deliver(steady, 2)
            # A memory report in the ledger is memory's series, not governance's.
            await ledger.fold(report(steady, next(positions), embedding_tokens=10 + 900 * i))
            await feed_usage(monitor, window, float(i + 1))
        assert monitor.series(Signal.USAGE) == {
            (spiky, usage.EVENTS_DELIVERED),
            (steady, usage.EVENTS_DELIVERED),
        }
        await deliver(spiky, 250)
        await deliver(steady, 2)
        await feed_usage(monitor, window, 1e6)
    finally:
        await indexer.close()

    async def anomalies(conn: object) -> list[dict[str, object]]:
        rows = await conn.fetch(  # type: ignore[attr-defined]
            "SELECT tenant_id, payload FROM outbox WHERE event_type = $1",
            "governance.anomaly.detected",
        )
        return [{"tenant": r["tenant_id"], **json.loads(r["payload"])} for r in rows]

    found = await gov.app.deps.db.run(spiky, anomalies, readonly=True)
    found += await gov.app.deps.db.run(steady, anomalies, readonly=True)
    assert [(e["tenant"], e["metric"], e["kind"]) for e in found] == [
        (spiky, usage.EVENTS_DELIVERED, Kind.SPIKE.value)
    ]
    assert found[0]["value"] == 250
