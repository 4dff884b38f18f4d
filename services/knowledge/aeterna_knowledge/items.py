"""Knowledge items in PostgreSQL: reads, and every write as one tenant transaction that
changes the item, appends its revision and its outbox event (:mod:`aeterna_common.writes`).

Concurrency: a write locks the item's row (``SELECT … FOR UPDATE``) and compares the
caller's etag with the locked version (AIP-154), so two writers of one item are serialised
and the second one with the first's etag is ``ABORTED``. Supersede locks the superseded item,
refuses a SUPERSEDES cycle by walking the relations from the successor, and writes the new
item, both relations and both revisions in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import usage, writes
from aeterna_common.db import Database
from aeterna_common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from aeterna_common.writes import WriteKey
from google.protobuf import json_format, struct_pb2

from aeterna_knowledge import lifecycle

NOTIFY_CHANNEL = "aeterna_knowledge_changes"
"""LISTEN/NOTIFY channel woken by every outbox append; the payload is the last position."""

CREATED = "knowledge.created"
UPDATED = "knowledge.updated"
STATUS_CHANGED = "knowledge.status_changed"
"""Event types (the envelope contract; issue 8's KNOWLEDGE_CREATED, _UPDATED,
_STATUS_CHANGED)."""

INVERSE: dict[int, int] = {
    res.RELATION_KIND_PROMOTED_FROM: res.RELATION_KIND_PROMOTED_TO,
    res.RELATION_KIND_PROMOTED_TO: res.RELATION_KIND_PROMOTED_FROM,
    res.RELATION_KIND_SUPERSEDES: res.RELATION_KIND_SUPERSEDED_BY,
    res.RELATION_KIND_SUPERSEDED_BY: res.RELATION_KIND_SUPERSEDES,
}
"""The inverse kind written on the target; a kind not listed is its own inverse (the proto)."""

_COLUMNS = (
    "id, type, layer, org_unit_id, path, title, summary, content, content_hash, severity, "
    "status, tags, constraints, metadata, version, author, variant_role, promoted_from, "
    "created_at, updated_at"
)


def content_hash(content: str) -> str:
    """Lower-case hex SHA-256 of the UTF-8 ``content``."""
    return hashlib.sha256(content.encode()).hexdigest()


def etag(version: int) -> str:
    """The etag of a version (opaque to clients)."""
    return f'"{version}"'


def item_name(tenant_id: str, item_id: uuid.UUID | str) -> str:
    """``tenants/{tenant}/knowledgeItems/{item}``."""
    return f"tenants/{tenant_id}/knowledgeItems/{item_id}"


def _item_pb(tenant_id: str, row: asyncpg.Record) -> res.KnowledgeItem:
    item = res.KnowledgeItem(
        name=item_name(tenant_id, row["id"]),
        type=row["type"],
        layer=row["layer"],
        org_unit=f"tenants/{tenant_id}/orgUnits/{row['org_unit_id']}",
        path=row["path"],
        title=row["title"],
        summary=row["summary"],
        content=row["content"],
        content_hash=row["content_hash"],
        severity=row["severity"],
        status=row["status"],
        tags=row["tags"],
        constraints=row["constraints"],
        version=row["version"],
        author=row["author"],
        variant_role=row["variant_role"],
        promoted_from=item_name(tenant_id, row["promoted_from"]) if row["promoted_from"] else "",
        etag=etag(row["version"]),
    )
    item.metadata.update(json.loads(row["metadata"]))
    item.create_time.FromDatetime(row["created_at"])
    item.update_time.FromDatetime(row["updated_at"])
    return item


def _revision_pb(tenant_id: str, row: asyncpg.Record) -> res.KnowledgeRevision:
    rev = res.KnowledgeRevision(
        name=f"{item_name(tenant_id, row['item_id'])}/revisions/{row['version']}",
        version=row["version"],
        content=row["content"],
        content_hash=row["content_hash"],
        author=row["author"],
        reason=row["reason"],
        status=row["status"],
    )
    rev.create_time.FromDatetime(row["created_at"])
    return rev


def _relation_pb(tenant_id: str, row: asyncpg.Record) -> res.KnowledgeRelation:
    rel = res.KnowledgeRelation(
        name=f"{item_name(tenant_id, row['source_id'])}/relations/{row['id']}",
        kind=row["kind"],
        target=item_name(tenant_id, row["target_id"]),
        author=row["author"],
    )
    rel.create_time.FromDatetime(row["created_at"])
    return rel


@dataclass(frozen=True, slots=True)
class NewItem:
    """The validated fields of an item to create.

    Attributes:
        type, layer, severity, variant_role: The proto's enum numbers (set, not 0).
        org_unit_id: The unit id of the layer.
        path, title, summary, content: As the proto says, validated.
        tags, constraints: Validated lists.
        metadata: JSON object.
    """

    type: int
    layer: int
    org_unit_id: str
    path: str
    title: str
    summary: str
    content: str
    severity: int
    tags: Sequence[str]
    constraints: Sequence[str]
    metadata: dict[str, Any]
    variant_role: int


def metadata_of(value: struct_pb2.Struct) -> dict[str, Any]:
    """The JSON object of a ``Struct``."""
    out: dict[str, Any] = json_format.MessageToDict(value)
    return out


class Items:
    """Reads and writes of knowledge items of one database.

    Args:
        db: The application role's pool (tenant transactions under RLS).
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- reads ----

    async def find(self, tenant_id: str, item_id: str) -> res.KnowledgeItem | None:
        """The item, or None when it does not exist."""

        async def work(conn: asyncpg.Connection) -> res.KnowledgeItem | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM knowledge_items WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(item_id),
            )
            return _item_pb(tenant_id, row) if row else None

        return await self.db.run(tenant_id, work, readonly=True)

    async def list_items(
        self,
        tenant_id: str,
        units: Sequence[str] | None,
        filters: dict[str, Any],
        after: str | None,
        limit: int,
    ) -> list[res.KnowledgeItem]:
        r"""Items ordered by (path, layer, id), after the keyset key ``after``.

        Args:
            tenant_id: The tenant.
            units: Only items of these units; None: every unit.
            filters: ``type``, ``status``, ``layer`` (enum numbers), ``org_unit_id``, ``path``;
                a falsy value does not filter.
            after: ``path\x00layer\x00id`` of the last item of the previous page.
            limit: At most this many.
        """
        clauses = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if units is not None:
            clauses.append(f"org_unit_id = ANY({arg(list(units))}::text[])")
        for column in ("type", "status", "layer", "org_unit_id", "path"):
            if filters.get(column):
                clauses.append(f"{column} = {arg(filters[column])}")
        if after is not None:
            path, layer, last = after.split("\x00")
            clauses.append(
                f"(path, layer, id) > ({arg(path)}, {arg(int(layer))}::smallint, "
                f"{arg(uuid.UUID(last))}::uuid)"
            )
        sql = (
            f"SELECT {_COLUMNS} FROM knowledge_items WHERE {' AND '.join(clauses)} "
            f"ORDER BY path, layer, id LIMIT {arg(limit)}"
        )

        async def work(conn: asyncpg.Connection) -> list[res.KnowledgeItem]:
            return [_item_pb(tenant_id, r) for r in await conn.fetch(sql, *args)]

        return await self.db.run(tenant_id, work, readonly=True)

    async def revisions(
        self, tenant_id: str, item_id: str, before: int | None, limit: int
    ) -> list[res.KnowledgeRevision]:
        """The item's revisions, newest first, older than version ``before`` when given."""

        async def work(conn: asyncpg.Connection) -> list[res.KnowledgeRevision]:
            rows = await conn.fetch(
                "SELECT * FROM knowledge_revisions WHERE tenant_id = $1 AND item_id = $2 "
                "AND version < $3 ORDER BY version DESC LIMIT $4",
                tenant_id,
                uuid.UUID(item_id),
                before if before is not None else 2**62,
                limit,
            )
            return [_revision_pb(tenant_id, r) for r in rows]

        return await self.db.run(tenant_id, work, readonly=True)

    async def relations(
        self, tenant_id: str, item_id: str, after: str | None, limit: int
    ) -> list[res.KnowledgeRelation]:
        """The relations from the item, by relation id."""

        async def work(conn: asyncpg.Connection) -> list[res.KnowledgeRelation]:
            rows = await conn.fetch(
                "SELECT * FROM knowledge_relations WHERE tenant_id = $1 AND source_id = $2 "
                "AND ($3::uuid IS NULL OR id > $3) ORDER BY id LIMIT $4",
                tenant_id,
                uuid.UUID(item_id),
                uuid.UUID(after) if after else None,
                limit,
            )
            return [_relation_pb(tenant_id, r) for r in rows]

        return await self.db.run(tenant_id, work, readonly=True)

    # ---- writes ----

    async def create(self, key: WriteKey, new: NewItem) -> tuple[res.KnowledgeItem, int]:
        """Create a DRAFT item (version 1) with its first revision and ``knowledge.created``.

        Raises:
            AlreadyExists: A live item has the path at this layer and unit (reason
                ``PATH_TAKEN``).
        """

        async def work(conn: asyncpg.Connection) -> tuple[res.KnowledgeItem, int]:
            item = await _insert(
                conn, key, new, res.KNOWLEDGE_STATUS_DRAFT, promoted_from=None, reason="created"
            )
            position = await _event(conn, key, CREATED, item)
            # After the event: the outbox lock comes before usage rows (aeterna_common.usage).
            await usage.record_usage(
                conn,
                key.tenant_id,
                {usage.KNOWLEDGE_ITEMS: 1, usage.KNOWLEDGE_BYTES: usage.content_bytes(new.content)},
            )
            return item, position

        return await writes.run_write(self.db, key, res.KnowledgeItem, work)

    async def update(
        self,
        key: WriteKey,
        item_id: str,
        given_etag: str,
        values: dict[str, Any],
        reason: str,
    ) -> tuple[res.KnowledgeItem, int]:
        """Change some fields, bump the version, append a revision and ``knowledge.updated``.

        Args:
            key: The idempotency key.
            item_id: The item.
            given_etag: The caller's etag; empty skips the check.
            values: Column → new value (validated).
            reason: Recorded in the revision.

        Raises:
            NotFound: No such item.
            Aborted: Stale etag (reason ``ETAG_MISMATCH``).
            FailedPrecondition: An accepted ADR or SPEC (reason ``IMMUTABLE_ITEM``).
        """

        async def work(conn: asyncpg.Connection) -> tuple[res.KnowledgeItem, int]:
            row = await _lock(conn, key.tenant_id, item_id, given_etag)
            name = item_name(key.tenant_id, item_id)
            lifecycle.check_mutable(name, row["type"], row["status"])
            sets = dict(values)
            if "content" in sets:
                sets["content_hash"] = content_hash(sets["content"])
            if "metadata" in sets:
                sets["metadata"] = json.dumps(sets["metadata"])
            assignments = ", ".join(f"{col} = ${i + 3}" for i, col in enumerate(sets))
            updated = _locked(
                await conn.fetchrow(
                    f"UPDATE knowledge_items SET {assignments}, version = version + 1, "
                    "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                    f"RETURNING {_COLUMNS}",
                    key.tenant_id,
                    uuid.UUID(item_id),
                    *sets.values(),
                )
            )
            await _revision(conn, key, updated, reason or "updated")
            item = _item_pb(key.tenant_id, updated)
            position = await _event(conn, key, UPDATED, item, {"fields": sorted(values)})
            # After the event: the outbox lock comes before usage rows (aeterna_common.usage).
            # New content is billed as written; its chunks' embeddings are billed by the
            # index follower that embeds them. A retried update replays (run_write).
            if "content" in values and values["content"] != row["content"]:
                await usage.record_usage(
                    conn,
                    key.tenant_id,
                    {usage.KNOWLEDGE_BYTES: usage.content_bytes(values["content"])},
                )
            return item, position

        return await writes.run_write(self.db, key, res.KnowledgeItem, work)

    async def transition(
        self,
        key: WriteKey,
        item_id: str,
        given_etag: str,
        target: int,
        reason: str,
        check: Any = None,
    ) -> tuple[res.KnowledgeItem, int]:
        """Move the item to status ``target`` if DOMAIN.md allows it from its current one.

        Args:
            key: The idempotency key.
            item_id: The item.
            given_etag: The caller's etag; empty skips the check.
            target: The new status.
            reason: Recorded in the revision; default the status's name in lower case.
            check: Called with the locked item before the change (e.g. the required sections);
                raises to refuse.

        Raises:
            NotFound: No such item.
            Aborted: Stale etag.
            FailedPrecondition: The transition is not allowed (reason ``INVALID_TRANSITION``,
                the allowed next statuses in ``ErrorInfo.metadata.allowed``).
        """

        async def work(conn: asyncpg.Connection) -> tuple[res.KnowledgeItem, int]:
            row = await _lock(conn, key.tenant_id, item_id, given_etag)
            name = item_name(key.tenant_id, item_id)
            lifecycle.check_transition(name, row["status"], target)
            if check is not None:
                check(_item_pb(key.tenant_id, row))
            item, position = await _set_status(conn, key, row, target, reason)
            return item, position

        return await writes.run_write(self.db, key, res.KnowledgeItem, work)

    async def supersede(
        self, key: WriteKey, item_id: str, given_etag: str, successor: NewItem, reason: str
    ) -> tuple[tuple[res.KnowledgeItem, res.KnowledgeItem], int]:
        """Create ``successor`` ACCEPTED, relate it SUPERSEDES/SUPERSEDED_BY both ways and move
        the old item to SUPERSEDED, in one transaction.

        Returns:
            ((the superseded item, the successor), outbox position).

        Raises:
            NotFound: No such item.
            Aborted: Stale etag.
            FailedPrecondition: The item is not ACCEPTED (``INVALID_TRANSITION``).
        """
        from aeterna.knowledge.v1 import knowledge_service_pb2 as svc

        async def work(conn: asyncpg.Connection) -> tuple[svc.SupersedeKnowledgeItemResponse, int]:
            row = await _lock(conn, key.tenant_id, item_id, given_etag)
            lifecycle.check_transition(
                item_name(key.tenant_id, item_id), row["status"], res.KNOWLEDGE_STATUS_SUPERSEDED
            )
            old, _ = await _set_status(
                conn, key, row, res.KNOWLEDGE_STATUS_SUPERSEDED, reason or "superseded"
            )
            await conn.execute(
                "UPDATE knowledge_items SET variant_role = $3 WHERE tenant_id = $1 AND id = $2",
                key.tenant_id,
                row["id"],
                res.VARIANT_ROLE_SUPERSEDED,
            )
            old.variant_role = res.VARIANT_ROLE_SUPERSEDED
            new = await _insert(
                conn,
                key,
                successor,
                res.KNOWLEDGE_STATUS_ACCEPTED,
                promoted_from=None,
                reason=reason or "supersedes " + old.name,
            )
            new_id = uuid.UUID(new.name.rsplit("/", 1)[1])
            # A brand-new item has no relations, so no SUPERSEDES cycle can close through it.
            await _relate(conn, key, new_id, row["id"], res.RELATION_KIND_SUPERSEDES)
            position = await _event(conn, key, CREATED, new)
            return svc.SupersedeKnowledgeItemResponse(superseded=old, successor=new), position

        response, position = await writes.run_write(
            self.db, key, svc.SupersedeKnowledgeItemResponse, work
        )
        return (response.superseded, response.successor), position

    async def relate(
        self, key: WriteKey, source_id: str, target_id: str, kind: int
    ) -> tuple[res.KnowledgeRelation, int]:
        """Create a relation and its inverse on the target.

        Raises:
            NotFound: The source or the target does not exist in the tenant.
            AlreadyExists: The relation exists (reason ``RELATION_EXISTS``).
            FailedPrecondition: A SUPERSEDES (or SUPERSEDED_BY) relation would close a cycle
                (reason ``SUPERSEDES_CYCLE``).
        """

        async def work(conn: asyncpg.Connection) -> tuple[res.KnowledgeRelation, int]:
            await _lock(conn, key.tenant_id, source_id, "")
            target = uuid.UUID(target_id)
            if not await conn.fetchval(
                "SELECT 1 FROM knowledge_items WHERE tenant_id = $1 AND id = $2",
                key.tenant_id,
                target,
            ):
                raise NotFound(
                    f"{item_name(key.tenant_id, target_id)} does not exist",
                    reason="TARGET_NOT_FOUND",
                    metadata={"target": item_name(key.tenant_id, target_id)},
                )
            source = uuid.UUID(source_id)
            if kind in (res.RELATION_KIND_SUPERSEDES, res.RELATION_KIND_SUPERSEDED_BY):
                newer, older = (
                    (source, target)
                    if kind == res.RELATION_KIND_SUPERSEDES
                    else (
                        target,
                        source,
                    )
                )
                await _refuse_cycle(conn, key.tenant_id, newer, older)
            relation = await _relate(conn, key, source, target, kind)
            item = _locked(
                await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM knowledge_items WHERE tenant_id = $1 AND id = $2",
                    key.tenant_id,
                    source,
                )
            )
            position = await _event(
                conn,
                key,
                UPDATED,
                _item_pb(key.tenant_id, item),
                {"relation": relation.name, "kind": res.RelationKind.Name(kind)},  # type: ignore[arg-type]
            )
            return relation, position

        return await writes.run_write(self.db, key, res.KnowledgeRelation, work)

    async def unrelate(self, key: WriteKey, source_id: str, relation_id: str) -> int:
        """Delete a relation and its inverse.

        Returns:
            The outbox position.

        Raises:
            NotFound: No such relation.
        """
        from google.protobuf import empty_pb2

        async def work(conn: asyncpg.Connection) -> tuple[empty_pb2.Empty, int]:
            row = await conn.fetchrow(
                "DELETE FROM knowledge_relations WHERE tenant_id = $1 AND source_id = $2 "
                "AND id = $3 RETURNING source_id, target_id, kind",
                key.tenant_id,
                uuid.UUID(source_id),
                uuid.UUID(relation_id),
            )
            if row is None:
                name = f"{item_name(key.tenant_id, source_id)}/relations/{relation_id}"
                raise NotFound(f"{name} does not exist", metadata={"name": name})
            await conn.execute(
                "DELETE FROM knowledge_relations WHERE tenant_id = $1 AND source_id = $2 "
                "AND target_id = $3 AND kind = $4",
                key.tenant_id,
                row["target_id"],
                row["source_id"],
                INVERSE.get(row["kind"], row["kind"]),
            )
            item = _locked(
                await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM knowledge_items WHERE tenant_id = $1 AND id = $2",
                    key.tenant_id,
                    row["source_id"],
                )
            )
            position = await _event(
                conn, key, UPDATED, _item_pb(key.tenant_id, item), {"relation_deleted": relation_id}
            )
            return empty_pb2.Empty(), position

        _, position = await writes.run_write(self.db, key, empty_pb2.Empty, work)
        return position

    async def delete(self, key: WriteKey, item_id: str, given_etag: str) -> int:
        """Delete a DRAFT or REJECTED item that was never proposed, with its revisions and
        relations (and their inverses, by the foreign keys).

        Raises:
            NotFound: No such item.
            Aborted: Stale etag.
            FailedPrecondition: The item was proposed at some point (reason
                ``ITEM_WAS_REVIEWED``: deprecate it instead).
        """
        from google.protobuf import empty_pb2

        async def work(conn: asyncpg.Connection) -> tuple[empty_pb2.Empty, int]:
            row = await _lock(conn, key.tenant_id, item_id, given_etag)
            name = item_name(key.tenant_id, item_id)
            reviewed = await conn.fetchval(
                "SELECT 1 FROM knowledge_revisions WHERE tenant_id = $1 AND item_id = $2 "
                "AND status <> $3 LIMIT 1",
                key.tenant_id,
                row["id"],
                res.KNOWLEDGE_STATUS_DRAFT,
            )
            if reviewed:
                raise FailedPrecondition(
                    f"{name} was proposed for review and stays; deprecate it instead",
                    reason="ITEM_WAS_REVIEWED",
                    metadata={"name": name},
                )
            await conn.execute(
                "DELETE FROM knowledge_items WHERE tenant_id = $1 AND id = $2",
                key.tenant_id,
                row["id"],
            )
            item = _item_pb(key.tenant_id, row)
            position = await _event(conn, key, UPDATED, item, {"deleted": True})
            return empty_pb2.Empty(), position

        _, position = await writes.run_write(self.db, key, empty_pb2.Empty, work)
        return position


# ---- the pieces of a write, inside its transaction ----


def _locked(row: asyncpg.Record | None) -> asyncpg.Record:
    """A row the transaction has locked or written, which therefore exists."""
    if row is None:
        raise AssertionError("a locked or written row vanished inside its transaction")
    return row


async def _lock(
    conn: asyncpg.Connection, tenant_id: str, item_id: str, given_etag: str
) -> asyncpg.Record:
    """Lock the item's row; refuse a stale etag.

    Raises:
        NotFound: No such item.
        Aborted: ``given_etag`` is set and not the current one (reason ``ETAG_MISMATCH``).
    """
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM knowledge_items WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_id,
        uuid.UUID(item_id),
    )
    name = item_name(tenant_id, item_id)
    if row is None:
        raise NotFound(f"{name} does not exist", metadata={"name": name})
    if given_etag and given_etag != etag(row["version"]):
        raise Aborted(
            f"{name} changed since the etag was read; get it again",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )
    return row


async def _insert(
    conn: asyncpg.Connection,
    key: WriteKey,
    new: NewItem,
    status: int,
    *,
    promoted_from: uuid.UUID | None,
    reason: str,
) -> res.KnowledgeItem:
    try:
        row = _locked(
            await conn.fetchrow(
                "INSERT INTO knowledge_items (tenant_id, id, type, layer, org_unit_id, path, "
                "title, summary, content, content_hash, severity, status, tags, constraints, "
                "metadata, author, variant_role, promoted_from) VALUES ($1, $2, $3, $4, $5, "
                "$6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $16, $17, $18) "
                f"RETURNING {_COLUMNS}",
                key.tenant_id,
                uuid.uuid4(),
                new.type,
                new.layer,
                new.org_unit_id,
                new.path,
                new.title,
                new.summary,
                new.content,
                content_hash(new.content),
                new.severity,
                status,
                list(new.tags),
                list(new.constraints),
                json.dumps(new.metadata),
                key.principal,
                new.variant_role,
                promoted_from,
            )
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(
            f"a live item has path {new.path!r} at this layer and unit",
            reason="PATH_TAKEN",
            metadata={"path": new.path, "org_unit": new.org_unit_id},
        ) from exc
    await _revision(conn, key, row, reason)
    return _item_pb(key.tenant_id, row)


async def _revision(
    conn: asyncpg.Connection, key: WriteKey, row: asyncpg.Record, reason: str
) -> None:
    await conn.execute(
        "INSERT INTO knowledge_revisions (tenant_id, item_id, version, content, content_hash, "
        "author, reason, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        key.tenant_id,
        row["id"],
        row["version"],
        row["content"],
        row["content_hash"],
        key.principal,
        reason[:500],
        row["status"],
    )


async def _set_status(
    conn: asyncpg.Connection, key: WriteKey, row: asyncpg.Record, target: int, reason: str
) -> tuple[res.KnowledgeItem, int]:
    updated = _locked(
        await conn.fetchrow(
            "UPDATE knowledge_items SET status = $3, version = version + 1, "
            "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
            f"RETURNING {_COLUMNS}",
            key.tenant_id,
            row["id"],
            target,
        )
    )
    await _revision(conn, key, updated, reason or lifecycle.status_name(target).lower())
    item = _item_pb(key.tenant_id, updated)
    position = await _event(
        conn,
        key,
        STATUS_CHANGED,
        item,
        {"from": lifecycle.status_name(row["status"]), "to": lifecycle.status_name(target)},
    )
    return item, position


async def _relate(
    conn: asyncpg.Connection, key: WriteKey, source: uuid.UUID, target: uuid.UUID, kind: int
) -> res.KnowledgeRelation:
    """Insert the relation and its inverse (one statement: both or neither)."""
    try:
        rows = await conn.fetch(
            "INSERT INTO knowledge_relations (tenant_id, id, source_id, target_id, kind, author) "
            "VALUES ($1, $2, $3, $4, $5, $7), ($1, $8, $4, $3, $6, $7) RETURNING *",
            key.tenant_id,
            uuid.uuid4(),
            source,
            target,
            kind,
            INVERSE.get(kind, kind),
            key.principal,
            uuid.uuid4(),
        )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(
            "the relation exists", reason="RELATION_EXISTS", metadata={"kind": str(kind)}
        ) from exc
    return _relation_pb(key.tenant_id, next(r for r in rows if r["source_id"] == source))


async def _refuse_cycle(
    conn: asyncpg.Connection, tenant_id: str, newer: uuid.UUID, older: uuid.UUID
) -> None:
    """Refuse ``newer`` SUPERSEDES ``older`` when ``older`` already (transitively) supersedes
    ``newer``: the SUPERSEDES graph stays acyclic."""
    closes = await conn.fetchval(
        "WITH RECURSIVE chain(id) AS (SELECT $2::uuid UNION SELECT r.target_id FROM "
        "knowledge_relations r JOIN chain c ON r.source_id = c.id WHERE r.tenant_id = $1 "
        "AND r.kind = $4) SELECT 1 FROM chain WHERE id = $3 LIMIT 1",
        tenant_id,
        older,
        newer,
        res.RELATION_KIND_SUPERSEDES,
    )
    if closes:
        raise FailedPrecondition(
            "the relation would close a SUPERSEDES cycle",
            reason="SUPERSEDES_CYCLE",
            metadata={"source": item_name(tenant_id, newer), "target": item_name(tenant_id, older)},
        )


async def _event(
    conn: asyncpg.Connection,
    key: WriteKey,
    event_type: str,
    item: res.KnowledgeItem,
    extra: dict[str, Any] | None = None,
) -> int:
    """Append the item's event; the payload never carries content (the envelope contract)."""
    payload = {
        "type": res.KnowledgeType.Name(item.type),
        "layer": res.KnowledgeLayer.Name(item.layer),
        "org_unit": item.org_unit,
        "path": item.path,
        "status": res.KnowledgeStatus.Name(item.status),
        "version": item.version,
        "content_hash": item.content_hash,
        **(extra or {}),
    }
    return await writes.append_event(
        conn, NOTIFY_CHANNEL, key.tenant_id, event_type, item.name, key.principal, payload
    )
