"""LoCoMo retrieval evaluation: baselines and the index-text / fusion research.

Library (reused by the service benchmark) and CLI::

    python bench/locomo_eval.py research --data /work/shared/data/locomo/locomo-dev.json
    python bench/locomo_eval.py baselines --data ...
    python bench/locomo_eval.py throughput --data ...

Task: for every question of categories 1-4 (category 5, adversarial, has no answer in the
conversation), rank the turns of its own conversation; a question's recall@k is the fraction of
its evidence ``dia_id``s in the top k, MRR@10 the reciprocal rank of the first evidence turn in
the top 10 (0 if none); both are averaged over questions.

The research part simulates exactly what the memory service can do: each turn is one memory
whose index text is built at write time from the memory's own content, its metadata
(``session_time``) and the content of the *preceding* memories of the same session; search
sees the question text only. Sparse scores use :mod:`aeterna_common.search.lexical` with IDF
computed the way Qdrant's ``Modifier.IDF`` does over the conversation's points, dense scores
use the ONNX MiniLM embedder, and the two rankings are fused with
:mod:`aeterna_common.search.fusion`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "libs" / "common"))

from aeterna_common.search import fusion  # noqa: E402
from aeterna_common.search.lexical import BM25Encoder  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/locomo/locomo-dev.json")
RESULTS = ROOT / "bench" / "results"
CATEGORIES = (1, 2, 3, 4)
KS = (1, 5, 10)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Turn:
    sample_id: str
    session: int
    position: int  # index within the session
    dia_id: str
    speaker: str
    text: str
    caption: str | None
    session_time: str

    @property
    def content(self) -> str:
        return turn_content({"speaker": self.speaker, "text": self.text, "blip_caption": self.caption})


@dataclass(frozen=True)
class Question:
    sample_id: str
    question: str
    evidence: tuple[str, ...]
    category: int
    answer: str = ""


@dataclass
class Conversation:
    sample_id: str
    turns: list[Turn] = field(default_factory=list)


def load_locomo(path: str | Path) -> list[dict[str, Any]]:
    """The raw LoCoMo samples (list of {sample_id, conversation, qa, ...})."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    return data


def turn_content(turn: Mapping[str, Any]) -> str:
    """Memory content of one turn: ``"{speaker}: {text}"`` plus ``" [image: {caption}]"``."""
    content = f"{turn['speaker']}: {turn['text']}"
    caption = turn.get("blip_caption")
    if caption:
        content += f" [image: {caption}]"
    return content


def _session_numbers(conv: Mapping[str, Any]) -> list[int]:
    nums = [int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k))]
    return sorted(n for n in nums if isinstance(conv[f"session_{n}"], list))


def conversation(sample: Mapping[str, Any]) -> Conversation:
    """All turns of a sample in session and turn order."""
    conv = sample["conversation"]
    out = Conversation(sample["sample_id"])
    for n in _session_numbers(conv):
        when = str(conv.get(f"session_{n}_date_time", ""))
        for pos, t in enumerate(conv[f"session_{n}"]):
            out.turns.append(
                Turn(sample["sample_id"], n, pos, t["dia_id"], t["speaker"], t["text"],
                     t.get("blip_caption") or None, when)
            )
    return out


def _normalise_evidence(raw: Sequence[str]) -> tuple[str, ...]:
    # A few dev items read "D8:6; D9:17" or "D:11:26"; split and repair those.
    out: list[str] = []
    for item in raw:
        for part in re.split(r"[;,\s]+", str(item)):
            part = re.sub(r"^D:(\d+:\d+)$", r"D\1", part.strip())
            if re.fullmatch(r"D\d+:\d+", part):
                out.append(part)
    return tuple(dict.fromkeys(out))


def questions(samples: Sequence[Mapping[str, Any]]) -> list[Question]:
    """Questions of categories 1-4 that have at least one well-formed evidence id."""
    out = []
    for s in samples:
        for qa in s["qa"]:
            if qa.get("category") not in CATEGORIES:
                continue
            ev = _normalise_evidence(qa.get("evidence", []))
            if ev:
                out.append(Question(s["sample_id"], qa["question"], ev, int(qa["category"]),
                                    str(qa.get("answer", ""))))
    return out


# --------------------------------------------------------------------------- metrics


def score(rankings: Sequence[Sequence[str]], qs: Sequence[Question]) -> dict[str, float]:
    """Mean recall@1/5/10 and MRR@10; ``rankings[i]`` is the dia_id ranking for ``qs[i]``."""
    if len(rankings) != len(qs):
        raise ValueError("one ranking per question")
    sums = dict.fromkeys([f"recall@{k}" for k in KS] + ["mrr@10"], 0.0)
    for ranking, q in zip(rankings, qs, strict=True):
        ev = set(q.evidence)
        for k in KS:
            sums[f"recall@{k}"] += len(ev & set(ranking[:k])) / len(ev)
        for rank, d in enumerate(ranking[:10], 1):
            if d in ev:
                sums["mrr@10"] += 1 / rank
                break
    n = max(len(qs), 1)
    return {k: round(v / n, 4) for k, v in sums.items()} | {"n": len(qs)}


# --------------------------------------------------------------------------- baselines


def bm25_baseline(samples: Sequence[Mapping[str, Any]], qs: Sequence[Question],
                  top_k: int = 10) -> list[list[str]]:
    """bm25s (Lucene BM25, English stop words, Snowball stemming) over each conversation."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    convs = {s["sample_id"]: conversation(s) for s in samples}
    retrievers: dict[str, Any] = {}
    for sid, conv in convs.items():
        corpus = [t.content for t in conv.turns]
        r = bm25s.BM25()
        r.index(bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False),
                show_progress=False)
        retrievers[sid] = r
    out = []
    for q in qs:
        conv = convs[q.sample_id]
        tokens = bm25s.tokenize([q.question], stopwords="en", stemmer=stemmer, show_progress=False)
        k = min(top_k, len(conv.turns))
        docs, scores = retrievers[q.sample_id].retrieve(tokens, k=k, show_progress=False)
        out.append([conv.turns[int(i)].dia_id for i, s in zip(docs[0], scores[0], strict=True)
                    if s > 0])
    return out


class EmbeddingCache:
    """Embeds with the ONNX MiniLM model, memoised on disk by text hash (research speed-up)."""

    def __init__(self, path: Path | None = None, embedder: Any = None) -> None:
        self.path = path
        self._embedder = embedder
        self._mem: dict[str, np.ndarray] = {}
        if path is not None and path.is_file():
            with np.load(path) as z:
                self._mem = {k: z[k] for k in z.files}
        self._dirty = False

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return self._embedder

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self._mem}.items())
        if missing:
            vecs = self.embedder.embed_sync([t for _, t in missing])
            for (k, _), v in zip(missing, vecs, strict=True):
                self._mem[k] = v
            self._dirty = True
        return np.stack([self._mem[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)

    def save(self) -> None:
        if self.path is not None and self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(tmp, **self._mem)
            tmp.replace(self.path)
            self._dirty = False


def dense_baseline(samples: Sequence[Mapping[str, Any]], qs: Sequence[Question],
                   embed: Callable[[Sequence[str]], np.ndarray], top_k: int = 10) -> list[list[str]]:
    """Cosine ranking of the turn contents by the question embedding (same MiniLM model)."""
    convs = {s["sample_id"]: conversation(s) for s in samples}
    qvec = embed([q.question for q in qs])
    out = []
    for sid, conv in convs.items():
        dvec = embed([t.content for t in conv.turns])
        for i, q in enumerate(qs):
            if q.sample_id == sid:
                order = np.argsort(-(dvec @ qvec[i]), kind="stable")[:top_k]
                out.append((i, [conv.turns[j].dia_id for j in order]))
    out.sort(key=lambda x: x[0])
    return [r for _, r in out]


# --------------------------------------------------------------------------- research


@dataclass(frozen=True)
class Recipe:
    """How the service builds a memory's index texts (write time) from what it knows."""

    dense_prev: int = 0  # preceding memories of the same session in the dense text
    sparse_prev: int = 0  # ... in the sparse text
    dense_next: int = 0  # following turns (only known when a batch carries them)
    sparse_next: int = 0
    dense_time: bool = False  # prefix the session_time metadata value
    sparse_time: bool = False
    current_first: bool = True  # the memory's own content before its context
    sparse_self_repeat: int = 1  # the memory's own content counted this many times (tf boost)

    def label(self) -> str:
        parts = [f"d{self.dense_prev}", f"s{self.sparse_prev}"]
        if self.dense_next or self.sparse_next:
            parts.append(f"next{self.dense_next}/{self.sparse_next}")
        if self.dense_time or self.sparse_time:
            parts.append(f"time{'D' if self.dense_time else ''}{'S' if self.sparse_time else ''}")
        if not self.current_first:
            parts.append("ctx-first")
        if self.sparse_self_repeat != 1:
            parts.append(f"self×{self.sparse_self_repeat}")
        return " ".join(parts)


def index_text(turns: Sequence[Turn], i: int, prev: int, nxt: int, with_time: bool,
               current_first: bool, self_repeat: int = 1) -> str:
    """Index text of ``turns[i]``: its content plus up to ``prev`` preceding (and ``nxt``
    following) contents of the same session, optionally prefixed by the session time."""
    t = turns[i]
    before = [u.content for u in turns[max(0, i - prev):i] if u.session == t.session]
    after = [u.content for u in turns[i + 1:i + 1 + nxt] if u.session == t.session]
    own = [t.content] * self_repeat
    parts = own + before + after if current_first else before + own + after
    text = "\n".join(parts)
    if with_time and t.session_time:
        text = f"[{t.session_time}] {text}"
    return text


def qdrant_idf(n_docs: int, df: int) -> float:
    """Qdrant ``Modifier.IDF``: ln(1 + (N - n + 0.5) / (n + 0.5))."""
    return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))


@dataclass
class ConvIndex:
    conv: Conversation
    dense: np.ndarray  # (n, 384)
    sparse: list[dict[int, float]]
    idf: dict[int, float]


def build_index(conv: Conversation, recipe: Recipe, encoder: BM25Encoder,
                embed: Callable[[Sequence[str]], np.ndarray]) -> ConvIndex:
    turns = conv.turns
    dtexts = [index_text(turns, i, recipe.dense_prev, recipe.dense_next, recipe.dense_time,
                         recipe.current_first) for i in range(len(turns))]
    stexts = [index_text(turns, i, recipe.sparse_prev, recipe.sparse_next, recipe.sparse_time,
                         recipe.current_first, recipe.sparse_self_repeat)
              for i in range(len(turns))]
    sparse = []
    for text in stexts:
        v = encoder.encode_document(text)
        sparse.append(dict(zip(v.indices, v.values, strict=True)))
    df = Counter(t for d in sparse for t in d)
    idf = {t: qdrant_idf(len(sparse), n) for t, n in df.items()}
    return ConvIndex(conv, embed(dtexts), sparse, idf)


def sparse_search(index: ConvIndex, query: dict[int, float], limit: int) -> list[tuple[str, float]]:
    scored = []
    for j, d in enumerate(index.sparse):
        s = sum(w * index.idf[t] * d[t] for t, w in query.items() if t in d)
        if s > 0:
            scored.append((index.conv.turns[j].dia_id, s))
    scored.sort(key=lambda x: -x[1])
    return scored[:limit]


def dense_search(index: ConvIndex, qvec: np.ndarray, limit: int) -> list[tuple[str, float]]:
    sims = index.dense @ qvec
    order = np.argsort(-sims, kind="stable")[:limit]
    return [(index.conv.turns[j].dia_id, float(sims[j])) for j in order]


@dataclass
class Runs:
    """Per-question dense and sparse result lists for one recipe (fusion is applied after)."""

    dense: list[list[tuple[str, float]]]
    sparse: list[list[tuple[str, float]]]


def run_recipe(samples: Sequence[Mapping[str, Any]], qs: Sequence[Question], recipe: Recipe,
               encoder: BM25Encoder, embed: Callable[[Sequence[str]], np.ndarray],
               prefetch: int = 50) -> Runs:
    indexes = {s["sample_id"]: build_index(conversation(s), recipe, encoder, embed) for s in samples}
    qvecs = embed([q.question for q in qs])
    dense, sparse = [], []
    for i, q in enumerate(qs):
        idx = indexes[q.sample_id]
        dense.append(dense_search(idx, qvecs[i], prefetch))
        qv = encoder.encode_query(q.question)
        sparse.append(sparse_search(idx, dict(zip(qv.indices, qv.values, strict=True)), prefetch))
    return Runs(dense, sparse)


FusionFn = Callable[[Sequence[tuple[str, float]], Sequence[tuple[str, float]]], list[tuple[str, float]]]


def fusions() -> dict[str, FusionFn]:
    """Candidate fusions of (dense, sparse) result lists."""
    out: dict[str, FusionFn] = {
        "dense": lambda d, s: list(d),
        "sparse": lambda d, s: list(s),
        "rrf k=60": lambda d, s: fusion.rrf([d, s], k=60),
        "dbsf": lambda d, s: fusion.dbsf([d, s]),
    }
    for w in (0.3, 0.5, 0.7):
        out[f"rrf k=60 wd={w}"] = lambda d, s, w=w: fusion.rrf([d, s], k=60, weights=[w, 1 - w])
        out[f"dbsf wd={w}"] = lambda d, s, w=w: fusion.dbsf([d, s], weights=[w, 1 - w])
        out[f"minmax wd={w}"] = lambda d, s, w=w: fusion.minmax([d, s], weights=[w, 1 - w])
    return out


def evaluate(runs: Runs, qs: Sequence[Question], fuse: FusionFn) -> dict[str, float]:
    ranks = [[d for d, _ in fuse(dn, sp)[:10]] for dn, sp in zip(runs.dense, runs.sparse, strict=True)]
    return score(ranks, qs)


def _fmt(name: str, m: Mapping[str, float]) -> str:
    return (f"{name:<44} {m['recall@1']:.3f}  {m['recall@5']:.3f}  {m['recall@10']:.3f}  "
            f"{m['mrr@10']:.3f}")


HEADER = f"{'setting':<44} R@1    R@5    R@10   MRR@10"


def research(data: Path, out: Path, cache: Path | None) -> dict[str, Any]:
    samples = load_locomo(data)
    qs = questions(samples)
    embed = EmbeddingCache(cache)
    results: dict[str, Any] = {"data": str(data), "questions": len(qs), "baselines": {},
                               "recipes": {}, "sensitivity": {}}
    print(f"{len(samples)} conversations, {len(qs)} questions (categories 1-4)")
    print(HEADER)
    base = {"bm25s": score(bm25_baseline(samples, qs), qs),
            "dense (turn content)": score(dense_baseline(samples, qs, embed), qs)}
    for name, m in base.items():
        print(_fmt(name, m))
    results["baselines"] = base
    embed.save()
    # ... (research grid filled in below)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("research", "baselines"):
        sp = sub.add_parser(name)
        sp.add_argument("--data", type=Path, default=DEFAULT_DATA)
        sp.add_argument("--out", type=Path, default=RESULTS / "locomo_research.json")
        sp.add_argument("--cache", type=Path, default=Path("/tmp/aeterna-locomo-emb.npz"),
                        help="on-disk embedding memo (speeds up reruns); '' to disable")
    args = p.parse_args(argv)
    cache = args.cache if str(args.cache) else None
    research(args.data, args.out, cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
