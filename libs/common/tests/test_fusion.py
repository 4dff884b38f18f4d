from __future__ import annotations

import statistics

import pytest
from aeterna_common.search.fusion import dbsf, minmax, rrf

DENSE = [("a", 0.9), ("b", 0.8), ("c", 0.3)]
SPARSE = [("c", 12.0), ("a", 4.0), ("d", 1.0)]


def test_rrf_plain() -> None:
    fused = dict(rrf([DENSE, SPARSE]))
    assert fused == pytest.approx(
        {"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 63}
    )
    assert [d for d, _ in rrf([DENSE, SPARSE])] == ["a", "c", "b", "d"]


def test_rrf_weighted_and_normalised() -> None:
    fused = rrf([DENSE, SPARSE], weights=[0.25, 0.75], normalize=True)
    assert fused[0][0] == "c"
    assert all(0 < s <= 1 for _, s in fused)
    top = rrf([[("x", 1.0)], [("x", 5.0)]], normalize=True)
    assert top == [("x", pytest.approx(1.0))]
    assert dict(rrf([DENSE], k=1))["a"] == pytest.approx(0.5)


def test_dbsf_matches_three_sigma_normalisation() -> None:
    fused = dict(dbsf([DENSE, SPARSE]))
    scores = [s for _, s in SPARSE]
    mean, std = statistics.mean(scores), statistics.stdev(scores)
    c_sparse = (12.0 - (mean - 3 * std)) / (6 * std)
    d_scores = [s for _, s in DENSE]
    dm, ds = statistics.mean(d_scores), statistics.stdev(d_scores)
    c_dense = (0.3 - (dm - 3 * ds)) / (6 * ds)
    assert fused["c"] == pytest.approx((c_dense + c_sparse) / 2)
    assert all(0 <= s <= 1 for s in fused.values())
    assert dict(dbsf([[("x", 3.0)]])) == {"x": 0.5}
    # An id missing from a list gets 0 from it.
    assert dict(dbsf([[("x", 3.0)], []])) == {"x": 0.25}


def test_minmax_convex_combination() -> None:
    fused = dict(minmax([DENSE, SPARSE], weights=[0.4, 0.6]))
    assert fused["a"] == pytest.approx(0.4 * 1.0 + 0.6 * (3.0 / 11.0))
    assert fused["c"] == pytest.approx(0.6 * 1.0)
    assert fused["d"] == pytest.approx(0.0)
    assert fused["b"] == pytest.approx(0.4 * 0.5 / 0.6)
    assert max(fused.values()) <= 1.0
    assert minmax([[("x", 2.0), ("y", 2.0)]]) == [("x", 1.0), ("y", 1.0)]


def test_ties_keep_first_seen_order() -> None:
    assert [d for d, _ in rrf([[("b", 1.0)], [("a", 1.0)]])] == ["b", "a"]


def test_empty_inputs() -> None:
    assert rrf([[], []]) == []
    assert minmax([[], []]) == []
    assert dbsf([]) == []


@pytest.mark.parametrize("fn", [rrf, dbsf, minmax])
def test_bad_weights(fn: object) -> None:
    with pytest.raises(ValueError):
        fn([DENSE, SPARSE], weights=[1.0])  # type: ignore[operator]
    with pytest.raises(ValueError):
        fn([DENSE, SPARSE], weights=[0.0, 0.0])  # type: ignore[operator]
    with pytest.raises(ValueError):
        fn([DENSE, SPARSE], weights=[-1.0, 2.0])  # type: ignore[operator]


def test_rrf_bad_k() -> None:
    with pytest.raises(ValueError):
        rrf([DENSE], k=0)
