"""``aeterna knowledge import DIR`` and ``export DIR``: decision-record folders as teams keep
them (MADR, adr-tools, Nygard), read with :func:`aeterna_common.markdown.parse_records` and
written back with :func:`aeterna_common.markdown.render_record`.

An item's content is the file's body (the Markdown after the front matter); what the front
matter held beyond title, status, tags and relations is kept in the item's metadata
(``front_matter`` as ``[key, value]`` pairs in file order, ``front_matter_keys``, ``date``)
with the SHA-256 of the whole file (``source_sha256``), which tells an unchanged file from a
changed one on a re-import.

Statuses are reached through the lifecycle's transitions only (DOMAIN.md): PROPOSED by
``:propose``, ACCEPTED by ``:propose`` then ``:accept``, REJECTED by ``:reject``, DEPRECATED by
``:accept`` then ``:deprecate``. SUPERSEDED has one way in, ``:supersede``, which creates the
successor: a record superseded by another record of the folder is accepted first and its
successor is created by superseding it. Every write's ``request_id`` is derived from the
target, the record's path, the file's hash and the step, so re-running an interrupted import
repeats no write.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from aeterna.governance.v1 import organization_service_pb2 as osvc
from aeterna.governance.v1 import resources_pb2 as gres
from aeterna.knowledge.v1 import knowledge_service_pb2 as ksvc
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common.markdown import (
    ParsedRecord,
    RecordStatus,
    Relation,
    RelationKind,
    parse_records,
    render_record,
)
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from aeterna_cli import client
from aeterna_cli.governance import Caller, Stubs, caller, every_page, run
from aeterna_cli.knowledge import LAYERS, TYPES, _enum, knowledge_app, status_of
from aeterna_cli.options import Roles, Tenant, Token, User, console, refusal

# The transitions from DRAFT that reach each status (DOMAIN.md's lifecycle); SUPERSEDED is
# reached from ACCEPTED by :supersede, which the import calls with the successor's record.
_PATHS: dict[RecordStatus, tuple[RecordStatus, ...]] = {
    RecordStatus.DRAFT: (),
    RecordStatus.PROPOSED: (RecordStatus.PROPOSED,),
    RecordStatus.ACCEPTED: (RecordStatus.PROPOSED, RecordStatus.ACCEPTED),
    RecordStatus.REJECTED: (RecordStatus.REJECTED,),
    RecordStatus.DEPRECATED: (
        RecordStatus.PROPOSED,
        RecordStatus.ACCEPTED,
        RecordStatus.DEPRECATED,
    ),
    RecordStatus.SUPERSEDED: (RecordStatus.PROPOSED, RecordStatus.ACCEPTED),
}
_VERBS = {
    RecordStatus.PROPOSED: "Propose",
    RecordStatus.ACCEPTED: "Accept",
    RecordStatus.REJECTED: "Reject",
    RecordStatus.DEPRECATED: "Deprecate",
}
_RELATION_KINDS = {
    RelationKind.SUPERSEDES: res.RELATION_KIND_SUPERSEDES,
    RelationKind.SUPERSEDED_BY: res.RELATION_KIND_SUPERSEDED_BY,
}
# A knowledge layer's unit is an org unit of this kind (resources.proto, KnowledgeLayer).
_UNIT_KINDS = {
    "company": gres.ORG_UNIT_KIND_COMPANY,
    "org": gres.ORG_UNIT_KIND_ORGANIZATION,
    "team": gres.ORG_UNIT_KIND_TEAM,
    "project": gres.ORG_UNIT_KIND_PROJECT,
}
_PARENT_KIND = {
    gres.ORG_UNIT_KIND_ORGANIZATION: gres.ORG_UNIT_KIND_COMPANY,
    gres.ORG_UNIT_KIND_TEAM: gres.ORG_UNIT_KIND_ORGANIZATION,
    gres.ORG_UNIT_KIND_PROJECT: gres.ORG_UNIT_KIND_TEAM,
}
_REQUEST_IDS = uuid.UUID("6f1d3c2e-5b7a-4e0f-9a51-0c8e2d4b7a19")
"""Namespace of the import's UUIDv5 request ids (RFC 4122 §4.3): any fixed UUID will do."""


@dataclass
class Outcome:
    """What the import did with one file.

    Attributes:
        file: The file's path relative to the directory.
        outcome: ``created``, ``updated``, ``unchanged`` or ``failed``.
        path: The item's path (the record id), empty for a file that did not parse.
        name: The item's resource name, when there is one.
        status: The item's status after the import (``ACCEPTED``), when there is an item.
        reasons: Why it failed or stopped short, in words.
    """

    file: str
    outcome: str
    path: str = ""
    name: str = ""
    status: str = ""
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        """One line of ``import --json``."""
        return json.dumps(
            {
                "file": self.file,
                "outcome": self.outcome,
                "path": self.path,
                "name": self.name,
                "status": self.status,
                "reasons": self.reasons,
            }
        )


def _why(exc: grpc.aio.AioRpcError) -> str:
    """A refusal in one line: code, message, ErrorInfo reason and field violations."""
    return "; ".join([f"{exc.code().name}: {exc.details()}", *refusal(exc)])


def _tags(tags: tuple[str, ...]) -> list[str]:
    """Tags as items take them (resources.proto: at most 32, each 1-64 characters of
    ``[a-z0-9._:-]``): ``Data Storage`` becomes ``data-storage``."""
    slugs = (re.sub(r"[^a-z0-9._:-]+", "-", t.lower()).strip("-")[:64] for t in tags)
    return list(dict.fromkeys(s for s in slugs if s))[:32]


def _ints(value: Any) -> Any:
    """A Struct's numbers back as written: a Struct holds every number as a double, so a
    front matter ``id: 3`` comes back 3.0."""
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_safe(value: Any) -> Any:
    """Front matter values as JSON (dates become ISO text), as a Struct holds them."""
    return json.loads(json.dumps(value, default=str))


class _Import:
    """One run of ``knowledge import``: the calls, in the order the lifecycle needs."""

    def __init__(
        self,
        s: Stubs,
        c: Caller,
        unit: str,
        layer: res.KnowledgeLayer.ValueType,
        kind: res.KnowledgeType.ValueType,
        files: dict[str, bytes],
    ) -> None:
        self.s, self.c, self.unit, self.layer, self.kind = s, c, unit, layer, kind
        self.hashes = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
        self.items: dict[str, res.KnowledgeItem] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.records: dict[str, ParsedRecord] = {}

    def _rid(self, record: ParsedRecord, file: str, step: str) -> tuple[str, Any]:
        """A request id stable for (target, path, file hash, step) and its metadata."""
        key = f"{self.unit}/{self.layer}/{record.id}/{self.hashes[file]}/{step}"
        rid = str(uuid.uuid5(_REQUEST_IDS, key))
        return rid, client.write_metadata(self.c.token, rid)

    def _item(self, record: ParsedRecord, file: str) -> res.KnowledgeItem:
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "source_sha256": self.hashes[file],
                # [key, value] pairs: a Struct's fields are a map, which loses the order.
                "front_matter": _json_safe(list(record.metadata.items())),
                "front_matter_keys": list(record.front_matter_keys),
                "date": record.date,
            }
        )
        return res.KnowledgeItem(
            type=self.kind,
            layer=self.layer,
            org_unit=self.unit,
            path=record.id,
            title=record.title,
            summary=record.summary[:2000],
            content=record.body,
            tags=_tags(record.tags),
            metadata=metadata,
        )

    async def existing(self) -> None:
        """The items already at the unit and layer, by path (a live one wins)."""
        for item in await items_at(self.s, self.c, self.layer, self.unit):
            old = self.items.get(item.path)
            if old is None or old.status == res.KNOWLEDGE_STATUS_SUPERSEDED:
                self.items[item.path] = item

    async def record(
        self, record: ParsedRecord, file: str, successor_of: res.KnowledgeItem | None
    ) -> None:
        """Create or update ``record``'s item and move it towards the file's status.

        Args:
            record: The parsed file.
            file: Its path relative to the directory.
            successor_of: The ACCEPTED item this record supersedes, when the record is
                created by superseding it.
        """
        out = Outcome(file, "unchanged", path=record.id)
        self.outcomes[file] = out
        self.records[file] = record
        item = self.items.get(record.id)
        try:
            # Only :supersede makes an item SUPERSEDED, and only an ACCEPTED one.
            if (
                item is None
                and successor_of is not None
                and successor_of.status == res.KNOWLEDGE_STATUS_ACCEPTED
            ):
                rid, md = self._rid(record, file, "supersede")
                reply = await self.s.knowledge.SupersedeKnowledgeItem(
                    ksvc.SupersedeKnowledgeItemRequest(
                        name=successor_of.name,
                        etag=successor_of.etag,
                        successor=self._item(record, file),
                        reason="imported",
                        request_id=rid,
                    ),
                    metadata=md,
                )
                self.items[successor_of.path] = reply.superseded
                item, out.outcome = reply.successor, "created"
            elif item is None:
                rid, md = self._rid(record, file, "create")
                item = await self.s.knowledge.CreateKnowledgeItem(
                    ksvc.CreateKnowledgeItemRequest(
                        parent=self.c.parent,
                        knowledge_item=self._item(record, file),
                        request_id=rid,
                    ),
                    metadata=md,
                )
                out.outcome = "created"
            elif item.metadata.fields.get("source_sha256") != struct_pb2.Value(
                string_value=self.hashes[file]
            ):
                rid, md = self._rid(record, file, "update")
                new = self._item(record, file)
                new.name, new.etag = item.name, item.etag
                item = await self.s.knowledge.UpdateKnowledgeItem(
                    ksvc.UpdateKnowledgeItemRequest(
                        knowledge_item=new,
                        update_mask=field_mask_pb2.FieldMask(
                            paths=["title", "summary", "content", "tags", "metadata"]
                        ),
                        reason="imported",
                        request_id=rid,
                    ),
                    metadata=md,
                )
                out.outcome = "updated"
            self.items[record.id] = item
            await self._advance(record, file, out)
        except grpc.aio.AioRpcError as exc:
            # Creating or updating was refused (an accepted ADR is immutable, a bad path...).
            out.outcome = "failed"
            out.reasons.append(_why(exc))

    async def _advance(self, record: ParsedRecord, file: str, out: Outcome) -> None:
        """The transitions from the item's status to the file's; a refused one stops there
        and is reported (the item keeps the status it reached)."""
        item = self.items[record.id]
        steps = _PATHS[record.status]
        now = RecordStatus(status_of(item))
        if now == record.status:
            return
        if now in steps:
            steps = steps[steps.index(now) + 1 :]
        elif not (
            now is RecordStatus.DRAFT
            # :reject takes a PROPOSED item as well as a DRAFT one.
            or (now is RecordStatus.PROPOSED and record.status is RecordStatus.REJECTED)
        ):
            out.reasons.append(f"the file says {record.status.value}, the item is {now.value}")
            return
        for target in steps:
            verb = _VERBS[target]
            rid, md = self._rid(record, file, verb)
            request = getattr(ksvc, f"{verb}KnowledgeItemRequest")(
                name=item.name, etag=item.etag, reason="imported", request_id=rid
            )
            try:
                item = await getattr(self.s.knowledge, f"{verb}KnowledgeItem")(request, metadata=md)
            except grpc.aio.AioRpcError as exc:
                out.reasons.append(f"kept {status_of(item)}: {verb.lower()} refused: {_why(exc)}")
                return
            self.items[record.id] = item
            if out.outcome == "unchanged":
                # The file is as imported before, but its item had not reached its status.
                out.outcome = "updated"

    async def relate(self, record: ParsedRecord, file: str) -> None:
        """Write the record's SUPERSEDES / SUPERSEDED_BY relations to items of the folder
        that exist; the service writes each inverse in the same transaction."""
        source = self.items.get(record.id)
        targets = [r for r in record.relations if r.target in self.items]
        if source is None or not targets:
            return
        have = {(r.kind, r.target) for r in await self._relations(source.name)}
        for relation in targets:
            kind, target = _RELATION_KINDS[relation.kind], self.items[relation.target].name
            if (kind, target) in have:
                continue
            rid, md = self._rid(record, file, f"relate/{relation.kind}/{relation.target}")
            try:
                await self.s.knowledge.CreateKnowledgeRelation(
                    ksvc.CreateKnowledgeRelationRequest(
                        parent=source.name,
                        knowledge_relation=res.KnowledgeRelation(kind=kind, target=target),
                        request_id=rid,
                    ),
                    metadata=md,
                )
            except grpc.aio.AioRpcError as exc:
                self.outcomes[file].reasons.append(
                    f"relation {relation.kind} {relation.target}: {_why(exc)}"
                )
                continue
            have.add((kind, target))

    async def _relations(self, name: str) -> list[res.KnowledgeRelation]:
        return await relations_of(self.s, self.c, name)

    def finish(self) -> list[Outcome]:
        """The outcomes with each item's final name and status; a record the folder says is
        superseded but that has no new successor in it stays ACCEPTED, which is reported."""
        for file, out in self.outcomes.items():
            item = self.items.get(out.path)
            if item is None:
                continue
            out.name, out.status = item.name, status_of(item)
            if self.records[file].status is RecordStatus.SUPERSEDED and out.status != "SUPERSEDED":
                out.reasons.append(
                    f"kept {out.status}: only :supersede makes an item SUPERSEDED, and it "
                    "needs a successor that this import creates"
                )
        return list(self.outcomes.values())


async def items_at(
    s: Stubs, c: Caller, layer: res.KnowledgeLayer.ValueType, unit: str
) -> list[res.KnowledgeItem]:
    """Every item the caller may read at ``layer`` and the org unit named ``unit``."""

    def fetch(page: str) -> Awaitable[ksvc.ListKnowledgeItemsResponse]:
        request = ksvc.ListKnowledgeItemsRequest(
            parent=c.parent, layer=layer, org_unit=unit, page_size=500, page_token=page
        )
        return s.knowledge.ListKnowledgeItems(request, metadata=client.metadata(c.token))

    items: list[res.KnowledgeItem] = await every_page(fetch, "knowledge_items")
    return items


async def relations_of(s: Stubs, c: Caller, name: str) -> list[res.KnowledgeRelation]:
    """Every relation of the item ``name``."""

    def fetch(page: str) -> Awaitable[ksvc.ListKnowledgeRelationsResponse]:
        request = ksvc.ListKnowledgeRelationsRequest(parent=name, page_size=500, page_token=page)
        return s.knowledge.ListKnowledgeRelations(request, metadata=client.metadata(c.token))

    return await every_page(fetch, "knowledge_relations")


async def ensure_unit(s: Stubs, c: Caller, unit: str, layer: str) -> None:
    """Make sure the org unit ``unit`` exists, creating it when the caller may.

    The new unit's kind follows the layer; its parent is the tenant's only unit of the kind
    above (a company has none).

    Raises:
        grpc.aio.AioRpcError: ``NOT_FOUND`` naming the unit when it does not exist and either
            the caller may not create it or its parent cannot be determined.
    """
    name = c.unit(unit)
    try:
        await s.orgs.GetOrgUnit(
            osvc.GetOrgUnitRequest(name=name), metadata=client.metadata(c.token)
        )
        return
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        missing = exc
    kind = _UNIT_KINDS[layer]
    parent = ""
    if kind in _PARENT_KIND:

        def fetch(page: str) -> Awaitable[osvc.ListOrgUnitsResponse]:
            request = osvc.ListOrgUnitsRequest(parent=c.parent, page_size=500, page_token=page)
            return s.orgs.ListOrgUnits(request, metadata=client.metadata(c.token))

        try:
            units = await every_page(fetch, "org_units")
        except grpc.aio.AioRpcError:
            raise missing from None
        above = [u.name for u in units if u.kind == _PARENT_KIND[kind]]
        if len(above) != 1:
            raise missing
        parent = above[0]
    rid = str(uuid.uuid5(_REQUEST_IDS, f"unit/{name}"))
    try:
        await s.orgs.CreateOrgUnit(
            osvc.CreateOrgUnitRequest(
                parent=c.parent,
                org_unit_id=name.rsplit("/", 1)[-1],
                org_unit=gres.OrgUnit(kind=kind, display_name=unit, parent=parent),
                request_id=rid,
            ),
            metadata=client.write_metadata(c.token, rid),
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
            raise missing from None
        raise


def _files(directory: Path) -> dict[str, bytes]:
    """``*.md`` files under ``directory`` by relative POSIX path, sorted."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*.md"))
        # Hidden folders (.git, .github) hold no records.
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    }


def _order(records: list[tuple[ParsedRecord, str]]) -> list[tuple[ParsedRecord, str, str]]:
    """Records in the order the lifecycle needs: a superseded record before its successor,
    each with the id of the record its successor-by-supersede replaces ("" for none)."""
    ids = {r.id for r, _ in records}
    successor_of: dict[str, str] = {}
    for record, _ in records:
        if record.status is not RecordStatus.SUPERSEDED:
            continue
        by = [r.target for r in record.relations if r.kind is RelationKind.SUPERSEDED_BY]
        by += [
            other.id
            for other, _ in records
            if Relation(RelationKind.SUPERSEDES, record.id) in other.relations
        ]
        for target in by:
            if target in ids and target not in successor_of and target != record.id:
                successor_of[target] = record.id
                break
    ordered: list[tuple[ParsedRecord, str, str]] = []
    placed: set[str] = set()
    by_id = {r.id: (r, f) for r, f in records}

    def place(rid: str, seen: frozenset[str]) -> None:
        if rid in placed or rid in seen:
            return
        before = successor_of.get(rid, "")
        if before:
            place(before, seen | {rid})
        placed.add(rid)
        record, file = by_id[rid]
        ordered.append((record, file, before if before in placed else ""))

    for record, _ in records:
        place(record.id, frozenset())
    return ordered


@knowledge_app.command("import")
def knowledge_import(
    directory: Annotated[
        Path, typer.Argument(help="Folder of Markdown decision records (*.md, recursively).")
    ],
    unit: Annotated[str, typer.Option("--unit", help="The org unit's id.")],
    layer: Annotated[str, typer.Option(help="|".join(LAYERS))] = "team",
    kind: Annotated[str, typer.Option("--type", help="|".join(TYPES))] = "adr",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per file, then the summary.")
    ] = False,
) -> None:
    """Import a folder of MADR, adr-tools or Nygard records: one item per file (path = the
    file's path without .md), statuses through the lifecycle, "Superseded by" links as
    relations. Re-importing unchanged files changes nothing; a changed file becomes a new
    revision where the item is still editable. Files that fail are reported, not fatal."""
    if not directory.is_dir():
        raise typer.BadParameter("not a directory", param_hint="DIRECTORY")
    knowledge_type = _enum(res.KnowledgeType, "KNOWLEDGE_TYPE_", kind, TYPES, "--type")
    knowledge_layer = _enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", layer, LAYERS, "--layer")
    c = caller(tenant, user, token, roles)
    files = _files(directory)
    batch = parse_records(files.items())
    unparsed = {e.path for e in batch.errors}
    paired = list(zip(batch.records, [f for f in files if f not in unparsed], strict=True))

    async def call(s: Stubs) -> list[Outcome]:
        await ensure_unit(s, c, unit, layer.lower())
        job = _Import(s, c, c.unit(unit), knowledge_layer, knowledge_type, files)
        await job.existing()
        for record, file, before in _order(paired):
            await job.record(record, file, job.items.get(before) if before else None)
        for record, file in paired:
            await job.relate(record, file)
        failed = [Outcome(e.path, "failed", reasons=[e.reason]) for e in batch.errors]
        return [*job.finish(), *failed]

    outcomes = sorted(run(call), key=lambda o: o.file)
    for fm_id, ids in batch.duplicate_ids.items():
        typer.echo(f"front matter id {fm_id!r} repeated by {', '.join(ids)}: kept apart", err=True)
    counts = {k: sum(o.outcome == k for o in outcomes) for k in _OUTCOMES}
    if as_json:
        for o in outcomes:
            print(o.as_json())
        print(json.dumps({"summary": counts}))
        return
    for o in outcomes:
        line = f"{o.outcome:9} {o.file}" + (f" ({o.status})" if o.status else "")
        console.print(line, markup=False)
        for reason in o.reasons:
            console.print(f"          {reason}", markup=False, style="dim")
    console.print(", ".join(f"{n} {k}" for k, n in counts.items()))


_OUTCOMES = ("created", "updated", "unchanged", "failed")


def record_of(item: res.KnowledgeItem, relations: list[Relation]) -> ParsedRecord:
    """The decision record an imported (or added) item is written back as."""
    meta = json_format.MessageToDict(item.metadata)
    date = meta.get("date")
    return ParsedRecord(
        id=item.path,
        title=item.title,
        status=RecordStatus(status_of(item)),
        date=str(date) if date else None,
        summary=item.summary,
        tags=tuple(item.tags),
        relations=tuple(relations),
        body=item.content,
        metadata={key: _ints(value) for key, value in meta.get("front_matter") or ()},
        front_matter_keys=tuple(meta.get("front_matter_keys") or ()),
    )


@knowledge_app.command("export")
def knowledge_export(
    directory: Annotated[Path, typer.Argument(help="Folder to write {path}.md files into.")],
    unit: Annotated[str, typer.Option("--unit", help="The org unit's id.")],
    layer: Annotated[str, typer.Option(help="|".join(LAYERS))] = "team",
    tenant: Tenant = "demo",
    user: User = "cli",
    token: Token = None,
    roles: Roles = "",
) -> None:
    """Write the unit's items at the layer as {path}.md decision records (status and
    SUPERSEDES / SUPERSEDED_BY relations included): the format import reads."""
    knowledge_layer = _enum(res.KnowledgeLayer, "KNOWLEDGE_LAYER_", layer, LAYERS, "--layer")
    c = caller(tenant, user, token, roles)

    async def call(s: Stubs) -> list[ParsedRecord]:
        items = await items_at(s, c, knowledge_layer, c.unit(unit))
        paths = {i.name: i.path for i in items}
        kinds = {v: k for k, v in _RELATION_KINDS.items()}
        records = []
        # A superseded item first, so that a live item sharing its path is the one written.
        for item in sorted(items, key=lambda i: i.status != res.KNOWLEDGE_STATUS_SUPERSEDED):
            relations = [
                Relation(kinds[r.kind], paths[r.target])
                for r in await relations_of(s, c, item.name)
                if r.kind in kinds and r.target in paths
            ]
            records.append(record_of(item, relations))
        return records

    records = run(call)
    for record in records:
        target = directory / f"{record.id}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render_record(record))
    console.print(f"wrote {len(records)} files to {directory}")
