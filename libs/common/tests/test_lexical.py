from __future__ import annotations

import math
import subprocess
import sys

import pytest
from aeterna_common.search import lexical
from aeterna_common.search.lexical import (
    DEFAULT_AVGDL,
    K1,
    BM25Encoder,
    encode_document,
    encode_query,
    term_id,
    tokenize,
)
from aeterna_common.vectors.port import SparseVector


def as_dict(v: SparseVector) -> dict[int, float]:
    return dict(zip(v.indices, v.values, strict=True))


def test_tokenize_folds_stops_and_stems() -> None:
    assert tokenize("Caroline's PAINTINGS were running, weren't they?") == [
        "carolin",
        "paint",
        "run",
    ]
    # Curly apostrophes are contractions too, so "don’t" is a stop word.
    assert tokenize("I don’t know") == ["know"]
    assert tokenize("Café ＬＧＢＴＱ group, 2 kids in 2023!") == [
        "café",
        "lgbtq",
        "group",
        "2",
        "kid",
        "2023",
    ]
    assert tokenize("a b c I") == []
    assert tokenize("") == []


def test_tokenize_options() -> None:
    enc = BM25Encoder(stem=False, stopwords=())
    assert enc.tokenize("The paintings") == ["the", "paintings"]


def test_term_ids_are_stable_u32() -> None:
    # BLAKE2b-32 of the UTF-8 term: fixed values, never Python's salted hash().
    assert term_id("paint") == 3861671845
    assert term_id("carolin") == 662147489
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from aeterna_common.search.lexical import term_id; print(term_id('paint'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=str(__import__("pathlib").Path(lexical.__file__).parents[2]),
    )
    assert int(out.stdout) == 3861671845
    assert all(0 <= term_id(t) < 2**32 for t in ("", "x", "é" * 50))


def test_document_values_follow_bm25_saturation() -> None:
    enc = BM25Encoder(k1=1.2, b=0.75, avgdl=4.0)
    vec = enc.encode_document("paint paint paint hike")  # dl = 4 = avgdl
    assert list(vec.indices) == sorted(set(vec.indices))
    got = as_dict(vec)
    assert got[term_id("paint")] == pytest.approx(3 * 2.2 / (3 + 1.2))
    assert got[term_id("hike")] == pytest.approx(1.0)  # tf 1 at average length
    longer = as_dict(enc.encode_document("hike " + "museum " * 12))
    assert longer[term_id("hike")] < 1.0
    assert all(0 < v < K1 + 1 for v in got.values())


def test_query_is_unit_weights() -> None:
    q = encode_query("What did Caroline paint? Caroline painted!")
    assert as_dict(q) == {term_id("carolin"): 1.0, term_id("paint"): 1.0}
    assert encode_query("what is it?") == SparseVector(indices=[], values=[])


def test_context_is_bm25f_weighted() -> None:
    enc = BM25Encoder(avgdl=DEFAULT_AVGDL, context_weight=0.5)
    own = "Melanie: I painted a lake sunrise"
    with_ctx = as_dict(enc.encode_document(own, ["Caroline: did you go camping?"]))
    alone = as_dict(enc.encode_document(own))
    assert term_id("camp") in with_ctx
    assert with_ctx[term_id("camp")] < with_ctx[term_id("lake")]
    # Context makes the document longer, so its own terms saturate a bit less.
    assert with_ctx[term_id("lake")] < alone[term_id("lake")]
    zero = BM25Encoder(avgdl=DEFAULT_AVGDL, context_weight=0.0)
    assert as_dict(zero.encode_document(own, ["camping trip"])) | {} == {
        **alone,
        term_id("camp"): 0.0,
        term_id("trip"): 0.0,
    }


def test_scores_match_bm25s_lucene() -> None:
    bm25s = pytest.importorskip("bm25s")
    docs = [
        "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.",
        "Melanie: I painted that lake sunrise last year, painting calms me.",
        "Caroline: The support group helped me accept myself.",
        "Melanie: We went camping in the mountains with the kids.",
    ]
    question = "When did Melanie paint a sunrise at the lake?"
    corpus = [tokenize(d) for d in docs]
    avgdl = sum(map(len, corpus)) / len(corpus)
    enc = BM25Encoder(avgdl=avgdl)
    vectors = [as_dict(enc.encode_document(d)) for d in docs]
    n_docs = len(docs)
    df: dict[int, int] = {}
    for v in vectors:
        for t in v:
            df[t] = df.get(t, 0) + 1
    query = as_dict(enc.encode_query(question))
    # What the store computes with Modifier.IDF.
    ours = [
        sum(
            w * math.log(1 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) * v[t]
            for t, w in query.items()
            if t in v
        )
        for v in vectors
    ]
    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    retriever.index(corpus, show_progress=False)
    theirs = retriever.get_scores(tokenize(question))
    # Lucene drops BM25's constant (k1 + 1) factor; everything else is identical.
    assert ours == pytest.approx([s * (K1 + 1) for s in theirs], rel=1e-5)
    assert max(range(4), key=ours.__getitem__) == 1


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        BM25Encoder(avgdl=0)
    with pytest.raises(ValueError):
        BM25Encoder(b=1.5)
    with pytest.raises(ValueError):
        BM25Encoder(context_weight=2)


def test_empty_document() -> None:
    assert encode_document("the and of") == SparseVector(indices=[], values=[])
