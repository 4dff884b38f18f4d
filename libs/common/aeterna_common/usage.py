"""Billable usage per tenant: recorded with the work, rolled up hourly, reported to governance.

A service adds what a unit of work used to its tenant's row of the current hour
(:func:`record_usage`) **in the transaction of that work**, so usage commits exactly when the
work does (a rolled-back or retried transaction counts nothing twice). Rows live in the
service's own database (``usage_hourly``, the ``{usage}`` include of
``aeterna_common/sql/usage.sql``) under the same row-level security as every tenant table.

Governance owns the tenant's view (``GetTenantUsage``, prices, budgets). A service never calls
governance to report: :class:`UsageReporter`, a leased background job, moves each tenant's
unreported quantities (``quantity - reported``) into one outbox event
``{service}.usage.reported`` and marks them reported **in the same transaction**, so each unit
is published exactly once through the outbox relay; governance folds the events into its own
hourly table, deduplicating by outbox position. A hot search path therefore costs one row
upsert, not an outbox event.

Concurrent units of work of one tenant and hour update the same row (``ON CONFLICT DO
UPDATE ... quantity + EXCLUDED.quantity``): PostgreSQL serializes them on the row lock, so the
sum is exact under any concurrency (READ COMMITTED re-reads the committed row before the
update, PostgreSQL docs, "INSERT ... ON CONFLICT").

Lock order: a writer that appends to the outbox takes the outbox advisory lock before it
records usage, and the reporter takes that lock before it touches usage rows, so the two never
wait on each other in opposite orders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import structlog
from aeterna.governance.v1 import usage_service_pb2 as usvc
from aeterna.governance.v1 import usage_service_pb2_grpc as usvc_grpc
from prometheus_client import Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from aeterna_common import leases
from aeterna_common.auth import ServiceCredentials
from aeterna_common.db import Database
from aeterna_common.errors import ResourceExhausted
from aeterna_common.writes import OUTBOX_LOCK, append_event

log = structlog.get_logger("aeterna.usage")

EMBEDDING_CALLS = "embedding.calls"
"""Texts the embedding model embedded (memories created, updated or re-embedded, search
queries, knowledge chunks), count. A vector served from the embedding cache is no call."""
EMBEDDING_TOKENS = "embedding.tokens"
"""Tokens the model read for those texts, as the embedding port counts them
(:class:`aeterna_common.embedding.Embeddings`; all-MiniLM-L6-v2: its WordPiece tokenizer,
[CLS] and [SEP] included, after truncation at 256)."""
SEARCHES = "memory.searches"
"""Memory searches served, count."""
MEMORIES_STORED = "memory.stored"
"""Memories created (rows with a vector), count."""
MEMORY_BYTES = "memory.bytes"
"""UTF-8 bytes of memory content written plus 4 bytes per vector dimension (float32), on
create, and on update or re-embed for the content and vector that changed."""
KNOWLEDGE_SEARCHES = "knowledge.searches"
"""Knowledge searches served, count."""
KNOWLEDGE_ITEMS = "knowledge.items"
"""Knowledge items created, count."""
KNOWLEDGE_BYTES = "knowledge.bytes"
"""UTF-8 bytes of knowledge item content written: on create, and on an update that changes
the content (its new content)."""
EVENTS_DELIVERED = "events.delivered"
"""Events of the tenant delivered through the event bus (counted by governance as it
consumes them), count."""

METRICS = (
    EMBEDDING_CALLS,
    EMBEDDING_TOKENS,
    SEARCHES,
    MEMORIES_STORED,
    MEMORY_BYTES,
    KNOWLEDGE_SEARCHES,
    KNOWLEDGE_ITEMS,
    KNOWLEDGE_BYTES,
    EVENTS_DELIVERED,
)
"""Every billable metric."""

REPORTED_EVENT = "usage.reported"
"""Suffix of the event type a service's reporter appends: ``{service}.usage.reported``."""

USAGE_RECORDED = Counter(
    "aeterna_usage_recorded_total",
    "Billable units recorded with the work (all tenants; per tenant in the usage store).",
    ["metric"],
)
USAGE_REPORTED = Counter(
    "aeterna_usage_reports_total",
    "usage.reported events appended by the reporter job (one per tenant and round).",
)


def content_bytes(content: str, dimension: int = 0) -> int:
    """Stored bytes of a row: UTF-8 content plus ``dimension`` float32 components."""
    return len(content.encode()) + 4 * dimension


async def record_usage(conn: asyncpg.Connection, tenant_id: str, counts: Mapping[str, int]) -> None:
    """Add ``counts`` to the tenant's usage row of the current hour, in the caller's
    transaction (one statement; zero counts are skipped).

    Args:
        conn: A connection inside the work's tenant transaction.
        tenant_id: The tenant (RLS admits only the bound one).
        counts: Metric (one of :data:`METRICS`) → non-negative quantity.

    Raises:
        ValueError: An unknown metric or a negative quantity.
    """
    items = [(m, int(q)) for m, q in counts.items() if q]
    for metric, quantity in items:
        if metric not in METRICS or quantity < 0:
            raise ValueError(f"invalid usage {metric}={quantity}")
    if not items:
        return
    # now() is the transaction's start: the unit counts in the hour it began.
    await conn.execute(
        "INSERT INTO usage_hourly AS u (tenant_id, hour, metric, quantity) "
        "SELECT $1, date_trunc('hour', now()), m, q "
        "FROM unnest($2::text[], $3::bigint[]) AS x(m, q) "
        "ON CONFLICT (tenant_id, hour, metric) "
        "DO UPDATE SET quantity = u.quantity + EXCLUDED.quantity",
        tenant_id,
        [m for m, _ in items],
        [q for _, q in items],
    )
    for metric, quantity in items:
        USAGE_RECORDED.labels(metric).inc(quantity)


class UsageSettings(BaseSettings):
    """How a service reports its usage (environment prefix ``AETERNA_USAGE_``).

    Attributes:
        report_interval_s: Seconds between reporter rounds (0 disables reporting; usage is
            still recorded). Governance's view lags the work by about this much.
        lease_ttl_s: Time to live in seconds of the reporter's lease.
        cap_check_s: How long, in seconds, a service (memory) trusts governance's answer
            whether a tenant's embeddings are capped (:class:`EmbeddingCap`); 0 never asks.
            Governance decides whether the cap is on (``AETERNA_GOVERNANCE_USAGE_HARD_CAP``).
    """

    model_config = SettingsConfigDict(env_prefix="AETERNA_USAGE_", extra="ignore")

    report_interval_s: float = Field(default=10.0, ge=0)
    lease_ttl_s: float = Field(default=30.0, gt=0)
    cap_check_s: float = Field(default=0.0, ge=0)


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Quantities of one hour not yet reported.

    Attributes:
        hour: Start of the hour (UTC).
        metric: One of :data:`METRICS`.
        quantity: Units added since the last report.
    """

    hour: datetime
    metric: str
    quantity: int

    def to_json(self) -> dict[str, Any]:
        """``{"hour": RFC 3339, "metric": ..., "quantity": ...}`` for the event payload."""
        return {"hour": self.hour.isoformat(), "metric": self.metric, "quantity": self.quantity}


class UsageReporter:
    """Moves unreported usage into ``{service}.usage.reported`` outbox events.

    One round (:meth:`report_once`) finds the tenants with unreported rows on the indexer pool,
    then per tenant, in one tenant transaction: takes the outbox lock, sets ``reported =
    quantity`` on every unreported row and appends one event whose payload lists the deltas.
    Run it under a lease (one replica), every few seconds to a minute.

    Args:
        db: The application role's pool.
        indexer: The indexer role's pool (cross-tenant SELECT of ``usage_hourly``).
        service: The producing service (event type prefix).
        channel: The service's outbox NOTIFY channel.
        actor: Actor recorded on the event (``services/{service}``).
    """

    def __init__(self, db: Database, indexer: Database, *, service: str, channel: str) -> None:
        self.db = db
        self.indexer = indexer
        self.service = service
        self.channel = channel
        self.actor = f"services/{service}"

    async def report_once(self) -> int:
        """One round over every tenant with unreported usage.

        Returns:
            Events appended.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            tenants = [
                r["tenant_id"]
                for r in await conn.fetch(
                    "SELECT DISTINCT tenant_id FROM usage_hourly WHERE quantity > reported"
                )
            ]
        sent = 0
        for tenant_id in tenants:
            if await self.db.run(tenant_id, self._work(tenant_id)):
                sent += 1
        if sent:
            USAGE_REPORTED.inc(sent)
            log.info("usage.reported", service=self.service, tenants=sent)
        return sent

    async def run(self, settings: UsageSettings | None = None) -> None:
        """Report every ``report_interval_s`` on the one replica holding the lease
        ``{service}:usage:report``, until cancelled (returns at once when disabled)."""
        settings = settings or UsageSettings()
        if not settings.report_interval_s:
            return

        async def round_(lease: leases.Lease) -> None:
            await self.report_once()

        await leases.run_periodic_under_lease(
            self.db.pool,
            f"{self.service}:usage:report",
            round_,
            interval_s=settings.report_interval_s,
            ttl_s=settings.lease_ttl_s,
        )

    def _work(self, tenant_id: str) -> Any:
        async def work(conn: asyncpg.Connection) -> bool:
            # The outbox lock first: writers hold it before they touch usage rows.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK)
            # Lock, then write what was locked, in two statements. One statement (``WITH
            # due AS (SELECT ... FOR UPDATE) UPDATE ... SET reported = due.quantity FROM
            # due``) failed usage_hourly_check under concurrent recording: the CTE waits for
            # a writer and returns the row's newest quantity, while the UPDATE's scan reads
            # the older version its statement snapshot sees; PostgreSQL checks constraints on
            # the new tuple built from that older version (reported above its quantity)
            # before it finds the row updated and redoes the update on the newest one
            # (EvalPlanQual), so the check fails although the final row would be valid
            # (libs/common/tests/test_usage_reporter.py reproduces it). The UPDATE below has
            # a later snapshot, which sees exactly the versions the SELECT locked.
            due = await conn.fetch(
                "SELECT hour, metric, quantity, reported FROM usage_hourly "
                "WHERE tenant_id = $1 AND quantity > reported FOR UPDATE",
                tenant_id,
            )
            if not due:
                return False
            await conn.execute(
                "UPDATE usage_hourly u SET reported = x.quantity "
                "FROM unnest($2::timestamptz[], $3::text[], $4::bigint[]) AS x(hour, metric, "
                "quantity) WHERE u.tenant_id = $1 AND u.hour = x.hour AND u.metric = x.metric",
                tenant_id,
                [r["hour"] for r in due],
                [r["metric"] for r in due],
                [r["quantity"] for r in due],
            )
            deltas = [
                UsageDelta(r["hour"], r["metric"], int(r["quantity"] - r["reported"])) for r in due
            ]
            deltas.sort(key=lambda d: (d.hour, d.metric))
            await append_event(
                conn,
                self.channel,
                tenant_id,
                f"{self.service}.{REPORTED_EVENT}",
                f"tenants/{tenant_id}",
                self.actor,
                {"deltas": [d.to_json() for d in deltas]},
            )
            return True

        return work


@dataclass(frozen=True)
class PriceTable:
    """Unit prices of the billable metrics.

    Attributes:
        prices: Metric → price per unit, in ``currency``. A metric without a price costs 0.
        currency: ISO 4217 code.
    """

    prices: Mapping[str, float]
    currency: str = "USD"

    def cost(self, metric: str, quantity: int) -> float:
        """Cost of ``quantity`` units of ``metric`` in :attr:`currency`."""
        return float(self.prices.get(metric, 0.0)) * quantity


DEFAULT_PRICES: dict[str, float] = {
    EMBEDDING_TOKENS: 0.02 / 1_000_000,
    SEARCHES: 0.10 / 1_000,
    KNOWLEDGE_SEARCHES: 0.10 / 1_000,
    MEMORY_BYTES: 0.25 / 1_000_000_000,
    KNOWLEDGE_BYTES: 0.25 / 1_000_000_000,
    EVENTS_DELIVERED: 0.01 / 1_000,
}
"""Illustrative defaults, per unit in USD (configure real ones): embedding tokens at $0.02 per
million (the list price of OpenAI's text-embedding-3-small), $0.10 per thousand searches
(memory or knowledge), $0.25 per GB stored (counted once per byte written), $0.01 per thousand
events."""


EMBEDDING_BUDGET_EXHAUSTED = "EMBEDDING_BUDGET_EXHAUSTED"
"""``ErrorInfo.reason`` of a write refused because the tenant's month has spent its budget."""

CAP_CALL_TIMEOUT_S = 2.0
"""Deadline of one ``GetTenantUsage`` call in seconds."""

CAP_REFUSALS = Counter(
    "aeterna_usage_cap_refusals_total",
    "Embedding requests refused because the tenant's budget is spent (hard cap).",
)


class EmbeddingCap:
    """Refuses new embeddings of a tenant whose month has spent its budget (hard cap on).

    Asks governance (``UsageService/GetTenantUsage`` with the service's own credentials)
    whether the tenant is capped and keeps the answer ``ttl_s`` seconds, so the cap takes
    effect within about ``ttl_s`` plus the usage report interval. It fails open: when
    governance cannot answer, embeddings go on (the budget is a cost control, not a security
    boundary) and the failure is logged and remembered for ``ttl_s`` as well.

    Args:
        target: ``host:port`` of governance (or the sidecar or edge routing to it).
        credentials: The service's token.
        ttl_s: Seconds an answer is kept.
    """

    def __init__(self, target: str, credentials: ServiceCredentials, ttl_s: float) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = usvc_grpc.UsageServiceStub(self.channel)
        self.credentials = credentials
        self.ttl_s = ttl_s
        self._answers: dict[str, tuple[float, bool]] = {}

    async def capped(self, tenant_id: str) -> bool:
        """Whether ``tenant_id``'s new embeddings are refused now (cached ``ttl_s``)."""
        now = time.monotonic()
        known = self._answers.get(tenant_id)
        if known is not None and now - known[0] < self.ttl_s:
            return known[1]
        try:
            reply = await self.stub.GetTenantUsage(
                usvc.GetTenantUsageRequest(name=f"tenants/{tenant_id}/usage"),
                metadata=await self.credentials.metadata(),
                timeout=CAP_CALL_TIMEOUT_S,
            )
            answer = bool(reply.embeddings_capped)
        except grpc.aio.AioRpcError as exc:
            log.warning("usage.cap_unknown", tenant=tenant_id, code=exc.code().name)
            answer = False
        self._answers[tenant_id] = (now, answer)
        return answer

    async def check(self, tenant_id: str) -> None:
        """Raise when the tenant is capped.

        Raises:
            ResourceExhausted: The tenant's budget is spent (reason
                :data:`EMBEDDING_BUDGET_EXHAUSTED`).
        """
        if await self.capped(tenant_id):
            CAP_REFUSALS.inc()
            raise ResourceExhausted(
                "the tenant's monthly budget is spent: new embeddings are refused until the "
                "budget is raised or the month ends",
                reason=EMBEDDING_BUDGET_EXHAUSTED,
            )

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()
