"""SearchKnowledge: hybrid dense + BM25 retrieval over the chunks of the items a caller may
read, answered per item with its best section, relevance first and precedence among
near-equals (DOMAIN.md, Knowledge: query with precedence; issue 8, item 4).

1. Authorization narrows first: the units whose items the caller may read
   (:meth:`Access.readable_units`, Cedar ``knowledge:read``) become a filter of the index
   query itself, so nothing unreadable is scored and the page counts readable hits only.
2. Read-your-writes (:mod:`aeterna_common.consistency`): with a consistency token the search
   waits (bounded) until this replica's index has applied its position, else answers
   ``UNAVAILABLE`` (``CONSISTENCY_TOKEN_NOT_REACHED``) so the edge retries another replica;
   without one it waits briefly for the tenant's latest change and is marked stale past that.
3. The dense (cosine) and BM25 rankings of the chunks are fused with min-max normalisation
   and weights (:func:`aeterna_common.search.fusion.minmax`, as memory's default); an item
   scores its best chunk's fused score and shows that chunk's heading and a snippet.
4. Hits are re-read from PostgreSQL under the tenant (RLS) and checked again against the
   filters and the readable units, so a stale index never returns what the source of truth
   no longer holds.
5. Order: by score; hits within :data:`NEAR_TIE` of the best score of their band are ordered
   by precedence (layer authority, company first; variant role, canonical first; update time,
   newest first). Precedence never lifts a hit over a clearly more relevant one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog
from aeterna.knowledge.v1 import resources_pb2 as res
from aeterna_common import usage
from aeterna_common.after_answer import AfterAnswer
from aeterna_common.config import CommonSettings
from aeterna_common.consistency import TOKEN_NOT_REACHED
from aeterna_common.context import Principal
from aeterna_common.db import Database
from aeterna_common.embedding import EmbeddingPort, Embeddings
from aeterna_common.errors import Unavailable
from aeterna_common.search import fusion
from aeterna_common.search.lexical import BM25Encoder
from aeterna_common.server import StartupError
from aeterna_common.vectors.follow import FileCursor
from aeterna_common.vectors.port import FieldMatch, IndexFilter, ScoredId, SparseVector, VectorIndex

from aeterna_knowledge import items
from aeterna_knowledge.access import Access
from aeterna_knowledge.index_follower import (
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    KnowledgeIndexFollower,
    enum_name,
)
from aeterna_knowledge.search_chunks import snippet, source_hash
from aeterna_knowledge.settings import KnowledgeSettings

log = structlog.get_logger("aeterna.knowledge.search")

NEAR_TIE = 0.02
"""Largest fused-score gap (on the [0, 1] scale) inside which precedence orders hits.

The same decision kept at two layers scores equal (equal texts give equal dense and BM25
scores), and a clarification beside its canonical item scores close; a hit that answers the
query better is usually ahead by more. 0.02 is a choice in the spirit of memory's
``NEAR_TIE`` (DOMAIN.md: relevance first), not fitted on data: precedence may overturn at
most 2 % of the score range."""

DEFAULT_STATUSES = ("DRAFT", "PROPOSED", "ACCEPTED")
"""Statuses searched when the request names none: SUPERSEDED, DEPRECATED and REJECTED items
are left out unless asked for (the proto)."""


@dataclass(frozen=True, slots=True)
class SearchTuning:
    """How a search ranks.

    Attributes:
        candidates: Chunks per ranking (dense and BM25) before fusion.
        dense_weight: Weight of the dense ranking in the min-max fusion; 0 searches BM25
            only (the benchmark's baseline).
        lexical_weight: Weight of the BM25 ranking.
        near_tie: See :data:`NEAR_TIE`.
        wait_s: Longest wait in seconds, without a token, for the tenant's latest change.
        token_wait_s: Longest wait in seconds for a token's position before ``UNAVAILABLE``.
    """

    candidates: int = 100
    dense_weight: float = 0.5
    lexical_weight: float = 0.5
    near_tie: float = NEAR_TIE
    wait_s: float = 0.5
    token_wait_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Query:
    """A validated search.

    Attributes:
        text: The plain-words query.
        limit: Most hits (1-100).
        types, statuses, layers: Enum short names (``ADR``, ``ACCEPTED``, ``TEAM``); empty
            types or layers: any; ``statuses`` is never empty (see
            :data:`DEFAULT_STATUSES`).
        tags: Every one of these tags.
    """

    text: str
    limit: int
    statuses: Sequence[str] = DEFAULT_STATUSES
    types: Sequence[str] = ()
    layers: Sequence[str] = ()
    tags: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Hit:
    """One item found.

    Attributes:
        item: The item as PostgreSQL holds it now.
        score: Fused relevance of its best chunk, in [0, 1].
        section: That chunk's heading (``""``: the title, summary and text before the first
            heading).
        snippet: The start of that chunk's text.
    """

    item: res.KnowledgeItem
    score: float
    section: str
    snippet: str


@dataclass(slots=True)
class Outcome:
    """A search's hits and the index's state.

    Attributes:
        hits: Best first.
        stale: The index had not applied the tenant's latest change (no token was given).
        applied_position: The position the index had applied.
    """

    hits: list[Hit] = field(default_factory=list)
    stale: bool = False
    applied_position: int = 0


def precedence(item: res.KnowledgeItem) -> tuple[int, int, float]:
    """An item's precedence, larger first: layer authority (COMPANY 4 > ORG > TEAM >
    PROJECT 1, the proto's numbers), variant role (CANONICAL 6 > CLARIFICATION >
    SPECIALIZATION > APPLICABILITY > EXCEPTION > SUPERSEDED 1, DOMAIN.md's 5..0 plus one),
    update time (seconds)."""
    updated = item.update_time.seconds + item.update_time.nanos / 1e9
    return (item.layer, item.variant_role or res.VARIANT_ROLE_CANONICAL, updated)


def order_hits(hits: Sequence[Hit], near_tie: float = NEAR_TIE) -> list[Hit]:
    """Relevance first, precedence among near-equals.

    Hits are sorted by score; a band starts at the best remaining hit and holds every hit
    whose score is within ``near_tie`` of it; inside a band, precedence decides
    (:func:`precedence`), then score.

    Args:
        hits: Hits in any order.
        near_tie: Width of a band on the score scale (>= 0).

    Returns:
        The hits, best first.
    """
    ranked = sorted(hits, key=lambda h: (-h.score, *(-p for p in precedence(h.item))))
    out: list[Hit] = []
    start = 0
    while start < len(ranked):
        top = ranked[start].score
        end = start
        while end < len(ranked) and top - ranked[end].score <= near_tie:
            end += 1
        out.extend(
            sorted(ranked[start:end], key=lambda h: (*(-p for p in precedence(h.item)), -h.score))
        )
        start = end
    return out


def index_filter(tenant_id: str, query: Query, units: Sequence[str] | None) -> IndexFilter:
    """The index filter of a search: status, type, layer, every tag, and the readable units
    (None: every unit)."""
    must = [FieldMatch("status", any_of=list(query.statuses))]
    if query.types:
        must.append(FieldMatch("type", any_of=list(query.types)))
    if query.layers:
        must.append(FieldMatch("layer", any_of=list(query.layers)))
    must.extend(FieldMatch("tags", value=tag) for tag in query.tags)
    if units is not None:
        must.append(FieldMatch("org_unit_id", any_of=sorted(units)))
    return IndexFilter(tenant_id=tenant_id, must=must)


def _matches(item: res.KnowledgeItem, query: Query, units: Sequence[str] | None) -> bool:
    """Whether the item, as PostgreSQL holds it, passes the filters and is readable."""
    unit = item.org_unit.rsplit("/", 1)[1]
    return (
        enum_name(res.KnowledgeStatus, item.status, "KNOWLEDGE_STATUS_") in query.statuses
        and (
            not query.types
            or enum_name(res.KnowledgeType, item.type, "KNOWLEDGE_TYPE_") in query.types
        )
        and (
            not query.layers
            or enum_name(res.KnowledgeLayer, item.layer, "KNOWLEDGE_LAYER_") in query.layers
        )
        and set(query.tags) <= set(item.tags)
        and (units is None or unit in units)
    )


async def _no_hits() -> list[ScoredId]:
    return []


class KnowledgeSearch:
    """Searches one replica's index (see the module docstring).

    Args:
        db: Application-role database (tenant transactions under RLS).
        index: The replica's vector index.
        follower: Its follower (applied position, waits).
        embedder: Embeds the query (its query lane).
        encode_query: ``text →`` BM25 query vector.
        access: The authorization checks.
        tuning: Ranking and wait settings.
    """

    def __init__(
        self,
        db: Database,
        index: VectorIndex,
        follower: KnowledgeIndexFollower,
        embedder: EmbeddingPort,
        encode_query: Callable[[str], SparseVector],
        access: Access | None,
        tuning: SearchTuning | None = None,
    ) -> None:
        self.db = db
        self.index = index
        self.follower = follower
        self.embedder = embedder
        self.encode_query = encode_query
        self.access = access
        self.tuning = tuning or SearchTuning()
        self.after_answer = AfterAnswer()
        """Usage writes started after the answer (:meth:`_bill`), drained at close."""

    async def search(
        self, principal: Principal, query: Query, *, min_position: int | None = None
    ) -> Outcome:
        """Search the items ``principal`` may read.

        Args:
            principal: The caller; its tenant scopes everything.
            query: The validated query.
            min_position: A consistency token's outbox position, or None.

        Returns:
            At most ``query.limit`` hits, best first, and the index's state.

        Raises:
            Unavailable: The index did not reach ``min_position`` in time (reason
                ``CONSISTENCY_TOKEN_NOT_REACHED``).
        """
        tenant = principal.tenant_id
        units = (
            await self.access.readable_units(principal, tenant, "SearchKnowledge")
            if self.access is not None
            else None
        )
        if units is not None and not units:
            return Outcome(applied_position=self.follower.applied)
        return await self.search_units(tenant, query, units, min_position=min_position)

    async def search_units(
        self,
        tenant: str,
        query: Query,
        units: Sequence[str] | None,
        *,
        min_position: int | None = None,
    ) -> Outcome:
        """Search the items of ``units`` (None: every unit) of ``tenant``, with no
        authorization of its own: :meth:`search` narrows first (and the benchmark calls this
        directly).

        Raises:
            Unavailable: See :meth:`search`.
        """
        started = time.perf_counter()
        tuning = self.tuning
        dense_on = tuning.dense_weight > 0

        async def caught_up() -> bool:
            if min_position is not None:
                if not await self.follower.wait_for(min_position, tuning.token_wait_s):
                    raise Unavailable(
                        "this replica's search index has not reached the consistency token "
                        "yet; retry (another replica may have)",
                        reason=TOKEN_NOT_REACHED,
                        metadata={"applied_position": str(self.follower.applied)},
                    )
                return True
            return await self.follower.wait_for(await self.latest_position(tenant), tuning.wait_s)

        async def dense_vector() -> Embeddings:
            return await self.embedder.embed_query([query.text]) if dense_on else Embeddings()

        fresh, embedded, sparse_q = await asyncio.gather(
            caught_up(), dense_vector(), asyncio.to_thread(self.encode_query, query.text)
        )
        dense_q = embedded[0] if embedded else []
        applied = self.follower.applied
        flt = index_filter(tenant, query, units)
        n = max(tuning.candidates, query.limit)
        dense, lexical = await asyncio.gather(
            self.index.search_dense(dense_q, flt, n) if dense_on else _no_hits(),
            self.index.search_sparse(sparse_q, flt, n) if sparse_q.indices else _no_hits(),
        )
        rankings = [[(h.id, h.score) for h in dense], [(h.id, h.score) for h in lexical]]
        fused = (
            fusion.minmax(rankings, weights=[tuning.dense_weight, tuning.lexical_weight])
            if dense or lexical
            else []
        )
        hits = await self._read_hits(tenant, fused, query, units)
        ordered = order_hits(hits, tuning.near_tie)[: query.limit]
        # Billing is read hours later: its transaction does not delay the answer.
        self.after_answer.spawn(
            self._bill(tenant, embedded.total_tokens), "search.usage_not_written", tenant=tenant
        )
        log.debug("search", hits=len(ordered), ms=round((time.perf_counter() - started) * 1e3, 2))
        return Outcome(hits=ordered, stale=not fresh, applied_position=applied)

    async def _bill(self, tenant: str, query_tokens: int) -> None:
        """Record the search and its query's embedding as billable usage
        (:mod:`aeterna_common.usage`); 0 tokens: the vector came from the cache (no call) or
        dense retrieval is off."""

        async def work(conn: asyncpg.Connection) -> None:
            await usage.record_usage(
                conn,
                tenant,
                {
                    usage.KNOWLEDGE_SEARCHES: 1,
                    usage.EMBEDDING_CALLS: 1 if query_tokens else 0,
                    usage.EMBEDDING_TOKENS: query_tokens,
                },
            )

        await self.db.run(tenant, work)

    async def latest_position(self, tenant_id: str) -> int:
        """The tenant's last committed outbox position (0 when none)."""

        async def work(conn: asyncpg.Connection) -> int:
            value = await conn.fetchval(
                "SELECT position FROM outbox WHERE tenant_id = $1 ORDER BY position DESC LIMIT 1",
                tenant_id,
            )
            return int(value or 0)

        return await self.db.run(tenant_id, work, readonly=True)

    async def _read_hits(
        self,
        tenant: str,
        fused: Sequence[tuple[str, float]],
        query: Query,
        units: Sequence[str] | None,
    ) -> list[Hit]:
        """Group the fused chunk ranking by item (best chunk wins), re-reading items and
        chunks from PostgreSQL; items gone, changed past the filters, or unreadable drop."""
        if not fused:
            return []
        score_of = dict(fused)
        ids = [uuid.UUID(pid) for pid, _ in fused]
        model = self.embedder.model

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(
                await conn.fetch(
                    "SELECT DISTINCT ON (c.point_id) c.point_id, c.heading, c.body, "
                    "c.source_hash, i.* FROM knowledge_chunks c JOIN knowledge_items i "
                    "ON i.tenant_id = c.tenant_id AND i.id = c.item_id "
                    "WHERE c.tenant_id = $1 AND c.point_id = ANY($2::uuid[]) "
                    "AND c.embedding_model = $3 ORDER BY c.point_id, c.created_at DESC",
                    tenant,
                    ids,
                    model,
                )
            )

        rows = await self.db.run(tenant, work, readonly=True)
        best: dict[uuid.UUID, tuple[float, asyncpg.Record]] = {}
        for row in rows:
            score = score_of[str(row["point_id"])]
            kept = best.get(row["id"])
            if kept is None or score > kept[0]:
                best[row["id"]] = (score, row)
        hits: list[Hit] = []
        for score, row in best.values():
            item = items._item_pb(tenant, row)
            if not _matches(item, query, units):
                continue
            # A chunk of an older text (the index has not applied the edit yet) still finds
            # the item, but shows no section the item no longer has.
            stale = row["source_hash"] != source_hash(row["title"], row["summary"], row["content"])
            body = row["summary"] if stale else row["body"] or row["summary"]
            hits.append(
                Hit(
                    item=item,
                    score=round(score, 6),
                    section="" if stale else row["heading"],
                    snippet=snippet(body or row["title"]),
                )
            )
        return hits


@dataclass(slots=True)
class SearchParts:
    """What :func:`open_search` built: the search, its follower, index and embedder."""

    search: KnowledgeSearch
    follower: KnowledgeIndexFollower
    index: VectorIndex
    embedder: EmbeddingPort

    async def close(self) -> None:
        """Finish the pending usage writes, stop following, close the index (flushes it) and
        the embedder."""
        await self.search.after_answer.drain()
        await self.follower.close()
        with contextlib.suppress(Exception):
            await self.index.close()
        await self.embedder.close()


def build_embedder(settings: KnowledgeSettings) -> EmbeddingPort:
    """all-MiniLM-L6-v2 from ``settings.model_dir`` (blocks about a second while ONNX
    Runtime loads; memory's adapter and defaults, query lane included).

    Raises:
        StartupError: The model directory is missing or unreadable; the message names
            ``AETERNA_KNOWLEDGE_MODEL_DIR`` and ``make model``.
    """
    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder, ModelUnavailableError

    try:
        return MiniLMEmbedder(
            settings.model_dir,
            intra_op_threads=settings.embedding_threads,
            sessions=settings.embedding_sessions,
            quantize=settings.embedding_int8,
        )
    except ModelUnavailableError as exc:
        raise StartupError(
            f"the embedding model cannot be loaded from AETERNA_KNOWLEDGE_MODEL_DIR="
            f"{settings.model_dir.absolute()}: {exc}. Build it with `make model`."
        ) from exc


async def open_search(
    common: CommonSettings,
    settings: KnowledgeSettings,
    db: Database,
    indexer: Database,
    access: Access,
) -> SearchParts:
    """Load the model and open this replica's embedded index (Qdrant edge) with its
    follower; the follower is started by the app's ``prepare`` step.

    Raises:
        StartupError: The model cannot be loaded.
    """
    from aeterna_common.vectors.edge import EdgeVectorIndex

    embedder = await asyncio.to_thread(build_embedder, settings)
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    index = EdgeVectorIndex(str(settings.index_dir / "shard"), KEYWORD_FIELDS, FLOAT_FIELDS)
    encoder = BM25Encoder(avgdl=settings.bm25_avgdl)
    follower = KnowledgeIndexFollower(
        db,
        indexer,
        index,
        FileCursor(settings.index_dir / "applied_position"),
        embedder,
        encoder.encode_document,
        dsn=common.database_indexer_url,
        embed_parallel=settings.embedding_sessions,
    )
    search = KnowledgeSearch(
        db,
        index,
        follower,
        embedder,
        encoder.encode_query,
        access,
        SearchTuning(
            candidates=settings.search_candidates,
            dense_weight=settings.dense_weight,
            lexical_weight=settings.lexical_weight,
            wait_s=settings.read_wait_s,
            token_wait_s=settings.consistency_wait_s,
        ),
    )
    return SearchParts(search, follower, index, embedder)
