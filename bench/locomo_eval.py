"""LoCoMo retrieval evaluation: baselines and the index-text / fusion research.

Library (reused by the service benchmark) and CLI::

    python bench/locomo_eval.py research --data bench/data/locomo-dev.json
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
import json
import math
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aeterna_cli import locomo
from aeterna_common.search import fusion
from aeterna_common.search.lexical import SNOWBALL_ENGLISH_STOPWORDS, BM25Encoder

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_DATA = ROOT / "bench" / "data" / "locomo-dev.json"
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
        return turn_content(
            {"speaker": self.speaker, "text": self.text, "blip_caption": self.caption}
        )


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


load_locomo = locomo.load
"""The raw LoCoMo samples (list of {sample_id, conversation, qa, ...})."""

turn_content = locomo.turn_content
"""Memory content of one turn, exactly as ``aeterna import locomo`` stores it."""


def _model_dir() -> Path:
    """The model directory of `make model` (AETERNA_MEMORY_MODEL_DIR, as the service reads it)."""
    from aeterna_memory.settings import MemorySettings

    return MemorySettings().model_dir


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
                Turn(
                    sample["sample_id"],
                    n,
                    pos,
                    t["dia_id"],
                    t["speaker"],
                    t["text"],
                    t.get("blip_caption") or None,
                    when,
                )
            )
    return out


_EVIDENCE = re.compile(r"^D:?(\d+):0*(\d+)$")


def normalise_evidence(raw: Sequence[str]) -> tuple[str, ...]:
    """Canonical evidence ids ``D{session}:{turn}`` (no leading zeros) of a raw list.

    A few items read "D8:6; D9:17" (two ids), "D:11:26" or "D30:05"; they are split and
    repaired, so "D30:05" == "D30:5". Parts that are no id at all ("D") are dropped.
    """
    out: list[str] = []
    for item in raw:
        for part in re.split(r"[;,\s]+", str(item)):
            if m := _EVIDENCE.fullmatch(part.strip()):
                out.append(f"D{int(m.group(1))}:{int(m.group(2))}")
    return tuple(dict.fromkeys(out))


def canonical_id(dia_id: str) -> str:
    """A turn's dia_id in the canonical form of :func:`normalise_evidence`."""
    ids = normalise_evidence([dia_id])
    return ids[0] if ids else dia_id


@dataclass
class EvidenceStats:
    """What the scorer did to the evidence ids: kept, repaired, dropped."""

    kept: int = 0
    repaired: int = 0
    dropped: list[str] = field(default_factory=list)
    questions_without_evidence: int = 0


def questions(
    samples: Sequence[Mapping[str, Any]], stats: EvidenceStats | None = None
) -> list[Question]:
    """Questions of categories 1-4 with at least one evidence id naming a turn.

    Evidence ids are normalised (:func:`normalise_evidence`); an id that names no turn of its
    conversation is dropped and counted in ``stats.dropped``, and a question left without
    evidence is skipped and counted.
    """
    stats = stats if stats is not None else EvidenceStats()
    out = []
    for s in samples:
        turns = {canonical_id(t.dia_id) for t in conversation(s).turns}
        for qa in s["qa"]:
            if qa.get("category") not in CATEGORIES:
                continue
            raw = [str(e) for e in qa.get("evidence", [])]
            norm = normalise_evidence(raw)
            stats.repaired += sum(1 for r in raw if r.strip() not in norm)
            ev = tuple(e for e in norm if e in turns)
            stats.dropped.extend(f"{s['sample_id']}:{e}" for e in norm if e not in turns)
            stats.dropped.extend(
                f"{s['sample_id']}:{r}" for r in raw if not normalise_evidence([r])
            )
            stats.kept += len(ev)
            if ev:
                out.append(
                    Question(
                        s["sample_id"],
                        qa["question"],
                        ev,
                        int(qa["category"]),
                        str(qa.get("answer", "")),
                    )
                )
            else:
                stats.questions_without_evidence += 1
    return out


# --------------------------------------------------------------------------- metrics


def score(rankings: Sequence[Sequence[str]], qs: Sequence[Question]) -> dict[str, float]:
    """Mean recall@1/5/10 and MRR@10; ``rankings[i]`` is the dia_id ranking for ``qs[i]``."""
    if len(rankings) != len(qs):
        raise ValueError("one ranking per question")
    sums = dict.fromkeys([f"recall@{k}" for k in KS] + ["mrr@10"], 0.0)
    for raw, q in zip(rankings, qs, strict=True):
        ev = set(q.evidence)
        ranking = [canonical_id(d) for d in raw]
        for k in KS:
            sums[f"recall@{k}"] += len(ev & set(ranking[:k])) / len(ev)
        for rank, d in enumerate(ranking[:10], 1):
            if d in ev:
                sums["mrr@10"] += 1 / rank
                break
    n = max(len(qs), 1)
    return {k: round(v / n, 4) for k, v in sums.items()} | {"n": len(qs)}


# --------------------------------------------------------------------------- baselines


def bm25_baseline(
    samples: Sequence[Mapping[str, Any]], qs: Sequence[Question], top_k: int = 10
) -> list[list[str]]:
    """bm25s (Lucene BM25, English stop words, Snowball stemming) over each conversation."""
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    convs = {s["sample_id"]: conversation(s) for s in samples}
    retrievers: dict[str, Any] = {}
    for sid, conv in convs.items():
        corpus = [t.content for t in conv.turns]
        r = bm25s.BM25()
        r.index(
            bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False),
            show_progress=False,
        )
        retrievers[sid] = r
    out = []
    for q in qs:
        conv = convs[q.sample_id]
        tokens = bm25s.tokenize([q.question], stopwords="en", stemmer=stemmer, show_progress=False)
        k = min(top_k, len(conv.turns))
        docs, scores = retrievers[q.sample_id].retrieve(tokens, k=k, show_progress=False)
        out.append(
            [conv.turns[int(i)].dia_id for i, s in zip(docs[0], scores[0], strict=True) if s > 0]
        )
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

            self._embedder = MiniLMEmbedder(_model_dir())
        return self._embedder

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
        missing = sorted(
            {k: t for k, t in zip(keys, texts, strict=True) if k not in self._mem}.items()
        )
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


def dense_baseline(
    samples: Sequence[Mapping[str, Any]],
    qs: Sequence[Question],
    embed: Callable[[Sequence[str]], np.ndarray],
    top_k: int = 10,
) -> list[list[str]]:
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
    """How the service builds a memory's index texts at write time, and how it fuses.

    Only what the service knows when the memory is written is used: the memory's content, its
    ``session_time`` metadata value and the contents of the preceding memories of the same
    session. ``next_turns`` > 0 (following turns) is only possible when a batch create carries
    them, so it is reported but not recommended.
    """

    dense_prev: int = 2  # preceding memories of the same session in the dense text
    sparse_prev: int = 2  # ... in the sparse context
    dense_time: bool = True  # "[{session_time}] " prefix on the dense text
    sparse_time: bool = True  # session_time as a sparse context text
    next_turns: int = 0  # following memories (dense and sparse), batch only
    context_weight: float = 0.5  # BM25F weight of the sparse context
    avgdl: float = 30.0  # ≈ the measured mean BM25F length of these texts (31 tokens)
    stem: bool = True
    stopwords: str = "snowball"  # or "lucene" (bm25s' 33-word list)
    fusion: str = "minmax"  # rrf | dbsf | minmax
    dense_weight: float = 0.4  # fusion weight of the dense list (sparse gets 1 - this)
    rrf_k: int = 60
    prefetch: int = 50  # results fetched per list before fusion

    def label(self, base: Recipe | None = None) -> str:
        if base is None:
            return ", ".join(f"{k}={v}" for k, v in self.__dict__.items())
        diff = [f"{k}={v}" for k, v in self.__dict__.items() if getattr(base, k) != v]
        return ", ".join(diff) or "chosen"

    def encoder(self) -> BM25Encoder:
        stop: Any = SNOWBALL_ENGLISH_STOPWORDS
        if self.stopwords == "lucene":
            from bm25s.stopwords import STOPWORDS_EN

            stop = STOPWORDS_EN
        return BM25Encoder(
            avgdl=self.avgdl, stem=self.stem, stopwords=stop, context_weight=self.context_weight
        )

    def fuse(
        self, dense: Sequence[tuple[str, float]], sparse: Sequence[tuple[str, float]]
    ) -> list[tuple[str, float]]:
        w = [self.dense_weight, 1 - self.dense_weight]
        if self.fusion == "rrf":
            return fusion.rrf([dense, sparse], k=self.rrf_k, weights=w)
        if self.fusion == "dbsf":
            return fusion.dbsf([dense, sparse], weights=w)
        if self.fusion == "minmax":
            return fusion.minmax([dense, sparse], weights=w)
        raise ValueError(self.fusion)


def _same_session(
    turns: Sequence[Turn], i: int, prev: int, nxt: int
) -> tuple[list[str], list[str]]:
    t = turns[i]
    before = [u.content for u in turns[max(0, i - prev) : i] if u.session == t.session]
    after = [u.content for u in turns[i + 1 : i + 1 + nxt] if u.session == t.session]
    return before, after


def index_texts(turns: Sequence[Turn], i: int, recipe: Recipe) -> tuple[str, str, list[str]]:
    """Write-time index texts of ``turns[i]``: (dense text, sparse text, sparse context).

    Dense: ``"[{session_time}] {content}"`` then the preceding contents of the same session,
    oldest first, one per line. Sparse: the content, with ``[session_time, *preceding]`` as
    BM25F context.
    """
    t = turns[i]
    d_before, d_after = _same_session(turns, i, recipe.dense_prev, recipe.next_turns)
    s_before, s_after = _same_session(turns, i, recipe.sparse_prev, recipe.next_turns)
    dense = "\n".join([t.content, *d_before, *d_after])
    if recipe.dense_time and t.session_time:
        dense = f"[{t.session_time}] {dense}"
    context = (
        ([t.session_time] if recipe.sparse_time and t.session_time else []) + s_before + s_after
    )
    return dense, t.content, context


def qdrant_idf(n_docs: int, df: int) -> float:
    """Qdrant ``Modifier.IDF``: ln(1 + (N - n + 0.5) / (n + 0.5))."""
    return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))


@dataclass
class ConvIndex:
    conv: Conversation
    dense: np.ndarray  # (n, 384)
    sparse: list[dict[int, float]]
    idf: dict[int, float]
    mean_dl: float


def build_index(
    conv: Conversation,
    recipe: Recipe,
    encoder: BM25Encoder,
    embed: Callable[[Sequence[str]], np.ndarray],
) -> ConvIndex:
    texts = [index_texts(conv.turns, i, recipe) for i in range(len(conv.turns))]
    sparse, dls = [], []
    for _, text, ctx in texts:
        v = encoder.encode_document(text, ctx)
        sparse.append(dict(zip(v.indices, v.values, strict=True)))
        dls.append(
            len(encoder.tokenize(text))
            + encoder.context_weight * sum(len(encoder.tokenize(c)) for c in ctx)
        )
    df = Counter(t for d in sparse for t in d)
    idf = {t: qdrant_idf(len(sparse), n) for t, n in df.items()}
    return ConvIndex(conv, embed([d for d, _, _ in texts]), sparse, idf, float(np.mean(dls)))


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
    """Per-question dense and sparse result lists of one recipe (fusion is applied after)."""

    dense: list[list[tuple[str, float]]]
    sparse: list[list[tuple[str, float]]]
    mean_dl: float


def run_recipe(
    samples: Sequence[Mapping[str, Any]],
    qs: Sequence[Question],
    recipe: Recipe,
    embed: Callable[[Sequence[str]], np.ndarray],
) -> Runs:
    """Index every conversation as the service would and run both searches per question."""
    encoder = recipe.encoder()
    indexes = {
        s["sample_id"]: build_index(conversation(s), recipe, encoder, embed) for s in samples
    }
    qvecs = embed([q.question for q in qs])
    dense, sparse = [], []
    for i, q in enumerate(qs):
        idx = indexes[q.sample_id]
        dense.append(dense_search(idx, qvecs[i], recipe.prefetch))
        qv = encoder.encode_query(q.question)
        sparse.append(
            sparse_search(idx, dict(zip(qv.indices, qv.values, strict=True)), recipe.prefetch)
        )
    n = sum(len(ix.conv.turns) for ix in indexes.values())
    mean_dl = sum(ix.mean_dl * len(ix.conv.turns) for ix in indexes.values()) / n
    return Runs(dense, sparse, mean_dl)


def evaluate(
    runs: Runs, qs: Sequence[Question], recipe: Recipe, mode: str = "fused"
) -> dict[str, float]:
    """Scores of one mode: ``fused`` (the recipe's fusion), ``dense`` or ``sparse`` only."""
    ranks = []
    for dn, sp in zip(runs.dense, runs.sparse, strict=True):
        hits = recipe.fuse(dn, sp) if mode == "fused" else dn if mode == "dense" else sp
        ranks.append([d for d, _ in hits[:10]])
    return score(ranks, qs)


def per_category(rankings: Sequence[Sequence[str]], qs: Sequence[Question]) -> dict[str, Any]:
    out = {}
    for c in CATEGORIES:
        idx = [i for i, q in enumerate(qs) if q.category == c]
        out[str(c)] = score([rankings[i] for i in idx], [qs[i] for i in idx])
    return out


def _fmt(name: str, m: Mapping[str, float]) -> str:
    return (
        f"{name:<58} {m['recall@1']:.3f}  {m['recall@5']:.3f}  {m['recall@10']:.3f}  "
        f"{m['mrr@10']:.3f}"
    )


HEADER = f"{'setting':<58} R@1    R@5    R@10   MRR@10"

CHOSEN = Recipe()

# One-at-a-time changes from CHOSEN (the sensitivity table).
SENSITIVITY: list[dict[str, Any]] = [
    {"dense_prev": 0},
    {"dense_prev": 1},
    {"dense_prev": 3},
    {"sparse_prev": 0},
    {"sparse_prev": 1},
    {"sparse_prev": 3},
    {"dense_time": False},
    {"sparse_time": False},
    {"dense_time": False, "sparse_time": False},
    {"context_weight": 0.25},
    {"context_weight": 0.75},
    {"context_weight": 1.0},
    {"avgdl": 15.0},
    {"avgdl": 20.0},
    {"avgdl": 45.0},
    {"avgdl": 60.0},
    {"stem": False},
    {"stopwords": "lucene"},
    {"dense_weight": 0.2},
    {"dense_weight": 0.3},
    {"dense_weight": 0.5},
    {"dense_weight": 0.6},
    {"fusion": "dbsf"},
    {"fusion": "dbsf", "dense_weight": 0.3},
    {"fusion": "rrf"},
    {"fusion": "rrf", "dense_weight": 0.3},
    {"fusion": "rrf", "dense_weight": 0.5},
    {"prefetch": 20},
    {"prefetch": 100},
    {"next_turns": 1},
]


def research(data: Path, out: Path, cache: Path | None) -> dict[str, Any]:
    from dataclasses import replace

    samples = load_locomo(data)
    qs = questions(samples)
    embed = EmbeddingCache(cache)
    res: dict[str, Any] = {
        "data": str(data),
        "questions": len(qs),
        "baselines": {},
        "chosen": {},
        "sensitivity": [],
    }
    print(f"{len(samples)} conversations, {len(qs)} questions (categories 1-4)\n")
    print(HEADER)

    def show(name: str, m: Mapping[str, float]) -> None:
        print(_fmt(name, m), flush=True)

    base = {
        "bm25s (turn content)": score(bm25_baseline(samples, qs), qs),
        "dense (turn content)": score(dense_baseline(samples, qs, embed), qs),
    }
    plain = replace(CHOSEN, dense_prev=0, sparse_prev=0, dense_time=False, sparse_time=False)
    runs = run_recipe(samples, qs, plain, embed)
    base["lexical encoder (turn content)"] = evaluate(runs, qs, plain, "sparse")
    base["naive RRF k=60 (turn content)"] = evaluate(
        runs, qs, replace(plain, fusion="rrf", dense_weight=0.5)
    )
    for name, m in base.items():
        show(name, m)
    res["baselines"] = base
    embed.save()

    runs = run_recipe(samples, qs, CHOSEN, embed)
    chosen = {mode: evaluate(runs, qs, CHOSEN, mode) for mode in ("dense", "sparse", "fused")}
    for mode, m in chosen.items():
        show(f"chosen recipe, {mode}", m)
    ranks = [
        [d for d, _ in CHOSEN.fuse(dn, sp)[:10]]
        for dn, sp in zip(runs.dense, runs.sparse, strict=True)
    ]
    res["chosen"] = {
        "recipe": CHOSEN.__dict__,
        "mean_sparse_dl": round(runs.mean_dl, 2),
        **chosen,
        "fused_by_category": per_category(ranks, qs),
    }
    print(f"  mean BM25F document length of the chosen sparse text: {runs.mean_dl:.1f} tokens")
    print("\nper conversation (chosen fused | bm25s | dense)")
    bm, dn = bm25_baseline(samples, qs), dense_baseline(samples, qs, embed)
    res["chosen"]["by_conversation"] = {}
    for s in samples:
        idx = [i for i, q in enumerate(qs) if q.sample_id == s["sample_id"]]
        sub = [qs[i] for i in idx]
        row = {
            name: score([r[i] for i in idx], sub)
            for name, r in (("chosen", ranks), ("bm25s", bm), ("dense", dn))
        }
        res["chosen"]["by_conversation"][s["sample_id"]] = row
        print(
            f"  {s['sample_id']:<10} n={len(idx):<4} "
            + " | ".join(f"R@10 {m['recall@10']:.3f} MRR {m['mrr@10']:.3f}" for m in row.values())
        )
    embed.save()

    print("\nsensitivity (one change from the chosen recipe)")
    print(HEADER)
    for change in SENSITIVITY:
        r = replace(CHOSEN, **change)
        runs = run_recipe(samples, qs, r, embed)
        m = evaluate(runs, qs, r)
        show(r.label(CHOSEN), m)
        res["sensitivity"].append({"change": change, **m})
        embed.save()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")
    return res


def throughput(data: Path, out: Path) -> dict[str, Any]:
    """Sentences/s of MiniLMEmbedder on every LoCoMo turn content, batch 64, 1 and 2 threads."""
    import asyncio

    from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder

    texts = [t.content for s in load_locomo(data) for t in conversation(s).turns]
    res: dict[str, Any] = {"texts": len(texts), "batch_size": 64}
    for threads in (1, 2):
        emb = MiniLMEmbedder(_model_dir(), intra_op_threads=threads, batch_size=64)
        asyncio.run(emb.embed(texts[:64]))  # warm-up
        t0 = time.perf_counter()
        asyncio.run(emb.embed(texts))
        rate = len(texts) / (time.perf_counter() - t0)
        res[f"threads={threads}"] = round(rate, 1)
        print(f"intra_op_threads={threads}: {rate:.0f} sentences/s", flush=True)

    async def pooled() -> float:
        emb = MiniLMEmbedder(_model_dir(), intra_op_threads=1, batch_size=64, sessions=2)
        await emb.embed(texts[:64])
        half = len(texts) // 2
        t0 = time.perf_counter()
        await asyncio.gather(emb.embed(texts[:half]), emb.embed(texts[half:]))
        return len(texts) / (time.perf_counter() - t0)

    rate = asyncio.run(pooled())
    res["sessions=2 x threads=1, 2 concurrent calls"] = round(rate, 1)
    print(f"2 sessions x 1 thread, 2 concurrent calls: {rate:.0f} sentences/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("research", help="baselines, chosen recipe and sensitivity table")
    sp.add_argument("--data", type=Path, default=DEFAULT_DATA)
    sp.add_argument("--out", type=Path, default=RESULTS / "locomo_research.json")
    sp.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "aeterna-locomo-emb.npz",
        help="on-disk embedding memo for reruns; pass '' to disable",
    )
    tp = sub.add_parser("throughput", help="embedding throughput on LoCoMo turns")
    tp.add_argument("--data", type=Path, default=DEFAULT_DATA)
    tp.add_argument("--out", type=Path, default=RESULTS / "embedding_throughput.json")
    args = p.parse_args(argv)
    if args.cmd == "throughput":
        throughput(args.data, args.out)
    else:
        research(args.data, args.out, args.cache if str(args.cache) not in ("", ".") else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
