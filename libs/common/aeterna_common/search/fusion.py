"""Fusion of ranked result lists (dense and lexical) into one ranking.

Every function takes ``rankings``: result lists of ``(id, score)`` pairs, best first, each id at
most once per list, and optional per-list ``weights`` (non-negative, at least one positive).
It returns the union of the ids as ``(id, fused_score)`` best first; ties keep the order in
which ids were first seen (list by list), so the output is deterministic.

Score ranges, for a user-facing ``min_score``:

* :func:`rrf` — raw sum of ``w / (k + rank)``, in ``(0, sum(w) / (k + 1)]``; with
  ``normalize=True`` divided by that maximum, so in ``(0, 1]`` and 1.0 means "first in every
  list".
* :func:`dbsf` and :func:`minmax` — weighted mean of per-list scores mapped to [0, 1], so in
  [0, 1]; an id missing from a list gets 0 from that list.

Note that every fused score is relative to the candidate lists: the best hit of an unrelated
query can still score high, so ``min_score`` on a fused score trims tails, it does not judge
absolute relevance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Id = TypeVar("Id", bound=Hashable)
Ranking = Sequence[tuple[Id, float]]

RRF_K = 60
"""RRF rank constant (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet
and individual Rank Learning Methods", SIGIR 2009)."""


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} rankings")
    if any(w < 0 or not math.isfinite(w) for w in weights) or not any(w > 0 for w in weights):
        raise ValueError("weights must be finite, non-negative and not all zero")
    return [float(w) for w in weights]


def _sorted(scores: dict[Id, float]) -> list[tuple[Id, float]]:
    # sorted() is stable, so equal scores keep first-seen order.
    return sorted(scores.items(), key=lambda item: -item[1])


def rrf(
    rankings: Sequence[Ranking[Id]],
    *,
    k: float = RRF_K,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> list[tuple[Id, float]]:
    """(Weighted) reciprocal rank fusion: ``score(d) = Σ_i w_i / (k + rank_i(d))``.

    Cormack et al. (SIGIR 2009) with rank starting at 1 and k = 60; the weights make it the
    weighted RRF of e.g. Elasticsearch's ``rrf`` retriever / Qdrant's weighted RRF. Input
    scores are ignored, only positions count.

    Args:
        rankings: Result lists, best first.
        k: Rank constant, > 0.
        weights: One weight per list (default all 1).
        normalize: Divide by the best possible score ``Σ w / (k + 1)`` so the range is (0, 1].

    Returns:
        Fused ``(id, score)`` best first (see the module docstring for the score range).

    Raises:
        ValueError: ``k`` <= 0 or bad weights.
    """
    if k <= 0:
        raise ValueError("k must be > 0")
    ws = _weights(len(rankings), weights)
    scores: dict[Id, float] = {}
    for w, ranking in zip(ws, rankings, strict=True):
        for rank, (doc, _) in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + w / (k + rank)
    if normalize and scores:
        best = sum(ws) / (k + 1)
        scores = {d: s / best for d, s in scores.items()}
    return _sorted(scores)


def _dbsf_norm(scores: list[float]) -> Callable[[float], float]:
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    if std == 0.0:
        # One result, or all equal: nothing tells them apart, place them mid-range.
        return lambda s: 0.5
    low = mean - 3 * std
    return lambda s: min(1.0, max(0.0, (s - low) / (6 * std)))


def _minmax_norm(scores: list[float]) -> Callable[[float], float]:
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return lambda s: 1.0
    return lambda s: (s - lo) / (hi - lo)


def _score_fusion(
    rankings: Sequence[Ranking[Id]],
    weights: Sequence[float] | None,
    norm: Callable[[list[float]], Callable[[float], float]],
) -> list[tuple[Id, float]]:
    ws = _weights(len(rankings), weights)
    total = sum(ws)
    scores: dict[Id, float] = {}
    for w, ranking in zip(ws, rankings, strict=True):
        if not ranking:
            continue
        f = norm([s for _, s in ranking])
        for doc, s in ranking:
            scores[doc] = scores.get(doc, 0.0) + w * f(s) / total
    return _sorted(scores)


def dbsf(
    rankings: Sequence[Ranking[Id]], *, weights: Sequence[float] | None = None
) -> list[tuple[Id, float]]:
    """Distribution-based score fusion (Qdrant ``Fusion.DBSF``), optionally weighted.

    Each list's scores are mapped linearly from [mean − 3σ, mean + 3σ] (σ: sample standard
    deviation of that list) to [0, 1] and clipped (M. Mazzeschi, "Distribution-based Score
    Fusion", 2023, as implemented by Qdrant); a list whose scores are all equal maps to 0.5.
    The fused score is the weighted mean over lists.

    Args:
        rankings: Result lists with comparable scores within each list, best first.
        weights: One weight per list (default all 1).

    Returns:
        Fused ``(id, score)`` best first, scores in [0, 1].

    Raises:
        ValueError: Bad weights.
    """
    return _score_fusion(rankings, weights, _dbsf_norm)


def minmax(
    rankings: Sequence[Ranking[Id]], *, weights: Sequence[float] | None = None
) -> list[tuple[Id, float]]:
    """Convex combination of min-max normalised scores.

    Each list's scores are mapped linearly from [min, max] to [0, 1] (a list whose scores are
    all equal maps to 1); the fused score is the weighted mean over lists (Bruch, Gai &
    Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", ACM TOIS 2023).

    Args:
        rankings: Result lists, best first.
        weights: One weight per list (default all 1).

    Returns:
        Fused ``(id, score)`` best first, scores in [0, 1].

    Raises:
        ValueError: Bad weights.
    """
    return _score_fusion(rankings, weights, _minmax_norm)
