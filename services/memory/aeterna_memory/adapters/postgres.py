"""PostgreSQL adapter: memories, revisions, idempotency keys and the outbox.

Writes return the outbox position of their commit (the consistency token's content). An
idempotency key is scoped to (tenant, principal, method, request_id), claimed in the
transaction of the write it protects, and counts for ``idempotency_ttl_s`` seconds; after a
commit with an unknown outcome the key tells whether the write committed
(:meth:`aeterna_common.db.Database.run` with ``resolve``).

Every write is one transaction that changes the memory, appends its revision and appends
its outbox event; nothing is left half done. Outbox positions are drawn at the end of the
transaction under an advisory lock, so they become visible in commit order (a follower
that reads ``position > p`` never skips a change committed later with a smaller number).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from aeterna_common import usage
from aeterna_common.db import Database
from aeterna_common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from aeterna_common.events import current_traceparent

from aeterna_memory.domain.model import (
    SCOPE_FIELDS,
    Embedded,
    FeedbackType,
    Layer,
    ListFilter,
    Memory,
    MemoryPatch,
    Revision,
    RevisionAction,
    Scope,
    new_importance,
)
from aeterna_memory.domain.service import narrowing_column

OUTBOX_LOCK = 7_311_000_002
"""Advisory lock serialising outbox position allocation (held until commit)."""

IDEMPOTENCY_TTL_S = 86_400.0
"""Default lifetime of an idempotency key in seconds (24 h, as issue 6 asks)."""

IDEMPOTENCY_GC_BATCH = 1000
"""Expired idempotency keys deleted per transaction by the collector
(:meth:`PostgresMemoryStore.gc_idempotency_keys`)."""

SERVICE_ACTOR = "services/memory"
"""Outbox ``actor`` of changes the service makes on its own (expiry, purge, decay)."""

NOTIFY_CHANNEL = "aeterna_memory_changes"
"""LISTEN/NOTIFY channel that wakes index followers; the payload is the last position."""

_COLUMNS = (
    "tenant_id, id, layer, agent_id, user_id, session_id, project_id, team_id, org_id, "
    "company_id, content, content_hash, metadata, tags, importance, access_count, "
    "last_accessed_at, created_at, updated_at, expire_at, deleted_at, revision, "
    "embedding_model, cardinality(embedding) AS embedding_dimension"
)


PAGE_BYTES = 3 * 1024 * 1024
"""Content and metadata bytes after which a ListMemories page ends early: a page then fits
gRPC's default 4 MiB receive limit, which clients that never raise it keep (names, hashes and
timestamps add about 300 bytes per memory), and so the service's larger response limit."""


def content_hash(content: str) -> str:
    """Hex SHA-256 of the UTF-8 content."""
    return hashlib.sha256(content.encode()).hexdigest()


_LAYERS = {int(layer): layer for layer in Layer}
"""Layers by stored value: a dict lookup is several times cheaper than ``Layer(value)``, and a
search with a ranker converts up to ~80 rows."""


def row_to_memory(row: asyncpg.Record) -> Memory:
    """Convert a ``memories`` row (selected with the service's column list)."""
    return Memory(
        tenant_id=row["tenant_id"],
        id=str(row["id"]),
        layer=_LAYERS[row["layer"]],
        scope=Scope(**{f: row[f] for f in SCOPE_FIELDS}),
        content=row["content"],
        content_hash=row["content_hash"],
        metadata=json.loads(row["metadata"]),
        tags=list(row["tags"]),
        importance=row["importance"],
        access_count=row["access_count"],
        last_accessed_at=row["last_accessed_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expire_at=row["expire_at"],
        deleted_at=row["deleted_at"],
        revision=row["revision"],
        embedding_model=row["embedding_model"],
        embedding_dimension=row["embedding_dimension"] or 0,
    )


def encode_page_token(created_at: datetime, memory_id: str, fingerprint: str) -> str:
    """Opaque keyset page token (https://google.aip.dev/158)."""
    raw = json.dumps({"c": created_at.isoformat(), "i": memory_id, "f": fingerprint})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_page_token(
    token: str, fingerprint: str, field: str = "page_token"
) -> tuple[datetime, str]:
    """Decode a token of :func:`encode_page_token`.

    Raises:
        InvalidArgument: the token is malformed or was made for other filters.
    """
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        created, mid, fp = datetime.fromisoformat(data["c"]), str(uuid.UUID(data["i"])), data["f"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument([FieldViolation(field, "malformed page token")]) from exc
    if fp != fingerprint:
        raise InvalidArgument(
            [FieldViolation(field, "page token was issued for different filters")]
        )
    return created, mid


_INSERT_MEMORY = (
    "INSERT INTO memories (tenant_id, id, layer, agent_id, user_id, session_id, "
    "project_id, team_id, org_id, company_id, content, content_hash, metadata, "
    "tags, importance, expire_at, index_context, embedding_model, embedding) VALUES "
    "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,"
    " $18, $19)"
)


class PostgresMemoryStore:
    """The memory repository on PostgreSQL (source of truth).

    Args:
        db: Application-role database (row-level security applies).
        idempotency_ttl_s: Seconds an idempotency key counts; an older key is treated as
            absent (and may be claimed again) even before the collector deletes it.
    """

    def __init__(self, db: Database, *, idempotency_ttl_s: float = IDEMPOTENCY_TTL_S) -> None:
        if idempotency_ttl_s <= 0:
            raise ValueError("idempotency_ttl_s must be positive")
        self.db = db
        self.idempotency_ttl_s = idempotency_ttl_s

    def _key(self, tenant_id: str, principal: str, method: str, request_id: str) -> _Key:
        return _Key(tenant_id, principal, method, request_id, self.idempotency_ttl_s)

    # ---- reads -------------------------------------------------------------------------

    async def get(self, tenant_id: str, memory_id: str, *, include_deleted: bool = True) -> Memory:
        """One memory.

        Raises:
            NotFound: no such memory in the tenant (reason ``MEMORY_NOT_FOUND``).
        """

        async def work(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(memory_id),
            )

        row = await self.db.run(tenant_id, work, readonly=True)
        if row is None or (row["deleted_at"] is not None and not include_deleted):
            raise _not_found(tenant_id, memory_id)
        return row_to_memory(row)

    async def recent_contents(
        self, tenant_id: str, sessions: Sequence[tuple[str, str]], limit: int
    ) -> dict[tuple[str, str], list[str]]:
        """Contents of the latest ``limit`` live memories of each session, oldest first.

        One query for all sessions of a batch.

        Args:
            tenant_id: The tenant.
            sessions: ``(user_id, session_id)`` pairs.
            limit: Memories per session.

        Returns:
            A list per requested session (empty for a new session).
        """
        out: dict[tuple[str, str], list[str]] = {key: [] for key in sessions}
        if limit <= 0 or not sessions:
            return out
        users = [u for u, _ in out]
        ids = [s for _, s in out]

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    "SELECT user_id, session_id, content FROM ("
                    " SELECT m.user_id, m.session_id, m.content, m.created_at, m.id,"
                    "  row_number() OVER (PARTITION BY m.user_id, m.session_id"
                    "   ORDER BY m.created_at DESC, m.id DESC) AS rn"
                    " FROM memories m JOIN unnest($2::text[], $3::text[]) AS k(u, s)"
                    "  ON m.user_id = k.u AND m.session_id = k.s"
                    " WHERE m.tenant_id = $1 AND m.deleted_at IS NULL) AS r"
                    " WHERE rn <= $4 ORDER BY created_at, id",
                    tenant_id,
                    users,
                    ids,
                    limit,
                )
            )

        for r in await self.db.run(tenant_id, work, readonly=True):
            out[(r["user_id"], r["session_id"])].append(r["content"])
        return out

    async def preceding_contents(self, tenant_id: str, memory_id: str, limit: int) -> list[str]:
        """Contents of the ``limit`` live memories of a memory's session created before it.

        "Before" is creation order, ``(created_at, id)``, the order in which
        :meth:`recent_contents` gave a new memory its context, so an updated memory gets
        the turns that preceded it, never later ones.

        Args:
            tenant_id: The tenant.
            memory_id: The memory; outside a session (no user or session id) the result is
                empty.
            limit: At most this many contents.

        Returns:
            Oldest first.
        """
        if limit <= 0:
            return []

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    "SELECT content FROM ("
                    " SELECT p.content, p.created_at, p.id FROM memories m"
                    " JOIN memories p ON p.tenant_id = m.tenant_id AND p.user_id = m.user_id"
                    "  AND p.session_id = m.session_id"
                    "  AND (p.created_at, p.id) < (m.created_at, m.id)"
                    " WHERE m.tenant_id = $1 AND m.id = $2 AND p.deleted_at IS NULL"
                    " ORDER BY p.created_at DESC, p.id DESC LIMIT $3) AS r"
                    " ORDER BY created_at, id",
                    tenant_id,
                    uuid.UUID(memory_id),
                    limit,
                )
            )

        return [r["content"] for r in await self.db.run(tenant_id, work, readonly=True)]

    async def list_page(
        self,
        tenant_id: str,
        flt: ListFilter,
        page_size: int,
        page_token: str,
        *,
        narrow: Mapping[Layer, frozenset[str] | None] | None = None,
    ) -> tuple[list[Memory], str]:
        """A page of memories, newest first (oldest change first with
        ``flt.by_update_time``), and the next page token ('' at the end).

        The page ends early (with a token) once its contents and metadata pass
        :data:`PAGE_BYTES`. ``narrow`` (what the caller may read) keeps only the listed
        layers, each to the given identifier values (None: all of the layer).
        """
        fp = flt.fingerprint()
        where = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]
        if flt.layer is not None:
            args.append(int(flt.layer))
            where.append(f"layer = ${len(args)}")
        for name, value in flt.scope.as_dict().items():
            args.append(value)
            where.append(f"{name} = ${len(args)}")
        if flt.tags:
            args.append(list(flt.tags))
            where.append(f"tags && ${len(args)}::text[]")
        if narrow is not None:
            allowed: list[str] = []
            for layer, values in narrow.items():
                if values is None:
                    allowed.append(f"layer = {int(layer)}")
                elif values:
                    args.append(sorted(values))
                    column = narrowing_column(layer)
                    allowed.append(
                        f"(layer = {int(layer)} AND {column} = ANY(${len(args)}::text[]))"
                    )
            where.append(f"({' OR '.join(allowed)})" if allowed else "FALSE")
        if not flt.show_deleted:
            where.append(
                "deleted_at IS NULL AND archived_at IS NULL "
                "AND (expire_at IS NULL OR expire_at > now())"
            )
        # Newest created first, or (order_by update_time) oldest change first; the page
        # token holds the last row's key in that order.
        key, op, direction = (
            ("updated_at", ">", "ASC") if flt.by_update_time else ("created_at", "<", "DESC")
        )
        if flt.min_update_time is not None:
            args.append(flt.min_update_time)
            where.append(f"updated_at >= ${len(args)}")
        if page_token:
            at, mid = decode_page_token(page_token, fp)
            args.extend([at, uuid.UUID(mid)])
            where.append(f"({key}, id) {op} (${len(args) - 1}, ${len(args)})")
        args.append(page_size + 1)
        sql = (
            f"SELECT {_COLUMNS} FROM memories WHERE {' AND '.join(where)} "
            f"ORDER BY {key} {direction}, id {direction} LIMIT ${len(args)}"
        )

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(await conn.fetch(sql, *args))

        rows = await self.db.run(tenant_id, work, readonly=True)
        # A page also ends where its content and metadata would pass PAGE_BYTES, so the
        # response fits the response size limit (AIP-158 lets a page hold fewer items).
        kept, size = 0, 0
        for r in rows[:page_size]:
            size += len(r["content"].encode()) + len(r["metadata"].encode())
            if kept and size > PAGE_BYTES:
                break
            kept += 1
        memories = [row_to_memory(r) for r in rows[:kept]]
        token = ""
        if len(rows) > kept:
            last = memories[-1]
            at = last.updated_at if flt.by_update_time else last.created_at
            token = encode_page_token(at, last.id, fp)
        return memories, token

    async def revisions(
        self, tenant_id: str, memory_id: str, page_size: int, after: int
    ) -> tuple[list[Revision], bool]:
        """Revisions after number ``after``, oldest first, and whether more follow.

        Raises:
            NotFound: no such memory.
        """

        async def work(conn: asyncpg.Connection) -> tuple[bool, list[asyncpg.Record]]:
            exists = await conn.fetchval(
                "SELECT 1 FROM memories WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(memory_id),
            )
            rows = await conn.fetch(
                "SELECT * FROM memory_revisions WHERE tenant_id = $1 AND memory_id = $2 "
                "AND revision > $3 ORDER BY revision LIMIT $4",
                tenant_id,
                uuid.UUID(memory_id),
                after,
                page_size + 1,
            )
            return bool(exists), list(rows)

        exists, rows = await self.db.run(tenant_id, work, readonly=True)
        if not exists:
            raise _not_found(tenant_id, memory_id)
        out = [
            Revision(
                memory_id=str(r["memory_id"]),
                revision=r["revision"],
                action=RevisionAction(r["action"]),
                old_content=r["old_content"],
                new_content=r["new_content"],
                changed_fields=list(r["changed_fields"]),
                actor=r["actor"],
                created_at=r["created_at"],
            )
            for r in rows[:page_size]
        ]
        return out, len(rows) > page_size

    async def latest_position(self, tenant_id: str) -> int:
        """The tenant's last committed outbox position (0 when none)."""

        async def work(conn: asyncpg.Connection) -> int:
            value = await conn.fetchval(
                "SELECT position FROM outbox WHERE tenant_id = $1 ORDER BY position DESC LIMIT 1",
                tenant_id,
            )
            return int(value or 0)

        return await self.db.run(tenant_id, work, readonly=True)

    async def read_hits(
        self, tenant_id: str, ids: Sequence[str], *, vectors: bool = True
    ) -> dict[str, tuple[Memory, list[float]]]:
        """Live (not deleted, not expired, not archived) memories among ``ids`` with their
        vectors.

        Args:
            tenant_id: The tenant; rows of other tenants are invisible (RLS) and filtered.
            ids: Candidate ids from the index.
            vectors: Read the vectors too; without, each vector is ``[]`` (decoding 384
                floats a row is most of a re-read's cost).
        """
        if not ids:
            return {}
        uuids = [uuid.UUID(i) for i in ids]

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f"SELECT {_COLUMNS}{', embedding' if vectors else ''} FROM memories "
                    "WHERE tenant_id = $1 AND id = ANY($2::uuid[]) AND deleted_at IS NULL "
                    "AND archived_at IS NULL AND (expire_at IS NULL OR expire_at > now())",
                    tenant_id,
                    uuids,
                )
            )

        rows = await self.db.run(tenant_id, work, readonly=True)
        return {
            str(r["id"]): (row_to_memory(r), list(r["embedding"]) if vectors else []) for r in rows
        }

    async def read_pool(
        self,
        tenant_id: str,
        ids: Sequence[str],
        expand: Sequence[str],
        before: int,
        after: int,
        *,
        vectors: bool = True,
    ) -> tuple[dict[str, tuple[Memory, list[float]]], dict[str, tuple[Memory, list[float]]]]:
        """Live memories among ``ids``, and the live memories just before and after each of
        ``expand`` in its session, in one statement.

        A memory's session neighbours share its tenant, layer, whole scope (every
        identifier) and session, so whoever may read the memory may read them; the order is
        creation order, ``(created_at, id)``, the order in which a session's turns were
        written (the order :meth:`recent_contents` gives write-time context in). Memories
        outside a session have none.

        Args:
            tenant_id: The tenant; rows of other tenants are invisible (RLS) and filtered.
            ids: Candidate ids from the index.
            expand: Memories whose neighbours are wanted (usually the best of ``ids``).
            before: Neighbours taken before each of ``expand`` (the nearest ones).
            after: Neighbours taken after each of ``expand``.
            vectors: Read the vectors too; without, each vector is ``[]`` (decoding 384
                floats a row is most of a re-read's cost).

        Returns:
            The rows of ``ids`` and, apart, those of neighbours that are not among ``ids``,
            each by id.
        """
        if not ids and not expand:
            return {}, {}
        if before + after <= 0:
            expand = []
        sql = pool_sql(vectors=vectors)

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    sql,
                    tenant_id,
                    [uuid.UUID(i) for i in ids],
                    [uuid.UUID(i) for i in expand],
                    before,
                    after,
                )
            )

        hits: dict[str, tuple[Memory, list[float]]] = {}
        neighbours: dict[str, tuple[Memory, list[float]]] = {}
        wanted = set(ids)
        for r in await self.db.run(tenant_id, work, readonly=True):
            mid = str(r["id"])
            row = (row_to_memory(r), list(r["embedding"]) if vectors else [])
            (hits if mid in wanted else neighbours)[mid] = row
        return hits, neighbours

    async def touch(self, tenant_id: str, ids: Sequence[str], *, query_tokens: int = 0) -> None:
        """Count one access of each memory (a search returned it), and the search and its
        query's embedding as billable usage (:mod:`aeterna_common.usage`), in one
        transaction.

        Args:
            tenant_id: The tenant.
            ids: Memory ids the search returned.
            query_tokens: Tokens the model read to embed the query; 0 when the query's vector
                came from the cache (no embedding call is billed then).
        """

        async def work(conn: asyncpg.Connection) -> None:
            if ids:
                await conn.execute(
                    "UPDATE memories SET access_count = access_count + 1, "
                    "last_accessed_at = now() WHERE tenant_id = $1 AND id = ANY($2::uuid[])",
                    tenant_id,
                    [uuid.UUID(i) for i in ids],
                )
            await usage.record_usage(
                conn,
                tenant_id,
                {
                    usage.SEARCHES: 1,
                    usage.EMBEDDING_CALLS: 1 if query_tokens else 0,
                    usage.EMBEDDING_TOKENS: query_tokens,
                },
            )

        await self.db.run(tenant_id, work)

    # ---- writes ------------------------------------------------------------------------

    async def gc_idempotency_keys(
        self, *, batch: int = IDEMPOTENCY_GC_BATCH, max_batches: int = 100
    ) -> int:
        """Delete expired idempotency keys of every tenant, ``batch`` rows per transaction.

        Safe to run on every replica at once (the database function locks with SKIP LOCKED)
        and cheap when there is nothing to do (one index probe on ``created_at``).

        Args:
            batch: Keys deleted per transaction.
            max_batches: Upper bound of transactions per call.

        Returns:
            How many keys were deleted.
        """
        total = 0
        for _ in range(max_batches):
            async with self.db.pool.acquire() as conn:
                deleted = int(
                    await conn.fetchval(
                        "SELECT gc_idempotency_keys($1, $2)", self.idempotency_ttl_s, batch
                    )
                )
            total += deleted
            if deleted < batch:
                break
        return total

    async def idempotent_result(
        self, tenant_id: str, principal: str, method: str, request_id: str, request_hash: str
    ) -> tuple[list[Memory], int] | None:
        """The memories a previous call with this key produced, if any, and a position at
        or after its commit.

        Args:
            tenant_id: The tenant.
            principal: The caller (``Principal.actor``); keys are per caller.
            method: The RPC method name.
            request_id: The client's idempotency key.
            request_hash: Fingerprint of the request.

        Raises:
            FailedPrecondition: the key was used for a different request
                (reason ``REQUEST_ID_REUSED``).
        """
        key = self._key(tenant_id, principal, method, request_id)

        async def work(conn: asyncpg.Connection) -> tuple[list[Memory], int] | None:
            replay = await _replay(conn, key, request_hash)
            return None if replay is None else (replay, await _latest_position(conn, tenant_id))

        return await self.db.run(tenant_id, work, readonly=True)

    async def create(
        self,
        tenant_id: str,
        items: Sequence[Embedded],
        *,
        model: str,
        actor: str,
        method: str,
        request_id: str,
        request_hash: str,
        step: int = 0,
        between_steps: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[list[Memory], int]:
        """Insert memories, their ADD revisions and outbox events in one transaction.

        With a ``request_id``, a retry returns the first call's memories instead, also when
        the first call's COMMIT lost its connection (resolved through the key).

        Args:
            tenant_id: The tenant.
            items: The memories with their vectors and index context.
            model: Embedding model id recorded with each vector.
            actor: Who writes (recorded in the revisions and the outbox).
            method: The RPC method (scopes the idempotency key).
            request_id: Idempotency key ("" for none).
            request_hash: Fingerprint of the request (a reused key with another request
                fails).
            step: Rows per ``INSERT`` batch (0: all in one). Encoding a row with its vector
                runs on the event loop; smaller batches let other requests run in between.
            between_steps: Awaited between two batches (see
                :meth:`aeterna_common.admission.ForegroundGauge.yield_to_foreground`).

        Returns:
            The memories and the outbox position of the commit.

        Raises:
            FailedPrecondition: the ``request_id`` was used for a different request.
            CommitOutcomeUnknown: COMMIT lost its connection and there is no ``request_id``.
        """
        ids = [uuid.uuid4() for _ in items]
        key = self._key(tenant_id, actor, method, request_id)

        async def work(conn: asyncpg.Connection) -> tuple[list[Memory], int]:
            if request_id:
                replay = await _claim(conn, key, request_hash, ids)
                if replay is not None:
                    return replay, await _latest_position(conn, tenant_id)
            values = [
                (
                    tenant_id,
                    mid,
                    int(e.memory.layer),
                    *(e.memory.scope.get(f) for f in SCOPE_FIELDS),
                    e.memory.content,
                    content_hash(e.memory.content),
                    json.dumps(e.memory.metadata),
                    list(e.memory.tags),
                    e.memory.importance,
                    e.memory.expire_at,
                    list(e.lexical_context),
                    model,
                    list(e.embedding),
                )
                for mid, e in zip(ids, items, strict=True)
            ]
            size = step or len(values) or 1
            for start in range(0, len(values), size):
                if start and between_steps is not None:
                    await between_steps()
                await conn.executemany(_INSERT_MEMORY, values[start : start + size])
            await conn.execute(
                "INSERT INTO memory_revisions (tenant_id, memory_id, revision, action, "
                "new_content, actor) SELECT $1, i, 1, 1, c, $4 "
                "FROM unnest($2::uuid[], $3::text[]) AS u(i, c)",
                tenant_id,
                ids,
                [e.memory.content for e in items],
                actor,
            )
            position = await _append_outbox(conn, tenant_id, "memory.created", ids, actor=actor)
            await usage.record_usage(
                conn,
                tenant_id,
                {
                    usage.MEMORIES_STORED: len(items),
                    usage.MEMORY_BYTES: sum(
                        usage.content_bytes(e.memory.content, len(e.embedding)) for e in items
                    ),
                    usage.EMBEDDING_CALLS: sum(1 for e in items if e.tokens),
                    usage.EMBEDDING_TOKENS: sum(e.tokens for e in items),
                },
            )
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 AND id = ANY($2::uuid[])",
                tenant_id,
                ids,
            )
            by_id = {r["id"]: row_to_memory(r) for r in rows}
            return [by_id[i] for i in ids], position

        return await self.db.run(
            tenant_id, work, resolve=self._resolver(key, request_hash) if request_id else None
        )

    def _resolver(
        self, key: _Key, request_hash: str
    ) -> Callable[[asyncpg.Connection], Awaitable[tuple[list[Memory], int] | None]]:
        async def resolve(conn: asyncpg.Connection) -> tuple[list[Memory], int] | None:
            replay = await _replay(conn, key, request_hash)
            if replay is None:
                return None
            return replay, await _latest_position(conn, key.tenant_id)

        return resolve

    async def update(
        self,
        tenant_id: str,
        memory_id: str,
        patch: MemoryPatch,
        *,
        expected_revision: int,
        lexical_context: Sequence[str] | None,
        embedding: Sequence[float] | None,
        actor: str,
        model: str | None = None,
        embedding_tokens: int = 0,
    ) -> tuple[Memory, int]:
        """Apply a patch if the memory is still at ``expected_revision``.

        ``lexical_context`` and ``embedding``, when given, replace the index texts' BM25
        context and the vector (a content change needs both; a metadata change may change
        either).
        A new ``embedding`` is stored with its ``model`` id; with an empty patch that is a
        re-embed (its revision lists ``embedding`` as the changed field).

        Billed in the same transaction (:mod:`aeterna_common.usage`): one embedding call of
        ``embedding_tokens`` tokens when the model made the vector (> 0), and the bytes
        written that differ from the row: the new content when it is not the stored one
        (UTF-8) and the vector when it is not the stored one (4 bytes a component). An
        update sent again (UpdateMemory has no request id) finds its content and vector
        stored and its embedding in the cache, and bills nothing twice.

        Returns:
            The memory and the outbox position of the commit.

        Raises:
            NotFound: no such live memory.
            Aborted: it changed since it was read (reason ``CONCURRENT_MODIFICATION``).
            CommitOutcomeUnknown: COMMIT lost its connection.
        """
        mid = uuid.UUID(memory_id)

        async def work(conn: asyncpg.Connection) -> tuple[Memory, int]:
            row = await conn.fetchrow(
                "SELECT content, revision, deleted_at, embedding FROM memories "
                "WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                mid,
            )
            if row is None or row["deleted_at"] is not None:
                raise _not_found(tenant_id, memory_id)
            if row["revision"] != expected_revision:
                raise Aborted(
                    "the memory changed while it was being updated; retry",
                    reason="CONCURRENT_MODIFICATION",
                )
            sets = ["revision = revision + 1", "updated_at = clock_timestamp()"]
            args: list[Any] = [tenant_id, mid]

            def put(column: str, value: Any) -> None:
                args.append(value)
                sets.append(f"{column} = ${len(args)}")

            f = patch.fields
            changed = sorted(f)
            if "content" in f:
                assert patch.content is not None and lexical_context is not None and embedding
                put("content", patch.content)
                put("content_hash", content_hash(patch.content))
            if lexical_context is not None:
                put("index_context", list(lexical_context))
            if embedding is not None:
                put("embedding", list(embedding))
                if model is not None:
                    put("embedding_model", model)
                if "content" not in f:
                    changed.append("embedding")
            if "metadata" in f:
                put("metadata", json.dumps(patch.metadata or {}))
            if "tags" in f:
                put("tags", list(patch.tags or []))
            if "importance" in f:
                put("importance", patch.importance if patch.importance is not None else 0.5)
            if "expire_time" in f:
                put("expire_at", patch.expire_at)
                # A new expiry is processed again by the expiry job when it passes.
                sets.append("expired_at = NULL")
            updated = await conn.fetchrow(
                f"UPDATE memories SET {', '.join(sets)} WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_COLUMNS}",
                *args,
            )
            assert updated is not None
            memory = row_to_memory(updated)
            await conn.execute(
                "INSERT INTO memory_revisions (tenant_id, memory_id, revision, action, "
                "old_content, new_content, changed_fields, actor) "
                "VALUES ($1, $2, $3, 2, $4, $5, $6, $7)",
                tenant_id,
                mid,
                memory.revision,
                row["content"],
                memory.content,
                changed,
                actor,
            )
            position = await _append_outbox(conn, tenant_id, "memory.updated", [mid], actor=actor)
            # After the outbox: its lock comes before usage rows (aeterna_common.usage).
            written = 0
            if "content" in f and patch.content != row["content"]:
                written += usage.content_bytes(memory.content)
            if embedding is not None and list(embedding) != list(row["embedding"]):
                written += usage.content_bytes("", len(embedding))
            await usage.record_usage(
                conn,
                tenant_id,
                {
                    usage.MEMORY_BYTES: written,
                    usage.EMBEDDING_CALLS: 1 if embedding_tokens else 0,
                    usage.EMBEDDING_TOKENS: embedding_tokens,
                },
            )
            return memory, position

        return await self.db.run(tenant_id, work)

    async def stale_embeddings(
        self, tenant_id: str, model: str, limit: int, after: str | None = None
    ) -> list[tuple[Memory, list[str]]]:
        """Live memories whose vector was made by another model than ``model``.

        Args:
            tenant_id: The tenant.
            model: The current model id.
            limit: At most this many, in id order.
            after: Only ids after this one (keyset on the primary key), if given.

        Returns:
            ``(memory, index_context)`` pairs.
        """
        start = uuid.UUID(after) if after else None

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    f"SELECT {_COLUMNS}, index_context FROM memories WHERE tenant_id = $1 "
                    "AND ($4::uuid IS NULL OR id > $4) AND embedding_model <> $2 "
                    "AND deleted_at IS NULL AND (expire_at IS NULL OR expire_at > now()) "
                    "ORDER BY id LIMIT $3",
                    tenant_id,
                    model,
                    limit,
                    start,
                )
            )

        rows = await self.db.run(tenant_id, work, readonly=True)
        return [(row_to_memory(r), list(r["index_context"])) for r in rows]

    async def count_stale_embeddings(self, tenant_id: str, model: str) -> int:
        """How many live memories of the tenant have a vector of another model than ``model``."""

        async def work(conn: asyncpg.Connection) -> int:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM memories WHERE tenant_id = $1 "
                    "AND embedding_model <> $2 AND deleted_at IS NULL "
                    "AND (expire_at IS NULL OR expire_at > now())",
                    tenant_id,
                    model,
                )
            )

        return await self.db.run(tenant_id, work, readonly=True)

    async def delete(self, tenant_id: str, memory_id: str, *, actor: str) -> tuple[Memory, int]:
        """Soft-delete; a deleted memory is returned unchanged (idempotent).

        Returns:
            The memory and the outbox position of the commit (for a memory deleted before,
            a position at or after that delete).

        Raises:
            NotFound: no such memory.
            CommitOutcomeUnknown: COMMIT lost its connection (repeating the call is safe).
        """
        mid = uuid.UUID(memory_id)

        async def work(conn: asyncpg.Connection) -> tuple[Memory, int]:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                mid,
            )
            if row is None:
                raise _not_found(tenant_id, memory_id)
            if row["deleted_at"] is not None:
                return row_to_memory(row), await _latest_position(conn, tenant_id)
            updated = await conn.fetchrow(
                "UPDATE memories SET deleted_at = clock_timestamp(), "
                "updated_at = clock_timestamp(), revision = revision + 1 "
                f"WHERE tenant_id = $1 AND id = $2 RETURNING {_COLUMNS}",
                tenant_id,
                mid,
            )
            assert updated is not None
            memory = row_to_memory(updated)
            await conn.execute(
                "INSERT INTO memory_revisions (tenant_id, memory_id, revision, action, "
                "old_content, actor) VALUES ($1, $2, $3, 3, $4, $5)",
                tenant_id,
                mid,
                memory.revision,
                row["content"],
                actor,
            )
            position = await _append_outbox(conn, tenant_id, "memory.deleted", [mid], actor=actor)
            return memory, position

        return await self.db.run(tenant_id, work)

    async def record_feedback(
        self,
        tenant_id: str,
        memory_id: str,
        feedback: FeedbackType,
        reward: float,
        *,
        actor: str,
        request_id: str,
        request_hash: str,
    ) -> tuple[Memory, int]:
        """Apply a reward to the importance (once per ``request_id``).

        Importance becomes ``clamp((old + reward) / 2, 0, 1)`` (DOMAIN.md, Feedback), written
        as an UPDATE revision of ``importance``.

        Returns:
            The memory and the outbox position of the commit.

        Raises:
            NotFound: no such live memory.
            CommitOutcomeUnknown: COMMIT lost its connection and there is no ``request_id``.
        """
        mid = uuid.UUID(memory_id)
        key = self._key(tenant_id, actor, "RecordMemoryFeedback", request_id)

        async def work(conn: asyncpg.Connection) -> tuple[Memory, int]:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                mid,
            )
            if row is None or row["deleted_at"] is not None:
                raise _not_found(tenant_id, memory_id)
            if request_id:
                replay = await _claim(conn, key, request_hash, [mid])
                if replay is not None:
                    return replay[0], await _latest_position(conn, tenant_id)
            importance = new_importance(row["importance"], reward)
            updated = await conn.fetchrow(
                "UPDATE memories SET importance = $3, revision = revision + 1, "
                "updated_at = clock_timestamp() WHERE tenant_id = $1 AND id = $2 "
                f"RETURNING {_COLUMNS}",
                tenant_id,
                mid,
                importance,
            )
            assert updated is not None
            memory = row_to_memory(updated)
            await conn.execute(
                "INSERT INTO memory_revisions (tenant_id, memory_id, revision, action, "
                "old_content, new_content, changed_fields, actor) "
                "VALUES ($1, $2, $3, 2, $4, $4, $5, $6)",
                tenant_id,
                mid,
                memory.revision,
                memory.content,
                ["importance"],
                actor,
            )
            position = await _append_outbox(
                conn,
                tenant_id,
                "memory.feedback_recorded",
                [mid],
                {"type": feedback.name, "reward": reward},
                actor=actor,
            )
            return memory, position

        resolve = self._resolver(key, request_hash) if request_id else None

        async def resolve_one(conn: asyncpg.Connection) -> tuple[Memory, int] | None:
            assert resolve is not None
            found = await resolve(conn)
            return None if found is None or not found[0] else (found[0][0], found[1])

        return await self.db.run(tenant_id, work, resolve=resolve_one if request_id else None)


@dataclass(frozen=True, slots=True)
class _Key:
    """An idempotency key: scope, the client's ``request_id`` and its lifetime in seconds."""

    tenant_id: str
    principal: str
    method: str
    request_id: str
    ttl_s: float


async def _claim(
    conn: asyncpg.Connection, key: _Key, request_hash: str, ids: Sequence[uuid.UUID]
) -> list[Memory] | None:
    """Claim ``key`` for ``ids``; ``None`` when claimed now, else the earlier result.

    A concurrent call with the same key blocks on the primary key until the first commits
    (or rolls back, leaving the key free), so exactly one of them does the work. An expired
    key is taken over as if it did not exist.
    """
    claimed = await conn.fetchval(
        "INSERT INTO idempotency_keys (tenant_id, principal, method, request_id, request_hash,"
        " memory_ids) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (tenant_id, principal, method, request_id) DO UPDATE SET"
        " request_hash = EXCLUDED.request_hash, memory_ids = EXCLUDED.memory_ids,"
        " created_at = clock_timestamp()"
        " WHERE idempotency_keys.created_at < clock_timestamp() - make_interval(secs => $7)"
        " RETURNING 1",
        key.tenant_id,
        key.principal,
        key.method,
        key.request_id,
        request_hash,
        list(ids),
        key.ttl_s,
    )
    if claimed:
        return None
    replay = await _replay(conn, key, request_hash)
    assert replay is not None
    return replay


async def _replay(conn: asyncpg.Connection, key: _Key, request_hash: str) -> list[Memory] | None:
    row = await conn.fetchrow(
        "SELECT request_hash, memory_ids FROM idempotency_keys WHERE tenant_id = $1 AND "
        "principal = $2 AND method = $3 AND request_id = $4 AND "
        "created_at >= clock_timestamp() - make_interval(secs => $5)",
        key.tenant_id,
        key.principal,
        key.method,
        key.request_id,
        key.ttl_s,
    )
    if row is None:
        return None
    if row["request_hash"] != request_hash:
        raise FailedPrecondition(
            "request_id was already used for a different request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": key.request_id},
        )
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM memories WHERE tenant_id = $1 AND id = ANY($2::uuid[])",
        key.tenant_id,
        row["memory_ids"],
    )
    by_id = {r["id"]: row_to_memory(r) for r in rows}
    return [by_id[i] for i in row["memory_ids"] if i in by_id]


async def _latest_position(conn: asyncpg.Connection, tenant_id: str) -> int:
    value = await conn.fetchval(
        "SELECT position FROM outbox WHERE tenant_id = $1 ORDER BY position DESC LIMIT 1",
        tenant_id,
    )
    return int(value or 0)


async def _append_outbox(
    conn: asyncpg.Connection,
    tenant_id: str,
    event_type: str,
    ids: Sequence[uuid.UUID],
    payload: dict[str, Any] | None = None,
    *,
    actor: str,
) -> int:
    """Append one outbox row per memory in ``ids`` (in the caller's transaction) and notify
    followers; returns the last position. ``actor`` is who caused the change
    (``Principal.actor``, or :data:`SERVICE_ACTOR` for the service's own jobs); the current
    trace context is recorded with it."""
    # Held until commit: positions are drawn, and become visible, in commit order.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK)
    # The memory's layer and scope identifiers (never its content) ride along, so that live
    # subscribers are routed to rooms without a lookup (sync, issue 9).
    last = await conn.fetchval(
        "WITH ins AS (INSERT INTO outbox (position, tenant_id, event_type, resource, "
        "memory_id, payload, actor, traceparent) SELECT nextval('outbox_position'), $1, $2, "
        "'tenants/' || $1 || '/memories/' || i, i, $4::jsonb || coalesce(("
        "SELECT jsonb_strip_nulls(jsonb_build_object('layer', m.layer, 'user_id', m.user_id, "
        "'project_id', m.project_id, 'team_id', m.team_id, 'org_id', m.org_id, "
        "'company_id', m.company_id)) FROM memories m WHERE m.tenant_id = $1 AND m.id = i), "
        "'{}'::jsonb), $5, $6 "
        "FROM unnest($3::uuid[]) WITH ORDINALITY AS u(i, n) ORDER BY n RETURNING position) "
        "SELECT max(position) FROM ins",
        tenant_id,
        event_type,
        list(ids),
        json.dumps(payload or {}),
        actor,
        current_traceparent(),
    )
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(last))
    return int(last)


def _not_found(tenant_id: str, memory_id: str) -> NotFound:
    return NotFound(
        f"memory tenants/{tenant_id}/memories/{memory_id} not found",
        reason="MEMORY_NOT_FOUND",
        metadata={"name": f"tenants/{tenant_id}/memories/{memory_id}"},
    )


def pool_sql(*, vectors: bool) -> str:
    """The statement of :meth:`PostgresMemoryStore.read_pool`: ``$1`` tenant, ``$2`` candidate
    ids, ``$3`` ids to expand, ``$4``/``$5`` neighbours before/after each.

    Args:
        vectors: Select the embedding too.

    Returns:
        The SQL text.
    """
    live = (
        "{t}.deleted_at IS NULL AND {t}.archived_at IS NULL "
        "AND ({t}.expire_at IS NULL OR {t}.expire_at > now())"
    )
    same = " ".join(f"AND n.{f} IS NOT DISTINCT FROM h.{f}" for f in SCOPE_FIELDS)
    side = (
        "(SELECT n.id FROM memories n WHERE n.tenant_id = h.tenant_id "
        "AND n.user_id = h.user_id AND n.session_id = h.session_id AND n.layer = h.layer "
        f"{same} AND {live.format(t='n')} AND (n.created_at, n.id) {{op}} "
        "(h.created_at, h.id) ORDER BY n.created_at {dir}, n.id {dir} LIMIT {limit})"
    )
    near = (
        "SELECT k.id FROM memories h CROSS JOIN LATERAL ("
        + side.format(op="<", dir="DESC", limit="$4")
        + " UNION ALL "
        + side.format(op=">", dir="ASC", limit="$5")
        + ") AS k WHERE h.tenant_id = $1 AND h.id = ANY($3::uuid[]) "
        "AND h.user_id IS NOT NULL AND h.session_id IS NOT NULL"
    )

    # Two primary-key probes: the candidates by ``id = ANY($2)``, the neighbours by
    # ``id = ANY(ARRAY(near))`` (an uncorrelated sub-select, evaluated once). Under RLS
    # only leakproof conditions become index conditions: ``array_cat`` is not, so the
    # one-array form ``id = ANY($2 || ARRAY(near))`` scanned every row of the table as the
    # application role (314 ms at 100k memories, 0.7 ms as the owner); an
    # ``IN (SELECT unnest ... UNION ALL near)`` was a hash semi-join over a scan too.
    columns = f"{_COLUMNS}{', embedding' if vectors else ''}"
    return (
        f"SELECT {columns} FROM memories m WHERE tenant_id = $1 "
        f"AND {live.format(t='m')} AND id = ANY($2::uuid[]) "
        f"UNION ALL SELECT {columns} FROM memories m WHERE tenant_id = $1 "
        f"AND {live.format(t='m')} AND id = ANY(ARRAY({near})) "
        "AND id <> ALL($2::uuid[])"
    )
