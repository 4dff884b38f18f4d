"""Approval requests and decisions in PostgreSQL (DOMAIN.md, Approvals).

* A request names its type, risk level, mode and the unit whose approvers decide (none: the
  tenant's admins). Its approvers are the users the permission model lets decide at the
  unit (``approval:decide`` in ``governance.cedar``: TECH_LEAD at a project or team,
  ARCHITECT at an organization, ADMIN at the company, bound there or above, and tenant
  admins); the requester is never one of them. Those eligible at creation are recorded;
  UNANIMOUS needs each of them, and only they decide it.
* Modes: SINGLE (one approval), QUORUM (``required_approvals``, 2-10, default 2), UNANIMOUS.
  One rejection closes a request. A request not decided within ``ttl_s`` (72 h) expires,
  by :meth:`Approvals.expire_due`, a job run under a lease.
* Decisions are serialised per request (``SELECT ... FOR UPDATE`` of its row), so concurrent
  approvers never lose a decision and the request reaches its final state once. A decision
  is idempotent per approver: repeating it returns the request unchanged.
* Requesters cannot approve their own requests (``FAILED_PRECONDITION``, reason
  ``SELF_APPROVAL``), also not through one of their agents.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import structlog
from aeterna.governance.v1 import resources_pb2 as res
from aeterna_common import leases
from aeterna_common.context import Principal
from aeterna_common.db import Database
from aeterna_common.errors import FieldViolation, InvalidArgument, NotFound, PreconditionViolated
from aeterna_common.names import unit_name
from google.protobuf import json_format, struct_pb2

from aeterna_governance import store
from aeterna_governance.access import APPROVALS, Access, denied, method
from aeterna_governance.organization import etag, timestamp, unit_reference

log = structlog.get_logger("aeterna.governance.approvals")

DECIDE = method(APPROVALS, "ApproveApprovalRequest")
"""The action whose permission makes an approver (approve and reject are one group,
``approval:decide``, in the policies)."""

DEFAULT_QUORUM = 2
"""Approvals a QUORUM request needs when it names none (DOMAIN.md: quorum default 2)."""

MAX_QUORUM = 10
"""Most approvals a QUORUM request may ask for (the contract's 2-10)."""

TITLE_MAX = 200
TARGET_MAX = 1000
COMMENT_MAX = 2000
PAYLOAD_MAX_BYTES = 64 * 1024
"""Limits of the contract: title 1-200 characters, comment ≤ 2,000, payload ≤ 64 KiB of
JSON; a target is a resource name, at most 1,000 characters."""

EXPIRY_BATCH = 500
"""Due requests expired per run and transaction by :meth:`Approvals.expire_due`."""

STATE_NAMES = {v: k.removeprefix("APPROVAL_STATE_") for k, v in res.ApprovalState.items() if v}

_COLUMNS = (
    "id, type, risk_level, mode, required_approvals, org_unit_id, target, title, payload, "
    "requester, state, revision, created_at, expire_at, closed_at"
)


def approval_pb(
    tenant_id: str, row: asyncpg.Record | None, decisions: Sequence[asyncpg.Record]
) -> res.ApprovalRequest:
    """An ``ApprovalRequest`` of its row and decision rows (oldest first)."""
    assert row is not None
    payload = struct_pb2.Struct()
    payload.update(json.loads(row["payload"]))
    return res.ApprovalRequest(
        name=f"tenants/{tenant_id}/approvalRequests/{row['id']}",
        type=row["type"],
        risk_level=row["risk_level"],
        mode=row["mode"],
        required_approvals=row["required_approvals"],
        org_unit=unit_name(tenant_id, row["org_unit_id"]) if row["org_unit_id"] else "",
        target=row["target"],
        title=row["title"],
        payload=payload,
        requester=row["requester"],
        state=row["state"],
        decisions=[
            res.ApprovalDecision(
                approver=d["approver"],
                approve=d["approve"],
                comment=d["comment"],
                decide_time=timestamp(d["decided_at"]),
            )
            for d in decisions
        ],
        create_time=timestamp(row["created_at"]),
        expire_time=timestamp(row["expire_at"]),
        close_time=timestamp(row["closed_at"]),
        etag=etag(row["revision"]),
    )


def validate_request(tenant_id: str, a: res.ApprovalRequest) -> tuple[str | None, int, int, int]:
    """Validate CreateApprovalRequest's body.

    Returns:
        ``(unit id or None, mode, required approvals (0 for UNANIMOUS: decided at
        creation), risk level)``; an unset mode is SINGLE, an unset risk MEDIUM.

    Raises:
        InvalidArgument: One violation per bad field.
    """
    violations: list[FieldViolation] = []
    if a.type not in res.ApprovalType.values() or a.type == res.APPROVAL_TYPE_UNSPECIFIED:
        violations.append(
            FieldViolation(
                "approval_request.type",
                "POLICY, KNOWLEDGE, MEMORY_PROMOTION, ROLE or CONFIG",
                "INVALID_TYPE",
            )
        )
    risk = a.risk_level or res.RISK_LEVEL_MEDIUM
    if risk not in res.RiskLevel.values():
        violations.append(
            FieldViolation("approval_request.risk_level", "LOW .. CRITICAL", "INVALID_RISK")
        )
    mode = a.mode or res.APPROVAL_MODE_SINGLE
    required = 1
    if mode not in res.ApprovalMode.values():
        violations.append(
            FieldViolation("approval_request.mode", "SINGLE, QUORUM or UNANIMOUS", "INVALID_MODE")
        )
    elif mode == res.APPROVAL_MODE_QUORUM:
        required = a.required_approvals or DEFAULT_QUORUM
        if not DEFAULT_QUORUM <= required <= MAX_QUORUM:
            violations.append(
                FieldViolation(
                    "approval_request.required_approvals",
                    f"{DEFAULT_QUORUM}-{MAX_QUORUM} for QUORUM",
                    "INVALID_QUORUM",
                )
            )
    elif a.required_approvals:
        violations.append(
            FieldViolation(
                "approval_request.required_approvals",
                "set only for QUORUM",
                "INVALID_QUORUM",
            )
        )
    if mode == res.APPROVAL_MODE_UNANIMOUS:
        required = 0
    if not a.target or len(a.target) > TARGET_MAX:
        violations.append(
            FieldViolation(
                "approval_request.target", f"1-{TARGET_MAX} characters", "INVALID_LENGTH"
            )
        )
    if not a.title.strip() or len(a.title) > TITLE_MAX:
        violations.append(
            FieldViolation(
                "approval_request.title", f"1-{TITLE_MAX} characters, not blank", "INVALID_LENGTH"
            )
        )
    if len(json_format.MessageToJson(a.payload, indent=None).encode()) > PAYLOAD_MAX_BYTES:
        violations.append(
            FieldViolation(
                "approval_request.payload", "at most 64 KiB of JSON", "PAYLOAD_TOO_LARGE"
            )
        )
    if violations:
        raise InvalidArgument(violations)
    unit = (
        unit_reference(tenant_id, a.org_unit, "approval_request.org_unit") if a.org_unit else None
    )
    return unit, mode, required, risk


def check_comment(comment: str, required: bool) -> None:
    """Validate a decision's comment (required for a rejection).

    Raises:
        InvalidArgument: Missing or longer than 2,000 characters (field ``comment``).
    """
    if len(comment) > COMMENT_MAX:
        raise InvalidArgument(
            [FieldViolation("comment", f"at most {COMMENT_MAX} characters", "INVALID_LENGTH")]
        )
    if required and not comment.strip():
        raise InvalidArgument(
            [FieldViolation("comment", "required: say why the request is rejected", "REQUIRED")]
        )


def requester_of(principal: Principal) -> str:
    """Who ``principal`` is as a requester: ``services/{service}`` for a service principal
    (token ``sub`` ``service:{service}``), else its actor (``users/{user}``, ...)."""
    return principal.actor


def same_user(requester: str, principal: Principal) -> bool:
    """Whether ``principal`` is the requester or its user (an agent's user approving what
    the agent asked is still self-approval)."""
    user = f"users/{principal.user_id}"
    return requester == user or requester.startswith(user + "/agents/")


async def _decisions(
    conn: asyncpg.Connection, tenant_id: str, rid: uuid.UUID
) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT approver, approve, comment, decided_at FROM approval_decisions "
            "WHERE tenant_id = $1 AND request_id = $2 ORDER BY decided_at, approver",
            tenant_id,
            rid,
        )
    )


def _not_found(tenant_id: str, request_id: str) -> NotFound:
    name = f"tenants/{tenant_id}/approvalRequests/{request_id}"
    return NotFound(
        f"approval request {name} not found",
        reason="APPROVAL_REQUEST_NOT_FOUND",
        metadata={"name": name},
    )


class Approvals:
    """Use cases of ``ApprovalService`` (after the tenant and access checks).

    Args:
        db: The application role's pool.
        indexer: The indexer role's pool (finds due requests across tenants).
        access: The access check.
        ttl_s: Seconds a request stays open (72 h by default).
        idempotency_ttl_s: Seconds a ``request_id`` is remembered.
    """

    def __init__(
        self,
        db: Database,
        indexer: Database,
        access: Access,
        *,
        ttl_s: float,
        idempotency_ttl_s: float,
    ) -> None:
        self.db = db
        self.indexer = indexer
        self.access = access
        self.ttl_s = ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s

    async def create(
        self,
        key: store.WriteKey,
        a: res.ApprovalRequest,
        unit_id: str | None,
        mode: int,
        required: int,
        risk: int,
    ) -> tuple[res.ApprovalRequest, int]:
        """Open a request; records its eligible approvers (all but the requester).

        Raises:
            PreconditionViolated: The unit does not exist (``ORG_UNIT_NOT_FOUND``), or a
                UNANIMOUS request has no eligible approver (``NO_ELIGIBLE_APPROVERS``).
        """
        tenant_id = key.tenant_id
        rid = uuid.uuid4()
        payload = json_format.MessageToJson(a.payload, indent=None) if a.payload.fields else "{}"

        async def work(conn: asyncpg.Connection) -> tuple[res.ApprovalRequest, int]:
            if unit_id is not None and not await conn.fetchval(
                "SELECT 1 FROM org_units WHERE tenant_id = $1 AND id = $2 FOR SHARE",
                tenant_id,
                unit_id,
            ):
                raise PreconditionViolated(
                    [
                        FieldViolation(
                            "approval_request.org_unit", "no such unit", "ORG_UNIT_NOT_FOUND"
                        )
                    ]
                )
            approvers = await self.access.users_allowed(tenant_id, DECIDE, unit_id)
            eligible = [s for s in approvers if s != key.principal]
            needed = required
            if mode == res.APPROVAL_MODE_UNANIMOUS:
                if not eligible:
                    raise PreconditionViolated(
                        [
                            FieldViolation(
                                "approval_request.mode",
                                "UNANIMOUS needs at least one user who may decide at the unit "
                                "(the permission model) besides the requester",
                                "NO_ELIGIBLE_APPROVERS",
                            )
                        ]
                    )
                needed = len(eligible)
            row = await conn.fetchrow(
                "INSERT INTO approval_requests (tenant_id, id, type, risk_level, mode, "
                "required_approvals, eligible, org_unit_id, target, title, payload, requester, "
                "expire_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, "
                f"clock_timestamp() + make_interval(secs => $13)) RETURNING {_COLUMNS}",
                tenant_id,
                rid,
                a.type,
                risk,
                mode,
                needed,
                eligible,
                unit_id,
                a.target,
                a.title,
                payload,
                key.principal,
                self.ttl_s,
            )
            created = approval_pb(tenant_id, row, [])
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.approval_request.created",
                created.name,
                key.principal,
                {
                    "type": res.ApprovalType.Name(a.type),
                    "target": a.target,
                    "mode": res.ApprovalMode.Name(res.ApprovalMode.ValueType(mode)),
                    "required_approvals": needed,
                    "eligible_approvers": len(eligible),
                },
            )
            return created, position

        await self.access.prefetch(tenant_id)  # the approvers are decided inside
        return await store.run_write(self.db, key, res.ApprovalRequest, work)

    async def get(self, tenant_id: str, request_id: str) -> res.ApprovalRequest:
        """The request with its decisions.

        Raises:
            NotFound: Reason ``APPROVAL_REQUEST_NOT_FOUND``.
        """
        rid = uuid.UUID(request_id)

        async def work(conn: asyncpg.Connection) -> res.ApprovalRequest | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM approval_requests WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                rid,
            )
            if row is None:
                return None
            return approval_pb(tenant_id, row, await _decisions(conn, tenant_id, rid))

        found = await self.db.run(tenant_id, work, readonly=True)
        if found is None:
            raise _not_found(tenant_id, request_id)
        return found

    async def list(
        self,
        principal: Principal,
        tenant_id: str,
        state: int,
        awaiting_me: bool,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[res.ApprovalRequest]:
        """Requests newest first, after the keyset ``after``; of one state when ``state``
        is set; with ``awaiting_me``, only pending requests the caller may decide and has
        not decided (and did not ask for)."""
        me = f"users/{principal.user_id}"

        async def work(conn: asyncpg.Connection) -> list[res.ApprovalRequest]:
            units: list[str] | None = None  # None: every unit (a tenant admin)
            if awaiting_me and not await self.access.tenant_admin(principal, tenant_id, DECIDE):
                units = list(await self.access.units_allowed(principal, tenant_id, DECIDE))
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM approval_requests r WHERE tenant_id = $1 "
                "AND ($2 = 0 OR state = $2) "
                "AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid)) "
                "AND (NOT $5 OR (state = 1 AND requester <> $6 AND requester NOT LIKE $6 || '/%' "
                "  AND NOT EXISTS (SELECT 1 FROM approval_decisions d WHERE d.tenant_id = $1 "
                "    AND d.request_id = r.id AND d.approver = $6) "
                "  AND ($7::text[] IS NULL OR org_unit_id = ANY($7::text[])) "
                "  AND (mode <> 3 OR $6 = ANY(eligible)))) "
                "ORDER BY created_at DESC, id DESC LIMIT $8",
                tenant_id,
                state,
                after[0] if after else None,
                after[1] if after else None,
                awaiting_me,
                me,
                units,
                limit,
            )
            return [
                approval_pb(tenant_id, r, await _decisions(conn, tenant_id, r["id"])) for r in rows
            ]

        await self.access.prefetch(tenant_id)
        return await self.db.run(tenant_id, work, readonly=True)

    async def decide(
        self,
        principal: Principal,
        tenant_id: str,
        request_id: str,
        approve: bool,
        comment: str,
    ) -> tuple[res.ApprovalRequest, int]:
        """Record one approver's decision and close the request when it is final.

        The request row is locked (``FOR UPDATE``) for the whole transaction, so concurrent
        decisions apply one after the other: each counts the decisions before it, and only
        the one that reaches the quorum (or the first rejection) closes the request.

        Raises:
            PermissionDenied: The caller is not an approver of the request (also when it
                does not exist, unless the caller is a tenant admin).
            NotFound: No such request (tenant admins only).
            PreconditionViolated: The caller asked for it (``SELF_APPROVAL``), it is closed
                (``APPROVAL_CLOSED``) or expired (``APPROVAL_EXPIRED``), or the caller
                decided it the other way already (``ALREADY_DECIDED``).
        """
        action = DECIDE
        rid = uuid.UUID(request_id)
        me = principal.actor

        async def work(conn: asyncpg.Connection) -> tuple[res.ApprovalRequest, int]:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS}, eligible, expire_at <= clock_timestamp() AS due "
                "FROM approval_requests WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                rid,
            )
            allowed = row is not None and await self.access.allowed_at(
                principal, tenant_id, action, row["org_unit_id"]
            )
            if allowed and row is not None and row["mode"] == res.APPROVAL_MODE_UNANIMOUS:
                allowed = me in row["eligible"]
            if not allowed:
                if row is None and await self.access.tenant_admin(principal, tenant_id, action):
                    raise _not_found(tenant_id, request_id)
                raise denied(action)
            assert row is not None
            if same_user(row["requester"], principal):
                raise PreconditionViolated(
                    [
                        FieldViolation(
                            "name", "requesters cannot decide their own requests", "SELF_APPROVAL"
                        )
                    ]
                )
            decisions = await _decisions(conn, tenant_id, rid)
            mine = next((d for d in decisions if d["approver"] == me), None)
            if mine is not None:
                if mine["approve"] != approve:
                    raise PreconditionViolated(
                        [
                            FieldViolation(
                                "name",
                                "you decided this request the other way already",
                                "ALREADY_DECIDED",
                            )
                        ]
                    )
                # The same decision again: the request as it stands.
                return approval_pb(tenant_id, row, decisions), await store.latest_position(
                    conn, tenant_id
                )
            if row["state"] != res.APPROVAL_STATE_PENDING:
                raise PreconditionViolated(
                    [
                        FieldViolation(
                            "name",
                            f"the request is {STATE_NAMES[row['state']]}",
                            "APPROVAL_CLOSED",
                        )
                    ]
                )
            if row["due"]:
                raise PreconditionViolated(
                    [FieldViolation("name", "the request has expired", "APPROVAL_EXPIRED")]
                )
            await conn.execute(
                "INSERT INTO approval_decisions (tenant_id, request_id, approver, approve, "
                "comment) VALUES ($1, $2, $3, $4, $5)",
                tenant_id,
                rid,
                me,
                approve,
                comment,
            )
            name = f"tenants/{tenant_id}/approvalRequests/{rid}"
            approvals = sum(1 for d in decisions if d["approve"]) + (1 if approve else 0)
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.approval_request.decided",
                name,
                me,
                {"approve": approve, "approvals": approvals, "required": row["required_approvals"]},
            )
            state = res.APPROVAL_STATE_PENDING
            if not approve:
                state = res.APPROVAL_STATE_REJECTED
            elif approvals >= row["required_approvals"]:
                state = res.APPROVAL_STATE_APPROVED
            updated = await conn.fetchrow(
                "UPDATE approval_requests SET state = $3::smallint, revision = revision + 1, "
                "closed_at = CASE WHEN $3::smallint <> 1 THEN clock_timestamp() END "
                f"WHERE tenant_id = $1 AND id = $2 RETURNING {_COLUMNS}",
                tenant_id,
                rid,
                state,
            )
            if state != res.APPROVAL_STATE_PENDING:
                kind = "approved" if state == res.APPROVAL_STATE_APPROVED else "rejected"
                position = await store.append_event(
                    conn,
                    tenant_id,
                    f"governance.approval_request.{kind}",
                    name,
                    me,
                    {"approvals": approvals, "required": row["required_approvals"]},
                )
            assert updated is not None
            return approval_pb(tenant_id, updated, await _decisions(conn, tenant_id, rid)), position

        await self.access.prefetch(tenant_id)
        return await self.db.run(tenant_id, work)

    async def cancel(
        self, principal: Principal, tenant_id: str, request_id: str
    ) -> tuple[res.ApprovalRequest, int]:
        """Cancel a pending request: its requester or a tenant admin. Cancelling a cancelled
        request returns it unchanged.

        Raises:
            PermissionDenied: Neither (also when it does not exist, unless a tenant admin).
            NotFound: No such request (tenant admins only).
            PreconditionViolated: It is closed otherwise (``APPROVAL_CLOSED``).
        """
        action = method(APPROVALS, "CancelApprovalRequest")
        rid = uuid.UUID(request_id)

        async def work(conn: asyncpg.Connection) -> tuple[res.ApprovalRequest, int]:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM approval_requests WHERE tenant_id = $1 AND id = $2 "
                "FOR UPDATE",
                tenant_id,
                rid,
            )
            is_admin = await self.access.tenant_admin(principal, tenant_id, action)
            if not is_admin and (row is None or row["requester"] != requester_of(principal)):
                raise denied(action)
            if row is None:
                raise _not_found(tenant_id, request_id)
            if row["state"] == res.APPROVAL_STATE_CANCELLED:
                return approval_pb(
                    tenant_id, row, await _decisions(conn, tenant_id, rid)
                ), await store.latest_position(conn, tenant_id)
            if row["state"] != res.APPROVAL_STATE_PENDING:
                raise PreconditionViolated(
                    [FieldViolation("name", "the request is closed", "APPROVAL_CLOSED")]
                )
            updated = await conn.fetchrow(
                "UPDATE approval_requests SET state = 5, revision = revision + 1, "
                "closed_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_COLUMNS}",
                tenant_id,
                rid,
            )
            assert updated is not None
            result = approval_pb(tenant_id, updated, await _decisions(conn, tenant_id, rid))
            position = await store.append_event(
                conn,
                tenant_id,
                "governance.approval_request.cancelled",
                result.name,
                principal.actor,
            )
            return result, position

        await self.access.prefetch(tenant_id)
        return await self.db.run(tenant_id, work)

    async def expire_due(self, lease: leases.Lease) -> int:
        """Expire every pending request past its expiry time, with its event, once.

        Finds due requests of every tenant as the indexer role, then expires them per
        tenant as the application role, fenced by ``lease`` (a replica that lost the lease
        writes nothing). Idempotent: only PENDING requests past ``expire_at`` change.

        Args:
            lease: The lease ``governance:approvals:expire`` this replica holds.

        Returns:
            Requests expired now.
        """
        async with self.indexer.all_tenants_snapshot() as conn:
            due = await conn.fetch(
                "SELECT tenant_id, id FROM approval_requests WHERE state = 1 "
                "AND expire_at <= clock_timestamp() ORDER BY expire_at LIMIT $1",
                EXPIRY_BATCH,
            )
        by_tenant: dict[str, list[uuid.UUID]] = {}
        for r in due:
            by_tenant.setdefault(r["tenant_id"], []).append(r["id"])
        total = 0
        for tenant_id, ids in by_tenant.items():

            async def work(
                conn: asyncpg.Connection, t: str = tenant_id, ids: list[uuid.UUID] = ids
            ) -> int:
                await leases.check(conn, lease)
                rows = await conn.fetch(
                    "UPDATE approval_requests SET state = 4, revision = revision + 1, "
                    "closed_at = clock_timestamp() WHERE tenant_id = $1 AND id = ANY($2::uuid[]) "
                    "AND state = 1 AND expire_at <= clock_timestamp() RETURNING id",
                    t,
                    ids,
                )
                for r in rows:
                    await store.append_event(
                        conn,
                        t,
                        "governance.approval_request.expired",
                        f"tenants/{t}/approvalRequests/{r['id']}",
                        "services/governance",
                    )
                return len(rows)

            total += await self.db.run(tenant_id, work)
        if total:
            log.info("approvals.expired", count=total)
        return total
