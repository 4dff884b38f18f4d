"""gRPC servicer of ``aeterna.knowledge.v1.KnowledgeService``: thin, protobuf ⇄ :mod:`.items`.

Each method checks the name's tenant first (another tenant's name is ``PERMISSION_DENIED``
before any lookup), then authorizes (:mod:`.access`), then validates the body, then writes.
An RPC on an existing item is decided on the item's unit; a name that does not exist is
decided on the tenant's data as a whole, so without tenant-wide rights the answer is the same
``PERMISSION_DENIED`` whether or not the item exists.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import grpc
from aeterna.knowledge.v1 import knowledge_service_pb2 as svc
from aeterna.knowledge.v1 import knowledge_service_pb2_grpc as svc_grpc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import context as rc
from aeterna_common import servicing
from aeterna_common.authz import UnitKind
from aeterna_common.consistency import INDEX_POSITION_KEY, INDEX_STALE_KEY, token_from_metadata
from aeterna_common.context import Principal
from aeterna_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PreconditionViolated,
    Unimplemented,
)
from aeterna_common.markdown import missing_sections
from aeterna_common.names import Name, invalid_name, parse_name, parse_parent
from aeterna_common.servicing import Ctx
from aeterna_common.writes import WriteKey, request_hash
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from aeterna_knowledge.access import UNIT_KIND, Access
from aeterna_knowledge.deps import Deps, Registered, ServicerSpec
from aeterna_knowledge.items import Items, NewItem, metadata_of
from aeterna_knowledge.promotion_service import Promotions
from aeterna_knowledge.search import DEFAULT_STATUSES, Query

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["KnowledgeService"].full_name

MAX_CONTENT_BYTES = 256 * 1024
"""Largest content, in bytes of UTF-8 (issue 8: 256 KiB)."""
MAX_TITLE_CHARS = 300
MAX_SUMMARY_CHARS = 2000
MAX_REASON_CHARS = 500
MAX_TAGS = 32
MAX_CONSTRAINTS = 64
MAX_CONSTRAINT_CHARS = 500
MAX_METADATA_BYTES = 16 * 1024
"""Limits of the contract (resources.proto)."""

PATH = re.compile(r"[a-z0-9._-]+(?:/[a-z0-9._-]+)*")
"""A path: segments of [a-z0-9._-] separated by `/` (the contract), 1-200 characters."""
TAG = re.compile(r"[a-z0-9._:-]{1,64}")
UNIT_REF = re.compile(r"tenants/([A-Za-z0-9_-]{1,100})/orgUnits/([a-z0-9-]{1,63})")

UPDATABLE = {
    "title",
    "summary",
    "content",
    "severity",
    "tags",
    "constraints",
    "metadata",
    "variant_role",
}
"""Fields UpdateKnowledgeItem changes (the contract)."""

TYPE_NAME = {
    t: res.KnowledgeType.Name(t).removeprefix("KNOWLEDGE_TYPE_")  # type: ignore[arg-type]
    for t in range(1, 6)
}
"""``ADR`` for KNOWLEDGE_TYPE_ADR, ...: the names
:func:`aeterna_common.markdown.missing_sections` takes."""


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _list_key(item: res.KnowledgeItem) -> str:
    """The keyset key of ListKnowledgeItems: path, layer and id, NUL-separated."""
    return f"{item.path}\x00{item.layer}\x00{item.name.rsplit('/', 1)[1]}"


def _item_ref(principal: Principal, name: str, field: str = "name") -> Name:
    """The parsed ``tenants/{tenant}/knowledgeItems/{uuid}``; the tenant check first."""
    return parse_name(principal, name, "knowledgeItems", field)


def _fields(
    item: res.KnowledgeItem, fields: set[str], prefix: str
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """Validated column values of ``fields`` of ``item``, and the violations found."""
    values: dict[str, Any] = {}
    bad: list[FieldViolation] = []

    def violation(field: str, text: str, reason: str = "") -> None:
        bad.append(FieldViolation(f"{prefix}.{field}", text, reason))

    if "title" in fields:
        if not 1 <= len(item.title) <= MAX_TITLE_CHARS:
            violation("title", f"1-{MAX_TITLE_CHARS} characters")
        values["title"] = item.title
    if "summary" in fields:
        if len(item.summary) > MAX_SUMMARY_CHARS:
            violation("summary", f"at most {MAX_SUMMARY_CHARS} characters")
        values["summary"] = item.summary
    if "content" in fields:
        if len(item.content.encode()) > MAX_CONTENT_BYTES:
            violation("content", "at most 256 KiB of UTF-8", "CONTENT_TOO_LARGE")
        values["content"] = item.content
    if "severity" in fields:
        if item.severity not in res.Severity.values():
            violation("severity", "INFO, WARN or BLOCK")
        values["severity"] = item.severity or res.SEVERITY_INFO
    if "tags" in fields:
        if len(item.tags) > MAX_TAGS or any(not TAG.fullmatch(t) for t in item.tags):
            violation("tags", f"at most {MAX_TAGS}, each 1-64 characters of [a-z0-9._:-]")
        values["tags"] = sorted(set(item.tags))
    if "constraints" in fields:
        if len(item.constraints) > MAX_CONSTRAINTS or any(
            not 1 <= len(c) <= MAX_CONSTRAINT_CHARS for c in item.constraints
        ):
            violation(
                "constraints",
                f"at most {MAX_CONSTRAINTS}, each 1-{MAX_CONSTRAINT_CHARS} characters",
            )
        values["constraints"] = list(item.constraints)
    if "metadata" in fields:
        if item.metadata.ByteSize() > MAX_METADATA_BYTES:
            violation("metadata", "at most 16 KiB serialized")
        values["metadata"] = metadata_of(item.metadata)
    if "variant_role" in fields:
        if item.variant_role not in res.VariantRole.values():
            violation("variant_role", "a VariantRole")
        values["variant_role"] = item.variant_role or res.VARIANT_ROLE_CANONICAL
    return values, bad


def _new_item(
    item: res.KnowledgeItem, prefix: str, type_: int, layer: int, unit_id: str
) -> NewItem:
    """The validated item to create at ``layer`` and ``unit_id``.

    Raises:
        InvalidArgument: One violation per bad field.
    """
    values, bad = _fields(item, UPDATABLE, prefix)
    if not (len(item.path) <= 200 and PATH.fullmatch(item.path)) or any(
        s in (".", "..") for s in item.path.split("/")
    ):
        bad.insert(
            0,
            FieldViolation(
                f"{prefix}.path",
                "1-200 characters: segments of [a-z0-9._-] separated by '/', e.g. "
                "adr/0010-luxon-dates",
                "INVALID_PATH",
            ),
        )
    if bad:
        raise InvalidArgument(bad)
    return NewItem(type=type_, layer=layer, org_unit_id=unit_id, path=item.path, **values)


def _required_sections(item: res.KnowledgeItem) -> None:
    """Refuse an item whose content lacks a required section of its type: the one place
    that asks :func:`aeterna_common.markdown.missing_sections` (headings matched tolerantly:
    case, numbering, MADR and Nygard synonyms; headings in fenced code are no sections).

    Raises:
        PreconditionViolated: ``FAILED_PRECONDITION``, reason ``MISSING_SECTIONS``, a violation
            on ``content`` naming the missing sections (also in ``ErrorInfo.metadata``).
    """
    missing = missing_sections(TYPE_NAME[item.type], item.content)
    if missing:
        raise PreconditionViolated(
            [
                FieldViolation(
                    "content",
                    f"a {TYPE_NAME[item.type]} needs the sections: {', '.join(missing)}",
                    "MISSING_SECTIONS",
                )
            ],
            metadata={"name": item.name, "missing": ",".join(missing)},
        )


MAX_QUERY_CHARS = 2000
MAX_SEARCH_RESULTS = 100
DEFAULT_SEARCH_RESULTS = 10
"""SearchKnowledge's limits (the proto): a query of 1-2,000 characters, 1-100 results, 10
by default; a larger page size is coerced to 100 (AIP-158)."""


def search_query(request: svc.SearchKnowledgeRequest) -> Query:
    """The validated query of a SearchKnowledge request (enum filters by short name).

    Raises:
        InvalidArgument: One violation per bad field.
    """
    bad: list[FieldViolation] = []
    if not request.query.strip() or len(request.query) > MAX_QUERY_CHARS:
        bad.append(FieldViolation("query", f"1-{MAX_QUERY_CHARS} characters, not only spaces"))
    if request.page_size < 0:
        bad.append(FieldViolation("page_size", "must not be negative"))
    names: dict[str, list[str]] = {}
    enums: tuple[tuple[str, list[int], Any, str], ...] = (
        ("types", list(request.types), res.KnowledgeType, "KNOWLEDGE_TYPE_"),
        ("statuses", list(request.statuses), res.KnowledgeStatus, "KNOWLEDGE_STATUS_"),
        ("layers", list(request.layers), res.KnowledgeLayer, "KNOWLEDGE_LAYER_"),
    )
    for field, values, enum, prefix in enums:
        if any(not v or v not in enum.values() for v in values):
            bad.append(FieldViolation(field, f"each a {enum.DESCRIPTOR.name} other than 0"))
            continue
        names[field] = sorted({str(enum.Name(v)).removeprefix(prefix) for v in values})
    if len(request.tags) > MAX_TAGS or any(not TAG.fullmatch(t) for t in request.tags):
        bad.append(
            FieldViolation("tags", f"at most {MAX_TAGS}, each 1-64 characters of [a-z0-9._:-]")
        )
    if bad:
        raise InvalidArgument(bad)
    return Query(
        text=request.query,
        limit=min(request.page_size or DEFAULT_SEARCH_RESULTS, MAX_SEARCH_RESULTS),
        statuses=names["statuses"] or DEFAULT_STATUSES,
        types=names["types"],
        layers=names["layers"],
        tags=sorted(set(request.tags)),
    )


class KnowledgeServicer(svc_grpc.KnowledgeServiceServicer):
    """Implements ``KnowledgeService``; see the proto for each method's contract.

    Args:
        deps: The shared dependencies.
    """

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.access: Access = deps.access
        self.items = Items(deps.db)
        self.promotions = Promotions(
            deps.db,
            self.access,
            self.items,
            deps.approvals,
            self._check_unit,
        )

    def _key(self, tenant_id: str, principal: Principal, method: str, request: Message) -> WriteKey:
        request_id = str(getattr(request, "request_id", ""))
        return WriteKey(
            tenant_id,
            principal.actor,
            method,
            request_id,
            request_hash(request),
            self.deps.settings.idempotency_ttl_s,
        )

    @staticmethod
    def _check_write(context: Ctx, request: Message) -> None:
        request_id = str(getattr(request, "request_id", ""))
        servicing.check_request_id(request_id)
        servicing.check_request_id_header(context, request_id)

    async def _authorized_item(
        self, principal: Principal, name: Name, rpc: str
    ) -> res.KnowledgeItem:
        """The item, once ``rpc`` is allowed on its unit (see the module docstring).

        Raises:
            PermissionDenied: Not allowed, or missing and the caller has no tenant-wide right.
            NotFound: Missing, for a caller with tenant-wide rights.
        """
        item = await self.items.find(name.tenant_id, name.id)
        if item is None:
            await self.access.require_everything(principal, name.tenant_id, rpc)
            raise NotFound(f"{name} does not exist", metadata={"name": str(name)})
        unit_id = item.org_unit.rsplit("/", 1)[1]
        await self.access.require_unit(principal, name.tenant_id, rpc, item.layer, unit_id)
        return item

    async def _check_unit(self, tenant_id: str, layer: int, unit_id: str, field: str) -> None:
        """Refuse a unit missing from the tree or of another kind than the layer's.

        Raises:
            NotFound: Not in the tenant's tree (reason ``ORG_UNIT_NOT_FOUND``).
            InvalidArgument: Of another kind (reason ``LAYER_UNIT_MISMATCH``).
        """
        kind = await self.access.unit_kind(tenant_id, unit_id)
        name = f"tenants/{tenant_id}/orgUnits/{unit_id}"
        if kind is None:
            raise NotFound(
                f"{name} does not exist", reason="ORG_UNIT_NOT_FOUND", metadata={"org_unit": name}
            )
        if kind is not UNIT_KIND[layer]:
            raise InvalidArgument(
                [
                    FieldViolation(
                        field,
                        f"{name} is a {kind.name}; layer "
                        f"{res.KnowledgeLayer.Name(layer)} needs a {UNIT_KIND[layer].name}",  # type: ignore[arg-type]
                        "LAYER_UNIT_MISMATCH",
                    )
                ]
            )

    async def CreateKnowledgeItem(
        self, request: svc.CreateKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        self._check_write(context, request)
        body = request.knowledge_item
        bad: list[FieldViolation] = []
        if body.type not in TYPE_NAME:
            bad.append(
                FieldViolation(
                    "knowledge_item.type", "ADR, POLICY, PATTERN, SPEC or HINDSIGHT", "INVALID_TYPE"
                )
            )
        if body.layer not in UNIT_KIND:
            bad.append(
                FieldViolation(
                    "knowledge_item.layer", "PROJECT, TEAM, ORG or COMPANY", "INVALID_LAYER"
                )
            )
        unit = UNIT_REF.fullmatch(body.org_unit)
        if unit is None:
            bad.append(
                FieldViolation(
                    "knowledge_item.org_unit",
                    "tenants/{tenant}/orgUnits/{org_unit}",
                    "INVALID_NAME",
                )
            )
        elif unit.group(1) != tenant_id:
            bad.append(
                FieldViolation(
                    "knowledge_item.org_unit",
                    "must be a unit of the same tenant",
                    "CROSS_TENANT_REFERENCE",
                )
            )
        if bad or unit is None:
            raise InvalidArgument(bad)
        unit_id = unit.group(2)
        await self.access.require_unit(
            principal, tenant_id, "CreateKnowledgeItem", body.layer, unit_id
        )
        new = _new_item(body, "knowledge_item", body.type, body.layer, unit_id)
        await self._check_unit(tenant_id, body.layer, unit_id, "knowledge_item.org_unit")
        key = self._key(tenant_id, principal, "CreateKnowledgeItem", request)
        item, position = await self.items.create(key, new)
        await servicing.send_token(context, position)
        return item

    async def GetKnowledgeItem(
        self, request: svc.GetKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto."""
        principal = rc.current().principal
        name = _item_ref(principal, request.name)
        servicing.check_read_token(context)
        item = await self._authorized_item(principal, name, "GetKnowledgeItem")
        if request.view == res.KNOWLEDGE_ITEM_VIEW_ENRICHED:
            await self.promotions.residuals(principal, name.tenant_id, [item])
        return item

    async def ListKnowledgeItems(
        self, request: svc.ListKnowledgeItemsRequest, context: Ctx
    ) -> svc.ListKnowledgeItemsResponse:
        """See the proto: the items of the units the caller may read."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        servicing.check_read_token(context)
        unit_id = ""
        if request.org_unit:
            unit = UNIT_REF.fullmatch(request.org_unit)
            if unit is None or unit.group(1) != tenant_id:
                raise invalid_name("org_unit", f"tenants/{tenant_id}/orgUnits/{{org_unit}}")
            unit_id = unit.group(2)
        for field, value, enum in (
            ("type", request.type, res.KnowledgeType),
            ("status", request.status, res.KnowledgeStatus),
            ("layer", request.layer, res.KnowledgeLayer),
        ):
            if value not in enum.values():
                raise InvalidArgument([FieldViolation(field, f"a {enum.DESCRIPTOR.name}")])
        units = await self.access.readable_units(principal, tenant_id, "ListKnowledgeItems")
        size = servicing.page_size(request.page_size)
        filters = {
            "type": request.type,
            "status": request.status,
            "layer": request.layer,
            "org_unit_id": unit_id,
            "path": request.path,
        }
        fingerprint = _fingerprint(tenant_id, sorted(filters.items()))
        after = servicing.decode_page_token(request.page_token, fingerprint)
        found = await self.items.list_items(tenant_id, units, filters, after, size + 1)
        page, token = servicing.cut_page(
            found,
            size,
            fingerprint,
            lambda i: f"{i.path}\x00{i.layer}\x00{i.name.rsplit('/', 1)[1]}",
        )
        if request.view == res.KNOWLEDGE_ITEM_VIEW_ENRICHED:
            await self.promotions.residuals(principal, tenant_id, page)
        return svc.ListKnowledgeItemsResponse(knowledge_items=page, next_page_token=token)

    async def UpdateKnowledgeItem(
        self, request: svc.UpdateKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto."""
        principal = rc.current().principal
        name = _item_ref(principal, request.knowledge_item.name, "knowledge_item.name")
        self._check_write(context, request)
        await self._authorized_item(principal, name, "UpdateKnowledgeItem")
        paths = servicing.check_mask(list(request.update_mask.paths), UPDATABLE)
        values, bad = _fields(request.knowledge_item, set(paths), "knowledge_item")
        if len(request.reason) > MAX_REASON_CHARS:
            bad.append(FieldViolation("reason", f"at most {MAX_REASON_CHARS} characters"))
        if bad:
            raise InvalidArgument(bad)
        key = self._key(name.tenant_id, principal, "UpdateKnowledgeItem", request)
        item, position = await self.items.update(
            key, name.id, request.knowledge_item.etag, values, request.reason
        )
        await servicing.send_token(context, position)
        return item

    async def DeleteKnowledgeItem(
        self, request: svc.DeleteKnowledgeItemRequest, context: Ctx
    ) -> empty_pb2.Empty:
        """See the proto."""
        principal = rc.current().principal
        name = _item_ref(principal, request.name)
        self._check_write(context, request)
        await self._authorized_item(principal, name, "DeleteKnowledgeItem")
        key = self._key(name.tenant_id, principal, "DeleteKnowledgeItem", request)
        position = await self.items.delete(key, name.id, request.etag)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()

    async def _transition(
        self,
        rpc: str,
        request: Any,
        context: Ctx,
        target: int,
        check: Callable[[res.KnowledgeItem], None] | None = None,
    ) -> res.KnowledgeItem:
        principal = rc.current().principal
        name = _item_ref(principal, request.name)
        self._check_write(context, request)
        await self._authorized_item(principal, name, rpc)
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument(
                [FieldViolation("reason", f"at most {MAX_REASON_CHARS} characters")]
            )
        key = self._key(name.tenant_id, principal, rpc, request)
        item, position = await self.items.transition(
            key, name.id, request.etag, target, request.reason, check
        )
        await servicing.send_token(context, position)
        return item

    async def ProposeKnowledgeItem(
        self, request: svc.ProposeKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto: DRAFT → PROPOSED, with the required sections."""
        return await self._transition(
            "ProposeKnowledgeItem",
            request,
            context,
            res.KNOWLEDGE_STATUS_PROPOSED,
            _required_sections,
        )

    async def AcceptKnowledgeItem(
        self, request: svc.AcceptKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto: PROPOSED → ACCEPTED, with the required sections."""
        return await self._transition(
            "AcceptKnowledgeItem",
            request,
            context,
            res.KNOWLEDGE_STATUS_ACCEPTED,
            _required_sections,
        )

    async def RejectKnowledgeItem(
        self, request: svc.RejectKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto: DRAFT or PROPOSED → REJECTED."""
        return await self._transition(
            "RejectKnowledgeItem", request, context, res.KNOWLEDGE_STATUS_REJECTED
        )

    async def DeprecateKnowledgeItem(
        self, request: svc.DeprecateKnowledgeItemRequest, context: Ctx
    ) -> res.KnowledgeItem:
        """See the proto: ACCEPTED → DEPRECATED."""
        return await self._transition(
            "DeprecateKnowledgeItem", request, context, res.KNOWLEDGE_STATUS_DEPRECATED
        )

    async def SupersedeKnowledgeItem(
        self, request: svc.SupersedeKnowledgeItemRequest, context: Ctx
    ) -> svc.SupersedeKnowledgeItemResponse:
        """See the proto: one transaction creates the successor ACCEPTED, relates both items
        both ways and moves the old one to SUPERSEDED."""
        principal = rc.current().principal
        name = _item_ref(principal, request.name)
        self._check_write(context, request)
        old = await self._authorized_item(principal, name, "SupersedeKnowledgeItem")
        unit_id = old.org_unit.rsplit("/", 1)[1]
        new = _new_item(request.successor, "successor", old.type, old.layer, unit_id)
        successor = res.KnowledgeItem(type=old.type, content=new.content)
        _required_sections(successor)
        key = self._key(name.tenant_id, principal, "SupersedeKnowledgeItem", request)
        (superseded, created), position = await self.items.supersede(
            key, name.id, request.etag, new, request.reason
        )
        await servicing.send_token(context, position)
        return svc.SupersedeKnowledgeItemResponse(superseded=superseded, successor=created)

    async def ListKnowledgeRevisions(
        self, request: svc.ListKnowledgeRevisionsRequest, context: Ctx
    ) -> svc.ListKnowledgeRevisionsResponse:
        """See the proto."""
        principal = rc.current().principal
        name = _item_ref(principal, request.parent, "parent")
        servicing.check_read_token(context)
        await self._authorized_item(principal, name, "ListKnowledgeRevisions")
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(str(name))
        after = servicing.decode_page_token(request.page_token, fingerprint)
        found = await self.items.revisions(
            name.tenant_id, name.id, int(after) if after else None, size + 1
        )
        page, token = servicing.cut_page(found, size, fingerprint, lambda r: str(r.version))
        return svc.ListKnowledgeRevisionsResponse(revisions=page, next_page_token=token)

    async def CreateKnowledgeRelation(
        self, request: svc.CreateKnowledgeRelationRequest, context: Ctx
    ) -> res.KnowledgeRelation:
        """See the proto. Writing a relation needs the write right on both items."""
        principal = rc.current().principal
        name = _item_ref(principal, request.parent, "parent")
        self._check_write(context, request)
        await self._authorized_item(principal, name, "CreateKnowledgeRelation")
        relation = request.knowledge_relation
        target = parse_name(
            principal, relation.target, "knowledgeItems", "knowledge_relation.target"
        )
        bad = []
        if relation.kind not in res.RelationKind.values() or not relation.kind:
            bad.append(FieldViolation("knowledge_relation.kind", "a RelationKind", "INVALID_KIND"))
        if target.id == name.id:
            bad.append(
                FieldViolation(
                    "knowledge_relation.target", "an item cannot relate to itself", "SELF_RELATION"
                )
            )
        if bad:
            raise InvalidArgument(bad)
        await self._authorized_item(principal, target, "CreateKnowledgeRelation")
        key = self._key(name.tenant_id, principal, "CreateKnowledgeRelation", request)
        created, position = await self.items.relate(key, name.id, target.id, relation.kind)
        await servicing.send_token(context, position)
        return created

    async def ListKnowledgeRelations(
        self, request: svc.ListKnowledgeRelationsRequest, context: Ctx
    ) -> svc.ListKnowledgeRelationsResponse:
        """See the proto."""
        principal = rc.current().principal
        name = _item_ref(principal, request.parent, "parent")
        servicing.check_read_token(context)
        await self._authorized_item(principal, name, "ListKnowledgeRelations")
        size = servicing.page_size(request.page_size)
        fingerprint = _fingerprint(str(name))
        after = servicing.decode_page_token(request.page_token, fingerprint)
        found = await self.items.relations(name.tenant_id, name.id, after, size + 1)
        page, token = servicing.cut_page(found, size, fingerprint, servicing.name_id)
        return svc.ListKnowledgeRelationsResponse(knowledge_relations=page, next_page_token=token)

    async def DeleteKnowledgeRelation(
        self, request: svc.DeleteKnowledgeRelationRequest, context: Ctx
    ) -> empty_pb2.Empty:
        """See the proto."""
        principal = rc.current().principal
        item_part, sep, relation_id = request.name.rpartition("/relations/")
        name = _item_ref(principal, item_part if sep else request.name)
        if not re.fullmatch(r"[0-9a-f-]{36}", relation_id):
            raise invalid_name("name", "tenants/{tenant}/knowledgeItems/{item}/relations/{uuid}")
        self._check_write(context, request)
        await self._authorized_item(principal, name, "DeleteKnowledgeRelation")
        key = self._key(name.tenant_id, principal, "DeleteKnowledgeRelation", request)
        position = await self.items.unrelate(key, name.id, relation_id)
        await servicing.send_token(context, position)
        return empty_pb2.Empty()

    async def SearchKnowledge(
        self, request: svc.SearchKnowledgeRequest, context: Ctx
    ) -> svc.SearchKnowledgeResponse:
        """See the proto and :mod:`aeterna_knowledge.search`: hybrid search of the items the
        caller may read (narrowed before scoring), relevance first, precedence among
        near-equals, each item with its best section. A consistency token is honoured (the
        replica's index reaches it, or ``UNAVAILABLE``); without one, an answer from an
        index behind the tenant's latest write is marked ``x-aeterna-index-stale``."""
        principal = rc.current().principal
        parse_parent(principal, request.parent)
        min_position = token_from_metadata(context.invocation_metadata())
        query = search_query(request)
        if self.deps.search is None:
            raise Unimplemented("this server was built without search")
        found = await self.deps.search.search(principal, query, min_position=min_position)
        if found.stale:
            await context.send_initial_metadata(
                ((INDEX_STALE_KEY, "true"), (INDEX_POSITION_KEY, str(found.applied_position)))
            )
        return svc.SearchKnowledgeResponse(
            results=[
                svc.KnowledgeSearchResult(
                    knowledge_item=h.item, score=h.score, section=h.section, snippet=h.snippet
                )
                for h in found.hits
            ]
        )

    # The promotion methods are declared in the contract and not built yet: UNIMPLEMENTED,
    # as the proto says.

    # Promotion: :mod:`.promotion_service` holds the logic.

    async def PreviewPromotion(
        self, request: svc.PreviewPromotionRequest, context: Ctx
    ) -> svc.PreviewPromotionResponse:
        """See the proto."""
        return await self.promotions.preview(request, context)

    async def CreatePromotionRequest(
        self, request: svc.CreatePromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        principal = rc.current().principal
        tenant_id = parse_parent(principal, request.parent)
        self._check_write(context, request)
        key = self._key(tenant_id, principal, "CreatePromotionRequest", request)
        return await self.promotions.create(request, context, key)

    async def GetPromotionRequest(
        self, request: svc.GetPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        return await self.promotions.get(request, context)

    async def ApprovePromotionRequest(
        self, request: svc.ApprovePromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        return await self.promotions.decide(request, context, approve=True)

    async def RejectPromotionRequest(
        self, request: svc.RejectPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        return await self.promotions.decide(request, context, approve=False)

    async def RetargetPromotionRequest(
        self, request: svc.RetargetPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        return await self.promotions.retarget(request, context)

    async def ApplyPromotionRequest(
        self, request: svc.ApplyPromotionRequestRequest, context: Ctx
    ) -> res.PromotionRequest:
        """See the proto."""
        principal = rc.current().principal
        name = parse_name(principal, request.name, "promotionRequests")
        self._check_write(context, request)
        key = self._key(name.tenant_id, principal, "ApplyPromotionRequest", request)
        return await self.promotions.apply(request, context, key)


def _build(deps: Deps, server: grpc.aio.Server) -> Registered:
    servicer = KnowledgeServicer(deps)
    svc_grpc.add_KnowledgeServiceServicer_to_server(servicer, server)
    return Registered(servicer=servicer)


SPEC = ServicerSpec(SERVICE_NAME, _build)

__all__ = ["SPEC", "KnowledgeServicer", "UnitKind"]
