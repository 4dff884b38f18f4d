"""gRPC servicer of ``aeterna.governance.v1.AuditService``, and the audit log's background
jobs: the checkpoint job and the consumer of the event streams.

Reading and verifying a tenant's audit log is for tenant admins (the interim access check:
``TENANT_ADMIN``).
"""

from __future__ import annotations

import contextlib
import json

import grpc
import structlog
from aeterna.governance.v1 import audit_service_pb2 as svc
from aeterna.governance.v1 import audit_service_pb2_grpc as svc_grpc
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.events import consumer_redis
from aeterna_common.leases import Lease
from aeterna_common.names import parse_parent
from aeterna_common.servicing import Ctx
from google.protobuf import struct_pb2

from aeterna_governance.access import method
from aeterna_governance.audit.chain import AuditRecord
from aeterna_governance.audit.consumer import AuditConsumer
from aeterna_governance.audit.log import AuditLog
from aeterna_governance.audit.settings import AuditSettings
from aeterna_governance.deps import Deps, Job, Registered, ServicerSpec
from aeterna_governance.organization import timestamp

log = structlog.get_logger("aeterna.governance.audit")

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["AuditService"].full_name


def _action(name: str) -> str:
    return method(SERVICE_NAME, name)


CHECKPOINT_LEASE = "governance:audit:checkpoint"
"""Lease of the checkpoint job."""


def entry_pb(record: AuditRecord) -> res.AuditEntry:
    """An ``AuditEntry`` of a stored entry."""
    payload = struct_pb2.Struct()
    payload.update(json.loads(record.payload))
    return res.AuditEntry(
        name=f"tenants/{record.tenant}/auditEntries/{record.sequence}",
        sequence=record.sequence,
        event_id=record.event_id,
        event_type=record.event_type,
        service=record.service,
        resource=record.resource,
        actor=record.actor,
        event_time=timestamp(record.event_time),
        append_time=timestamp(record.append_time),
        payload=payload,
        previous_hash=record.previous_hash,
        hash=record.hash,
    )


class AuditServicer(svc_grpc.AuditServiceServicer):
    """``AuditService`` over :class:`~aeterna_governance.audit.log.AuditLog`."""

    def __init__(self, deps: Deps, audit: AuditLog) -> None:
        self.access = deps.access
        self.audit = audit

    async def ListAuditEntries(
        self, request: svc.ListAuditEntriesRequest, context: Ctx
    ) -> svc.ListAuditEntriesResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        # The company's ADMIN and tenant admins (governance.cedar, audit-company-admin).
        await self.access.require(
            principal, _action("ListAuditEntries"), await self.access.company(tenant_id)
        )
        servicing.check_read_token(context)
        size = servicing.page_size(request.page_size)
        fingerprint = f"{len(request.resource)}:{request.resource}|{request.actor}"
        after = servicing.decode_page_token(request.page_token, fingerprint)
        records = await self.audit.page(
            tenant_id,
            after=int(after) if after and after.isdigit() else 0,
            limit=size + 1,
            resource=request.resource,
            actor=request.actor,
        )
        records, token = servicing.cut_page(records, size, fingerprint, lambda r: str(r.sequence))
        return svc.ListAuditEntriesResponse(
            audit_entries=[entry_pb(r) for r in records], next_page_token=token
        )

    async def VerifyAuditLog(
        self, request: svc.VerifyAuditLogRequest, context: Ctx
    ) -> svc.VerifyAuditLogResponse:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        # The company's ADMIN and tenant admins (governance.cedar, audit-company-admin).
        await self.access.require(
            principal, _action("VerifyAuditLog"), await self.access.company(tenant_id)
        )
        outcome = await self.audit.verify(tenant_id)
        response = svc.VerifyAuditLogResponse(
            valid=outcome.valid,
            entries_checked=outcome.entries_checked,
            head_hash=outcome.head_hash,
        )
        if outcome.broken_sequence is not None and outcome.reason is not None:
            response.first_broken_entry = (
                f"tenants/{tenant_id}/auditEntries/{outcome.broken_sequence}"
            )
            response.break_reason = int(outcome.reason)  # type: ignore[assignment]
        if outcome.checkpoint is not None:
            response.checkpoint_sequence = outcome.checkpoint.sequence
            response.checkpoint_time.FromDatetime(outcome.checkpoint.time)
        return response


def _jobs(deps: Deps, audit: AuditLog, settings: AuditSettings) -> list[Job]:
    async def checkpoint(lease: Lease) -> None:
        recorded = await audit.checkpoint(lease)
        if recorded:
            log.info("audit.checkpoints", recorded=recorded)

    jobs = [deps.under_lease(CHECKPOINT_LEASE, settings.checkpoint_interval_s, checkpoint)]
    if settings.consume and deps.common.redis_url:
        redis_url = deps.common.redis_url

        async def consume() -> None:
            client = consumer_redis(redis_url, block_s=settings.consume_block_ms / 1000)
            consumer = AuditConsumer(
                client,
                audit,
                batch=settings.consume_batch,
                block_s=settings.consume_block_ms / 1000,
            )
            try:
                await consumer.run(deps.db.pool, ttl_s=deps.settings.jobs_lease_ttl_s)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

        jobs.append(consume)
    return jobs


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    audit = AuditLog(deps.db)
    servicer = AuditServicer(deps, audit)
    svc_grpc.add_AuditServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer, background=_jobs(deps, audit, AuditSettings()))


SPEC = ServicerSpec(SERVICE_NAME, _build)
