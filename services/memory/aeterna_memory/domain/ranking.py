"""Second-stage ranking of search candidates: time, people, episodes and order.

The first stage (dense + BM25 fused, :func:`aeterna_memory.domain.service.fuse_layers`) sees
each memory alone. Memories are not alone: they were said at a time, by someone, in an episode
(a session), in an order. This module re-ranks the fused candidates with that structure, using
only what the candidates themselves carry (their row, already authorised and re-read under
RLS), so it never reaches a memory the first stage did not return:

* **temporal**: a "when / how long / what year" query favours memories whose text holds a time
  expression; a query naming a date favours memories whose session time, stored event date
  (metadata ``event_date``, resolved at write time) or text names an overlapping date;
* **participant**: a query naming exactly one of the candidates' participants (metadata
  ``speaker``, ``author`` or ``user``) favours that participant's memories;
* **episode**: a memory gains a share of the best score of its episode (layer + user + session);
* **neighbour**: a hit hands a share of its score to the memories just before it in its episode
  (the turn that a reply answers often holds the fact).

Two rankers use these features: :class:`HandTunedRanker` (the fused score plus weighted
boosts, the fallback) and :class:`LambdaMartRanker` (a LightGBM LambdaMART model trained by
``make train-ranker``, loaded from a versioned file whose feature list must equal
:data:`FEATURES`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from aeterna_common.search import temporal
from aeterna_common.search.temporal import DateSpan

from aeterna_memory.domain.model import Memory, NewMemory

PARTICIPANT_KEYS = ("speaker", "author", "user")
"""Metadata keys that name who said or wrote a memory (first present wins)."""

TIME_KEYS = ("session_time",)
"""Metadata keys holding when a memory was said (its anchor for relative dates)."""

EVENT_DATE_KEY = "event_date"
"""Metadata key of the dates a memory's text names, resolved at write time (ISO 8601 days or
intervals, a list)."""

FEATURES: tuple[str, ...] = (
    "fused",
    "dense",
    "lexical_norm",
    "dense_rank_rr",
    "lexical_rank_rr",
    "in_both",
    "temporal_query",
    "has_time",
    "date_match",
    "participant_named",
    "participant_match",
    "episode_best",
    "episode_hits",
    "neighbour",
    "recency",
    "importance",
    "layer",
)
"""Feature names, in the column order of :func:`features` and of the ranker file."""

RANKER_VERSION = 2
"""Version of the ranker file format and feature semantics; bump when either changes.

2: the pool holds the top hits' session neighbours (episode expansion) before ranking."""


@dataclass(frozen=True, slots=True)
class RankInput:
    """One first-stage candidate with what the second stage reads of its row.

    Attributes:
        id: Memory id.
        fused: Fused first-stage score in [0, 1].
        dense: Raw dense score (cosine in [-1, 1]), 0 when not among the dense hits.
        lexical: Raw BM25 score (≥ 0), 0 when not among the lexical hits.
        dense_rank: 1-based rank in the dense list, 0 when absent.
        lexical_rank: 1-based rank in the lexical list, 0 when absent.
        content: The memory's text.
        metadata: The memory's metadata.
        episode: Episode key (layer, user, session), or None outside a session.
        order: Sort key of the memory within its episode (write time, then id).
        layer: Layer precedence 1 (most specific) .. 7.
        importance: Importance in [0, 1].
        age_days: Days since the memory was written (≥ 0).
    """

    id: str
    fused: float
    dense: float
    lexical: float
    dense_rank: int
    lexical_rank: int
    content: str
    metadata: Mapping[str, Any]
    episode: tuple[str, ...] | None
    order: tuple[Any, ...]
    layer: int
    importance: float
    age_days: float


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """What the second stage reads of the query, computed once per search.

    Attributes:
        temporal: The query asks when / how long / what year.
        dates: Explicit dates the query names.
        words: Lower-cased word tokens of the query.
    """

    temporal: bool
    dates: tuple[DateSpan, ...]
    words: frozenset[str]

    @staticmethod
    def of(text: str) -> QueryInfo:
        """Parse ``text`` once."""
        return QueryInfo(
            temporal=temporal.is_temporal_query(text),
            dates=temporal.explicit_dates(text),
            words=frozenset(_words(text)),
        )


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _words(text: str) -> list[str]:
    return [w.removesuffix("'s") for w in _WORD.findall(text.lower())]


def participant(metadata: Mapping[str, Any]) -> str | None:
    """Who said or wrote a memory: the first string value of :data:`PARTICIPANT_KEYS`."""
    for key in PARTICIPANT_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def memory_dates(item: RankInput) -> tuple[DateSpan, ...]:
    """Dates a memory is about: its stored event dates, its session day and the explicit
    dates of its text."""
    spans: list[DateSpan] = []
    stored = item.metadata.get(EVENT_DATE_KEY)
    for value in stored if isinstance(stored, list) else [stored] if stored else []:
        if isinstance(value, str) and (span := DateSpan.parse_iso(value)):
            spans.append(span)
    for key in TIME_KEYS:
        value = item.metadata.get(key)
        if isinstance(value, str) and (day := temporal.anchor_date(value)):
            spans.append(DateSpan.day(day))
    spans.extend(temporal.explicit_dates(item.content))
    return tuple(spans)


NEIGHBOUR_DECAY = 0.5
"""Share of a hit's score handed to the second memory before it (the first gets it all)."""

_COL = {name: i for i, name in enumerate(FEATURES)}


def features(query: QueryInfo, items: Sequence[RankInput]) -> np.ndarray:
    """The feature matrix of a candidate list, one row per item, columns :data:`FEATURES`.

    Every feature is computed from the candidates alone (the list is the authorised,
    re-read first-stage pool), so episode and neighbour values never reflect a memory the
    caller may not read.

    Args:
        query: The parsed query.
        items: The candidates, in first-stage order.

    Returns:
        A ``(len(items), len(FEATURES))`` float64 array.
    """
    n = len(items)
    out = np.zeros((n, len(FEATURES)), dtype=np.float64)
    if n == 0:
        return out
    # Column by column; the values are those of the row-by-row form the model was trained
    # with, to the bit (the arithmetic is the same IEEE operations).
    col = _COL
    out[:, col["fused"]] = [i.fused for i in items]
    out[:, col["dense"]] = [i.dense for i in items]
    lexical = np.array([i.lexical for i in items], dtype=np.float64)
    out[:, col["lexical_norm"]] = lexical / (float(lexical.max()) or 1.0)
    dense_rank = np.array([i.dense_rank for i in items], dtype=np.float64)
    lexical_rank = np.array([i.lexical_rank for i in items], dtype=np.float64)
    np.divide(1.0, dense_rank, out=out[:, col["dense_rank_rr"]], where=dense_rank > 0)
    np.divide(1.0, lexical_rank, out=out[:, col["lexical_rank_rr"]], where=lexical_rank > 0)
    out[:, col["in_both"]] = (dense_rank > 0) & (lexical_rank > 0)
    out[:, col["temporal_query"]] = float(query.temporal)
    out[:, col["has_time"]] = [temporal.has_time_expression(i.content) for i in items]
    if query.dates:
        out[:, col["date_match"]] = [
            any(q.overlaps(m) for q in query.dates for m in memory_dates(i)) for i in items
        ]
    # Participants are those of the candidates; the query names one when a participant's
    # first name is one of its words.
    who = [participant(i.metadata) for i in items]
    named = sorted(
        p for p in {w for w in who if w} if (first := _words(p)[:1]) and first[0] in query.words
    )
    if len(named) == 1:
        out[:, col["participant_named"]] = 1.0
        out[:, col["participant_match"]] = [w == named[0] for w in who]
    # Episodes: best fused score, number of candidates, and order for neighbours.
    episodes: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for k, item in enumerate(items):
        if item.episode is not None:
            episodes[item.episode].append(k)
    best = out[:, col["episode_best"]]
    count = out[:, col["episode_hits"]]
    neighbour = out[:, col["neighbour"]]
    for members in episodes.values():
        members.sort(key=lambda k: items[k].order)
        fused = [items[k].fused for k in members]
        top = max(fused)
        size = math.log1p(len(members))
        for pos, k in enumerate(members):
            best[k] = top
            count[k] = size
            shares = [s * NEIGHBOUR_DECAY**d for d, s in enumerate(fused[pos + 1 : pos + 3])]
            neighbour[k] = max(shares, default=0.0)
    out[:, col["recency"]] = [math.exp(-max(i.age_days, 0.0) / 30.0) for i in items]
    out[:, col["importance"]] = [i.importance for i in items]
    out[:, col["layer"]] = [i.layer for i in items]
    return out


class Ranker(Protocol):
    """Scores a candidate list; higher is better."""

    @property
    def name(self) -> str:
        """Short name for logs and benchmarks."""
        ...

    def scores(self, query: QueryInfo, items: Sequence[RankInput]) -> np.ndarray:
        """One score per item."""
        ...


@dataclass(frozen=True, slots=True)
class HandTunedRanker:
    """The fused score plus weighted boosts: the fallback ranker and the benchmark baseline.

    ``score = fused + temporal·[temporal query ∧ time expression] + date·[date match]
    + participant·[participant match] + episode·episode_best + neighbour·neighbour``.

    The defaults were chosen on the LoCoMo dev conversations with leave-one-conversation-out
    cross-validation (``bench/locomo_rank.py levers``).

    Attributes:
        temporal: Boost of a time expression for a temporal query.
        date: Boost of a date match.
        participant: Boost of the one named participant's memories.
        episode: Share of the episode's best score.
        neighbour: Share of the following hits' score.
    """

    temporal: float = 0.1
    date: float = 0.1
    participant: float = 0.05
    episode: float = 0.3
    neighbour: float = 0.3
    name: str = "hand-tuned"

    def scores(self, query: QueryInfo, items: Sequence[RankInput]) -> np.ndarray:
        """Boosted scores of ``items`` (see the class docstring)."""
        return self.scores_of(features(query, items))

    def scores_of(self, x: np.ndarray) -> np.ndarray:
        """Boosted scores from a feature matrix of :func:`features`."""
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(
            x[:, _COL["fused"]]
            + self.temporal * x[:, _COL["temporal_query"]] * x[:, _COL["has_time"]]
            + self.date * x[:, _COL["date_match"]]
            + self.participant * x[:, _COL["participant_match"]]
            + self.episode * x[:, _COL["episode_best"]]
            + self.neighbour * x[:, _COL["neighbour"]]
        )


class RankerFileError(RuntimeError):
    """The ranker file is missing, unreadable, of another version or feature list."""


DEFAULT_RANKER_FILE = "lambdamart.json"
"""The ranker file shipped in ``aeterna_memory/ranker/``."""


class TreeEnsemble:
    """A LightGBM tree ensemble evaluated in numpy, every tree at once.

    Prediction never calls into LightGBM: through Envoy on a loaded machine, its
    ``predict`` (numpy input, one thread) added 28 ms to the search p50 over the same
    search scored by the hand-tuned sum (``make bench-locomo``), against 0.3 ms per call in
    a quiet process; the cause was not isolated (an OpenMP region per call is the likely
    one). Here a call is a handful of vectorised numpy operations: QuickScorer's bit vectors
    (:meth:`_bitvectors`) when every tree has at most 64 leaves, else a walk of every
    (row, tree) pair a level at a time. The score of a row is the sum of its leaf values over
    the trees, LightGBM's raw score (which ``predict`` returns for ``lambdarank``).

    Numerical splits only (``decision_type`` ``<=``). A missing value goes the node's
    default side: NaN for ``missing_type`` NaN, NaN and 0 for Zero; with None, NaN counts
    as 0 (LightGBM's ``Tree::NumericalDecision``).

    Args:
        dump: ``Booster.dump_model()``.

    Raises:
        ValueError: The model has a split other than ``<=`` (a categorical feature).
    """

    def __init__(self, dump: Mapping[str, Any]) -> None:
        flat = [self._flatten(t["tree_structure"]) for t in dump["tree_info"]]
        # All trees' nodes in one array each; a node's children are global indices and a
        # leaf is its own child, so every row takes ``depth`` steps in every tree at once.
        offsets = np.cumsum([0] + [len(f) for f in flat])
        size = int(offsets[-1])
        self.feature = np.zeros(size, dtype=np.intp)
        self.threshold = np.zeros(size, dtype=np.float64)
        self.left = np.zeros(size, dtype=np.intp)
        self.right = np.zeros(size, dtype=np.intp)
        self.value = np.zeros(size, dtype=np.float64)
        self.default_left = np.zeros(size, dtype=bool)
        self.missing = np.zeros(size, dtype=np.int8)  # 0 None, 1 Zero, 2 NaN
        depth = 0
        for nodes, base in zip(flat, offsets[:-1], strict=True):
            for k, node in enumerate(nodes):
                g = int(base) + k
                depth = max(depth, node["depth"])
                if "leaf" in node:
                    self.left[g] = self.right[g] = g
                    self.value[g] = node["leaf"]
                    continue
                self.feature[g] = node["split_feature"]
                self.threshold[g] = node["threshold"]
                self.left[g] = int(base) + node["left"]
                self.right[g] = int(base) + node["right"]
                self.default_left[g] = node["default_left"]
                self.missing[g] = {"None": 0, "Zero": 1, "NaN": 2}[node["missing_type"]]
        self.depth = depth
        self.roots = np.asarray(offsets[:-1], dtype=np.intp)
        self._zero_missing = bool((self.missing == 1).any())
        self._leaf = self.left == np.arange(size)
        # Children side by side: ``_children[2 * node + went_left]``.
        self._children = np.stack([self.right, self.left], axis=1).ravel()
        self._bitvectors(flat, offsets)

    def _bitvectors(self, flat: Sequence[Sequence[Mapping[str, Any]]], offsets: np.ndarray) -> None:
        """Prepare the QuickScorer evaluation (Lucchese et al., "QuickScorer: a Fast Algorithm
        to Rank Documents with Additive Ensembles of Regression Trees", SIGIR 2015).

        A tree's leaves are numbered left to right, one bit each. A split whose test is false
        (the row goes right) rules out every leaf of its left subtree; the row's exit leaf is
        the leftmost leaf no false test ruled out, i.e. the lowest bit left in the AND of the
        masks of the false tests. That needs no walk: one comparison of every split against
        every row, one AND-reduction per tree and one lookup. Ensembles with a tree of more
        than 64 leaves keep the walk (``_masks`` is None).
        """
        most = max((sum("leaf" in n for n in nodes) for nodes in flat), default=0)
        widths = (np.uint16, np.uint32, np.uint64)
        dtype = next((d for d in widths if most <= np.iinfo(d).bits), None)
        self._masks: np.ndarray | None = None
        split: list[int] = []
        masks: list[int] = []
        starts: list[int] = []
        leaf_base: list[int] = []
        leaf_nodes: list[int] = []
        self._constant = 0.0
        for nodes, base in zip(flat, offsets[:-1], strict=True):
            if "leaf" in nodes[0]:
                self._constant += float(nodes[0]["leaf"])
                continue
            bit: dict[int, int] = {}
            for k, node in enumerate(nodes):  # pre-order: leaves come left to right
                if "leaf" in node:
                    bit[k] = len(bit)
            leaf_base.append(len(leaf_nodes))
            leaf_nodes.extend(int(base) + k for k in bit)
            everything = (1 << len(bit)) - 1

            def under(k: int, nodes: Sequence[Mapping[str, Any]] = nodes) -> list[int]:
                node = nodes[k]
                return [k] if "leaf" in node else under(node["left"]) + under(node["right"])

            starts.append(len(split))
            for k, node in enumerate(nodes):
                if "leaf" not in node:
                    split.append(int(base) + k)
                    masks.append(everything & ~sum(1 << bit[j] for j in under(node["left"])))
        if dtype is None or not split:
            return
        at = np.asarray(split, dtype=np.intp)
        self._split_feature = self.feature[at]
        self._split_threshold = self.threshold[at]
        self._masks = np.asarray(masks, dtype=dtype)
        self._all_leaves = dtype(np.iinfo(dtype).max)
        self._starts = np.asarray(starts, dtype=np.intp)
        self._leaf_base = np.asarray(leaf_base, dtype=np.intp)
        self._leaf_value = self.value[np.asarray(leaf_nodes, dtype=np.intp)]

    @staticmethod
    def _flatten(root: Mapping[str, Any]) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = []

        def visit(node: Mapping[str, Any], depth: int) -> int:
            k = len(nodes)
            nodes.append({"depth": depth})
            if "leaf_value" in node:
                nodes[k]["leaf"] = float(node["leaf_value"])
                return k
            if node.get("decision_type") != "<=":
                raise ValueError(f"unsupported split {node.get('decision_type')!r}")
            nodes[k].update(
                split_feature=int(node["split_feature"]),
                threshold=float(node["threshold"]),
                default_left=bool(node["default_left"]),
                missing_type=str(node["missing_type"]),
            )
            nodes[k]["left"] = visit(node["left_child"], depth + 1)
            nodes[k]["right"] = visit(node["right_child"], depth + 1)
            return k

        visit(root, 0)
        return nodes

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw scores of the rows of ``x`` (``(n, features)``) as an ``(n,)`` float64 array."""
        n, width = x.shape
        flat = np.ascontiguousarray(x, dtype=np.float64).ravel()
        if self._zero_missing or bool(np.isnan(flat).any()):
            return self._predict_missing(flat, n, width)
        if self._masks is not None:
            return self._predict_bitvectors(flat.reshape(n, width))
        return self._predict_walk(flat, n, width)

    def _predict_bitvectors(self, x: np.ndarray) -> np.ndarray:
        """:meth:`predict` by QuickScorer (see :meth:`_bitvectors`); no missing values."""
        assert self._masks is not None
        false = x[:, self._split_feature] > self._split_threshold  # (rows, splits)
        kept = np.where(false, self._masks, self._all_leaves)
        alive = np.bitwise_and.reduceat(kept, self._starts, axis=1)  # (rows, trees)
        # The lowest set bit, isolated (two's complement), is an exact power of two.
        lowest = (alive & (~alive + alive.dtype.type(1))).astype(np.float64)
        leaf = np.frexp(lowest)[1] - 1 + self._leaf_base
        return np.asarray(self._leaf_value[leaf].sum(axis=1) + self._constant, dtype=np.float64)

    def _predict_walk(self, flat: np.ndarray, n: int, width: int) -> np.ndarray:
        """:meth:`predict` walking every (row, tree) pair down a level at a time."""
        # One (row, tree) walker per pair; those that reached a leaf drop out of the work,
        # so a call costs the mean depth rather than the deepest tree's.
        trees = len(self.roots)
        node = np.tile(self.roots, n)
        row = np.repeat(np.arange(n, dtype=np.intp) * width, trees)
        active = np.arange(n * trees)
        for _ in range(self.depth):
            at = node[active]
            went_left = flat[row[active] + self.feature[at]] <= self.threshold[at]
            step = self._children[2 * at + went_left]
            node[active] = step
            active = active[~self._leaf[step]]
            if not active.size:
                break
        return np.asarray(self.value[node].reshape(n, trees).sum(axis=1), dtype=np.float64)

    def _predict_missing(self, flat: np.ndarray, n: int, width: int) -> np.ndarray:
        """:meth:`predict` with LightGBM's missing-value rules (NaN inputs, Zero splits)."""
        base = (np.arange(n, dtype=np.intp) * width)[:, None]
        node = np.broadcast_to(self.roots, (n, len(self.roots)))
        for _ in range(self.depth):
            v = flat[base + self.feature[node]]
            nan = np.isnan(v)
            miss = self.missing[node]
            v = np.where(nan & (miss == 0), 0.0, v)
            missing = (nan & (miss == 2)) | ((miss == 1) & (nan | (np.abs(v) <= 1e-35)))
            go_left = np.where(missing, self.default_left[node], v <= self.threshold[node])
            node = np.where(go_left, self.left[node], self.right[node])
        return np.asarray(self.value[node].sum(axis=1), dtype=np.float64)


class LambdaMartRanker:
    """A LightGBM LambdaMART model over :data:`FEATURES` (Burges, "From RankNet to LambdaRank
    to LambdaMART: An Overview", MSR-TR-2010-82).

    The file is JSON: ``{"version", "features", "model"}`` with ``model`` LightGBM's text
    format. LightGBM reads the file; prediction walks the trees in numpy
    (:class:`TreeEnsemble`), single-threaded and deterministic: the same file and features
    give the same scores in every process.

    Args:
        document: The parsed file.
        source: Where it came from (for error messages).

    Raises:
        RankerFileError: Version or feature list differ from the code's, or the model does
            not load.
    """

    name = "lambdamart"

    def __init__(self, document: Mapping[str, Any], source: str = "<memory>") -> None:
        import lightgbm

        version = document.get("version")
        if version != RANKER_VERSION:
            raise RankerFileError(
                f"ranker file {source} has version {version!r}, this code reads version "
                f"{RANKER_VERSION}; retrain it with `make train-ranker`"
            )
        names = list(document.get("features") or [])
        if names != list(FEATURES):
            raise RankerFileError(
                f"ranker file {source} was trained on features {names}, this code computes "
                f"{list(FEATURES)}; retrain it with `make train-ranker`"
            )
        try:
            self.booster = lightgbm.Booster(model_str=str(document["model"]))
        except (KeyError, lightgbm.basic.LightGBMError) as exc:
            raise RankerFileError(
                f"ranker file {source} holds no loadable model ({exc}); retrain it with "
                "`make train-ranker`"
            ) from exc
        if self.booster.num_feature() != len(FEATURES):
            raise RankerFileError(
                f"ranker file {source}: the model reads {self.booster.num_feature()} features, "
                f"the list names {len(FEATURES)}"
            )
        try:
            self.trees = TreeEnsemble(self.booster.dump_model())
        except (KeyError, ValueError) as exc:
            raise RankerFileError(f"ranker file {source}: unsupported model ({exc})") from exc
        self.document = dict(document)

    @classmethod
    def load(cls, path: Path | None = None) -> LambdaMartRanker:
        """Load a ranker file (default: the one shipped with the package).

        Raises:
            RankerFileError: See the class.
        """
        try:
            if path is None:
                ref = resources.files("aeterna_memory.ranker").joinpath(DEFAULT_RANKER_FILE)
                text, source = ref.read_text(), f"aeterna_memory/ranker/{DEFAULT_RANKER_FILE}"
            else:
                text, source = path.read_text(), str(path)
            document = json.loads(text)
        except (OSError, ValueError) as exc:
            raise RankerFileError(f"cannot read the ranker file: {exc}") from exc
        if not isinstance(document, dict):
            raise RankerFileError(f"ranker file {source} is not a JSON object")
        return cls(document, source)

    def scores(self, query: QueryInfo, items: Sequence[RankInput]) -> np.ndarray:
        """Model scores of ``items``."""
        return self.scores_of(features(query, items))

    def scores_of(self, x: np.ndarray) -> np.ndarray:
        """Model scores from a feature matrix of :func:`features`."""
        if len(x) == 0:
            return np.zeros(0)
        return self.trees.predict(x)


def rerank(ranker: Ranker, query: QueryInfo, items: Sequence[RankInput]) -> list[int]:
    """Indices of ``items`` best first by ``ranker``; ties go to the higher fused score, then
    the smaller id, so that replicas whose indexes list equal scores in another order agree."""
    s = ranker.scores(query, items)
    return sorted(range(len(items)), key=lambda k: (-float(s[k]), -items[k].fused, items[k].id))


def competition_ranks(scores: Sequence[tuple[str, float]]) -> dict[str, int]:
    """1-based standard competition ranks ("1224"): one plus the number of strictly higher
    scores, so equal scores share a rank whatever order an index listed them in."""
    values = sorted((s for _, s in scores), reverse=True)
    first: dict[float, int] = {}
    for i, v in enumerate(values, 1):
        first.setdefault(v, i)
    return {mid: first[s] for mid, s in scores}


def age_days(created: datetime, now: datetime) -> float:
    """Days from ``created`` to ``now`` (≥ 0)."""
    return max((now - created).total_seconds() / 86400.0, 0.0)


def event_date_metadata(content: str, metadata: Mapping[str, Any]) -> list[str]:
    """The ``event_date`` values of a memory being written: the dates its text names
    relative to its session time (``metadata["session_time"]``), as ISO 8601 days or
    intervals (:meth:`~aeterna_common.search.DateSpan.iso`).

    Only relative expressions ("yesterday", "last week", "two years ago") are stored: explicit
    dates are read from the text at query time anyway.

    Args:
        content: The memory's text.
        metadata: Its metadata as given by the writer.

    Returns:
        The resolved dates, possibly empty (no anchor time, or no relative expression).
    """
    for key in TIME_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and (anchor := temporal.anchor_date(value)):
            return [s.iso() for s in temporal.resolve_relative(content, anchor)]
    return []


def with_event_dates(memory: NewMemory) -> NewMemory:
    """``memory`` with :data:`EVENT_DATE_KEY` metadata when its text states dates relative to
    its session time and the writer gave none (a writer's own value is kept)."""
    if EVENT_DATE_KEY in memory.metadata:
        return memory
    dates = event_date_metadata(memory.content, memory.metadata)
    if not dates:
        return memory
    return dataclasses.replace(memory, metadata={**memory.metadata, EVENT_DATE_KEY: dates})


class _Scored(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def dense_score(self) -> float: ...
    @property
    def lexical_score(self) -> float: ...
    @property
    def dense_rank(self) -> int: ...
    @property
    def lexical_rank(self) -> int: ...


def episode_of(memory: Memory) -> tuple[str, ...] | None:
    """The episode of a memory: its layer, user and session, or None outside a session."""
    if not memory.scope.session_id:
        return None
    return (memory.layer.name, memory.scope.user_id or "", memory.scope.session_id)


def rank_inputs(
    candidates: Sequence[_Scored], memories: Sequence[Memory], now: datetime | None = None
) -> list[RankInput]:
    """Second-stage inputs of first-stage candidates and their re-read rows (same order).

    The order within an episode is the write order (``created_at``, then id): a session's
    turns are written in the order they were said.

    Args:
        candidates: First-stage candidates (``aeterna_memory.domain.service.Candidate``).
        memories: Their rows.
        now: Reference time of the recency feature (default: the newest row's write time,
            so that a ranking does not drift with the wall clock and replicas agree).
    """
    if now is None:
        now = max((m.created_at for m in memories), default=datetime.now(UTC))
    return [
        RankInput(
            id=c.id,
            fused=c.score,
            dense=c.dense_score,
            lexical=c.lexical_score,
            dense_rank=c.dense_rank,
            lexical_rank=c.lexical_rank,
            content=m.content,
            metadata=m.metadata,
            episode=episode_of(m),
            order=(m.created_at, m.id),
            layer=int(m.layer),
            importance=m.importance,
            age_days=age_days(m.created_at, now),
        )
        for c, m in zip(candidates, memories, strict=True)
    ]
