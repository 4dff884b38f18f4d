"""gRPC servicer of ``aeterna.governance.v1.UsageService``, and the usage ledger's consumer of
the event streams (consumer group ``governance-usage``, one replica under a lease).

Reading a tenant's usage is for tenant administrators and the company's ADMIN
(governance.cedar, ``usage-company-admin``), and for service principals (``service-usage-read``:
memory asks before embedding when the hard cap is on).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from datetime import UTC

import grpc
import structlog
from aeterna.governance.v1 import usage_service_pb2 as svc
from aeterna.governance.v1 import usage_service_pb2_grpc as svc_grpc
from aeterna_common import context as rc
from aeterna_common.authz import Resource
from aeterna_common.errors import FieldViolation, InvalidArgument
from aeterna_common.events import Event, EventConsumer, LeasedConsumer, consumer_redis
from aeterna_common.names import invalid_name, tenant_mismatch
from aeterna_common.servicing import Ctx

from aeterna_governance.access import method
from aeterna_governance.deps import Deps, Job, Registered, ServicerSpec
from aeterna_governance.organization import timestamp
from aeterna_governance.usage.ledger import UsageLedger
from aeterna_governance.usage.settings import UsageSettings

log = structlog.get_logger("aeterna.governance.usage")

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["UsageService"].full_name

GROUP = "governance-usage"
"""Consumer group of the usage ledger on every tenant's stream."""

LEASE = "governance:usage:consume"
"""Lease held by the one replica that folds events."""

_NAME = re.compile(r"tenants/([A-Za-z0-9_-]{1,100})/usage")


def _action(name: str) -> str:
    return method(SERVICE_NAME, name)


class UsageServicer(svc_grpc.UsageServiceServicer):
    """``UsageService`` over :class:`~aeterna_governance.usage.ledger.UsageLedger`."""

    def __init__(self, deps: Deps, ledger: UsageLedger) -> None:
        self.access = deps.access
        self.ledger = ledger

    async def GetTenantUsage(
        self, request: svc.GetTenantUsageRequest, context: Ctx
    ) -> svc.TenantUsage:
        """See the proto."""
        principal = rc.current().principal
        m = _NAME.fullmatch(request.name)
        if not m:
            raise invalid_name("name", "tenants/{tenant}/usage")
        tenant_id = m.group(1)
        if not principal.is_service and tenant_id != principal.tenant_id:
            raise tenant_mismatch("name", request.name)
        # Permission before anything is read; a service principal has no company to be in.
        resource = (
            Resource.tenant(tenant_id)
            if principal.is_service
            else await self.access.company(tenant_id)
        )
        await self.access.require(principal, _action("GetTenantUsage"), resource)
        start = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidArgument(
                [FieldViolation("end_time", "must be after start_time", "INVALID_RANGE")],
                reason="INVALID_RANGE",
            )
        report = await self.ledger.report(tenant_id, start, end)
        return svc.TenantUsage(
            name=f"tenants/{tenant_id}/usage",
            start_time=timestamp(report.start),
            end_time=timestamp(report.end),
            lines=[
                svc.UsageLine(
                    service=line.service,
                    metric=line.metric,
                    quantity=line.quantity,
                    unit_price=line.unit_price,
                    cost=line.cost,
                )
                for line in report.lines
            ],
            total_cost=report.total_cost,
            currency=report.currency,
            monthly_budget=report.monthly_budget,
            month_to_date_cost=report.month_to_date_cost,
            budget_used_ratio=report.budget_used_ratio,
            embeddings_capped=report.embeddings_capped,
        )


def consumer(redis_client: object, ledger: UsageLedger, settings: UsageSettings) -> LeasedConsumer:
    """The leased consumer that folds every tenant stream into ``ledger``.

    Args:
        redis_client: A client from :func:`aeterna_common.events.consumer_redis`.
        ledger: The ledger.
        settings: Batch and block sizes.
    """

    async def handle(event: Event) -> None:
        await ledger.fold(event)

    async def handle_batch(events: Sequence[Event]) -> None:
        await ledger.fold_many(events)

    events = EventConsumer(
        redis_client,  # type: ignore[arg-type]
        GROUP,
        handle,
        batch_handler=handle_batch,
        start="0",
        block_s=settings.consume_block_ms / 1000,
        count=settings.consume_batch,
    )
    return LeasedConsumer(events, LEASE)


def _jobs(deps: Deps, ledger: UsageLedger, settings: UsageSettings) -> list[Job]:
    if not (settings.consume and deps.common.redis_url):
        return []
    redis_url = deps.common.redis_url

    async def consume() -> None:
        client = consumer_redis(redis_url, block_s=settings.consume_block_ms / 1000)
        try:
            await consumer(client, ledger, settings).run(
                deps.db.pool, ttl_s=deps.settings.jobs_lease_ttl_s
            )
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    return [consume]


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    settings = UsageSettings()
    ledger = UsageLedger(deps.db, settings)
    servicer = UsageServicer(deps, ledger)
    svc_grpc.add_UsageServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer, background=_jobs(deps, ledger, settings))


SPEC = ServicerSpec(SERVICE_NAME, _build)
