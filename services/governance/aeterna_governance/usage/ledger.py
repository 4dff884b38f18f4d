"""The tenant usage ledger: hourly rollups of every service's usage, prices and budgets.

Services report usage as outbox events ``{service}.usage.reported`` (payload ``{"deltas":
[{"hour", "metric", "quantity"}]}``, :mod:`aeterna_common.usage`); every other event a tenant
stream carries counts one ``events.delivered`` for its producing service. :meth:`fold` adds
one event to ``tenant_usage_hourly`` in one tenant transaction with the per-service cursor
(``usage_cursors``): an event at or below the cursor was folded already (delivery is at least
once), so each counts exactly once. The same transaction checks the tenant's monthly budget
and, the first time the month-to-date cost reaches 80 % or 100 % of it, records the notice and
appends ``governance.budget.threshold_reached`` to the outbox (and counts the metric
``aeterna_usage_budget_threshold_total``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog
from aeterna_common import usage, writes
from aeterna_common.db import Database
from aeterna_common.events import Event
from prometheus_client import Counter

from aeterna_governance.store import NOTIFY_CHANNEL
from aeterna_governance.usage.settings import UsageSettings

log = structlog.get_logger("aeterna.governance.usage")

THRESHOLDS_PERCENT = (80, 100)
"""Budget thresholds announced (issue 10: an event and an alert at 80 % and 100 %)."""

BUDGET_EVENT = "governance.budget.threshold_reached"
"""Event type of a budget threshold reached; payload ``threshold_percent``, ``month``,
``cost``, ``budget``, ``currency``."""

BUDGET_THRESHOLD = Counter(
    "aeterna_usage_budget_threshold_total",
    "Tenant budget thresholds reached (per tenant in the budget_notices table).",
    ["threshold_percent"],
)
FOLDED = Counter(
    "aeterna_usage_events_folded_total",
    "Events folded into the usage ledger.",
    ["kind"],
)


def month_start(moment: datetime) -> datetime:
    """The first instant (UTC) of ``moment``'s calendar month."""
    m = moment.astimezone(UTC)
    return datetime(m.year, m.month, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Line:
    """One service's quantity of one metric, priced.

    Attributes:
        service: Producing service.
        metric: Metric name (:data:`aeterna_common.usage.METRICS`).
        quantity: Units.
        unit_price: Price per unit.
        cost: ``quantity * unit_price``.
    """

    service: str
    metric: str
    quantity: int
    unit_price: float
    cost: float


@dataclass(frozen=True, slots=True)
class Report:
    """A tenant's usage in a range and its month's budget state.

    Attributes:
        tenant_id: The tenant.
        start: Start of the range (hour boundary, inclusive).
        end: End of the range (exclusive).
        lines: Non-zero lines ordered by service and metric.
        total_cost: Sum of the lines' costs.
        currency: ISO 4217 code.
        monthly_budget: Budget per month (0: none).
        month_to_date_cost: Cost of the current month so far.
        budget_used_ratio: ``month_to_date_cost / monthly_budget`` (0 without a budget).
        embeddings_capped: The hard cap is on and the budget is spent.
    """

    tenant_id: str
    start: datetime
    end: datetime
    lines: list[Line]
    total_cost: float
    currency: str
    monthly_budget: float
    month_to_date_cost: float
    budget_used_ratio: float
    embeddings_capped: bool


class UsageLedger:
    """Folds usage events and answers usage reports (see the module docstring).

    Args:
        db: The application role's pool.
        settings: Prices, budgets, hard cap.
    """

    def __init__(self, db: Database, settings: UsageSettings) -> None:
        self.db = db
        self.settings = settings
        self.prices = settings.price_table()

    async def fold(self, event: Event) -> bool:
        """Add one event's usage to its tenant's ledger, once.

        Args:
            event: Any event of a tenant stream.

        Returns:
            Whether it counted (False: folded before).

        Raises:
            ValueError: A ``usage.reported`` payload is malformed (the consumer dead-letters
                the entry after its delivery limit).
        """
        deltas = self._deltas(event)

        async def work(conn: asyncpg.Connection) -> bool:
            fresh = await conn.fetchval(
                "INSERT INTO usage_cursors AS c (tenant_id, service, position) "
                "VALUES ($1, $2, $3) ON CONFLICT (tenant_id, service) DO UPDATE "
                "SET position = EXCLUDED.position WHERE c.position < EXCLUDED.position "
                "RETURNING true",
                event.tenant,
                event.service,
                event.position,
            )
            if not fresh:
                return False
            await conn.execute(
                "INSERT INTO tenant_usage_hourly AS u (tenant_id, hour, service, metric, "
                "quantity) SELECT $1, h, $2, m, q FROM unnest($3::timestamptz[], $4::text[], "
                "$5::bigint[]) AS x(h, m, q) ON CONFLICT (tenant_id, hour, service, metric) "
                "DO UPDATE SET quantity = u.quantity + EXCLUDED.quantity",
                event.tenant,
                event.service,
                [h for h, _, _ in deltas],
                [m for _, m, _ in deltas],
                [q for _, _, q in deltas],
            )
            await self._check_budget(conn, event.tenant)
            return True

        counted = await self.db.run(event.tenant, work)
        if counted:
            FOLDED.labels("usage" if event.type.endswith(usage.REPORTED_EVENT) else "event").inc()
        return counted

    async def fold_many(self, events: Sequence[Event]) -> int:
        """Fold ``events`` in order, each once: the effect of :meth:`fold` on each in turn,
        in one transaction per tenant (a cursor read, one upsert of the hours, the cursors
        moved, one budget check).

        Args:
            events: Events of any tenant streams, in stream order.

        Returns:
            How many counted (the others were folded before).

        Raises:
            ValueError: A ``usage.reported`` payload is malformed (nothing of the batch is
                folded; the consumer then folds the events one by one).
        """
        by_tenant: dict[str, list[tuple[Event, list[tuple[datetime, str, int]]]]] = {}
        for event in events:
            by_tenant.setdefault(event.tenant, []).append((event, self._deltas(event)))
        counted = 0
        for tenant, group in by_tenant.items():

            async def work(
                conn: asyncpg.Connection,
                tenant: str = tenant,
                group: list[tuple[Event, list[tuple[datetime, str, int]]]] = group,
            ) -> list[Event]:
                services = sorted({e.service for e, _ in group})
                cursor = {
                    r["service"]: int(r["position"])
                    for r in await conn.fetch(
                        "SELECT service, position FROM usage_cursors "
                        "WHERE tenant_id = $1 AND service = ANY($2) FOR UPDATE",
                        tenant,
                        services,
                    )
                }
                folded: list[Event] = []
                sums: dict[tuple[str, datetime, str], int] = defaultdict(int)
                for event, deltas in group:
                    # As fold: an event counts when its position passes its service's cursor.
                    if event.position <= cursor.get(event.service, -1):
                        continue
                    cursor[event.service] = event.position
                    folded.append(event)
                    for hour, metric, quantity in deltas:
                        sums[(event.service, hour, metric)] += quantity
                if not folded:
                    return []
                moved = sorted({e.service for e in folded})
                await conn.execute(
                    "INSERT INTO usage_cursors AS c (tenant_id, service, position) "
                    "SELECT $1, s, p FROM unnest($2::text[], $3::bigint[]) AS x(s, p) "
                    "ON CONFLICT (tenant_id, service) DO UPDATE "
                    "SET position = EXCLUDED.position WHERE c.position < EXCLUDED.position",
                    tenant,
                    moved,
                    [cursor[m] for m in moved],
                )
                keys = sorted(sums)
                await conn.execute(
                    "INSERT INTO tenant_usage_hourly AS u (tenant_id, hour, service, metric, "
                    "quantity) SELECT $1, h, s, m, q FROM unnest($2::timestamptz[], "
                    "$3::text[], $4::text[], $5::bigint[]) AS x(h, s, m, q) "
                    "ON CONFLICT (tenant_id, hour, service, metric) "
                    "DO UPDATE SET quantity = u.quantity + EXCLUDED.quantity",
                    tenant,
                    [h for _, h, _ in keys],
                    [s for s, _, _ in keys],
                    [m for _, _, m in keys],
                    [sums[k] for k in keys],
                )
                await self._check_budget(conn, tenant)
                return folded

            for event in await self.db.run(tenant, work):
                kind = "usage" if event.type.endswith(usage.REPORTED_EVENT) else "event"
                FOLDED.labels(kind).inc()
                counted += 1
        return counted

    def _deltas(self, event: Event) -> list[tuple[datetime, str, int]]:
        if not event.type.endswith("." + usage.REPORTED_EVENT):
            moment = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
            hour = moment.replace(minute=0, second=0, microsecond=0)
            return [(hour, usage.EVENTS_DELIVERED, 1)]
        out: list[tuple[datetime, str, int]] = []
        raw = event.payload.get("deltas")
        if not isinstance(raw, list):
            raise ValueError("usage.reported payload has no deltas list")
        for d in raw:
            if not isinstance(d, dict):
                raise ValueError("a usage delta is not an object")
            metric, quantity = d.get("metric"), d.get("quantity")
            if metric not in usage.METRICS or not isinstance(quantity, int) or quantity < 0:
                raise ValueError(f"invalid usage delta {d!r}")
            out.append((datetime.fromisoformat(str(d.get("hour"))), str(metric), quantity))
        return out

    async def _check_budget(self, conn: asyncpg.Connection, tenant_id: str) -> None:
        budget = self.settings.budget_of(tenant_id)
        if budget <= 0:
            return
        start = month_start(datetime.now(UTC))
        cost = await self._cost_since(conn, tenant_id, start)
        for percent in THRESHOLDS_PERCENT:
            if cost < budget * percent / 100:
                continue
            noticed = await conn.fetchval(
                "INSERT INTO budget_notices (tenant_id, month, threshold_percent, cost) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true",
                tenant_id,
                start.date(),
                percent,
                cost,
            )
            if not noticed:
                continue
            await writes.append_event(
                conn,
                NOTIFY_CHANNEL,
                tenant_id,
                BUDGET_EVENT,
                f"tenants/{tenant_id}/usage",
                "services/governance",
                {
                    "threshold_percent": percent,
                    "month": start.date().isoformat(),
                    "cost": round(cost, 6),
                    "budget": budget,
                    "currency": self.prices.currency,
                },
            )
            BUDGET_THRESHOLD.labels(str(percent)).inc()
            log.warning("usage.budget_threshold", tenant=tenant_id, percent=percent)

    async def _rows(
        self, conn: asyncpg.Connection, tenant_id: str, start: datetime, end: datetime | None
    ) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                "SELECT service, metric, sum(quantity)::bigint AS quantity "
                "FROM tenant_usage_hourly WHERE tenant_id = $1 AND hour >= $2 "
                "AND ($3::timestamptz IS NULL OR hour < $3) GROUP BY service, metric "
                "ORDER BY service, metric",
                tenant_id,
                start,
                end,
            )
        )

    async def _cost_since(self, conn: asyncpg.Connection, tenant_id: str, start: datetime) -> float:
        rows = await self._rows(conn, tenant_id, start, None)
        return sum(self.prices.cost(r["metric"], int(r["quantity"])) for r in rows)

    async def report(self, tenant_id: str, start: datetime | None, end: datetime | None) -> Report:
        """The tenant's usage from ``start`` (rounded down to the hour; default: the month's
        start) to ``end`` (default: now), priced, with the month's budget state."""
        now = datetime.now(UTC)
        end = end or now
        start = (start or month_start(now)).replace(minute=0, second=0, microsecond=0)
        month = month_start(now)

        async def work(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], float]:
            rows = await self._rows(conn, tenant_id, start, end)
            return rows, await self._cost_since(conn, tenant_id, month)

        rows, month_cost = await self.db.run(tenant_id, work, readonly=True)
        lines = [
            Line(
                service=r["service"],
                metric=r["metric"],
                quantity=int(r["quantity"]),
                unit_price=float(self.prices.prices.get(r["metric"], 0.0)),
                cost=self.prices.cost(r["metric"], int(r["quantity"])),
            )
            for r in rows
            if r["quantity"]
        ]
        budget = self.settings.budget_of(tenant_id)
        ratio = month_cost / budget if budget > 0 else 0.0
        return Report(
            tenant_id=tenant_id,
            start=start,
            end=end,
            lines=lines,
            total_cost=sum(line.cost for line in lines),
            currency=self.prices.currency,
            monthly_budget=budget,
            month_to_date_cost=month_cost,
            budget_used_ratio=ratio,
            embeddings_capped=self.settings.hard_cap and budget > 0 and ratio >= 1.0,
        )


def totals(report: Report) -> dict[str, int]:
    """Quantity per metric over every service of ``report``."""
    out: dict[str, int] = defaultdict(int)
    for line in report.lines:
        out[line.metric] += line.quantity
    return dict(out)
