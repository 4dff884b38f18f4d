"""The promotion RPCs of ``KnowledgeService`` (preview, request, get, approve, reject,
retarget, apply) and their storage (migration ``0003_promotions.sql``); the servicer
delegates to :class:`Promotions`. The rules are :mod:`.promotion`'s.

Authorization comes first, as for items: a request is decided on its source's unit for
get and apply (``knowledge:read`` / ``knowledge:write``), on its target unit for approve,
reject and retarget (``knowledge:review``: TECH_LEAD at a team, ARCHITECT at an
organization or a team, ADMIN at the company, tenant admins anywhere, as DOMAIN.md's reviewer
authority); a name that does not exist is decided on the tenant's data as a whole. The
decision itself is governance's: approve and reject forward the reviewer's own token to
governance's ``ApprovalService``, which checks ``approval:decide`` at the target unit and
records the reviewer; a decision made in governance directly is picked up by get and
apply. The requester never reviews their own request.

Every change is one tenant transaction with its outbox event
(``knowledge.promotion_request.created``, ``.approved``, ``.rejected``, ``.retargeted``, and
``knowledge.promoted`` on apply). Apply is one transaction: it locks the request and the
source, refuses a source changed since the request (``ABORTED``, reason
``SOURCE_CHANGED``), creates the promoted item ACCEPTED at the target with
``promoted_from``, writes PROMOTED_FROM/PROMOTED_TO both ways, then FULL supersedes the
source (SUPERSEDES/SUPERSEDED_BY both ways) and PARTIAL keeps it with its residual role,
related to the promoted item by that role's kind.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import structlog
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing, writes
from aeterna_common.context import Principal
from aeterna_common.db import Database
from aeterna_common.errors import (
    Aborted,
    AeternaError,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionViolated,
    Unavailable,
)
from aeterna_common.names import Name, parse_name, parse_parent
from aeterna_common.servicing import Ctx
from aeterna_common.writes import WriteKey

from aeterna_knowledge import items as it
from aeterna_knowledge import promotion as rules
from aeterna_knowledge.access import UNIT_KIND, Access
from aeterna_knowledge.items import Items, NewItem

log = structlog.get_logger("aeterna.knowledge.promotion")

PROMOTED = "knowledge.promoted"
"""Event of an applied promotion, on the promoted item (issue 8's KNOWLEDGE_PROMOTED)."""
REQUEST_EVENT = "knowledge.promotion_request.{}"
"""Events of a promotion request's changes (created, approved, rejected, retargeted)."""

_ID_NAMESPACE = uuid.UUID("0b6c3f6e-4b1f-5d52-9a57-6b0d5c1e9a11")
"""Namespace of the request ids derived from a caller's ``request_id`` (UUIDv5), so that a
retried create names the same request and the same governance approval."""

_SELECT = (
    "SELECT p.*, i.layer AS source_layer, i.org_unit_id AS source_unit "
    "FROM knowledge_promotions p JOIN knowledge_items i "
    "ON i.tenant_id = p.tenant_id AND i.id = p.source_id "
    "WHERE p.tenant_id = $1 AND p.id = $2"
)

STATE_NAME: dict[int, str] = {
    rules.PENDING_REVIEW: "PENDING_REVIEW",
    rules.APPROVED: "APPROVED",
    rules.REJECTED: "REJECTED",
    rules.APPLIED: "APPLIED",
}


def promotion_name(tenant_id: str, promotion_id: uuid.UUID | str) -> str:
    """``tenants/{tenant}/promotionRequests/{promotion_request}``."""
    return f"tenants/{tenant_id}/promotionRequests/{promotion_id}"


def _pb(tenant_id: str, row: asyncpg.Record) -> res.PromotionRequest:
    pb = res.PromotionRequest(
        name=promotion_name(tenant_id, row["id"]),
        source=it.item_name(tenant_id, row["source_id"]),
        source_version=row["source_version"],
        target_layer=row["target_layer"],
        target_org_unit=f"tenants/{tenant_id}/orgUnits/{row['target_unit_id']}",
        mode=row["mode"],
        state=row["state"],
        approval_request=row["approval_request"],
        etag=it.etag(row["version"]),
        residual_role=(
            row["residual_role"]
            if row["mode"] == res.PROMOTION_MODE_PARTIAL
            else res.VARIANT_ROLE_UNSPECIFIED
        ),
        promoted_item=it.item_name(tenant_id, row["promoted_id"]) if row["promoted_id"] else "",
        requester=row["requester"],
    )
    pb.create_time.FromDatetime(row["created_at"])
    return pb


def _governance_error(exc: grpc.aio.AioRpcError) -> AeternaError:
    """Governance's refusal as this service's error (its message kept, never a stack)."""
    code, text = exc.code(), exc.details() or exc.code().name
    meta = {"governance_code": code.name}
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(
            f"governance refused the decision: {text}", reason="APPROVAL_NOT_ALLOWED", metadata=meta
        )
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
        return FailedPrecondition(
            f"governance refused: {text}", reason="APPROVAL_REFUSED", metadata=meta
        )
    return Unavailable(
        f"governance could not be reached: {text}", reason="GOVERNANCE_UNAVAILABLE", metadata=meta
    )


class Promotions:
    """The promotion RPCs (see the module docstring).

    Args:
        db: Pool of the application role.
        access: The authorization checks.
        items: The items' storage.
        approvals: Governance's approvals, or None where governance is not configured
            (requests are then ``FAILED_PRECONDITION``, reason ``GOVERNANCE_NOT_CONFIGURED``).
        check_unit: Refuses a unit missing from the tree or of another kind than a layer's
            (``NOT_FOUND`` / ``INVALID_ARGUMENT``); args tenant, layer, unit id, field.
    """

    def __init__(
        self,
        db: Database,
        access: Access,
        items: Items,
        approvals: rules.PromotionApprovals | None,
        check_unit: Callable[[str, int, str, str], Awaitable[None]],
    ) -> None:
        self.db = db
        self.access = access
        self.items = items
        self.approvals = approvals
        self.check_unit = check_unit

    # ---- reads and authorization ----

    async def _row(self, tenant_id: str, promotion_id: str) -> asyncpg.Record | None:
        async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                _SELECT, tenant_id, uuid.UUID(promotion_id)
            )
            return row

        return await self.db.run(tenant_id, work, readonly=True)

    async def _authorized(
        self, principal: Principal, name: Name, rpc: str, on_target: bool
    ) -> asyncpg.Record:
        """The request's row, once ``rpc`` is allowed on its source's (or target's) unit.

        Raises:
            PermissionDenied: Not allowed, or missing and no tenant-wide right.
            NotFound: Missing, for a caller with tenant-wide rights.
        """
        row = await self._row(name.tenant_id, name.id)
        if row is None:
            await self.access.require_everything(principal, name.tenant_id, rpc)
            raise NotFound(f"{name} does not exist", metadata={"name": str(name)})
        if on_target:
            layer, unit = row["target_layer"], row["target_unit_id"]
        else:
            layer, unit = row["source_layer"], row["source_unit"]
        await self.access.require_unit(principal, name.tenant_id, rpc, layer, unit)
        return row

    async def _source(self, principal: Principal, name: Name, rpc: str) -> res.KnowledgeItem:
        item = await self.items.find(name.tenant_id, name.id)
        if item is None:
            await self.access.require_everything(principal, name.tenant_id, rpc)
            raise NotFound(f"{name} does not exist", metadata={"name": str(name)})
        unit_id = item.org_unit.rsplit("/", 1)[1]
        await self.access.require_unit(principal, name.tenant_id, rpc, item.layer, unit_id)
        return item

    @staticmethod
    def _target(
        tenant_id: str, layer: int, unit_ref: str, prefix: str
    ) -> tuple[str, list[FieldViolation]]:
        """The target unit id and the violations of a target layer and unit."""
        bad: list[FieldViolation] = []
        if layer not in UNIT_KIND:
            bad.append(
                FieldViolation(f"{prefix}target_layer", "TEAM, ORG or COMPANY", "INVALID_LAYER")
            )
        parts = unit_ref.split("/")
        if len(parts) != 4 or parts[0] != "tenants" or parts[2] != "orgUnits" or not parts[3]:
            bad.append(
                FieldViolation(
                    f"{prefix}target_org_unit",
                    "tenants/{tenant}/orgUnits/{org_unit}",
                    "INVALID_NAME",
                )
            )
            return "", bad
        if parts[1] != tenant_id:
            bad.append(
                FieldViolation(
                    f"{prefix}target_org_unit",
                    "must be a unit of the same tenant",
                    "CROSS_TENANT_REFERENCE",
                )
            )
        return parts[3], bad

    @staticmethod
    def _upward(source_layer: int, target_layer: int, field: str) -> None:
        """Refuse a target that is not above the source (downward or sideways).

        Raises:
            InvalidArgument: Reason ``PROMOTION_NOT_UPWARD``.
        """
        if source_layer != res.KNOWLEDGE_LAYER_COMPANY and target_layer <= source_layer:
            raise InvalidArgument(
                [
                    FieldViolation(
                        field,
                        f"must be above the source's layer {rules.layer_name(source_layer)}: "
                        "promotion goes upward only",
                        "PROMOTION_NOT_UPWARD",
                    )
                ]
            )

    async def _path_taken(self, tenant_id: str, layer: int, unit_id: str, path: str) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT 1 FROM knowledge_items WHERE tenant_id = $1 AND layer = $2 "
                    "AND org_unit_id = $3 AND path = $4 AND status IN (1, 2, 3)",
                    tenant_id,
                    layer,
                    unit_id,
                    path,
                )
            )

        return await self.db.run(tenant_id, work, readonly=True)

    async def _settle(self, tenant_id: str, row: asyncpg.Record) -> asyncpg.Record:
        """A PENDING_REVIEW request with governance's decision applied, if one was made
        (read with the service's own token); other requests as they are."""
        if row["state"] != rules.PENDING_REVIEW or self.approvals is None:
            return row
        try:
            state = await self.approvals.state(row["approval_request"])
        except grpc.aio.AioRpcError as exc:
            raise _governance_error(exc) from exc
        settled = rules.promotion_state(state)
        if settled is None:
            return row
        return await self._set_state(tenant_id, row, settled)

    async def _set_state(self, tenant_id: str, row: asyncpg.Record, state: int) -> asyncpg.Record:
        """Move a PENDING_REVIEW request to ``state`` (once: a request already moved is
        returned as it is) with its event."""
        principal = rc.current().principal

        async def work(conn: asyncpg.Connection) -> asyncpg.Record:
            updated = await conn.fetchrow(
                "UPDATE knowledge_promotions SET state = $3, version = version + 1, "
                "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 AND state = 1 "
                "RETURNING id",
                tenant_id,
                row["id"],
                state,
            )
            if updated is not None:
                await writes.append_event(
                    conn,
                    it.NOTIFY_CHANNEL,
                    tenant_id,
                    REQUEST_EVENT.format(STATE_NAME[state].lower()),
                    promotion_name(tenant_id, row["id"]),
                    principal.actor,
                    {
                        "source": it.item_name(tenant_id, row["source_id"]),
                        "approval_request": row["approval_request"],
                        "state": STATE_NAME[state],
                    },
                )
            fresh: asyncpg.Record = it._locked(await conn.fetchrow(_SELECT, tenant_id, row["id"]))
            return fresh

        return await self.db.run(tenant_id, work)

    @staticmethod
    def _check_etag(name: Name, row: asyncpg.Record, given: str) -> None:
        if given and given != it.etag(row["version"]):
            raise Aborted(
                f"{name} changed since the etag was read; get it again",
                reason="ETAG_MISMATCH",
                metadata={"name": str(name)},
            )

    # ---- RPCs ----

    async def preview(
        self, request: svc.PreviewPromotionRequest, context: Ctx
    ) -> svc.PreviewPromotionResponse:
        """See the proto: what apply would create and leave, and the blockers; no write."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "knowledgeItems")
        servicing.check_read_token(context)
        source = await self._source(principal, name, "PreviewPromotion")
        unit_id, bad = self._target(
            name.tenant_id, request.target_layer, request.target_org_unit, ""
        )
        if request.mode not in (res.PROMOTION_MODE_FULL, res.PROMOTION_MODE_PARTIAL):
            bad.append(FieldViolation("mode", "FULL or PARTIAL", "INVALID_MODE"))
        if bad:
            raise InvalidArgument(bad)
        found = [d for _, d in rules.blockers(source, request.target_layer)]
        kind = await self.access.unit_kind(name.tenant_id, unit_id)
        if kind is None:
            found.append(f"the target unit {request.target_org_unit} does not exist")
        elif kind is not UNIT_KIND[request.target_layer]:
            found.append(
                f"the target unit is a {kind.name}; layer "
                f"{rules.layer_name(request.target_layer)} needs a "
                f"{UNIT_KIND[request.target_layer].name}"
            )
        elif await self._path_taken(name.tenant_id, request.target_layer, unit_id, source.path):
            found.append(f"a live item has the path {source.path!r} at the target unit")
        promoted = res.KnowledgeItem()
        promoted.CopyFrom(source)
        for field in ("name", "etag", "create_time", "update_time", "content_hash"):
            promoted.ClearField(field)
        promoted.layer = request.target_layer
        promoted.org_unit = request.target_org_unit
        promoted.status = res.KNOWLEDGE_STATUS_ACCEPTED
        promoted.variant_role = res.VARIANT_ROLE_CANONICAL
        promoted.promoted_from = source.name
        promoted.version = 1
        promoted.content_hash = source.content_hash
        promoted.author = principal.actor
        after = res.KnowledgeItem()
        after.CopyFrom(source)
        if request.mode == res.PROMOTION_MODE_FULL:
            after.status = res.KNOWLEDGE_STATUS_SUPERSEDED
            after.variant_role = res.VARIANT_ROLE_SUPERSEDED
        else:
            after.variant_role = rules.DEFAULT_RESIDUAL_ROLE
        return svc.PreviewPromotionResponse(promoted=promoted, source=after, blockers=found)

    async def create(
        self, request: svc.CreatePromotionRequestRequest, context: Ctx, key: WriteKey
    ) -> res.PromotionRequest:
        """See the proto: validate, open the governance approval, record PENDING_REVIEW."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        body = request.promotion_request
        source_name = parse_name(
            principal, body.source, "knowledgeItems", "promotion_request.source"
        )
        rpc = "CreatePromotionRequest"
        source = await self._source(principal, source_name, rpc)
        unit_id, bad = self._target(
            tenant_id, body.target_layer, body.target_org_unit, "promotion_request."
        )
        if body.mode not in (res.PROMOTION_MODE_FULL, res.PROMOTION_MODE_PARTIAL):
            bad.append(FieldViolation("promotion_request.mode", "FULL or PARTIAL", "INVALID_MODE"))
        if body.residual_role and body.residual_role not in rules.RESIDUAL_KIND:
            bad.append(
                FieldViolation(
                    "promotion_request.residual_role",
                    "SPECIALIZATION, APPLICABILITY, EXCEPTION or CLARIFICATION",
                    "INVALID_RESIDUAL_ROLE",
                )
            )
        if bad:
            raise InvalidArgument(bad)
        self._upward(source.layer, body.target_layer, "promotion_request.target_layer")
        refused = [
            FieldViolation(
                "promotion_request.source" if reason != "CREDENTIALS_IN_CONTENT" else "content",
                text,
                reason,
            )
            for reason, text in rules.blockers(source, body.target_layer)
        ]
        if refused:
            raise PreconditionViolated(refused, metadata={"source": source.name})
        await self.check_unit(
            tenant_id, body.target_layer, unit_id, "promotion_request.target_org_unit"
        )
        if self.approvals is None:
            raise FailedPrecondition(
                "promotions need governance's approvals, which are not configured "
                "(AETERNA_AUTHZ_DIRECTORY_URL and AETERNA_SERVICE_TOKEN_FILE)",
                reason="GOVERNANCE_NOT_CONFIGURED",
            )
        if key.request_id:
            seed = f"{tenant_id}/{principal.actor}/{key.request_id}"
            promotion_id = uuid.uuid5(_ID_NAMESPACE, seed)
        else:
            promotion_id = uuid.uuid4()
        name = promotion_name(tenant_id, promotion_id)
        existing = await self._open_for(tenant_id, source_name.id)
        if existing is not None and existing["id"] != promotion_id:
            raise AlreadyExists(
                f"{source.name} already has an open promotion request",
                reason="PROMOTION_PENDING",
                metadata={"promotion_request": promotion_name(tenant_id, existing["id"])},
            )
        residual = body.residual_role or rules.DEFAULT_RESIDUAL_ROLE
        payload = {
            "promotion_request": name,
            "source": source.name,
            "source_version": source.version,
            "source_layer": rules.layer_name(source.layer),
            "path": source.path,
            "content_sha256": source.content_hash,
            "target_layer": rules.layer_name(body.target_layer),
            "mode": res.PromotionMode.Name(body.mode).removeprefix("PROMOTION_MODE_"),
            "requester": principal.actor,
        }
        try:
            approval, _ = await self.approvals.ask(
                tenant_id,
                unit_id,
                source.name,
                f"Promote {source.path} to {rules.layer_name(body.target_layer)} {unit_id}",
                payload,
                f"kpromo-{promotion_id}",
            )
        except grpc.aio.AioRpcError as exc:
            raise _governance_error(exc) from exc

        async def work(conn: asyncpg.Connection) -> tuple[res.PromotionRequest, int]:
            inserted = await conn.fetchrow(
                "INSERT INTO knowledge_promotions (tenant_id, id, source_id, source_version, "
                "content_sha256, target_layer, target_unit_id, mode, residual_role, "
                "approval_request, requester) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                "$11) ON CONFLICT DO NOTHING RETURNING id",
                tenant_id,
                promotion_id,
                uuid.UUID(source_name.id),
                source.version,
                source.content_hash,
                body.target_layer,
                unit_id,
                body.mode,
                residual,
                approval,
                principal.actor,
            )
            if inserted is None:
                raise AlreadyExists(
                    f"{source.name} already has an open promotion request",
                    reason="PROMOTION_PENDING",
                    metadata={"source": source.name},
                )
            position = await writes.append_event(
                conn,
                it.NOTIFY_CHANNEL,
                tenant_id,
                REQUEST_EVENT.format("created"),
                name,
                principal.actor,
                {k: v for k, v in payload.items() if k != "promotion_request"}
                | {"approval_request": approval},
            )
            row = it._locked(await conn.fetchrow(_SELECT, tenant_id, promotion_id))
            return _pb(tenant_id, row), position

        if existing is not None:
            # A retried create (same request id) whose first call committed.
            return _pb(tenant_id, existing)
        created, position = await writes.run_write(self.db, key, res.PromotionRequest, work)
        await servicing.send_token(context, position)
        return created

    async def _open_for(self, tenant_id: str, source_id: str) -> asyncpg.Record | None:
        async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
            row: asyncpg.Record | None = await conn.fetchrow(
                "SELECT p.*, i.layer AS source_layer, i.org_unit_id AS source_unit "
                "FROM knowledge_promotions p JOIN knowledge_items i "
                "ON i.tenant_id = p.tenant_id AND i.id = p.source_id "
                "WHERE p.tenant_id = $1 AND p.source_id = $2 AND p.state IN (1, 2)",
                tenant_id,
                uuid.UUID(source_id),
            )
            return row

        return await self.db.run(tenant_id, work, readonly=True)

    async def get(
        self, request: svc.GetPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "promotionRequests")
        servicing.check_read_token(context)
        row = await self._authorized(principal, name, "GetPromotionRequest", on_target=False)
        return _pb(name.tenant_id, await self._settle(name.tenant_id, row))

    async def decide(self, request: Any, context: Ctx, approve: bool) -> res.PromotionRequest:
        """Approve or reject (see the proto): the reviewer's decision in governance.

        Raises:
            PermissionDenied: Not a reviewer of the target unit (``ACTION_NOT_ALLOWED``), the
                requester themself (``SELF_REVIEW``), or refused by governance
                (``APPROVAL_NOT_ALLOWED``).
            FailedPrecondition: Already decided the other way (``PROMOTION_DECIDED``).
            Aborted: Stale etag.
        """
        principal = rc.current().principal
        name = parse_name(principal, request.name, "promotionRequests")
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        rpc = "ApprovePromotionRequest" if approve else "RejectPromotionRequest"
        row = await self._authorized(principal, name, rpc, on_target=True)
        if row["requester"] == principal.actor:
            raise PermissionDenied(
                f"{name} was requested by {principal.actor}, who cannot review it",
                reason="SELF_REVIEW",
                metadata={"name": str(name)},
            )
        wanted = {rules.APPROVED, rules.APPLIED} if approve else {rules.REJECTED}
        if row["state"] in wanted:
            return _pb(name.tenant_id, row)  # idempotent: decided that way already
        self._check_etag(name, row, request.etag)
        if row["state"] != rules.PENDING_REVIEW:
            raise FailedPrecondition(
                f"{name} is {STATE_NAME[row['state']]}",
                reason="PROMOTION_DECIDED",
                metadata={"name": str(name), "state": STATE_NAME[row["state"]]},
            )
        if self.approvals is None:
            raise FailedPrecondition(
                "governance's approvals are not configured", reason="GOVERNANCE_NOT_CONFIGURED"
            )
        try:
            state = await self.approvals.decide(
                row["approval_request"],
                approve,
                servicing.caller_authorization(context),
                f"{'approved' if approve else 'rejected'} through {name}",
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise _governance_error(exc) from exc
            # Decided in governance meanwhile: its state settles the request.
            return _pb(name.tenant_id, await self._settle(name.tenant_id, row))
        settled = rules.promotion_state(state)
        if settled is None:
            return _pb(name.tenant_id, row)  # more approvals needed
        return _pb(name.tenant_id, await self._set_state(name.tenant_id, row, settled))

    async def retarget(
        self, request: svc.RetargetPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto: a reviewer of the current target moves a pending request; a new
        approval is opened at the new target and the old one withdrawn."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "promotionRequests")
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        row = await self._authorized(principal, name, "RetargetPromotionRequest", on_target=True)
        layer = request.target_layer or row["target_layer"]
        unit_id, bad = self._target(
            name.tenant_id,
            layer,
            request.target_org_unit or f"tenants/{name.tenant_id}/orgUnits/{row['target_unit_id']}",
            "",
        )
        if bad:
            raise InvalidArgument(bad)
        self._upward(row["source_layer"], layer, "target_layer")
        self._check_etag(name, row, request.etag)
        if (layer, unit_id) == (row["target_layer"], row["target_unit_id"]):
            return _pb(name.tenant_id, row)
        if row["state"] != rules.PENDING_REVIEW:
            raise FailedPrecondition(
                f"{name} is {STATE_NAME[row['state']]}: only a pending request is retargeted",
                reason="PROMOTION_DECIDED",
                metadata={"name": str(name), "state": STATE_NAME[row["state"]]},
            )
        await self.check_unit(name.tenant_id, layer, unit_id, "target_org_unit")
        if self.approvals is None:
            raise FailedPrecondition(
                "governance's approvals are not configured", reason="GOVERNANCE_NOT_CONFIGURED"
            )
        source = it.item_name(name.tenant_id, row["source_id"])
        payload = {
            "promotion_request": str(name),
            "source": source,
            "source_version": row["source_version"],
            "content_sha256": row["content_sha256"],
            "target_layer": rules.layer_name(layer),
            "mode": res.PromotionMode.Name(row["mode"]).removeprefix("PROMOTION_MODE_"),
            "requester": row["requester"],
            "retargeted_by": principal.actor,
        }
        try:
            approval, _ = await self.approvals.ask(
                name.tenant_id,
                unit_id,
                source,
                f"Promote {source} to {rules.layer_name(layer)} {unit_id}",
                payload,
                f"kpromo-{row['id']}-v{row['version'] + 1}",
            )
        except grpc.aio.AioRpcError as exc:
            raise _governance_error(exc) from exc

        async def work(conn: asyncpg.Connection) -> asyncpg.Record:
            updated = await conn.fetchrow(
                "UPDATE knowledge_promotions SET target_layer = $4, target_unit_id = $5, "
                "approval_request = $6, version = version + 1, updated_at = clock_timestamp() "
                "WHERE tenant_id = $1 AND id = $2 AND version = $3 AND state = 1 RETURNING id",
                name.tenant_id,
                row["id"],
                row["version"],
                layer,
                unit_id,
                approval,
            )
            if updated is None:
                raise Aborted(
                    f"{name} changed meanwhile; get it again",
                    reason="ETAG_MISMATCH",
                    metadata={"name": str(name)},
                )
            await writes.append_event(
                conn,
                it.NOTIFY_CHANNEL,
                name.tenant_id,
                REQUEST_EVENT.format("retargeted"),
                str(name),
                principal.actor,
                {
                    "source": source,
                    "approval_request": approval,
                    "previous_approval_request": row["approval_request"],
                    "target_layer": rules.layer_name(layer),
                    "target_org_unit": f"tenants/{name.tenant_id}/orgUnits/{unit_id}",
                },
            )
            fresh: asyncpg.Record = it._locked(
                await conn.fetchrow(_SELECT, name.tenant_id, row["id"])
            )
            return fresh

        fresh = await self.db.run(name.tenant_id, work)
        try:
            await self.approvals.cancel(row["approval_request"])
        except grpc.aio.AioRpcError as exc:
            # The old approval no longer decides anything (the request names the new one);
            # it expires in governance if it cannot be withdrawn now.
            log.warning(
                "promotion.cancel_failed",
                approval_request=row["approval_request"],
                code=exc.code().name,
            )
        return _pb(name.tenant_id, fresh)

    async def apply(
        self, request: svc.ApplyPromotionRequestRequest, context: Ctx, key: WriteKey
    ) -> res.PromotionRequest:
        """See the proto and the module docstring.

        Raises:
            FailedPrecondition: Not approved (``PROMOTION_NOT_APPROVED``), rejected
                (``PROMOTION_REJECTED``), or the source is no longer ACCEPTED.
            Aborted: The source changed since the request (``SOURCE_CHANGED``), or a stale
                etag.
            AlreadyExists: A live item has the path at the target (``PATH_TAKEN``).
        """
        principal = rc.current().principal
        name = parse_name(principal, request.name, "promotionRequests")
        servicing.check_request_id(request.request_id)
        servicing.check_request_id_header(context, request.request_id)
        row = await self._authorized(principal, name, "ApplyPromotionRequest", on_target=False)
        if row["state"] == rules.APPLIED:
            return _pb(name.tenant_id, row)  # idempotent
        self._check_etag(name, row, request.etag)
        row = await self._settle(name.tenant_id, row)
        if row["state"] == rules.REJECTED:
            raise FailedPrecondition(
                f"{name} was rejected", reason="PROMOTION_REJECTED", metadata={"name": str(name)}
            )
        if row["state"] == rules.PENDING_REVIEW:
            raise FailedPrecondition(
                f"{name} waits for its approval {row['approval_request']}",
                reason="PROMOTION_NOT_APPROVED",
                metadata={"name": str(name), "approval_request": row["approval_request"]},
            )
        tenant_id = name.tenant_id

        async def work(conn: asyncpg.Connection) -> tuple[res.PromotionRequest, int]:
            locked = it._locked(
                await conn.fetchrow(
                    "SELECT * FROM knowledge_promotions WHERE tenant_id = $1 AND id = $2 "
                    "FOR UPDATE",
                    tenant_id,
                    row["id"],
                )
            )
            if locked["state"] == rules.APPLIED:
                fresh = it._locked(await conn.fetchrow(_SELECT, tenant_id, row["id"]))
                return _pb(tenant_id, fresh), 0
            source = await it._lock(conn, tenant_id, str(row["source_id"]), "")
            source_name = it.item_name(tenant_id, source["id"])
            if (
                source["version"] != locked["source_version"]
                or source["content_hash"] != locked["content_sha256"]
            ):
                raise Aborted(
                    f"{source_name} changed since the promotion was requested (version "
                    f"{locked['source_version']} → {source['version']}): request it again",
                    reason="SOURCE_CHANGED",
                    metadata={
                        "source": source_name,
                        "requested_version": str(locked["source_version"]),
                        "current_version": str(source["version"]),
                    },
                )
            if source["status"] != res.KNOWLEDGE_STATUS_ACCEPTED:
                raise FailedPrecondition(
                    f"{source_name} is no longer ACCEPTED",
                    reason="SOURCE_NOT_ACCEPTED",
                    metadata={"source": source_name},
                )
            new = NewItem(
                type=source["type"],
                layer=locked["target_layer"],
                org_unit_id=locked["target_unit_id"],
                path=source["path"],
                title=source["title"],
                summary=source["summary"],
                content=source["content"],
                severity=source["severity"],
                tags=list(source["tags"]),
                constraints=list(source["constraints"]),
                metadata=json.loads(source["metadata"]),
                variant_role=res.VARIANT_ROLE_CANONICAL,
            )
            promoted = await it._insert(
                conn,
                key,
                new,
                res.KNOWLEDGE_STATUS_ACCEPTED,
                promoted_from=source["id"],
                reason=f"promoted from {source_name} ({locked['approval_request']})",
            )
            promoted_id = uuid.UUID(promoted.name.rsplit("/", 1)[1])
            await it._relate(conn, key, promoted_id, source["id"], res.RELATION_KIND_PROMOTED_FROM)
            if locked["mode"] == res.PROMOTION_MODE_FULL:
                await it._set_status(
                    conn,
                    key,
                    source,
                    res.KNOWLEDGE_STATUS_SUPERSEDED,
                    f"superseded by its promotion {promoted.name}",
                )
                await conn.execute(
                    "UPDATE knowledge_items SET variant_role = $3 WHERE tenant_id = $1 AND id = $2",
                    tenant_id,
                    source["id"],
                    res.VARIANT_ROLE_SUPERSEDED,
                )
                await it._relate(conn, key, promoted_id, source["id"], res.RELATION_KIND_SUPERSEDES)
            else:
                role = locked["residual_role"]
                residual = it._locked(
                    await conn.fetchrow(
                        "UPDATE knowledge_items SET variant_role = $3, version = version + 1, "
                        "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                        f"RETURNING {it._COLUMNS}",
                        tenant_id,
                        source["id"],
                        role,
                    )
                )
                await it._revision(
                    conn, key, residual, f"kept as a residual of its promotion {promoted.name}"
                )
                await it._relate(conn, key, source["id"], promoted_id, rules.RESIDUAL_KIND[role])
                await it._event(
                    conn,
                    key,
                    it.UPDATED,
                    it._item_pb(tenant_id, residual),
                    {"fields": ["variant_role"], "residual_of": promoted.name},
                )
            await conn.execute(
                "UPDATE knowledge_promotions SET state = $3, promoted_id = $4, "
                "version = version + 1, updated_at = clock_timestamp() "
                "WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                row["id"],
                rules.APPLIED,
                promoted_id,
            )
            position = await it._event(
                conn,
                key,
                PROMOTED,
                promoted,
                {
                    "source": source_name,
                    "promotion_request": str(name),
                    "approval_request": locked["approval_request"],
                    "mode": res.PromotionMode.Name(locked["mode"]).removeprefix("PROMOTION_MODE_"),
                },
            )
            fresh = it._locked(await conn.fetchrow(_SELECT, tenant_id, row["id"]))
            return _pb(tenant_id, fresh), position

        applied, position = await writes.run_write(self.db, key, res.PromotionRequest, work)
        if position:
            await servicing.send_token(context, position)
        return applied

    async def residuals(
        self, principal: Principal, tenant_id: str, primaries: list[res.KnowledgeItem]
    ) -> None:
        """Fill ``residuals`` of each item (query_enriched): the items the caller may read
        that relate to it as SPECIALIZES, APPLICABLE_FROM, EXCEPTION_TO or CLARIFIES and
        hold a residual variant role (what a PARTIAL promotion left at a lower layer)."""
        if not primaries:
            return
        units = await self.access.readable_units(principal, tenant_id, "ListKnowledgeItems")
        ids = [uuid.UUID(p.name.rsplit("/", 1)[1]) for p in primaries]

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    "SELECT r.target_id, r.source_id FROM knowledge_relations r "
                    "JOIN knowledge_items i ON i.tenant_id = r.tenant_id AND i.id = r.source_id "
                    "WHERE r.tenant_id = $1 AND r.target_id = ANY($2::uuid[]) "
                    "AND r.kind = ANY($3::smallint[]) AND i.variant_role = ANY($4::smallint[]) "
                    "AND ($5::text[] IS NULL OR i.org_unit_id = ANY($5::text[])) "
                    "ORDER BY i.layer, i.path, i.id",
                    tenant_id,
                    ids,
                    list(rules.RESIDUAL_KIND.values()),
                    list(rules.RESIDUAL_KIND),
                    list(units) if units is not None else None,
                )
            )

        rows = await self.db.run(tenant_id, work, readonly=True)
        by_target: dict[uuid.UUID, list[str]] = {}
        for r in rows:
            by_target.setdefault(r["target_id"], []).append(it.item_name(tenant_id, r["source_id"]))
        for primary, item_id in zip(primaries, ids, strict=True):
            primary.residuals[:] = by_target.get(item_id, [])
