"""Contract suite of the VectorIndex port, run against both adapters.

``edge``: qdrant-edge-py in a temporary directory. ``local``: qdrant-client local mode
(``:memory:``), which stands in for a Qdrant server.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from aeterna_common.vectors import (
    EdgeVectorIndex,
    FieldMatch,
    IndexFilter,
    IndexPoint,
    QdrantVectorIndex,
    SparseVector,
    VectorIndex,
    VectorIndexLockedError,
)
from qdrant_client import AsyncQdrantClient

DIM = 8
KEYWORDS = ["layer", "user_id", "session_id", "tags", "metadata.speaker"]
FLOATS = ["created_at"]
A, B = "tenant-a", "tenant-b"


def uid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


def unit(*xs: float) -> list[float]:
    v = np.zeros(DIM, dtype=np.float64)
    v[: len(xs)] = xs
    return [float(x) for x in v / np.linalg.norm(v)]


def point(
    n: int,
    dense: list[float],
    tenant: str = A,
    sparse: SparseVector | None = None,
    **payload: object,
) -> IndexPoint:
    return IndexPoint(
        id=uid(n),
        dense=dense,
        sparse=sparse or SparseVector([1000 + n], [1.0]),
        payload={"tenant_id": tenant, **payload},
    )


Factory = Callable[[], VectorIndex]


@pytest.fixture(params=["edge", "local"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Yield a factory of fresh indexes of one backend; closes them afterwards."""
    made: list[VectorIndex] = []

    def factory() -> VectorIndex:
        index: VectorIndex
        if request.param == "edge":
            index = EdgeVectorIndex(str(tmp_path / f"shard{len(made)}"), KEYWORDS, FLOATS)
        else:
            index = QdrantVectorIndex(
                AsyncQdrantClient(location=":memory:"), "memories", KEYWORDS, FLOATS
            )
        made.append(index)
        return index

    yield factory
    for index in made:
        await index.close()


@pytest.fixture
async def index(make: Factory) -> VectorIndex:
    idx = make()
    await idx.ensure_collection(DIM)
    return idx


async def test_upsert_retrieve_count(index: VectorIndex) -> None:
    await index.ensure_collection(DIM)  # idempotent
    pts = [point(i, unit(1, i)) for i in range(5)]
    await index.upsert(pts)
    assert await index.count(IndexFilter(A)) == 5
    got = await index.retrieve_dense([uid(0), uid(3), uid(99)])
    assert set(got) == {uid(0), uid(3)}
    assert np.allclose(got[uid(3)], unit(1, 3), atol=1e-6)
    assert await index.retrieve_dense([]) == {}


async def test_idempotent_upsert_and_delete(index: VectorIndex) -> None:
    p = point(1, unit(1), layer="USER")
    await index.upsert([p])
    await index.upsert([p])
    await index.upsert([point(1, unit(0, 1), layer="AGENT")])  # replace vector and payload
    assert await index.count(IndexFilter(A)) == 1
    assert np.allclose((await index.retrieve_dense([uid(1)]))[uid(1)], unit(0, 1), atol=1e-6)
    assert await index.count(IndexFilter(A, must=[FieldMatch("layer", value="USER")])) == 0
    await index.delete([uid(1), uid(42)])
    await index.delete([uid(1)])
    await index.delete([])
    assert await index.count(IndexFilter(A)) == 0
    assert await index.all_ids() == set()


async def test_ids_are_canonical_uuids(index: VectorIndex) -> None:
    upper = str(uuid.UUID(int=7)).upper()
    await index.upsert([IndexPoint(upper, unit(1), SparseVector([1], [1.0]), {"tenant_id": A})])
    assert await index.all_ids(A) == {upper.lower()}
    with pytest.raises(ValueError, match="UUID"):
        await index.upsert([IndexPoint("not-a-uuid", unit(1), SparseVector([], []), {})])


async def test_tenant_isolation(index: VectorIndex) -> None:
    same = unit(1, 1)
    await index.upsert([point(1, same, A), point(2, same, B), point(3, unit(0, 0, 1), A)])
    hits = await index.search_dense(same, IndexFilter(A), 10)
    assert [h.id for h in hits] == [uid(1), uid(3)]
    sparse = SparseVector([1001, 1002, 1003], [1.0, 1.0, 1.0])
    assert {h.id for h in await index.search_sparse(sparse, IndexFilter(A), 10)} == {
        uid(1),
        uid(3),
    }
    assert [h.id for h in await index.search_dense(same, IndexFilter(B), 10)] == [uid(2)]
    assert await index.count(IndexFilter(B)) == 1
    assert await index.all_ids(A) == {uid(1), uid(3)}
    assert await index.all_ids(B) == {uid(2)}
    assert await index.all_ids() == {uid(1), uid(2), uid(3)}
    assert await index.all_ids("tenant-c") == set()


async def _filter_fixture(index: VectorIndex) -> None:
    await index.upsert(
        [
            point(
                1,
                unit(1),
                layer="USER",
                user_id="u1",
                tags=["red", "blue"],
                created_at=100.0,
                metadata={"speaker": "alice"},
            ),
            point(
                2,
                unit(1),
                layer="USER",
                user_id="u2",
                tags=["green"],
                created_at=200.0,
                metadata={"speaker": "bob"},
            ),
            point(
                3,
                unit(1),
                layer="AGENT",
                user_id="u1",
                tags=[],
                created_at=300.0,
                metadata={"speaker": "alice"},
            ),
            point(4, unit(1), layer="SESSION", user_id="u1", session_id="s1", created_at=400.0),
            point(5, unit(1), B, layer="USER", user_id="u1", tags=["red"], created_at=150.0),
        ]
    )


async def ids_for(index: VectorIndex, *must: FieldMatch, groups: object = ()) -> set[str]:
    flt = IndexFilter(A, must=must, should_groups=groups)  # type: ignore[arg-type]
    hits = await index.search_dense(unit(1), flt, 100)
    assert await index.count(flt) == len(hits)
    return {h.id for h in hits}


async def test_field_match_forms(index: VectorIndex) -> None:
    await _filter_fixture(index)
    ids = [uid(i) for i in range(6)]
    assert await ids_for(index, FieldMatch("layer", value="USER")) == {ids[1], ids[2]}
    assert await ids_for(index, FieldMatch("tags", value="red")) == {ids[1]}
    assert await ids_for(index, FieldMatch("tags", any_of=["red", "green"])) == {ids[1], ids[2]}
    assert await ids_for(index, FieldMatch("layer", any_of=["AGENT", "SESSION"])) == {
        ids[3],
        ids[4],
    }
    assert await ids_for(index, FieldMatch("created_at", gte=200.0, lte=300.0)) == {
        ids[2],
        ids[3],
    }
    assert await ids_for(index, FieldMatch("created_at", gte=350.0)) == {ids[4]}
    assert await ids_for(index, FieldMatch("created_at", lte=100.0)) == {ids[1]}
    assert await ids_for(index, FieldMatch("layer", value="USER", negate=True)) == {
        ids[3],
        ids[4],
    }
    assert await ids_for(index, FieldMatch("tags", any_of=["red"], negate=True)) == {
        ids[2],
        ids[3],
        ids[4],
    }
    assert await ids_for(index, FieldMatch("metadata.speaker", value="alice")) == {ids[1], ids[3]}
    assert await ids_for(
        index, FieldMatch("user_id", value="u1"), FieldMatch("created_at", gte=150.0)
    ) == {ids[3], ids[4]}
    # any_of=[] matches nothing; negated it matches everything.
    assert await ids_for(index, FieldMatch("tags", any_of=[])) == set()
    assert len(await ids_for(index, FieldMatch("tags", any_of=[], negate=True))) == 4


async def test_should_groups(index: VectorIndex) -> None:
    await _filter_fixture(index)
    ids = [uid(i) for i in range(6)]
    # (AGENT and u1) or (SESSION and s1), and separately (speaker alice or no red tag).
    layers = [
        [FieldMatch("layer", value="AGENT"), FieldMatch("user_id", value="u1")],
        [FieldMatch("layer", value="SESSION"), FieldMatch("session_id", value="s1")],
    ]
    assert await ids_for(index, groups=[layers]) == {ids[3], ids[4]}
    second = [
        [FieldMatch("metadata.speaker", value="alice")],
        [FieldMatch("created_at", gte=350.0)],
    ]
    assert await ids_for(index, groups=[layers, second]) == {ids[3], ids[4]}
    assert await ids_for(index, FieldMatch("user_id", value="u1"), groups=[second]) == {
        ids[1],
        ids[3],
        ids[4],
    }
    with_negation = [
        [FieldMatch("layer", value="USER", negate=True), FieldMatch("tags", any_of=[])],
    ]
    assert await ids_for(index, groups=[with_negation]) == set()
    # An empty group can hold for no point; a group with an empty conjunction always holds.
    assert await ids_for(index, groups=[[]]) == set()
    assert len(await ids_for(index, groups=[[[]]])) == 4


async def test_malformed_field_match(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await index.count(IndexFilter(A, must=[FieldMatch("layer")]))
    with pytest.raises(ValueError, match="exactly one"):
        await index.count(IndexFilter(A, must=[FieldMatch("layer", value="x", gte=1.0)]))
    with pytest.raises(ValueError, match="tenant"):
        await index.count(IndexFilter(""))


async def test_dense_order_is_cosine(index: VectorIndex) -> None:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(30, DIM))
    await index.upsert([point(i, (v / np.linalg.norm(v)).tolist()) for i, v in enumerate(vecs)])
    q = rng.normal(size=DIM)
    q /= np.linalg.norm(q)
    hits = await index.search_dense(q.tolist(), IndexFilter(A), 5)
    cos = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)) @ q
    order = np.argsort(-cos)[:5]
    assert [h.id for h in hits] == [uid(int(i)) for i in order]
    assert np.allclose([h.score for h in hits], cos[order], atol=1e-5)


def idf(n_docs: int, df: int) -> float:
    """Robertson-Sparck Jones IDF as Qdrant's Modifier.IDF computes it."""
    return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))


async def test_sparse_bm25_idf(index: VectorIndex) -> None:
    common, rare = 1, 2
    # Tenant A: 4 docs, all with the common term, one with the rare term.
    await index.upsert(
        [
            point(1, unit(1), A, SparseVector([common, rare], [0.8, 1.2])),
            point(2, unit(1), A, SparseVector([common], [1.5])),
            point(3, unit(1), A, SparseVector([common, 7], [1.0, 1.0])),
            point(4, unit(1), A, SparseVector([common], [0.5])),
            # Tenant B holds many rare-term docs: they must not change A's IDF.
            *[point(10 + i, unit(1), B, SparseVector([rare], [1.0])) for i in range(6)],
        ]
    )
    query = SparseVector([common, rare], [1.0, 1.0])
    hits = await index.search_sparse(query, IndexFilter(A), 10)
    assert hits[0].id == uid(1)  # the rare term outweighs a higher common-term weight
    n = 4
    expected = {
        uid(1): 0.8 * idf(n, 4) + 1.2 * idf(n, 1),
        uid(2): 1.5 * idf(n, 4),
        uid(3): 1.0 * idf(n, 4),
        uid(4): 0.5 * idf(n, 4),
    }
    assert [h.id for h in hits] == sorted(expected, key=lambda k: -expected[k])
    for h in hits:
        assert h.score == pytest.approx(expected[h.id], rel=1e-5)
    # Deleting a doc updates the statistics at once (tenant-scoped IDF counts live points).
    await index.delete([uid(3)])
    hits = await index.search_sparse(SparseVector([rare], [1.0]), IndexFilter(A), 10)
    assert [(h.id, round(h.score, 5)) for h in hits] == [(uid(1), round(1.2 * idf(3, 1), 5))]
    assert await index.search_sparse(SparseVector([], []), IndexFilter(A), 10) == []
    assert await index.search_sparse(SparseVector([99999], [1.0]), IndexFilter(A), 10) == []
    with pytest.raises(ValueError, match="length"):
        await index.search_sparse(SparseVector([1, 2], [1.0]), IndexFilter(A), 10)
    with pytest.raises(ValueError, match="length"):
        await index.upsert([point(50, unit(1), A, SparseVector([1, 2], [1.0]))])


async def test_edge_reopen_keeps_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "shard")
    first = EdgeVectorIndex(path, KEYWORDS, FLOATS)
    await first.ensure_collection(DIM)
    await first.upsert([point(i, unit(1, i), A if i % 2 else B, tags=[f"t{i}"]) for i in range(20)])
    await first.delete([uid(0)])
    before = await first.search_dense(unit(1, 3), IndexFilter(A), 5)
    await first.close()
    await first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await first.count(IndexFilter(A))

    second = EdgeVectorIndex(path, KEYWORDS, FLOATS)
    await second.ensure_collection(DIM)
    try:
        assert await second.all_ids() == {uid(i) for i in range(1, 20)}
        assert await second.search_dense(unit(1, 3), IndexFilter(A), 5) == before
        assert await second.count(IndexFilter(A, must=[FieldMatch("tags", value="t3")])) == 1
    finally:
        await second.close()


async def test_edge_second_open_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "shard")
    first = EdgeVectorIndex(path, KEYWORDS)
    await first.ensure_collection(DIM)
    try:
        second = EdgeVectorIndex(path, KEYWORDS)
        with pytest.raises(VectorIndexLockedError, match=str(tmp_path / "shard")):
            await second.ensure_collection(DIM)
    finally:
        await first.close()
    third = EdgeVectorIndex(path, KEYWORDS)
    await third.ensure_collection(DIM)  # the lock is released by close()
    await third.close()


async def test_edge_writes_and_listings_go_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine holds the GIL for a whole call, so the adapter splits writes and listings;
    # every point must still arrive, and a bad id must stop the write before any chunk.
    from aeterna_common.vectors import edge

    monkeypatch.setattr(edge, "_EDGE_SCROLL_PAGE", 4)
    index = EdgeVectorIndex(str(tmp_path / "shard"), KEYWORDS, FLOATS, write_chunk=3)
    await index.ensure_collection(DIM)
    try:
        await index.upsert([point(i, unit(1, i), user_id=f"u{i}") for i in range(17)])
        assert await index.count(IndexFilter(A)) == 17
        assert await index.all_ids() == {uid(i) for i in range(17)}
        assert (await index.payload_values("user_id"))[uid(16)] == "u16"
        bad = [point(100 + i, unit(1, i)) for i in range(6)]
        bad.append(
            IndexPoint(id="not-a-uuid", dense=unit(1), sparse=SparseVector([], []), payload={})
        )
        with pytest.raises(ValueError, match="not-a-uuid"):
            await index.upsert(bad)
        assert await index.count(IndexFilter(A)) == 17
        with pytest.raises(ValueError, match="nope"):
            await index.delete([uid(0), "nope"])
        await index.delete([uid(i) for i in range(10)])
        assert await index.all_ids() == {uid(i) for i in range(10, 17)}
        with pytest.raises(ValueError, match="write_chunk"):
            EdgeVectorIndex(str(tmp_path / "other"), KEYWORDS, write_chunk=0)
    finally:
        await index.close()


async def test_use_before_ensure_collection_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ensure_collection"):
        await EdgeVectorIndex(str(tmp_path / "x"), KEYWORDS).count(IndexFilter(A))


async def test_congruence_between_adapters(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    n, dim = 600, 32
    centers = rng.normal(size=(8, dim))
    vecs = centers[rng.integers(0, 8, n)] + 0.5 * rng.normal(size=(n, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    zipf = 1.0 / np.arange(1, 301)
    zipf /= zipf.sum()
    pts = []
    for i in range(n):
        terms = np.unique(rng.choice(300, rng.integers(3, 10), p=zipf))
        pts.append(
            point(
                i,
                vecs[i].tolist(),
                A if i % 3 else B,
                SparseVector(terms.tolist(), rng.uniform(0.3, 2.0, len(terms)).tolist()),
                user_id=f"u{i % 7}",
                tags=[f"t{i % 5}", f"t{i % 11}"],
            )
        )
    edge = EdgeVectorIndex(str(tmp_path / "edge"), KEYWORDS, FLOATS)
    local = QdrantVectorIndex(AsyncQdrantClient(location=":memory:"), "c", KEYWORDS, FLOATS)
    try:
        for idx in (edge, local):
            await idx.ensure_collection(dim)
            await idx.upsert(pts)
            await idx.delete([uid(i) for i in range(0, n, 10)])
        filters = [
            IndexFilter(A),
            IndexFilter(B),
            IndexFilter(A, must=[FieldMatch("user_id", value="u3")]),
            IndexFilter(A, must=[FieldMatch("tags", any_of=["t1", "t4"], negate=True)]),
        ]
        for k in range(20):
            q = rng.normal(size=dim)
            q /= np.linalg.norm(q)
            terms = np.unique(rng.choice(300, 3, p=zipf)).tolist()
            sq = SparseVector(terms, [1.0] * len(terms))
            flt = filters[k % len(filters)]
            d_edge = await edge.search_dense(q.tolist(), flt, 10)
            d_local = await local.search_dense(q.tolist(), flt, 10)
            assert [h.id for h in d_edge] == [h.id for h in d_local]
            assert np.allclose([h.score for h in d_edge], [h.score for h in d_local], atol=1e-5)
            s_edge = await edge.search_sparse(sq, flt, 10)
            s_local = await local.search_sparse(sq, flt, 10)
            assert [h.id for h in s_edge] == [h.id for h in s_local]
            assert np.allclose([h.score for h in s_edge], [h.score for h in s_local], rtol=1e-5)
            assert await edge.count(flt) == await local.count(flt)
        assert await edge.all_ids(A) == await local.all_ids(A)
    finally:
        await edge.close()
        await local.close()


async def test_payload_values(index: VectorIndex) -> None:
    await index.upsert([point(i, unit(1, i), revision=i + 1) for i in range(3)])
    await index.upsert([point(3, unit(1, 3))])
    assert await index.payload_values("revision") == {
        uid(0): 1,
        uid(1): 2,
        uid(2): 3,
        uid(3): None,
    }
