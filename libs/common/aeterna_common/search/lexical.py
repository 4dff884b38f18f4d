"""BM25 sparse vectors for a store that applies IDF itself (Qdrant ``Modifier.IDF``).

A document vector holds, per term, BM25's term-frequency saturation

    tf · (k1 + 1) / (tf + k1 · (1 − b + b · dl / avgdl))

and a query vector holds 1.0 per unique term. The store multiplies each matching query weight
by idf = ln(1 + (N − n + 0.5) / (n + 0.5)) (N points, n of them containing the term), so the
dot product is the BM25 score of Robertson & Zaragoza, "The Probabilistic Relevance Framework:
BM25 and Beyond" (2009), eq. 3.15, with the Lucene variant of the IDF that is never negative.

Because the store does not know the corpus' average document length, ``avgdl`` is a fixed
parameter; :data:`DEFAULT_AVGDL` was measured on conversational memories (see its docstring).

Tokens: NFKC normalisation, case folding, Unicode word tokens (apostrophe contractions kept
whole), Snowball English stop words removed, Snowball English stemming (PyStemmer), single
letters dropped. Term ids are the first 4 bytes of the BLAKE2b digest of the stemmed term, so
they are identical in every process, machine and Python version.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import Stemmer

from aeterna_common.vectors.port import SparseVector

K1 = 1.2
"""BM25 term-frequency saturation; the common default (Robertson & Zaragoza 2009, sec. 3.5)."""

B = 0.75
"""BM25 length normalisation; the common default (Robertson & Zaragoza 2009, sec. 3.5)."""

DEFAULT_AVGDL = 30.0
"""Assumed average document length in index terms (BM25F-weighted, see
:meth:`BM25Encoder.encode_document`). Measured on the LoCoMo dev conversations with the memory
service's recipe (a turn, plus its session time and two preceding turns as context at weight
0.5): 31.3 (``bench/locomo_eval.py research``); retrieval is flat between 20 and 45."""

CONTEXT_WEIGHT = 0.5
"""BM25F weight of context terms relative to the memory's own terms, chosen on LoCoMo dev
(``bench/locomo_eval.py research``): 0.25 and 0.5 tie, 0.75 loses 0.02 MRR@10 and plain
concatenation (1.0) 0.05."""

SNOWBALL_ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    """
    i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
    she her hers herself it its itself they them their theirs themselves what which who whom
    this that these those am is are was were be been being have has had having do does did
    doing would should could ought i'm you're he's she's it's we're they're i've you've we've
    they've i'd you'd he'd she'd we'd they'd i'll you'll he'll she'll we'll they'll isn't
    aren't wasn't weren't hasn't haven't hadn't doesn't don't didn't won't wouldn't shan't
    shouldn't can't cannot couldn't mustn't let's that's who's what's here's there's when's
    where's why's how's a an the and but if or because as until while of at by for with about
    against between into through during before after above below to from up down in out on off
    over under again further then once here there when where why how all any both each few
    more most other some such no nor not only own same so than too very
    """.split()
)
"""The Snowball English stop word list (https://snowballstem.org/algorithms/english/stop.txt)."""

_WORD = re.compile(r"\w+(?:'\w+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def term_id(term: str) -> int:
    """Stable unsigned 32-bit id of a term.

    Args:
        term: A token as produced by :meth:`BM25Encoder.tokenize`.

    Returns:
        The big-endian integer of the first 4 bytes of BLAKE2b(term, UTF-8), in [0, 2**32).
    """
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "big")


class BM25Encoder:
    """Turns texts into BM25 sparse vectors (see the module docstring for the formulas).

    Encoding is CPU work (tens of microseconds per short text): services call it from a
    worker thread (``asyncio.to_thread``), never on the event loop. It is thread-safe.

    Args:
        k1: Term-frequency saturation, > 0.
        b: Length normalisation in [0, 1].
        avgdl: Assumed average document length in tokens, > 0.
        stopwords: Lower-case words to drop before stemming.
        stem: Apply Snowball English stemming.
        context_weight: BM25F weight of ``context`` terms in :meth:`encode_document`, in
            [0, 1].

    Raises:
        ValueError: A parameter is out of range.
    """

    def __init__(
        self,
        *,
        k1: float = K1,
        b: float = B,
        avgdl: float = DEFAULT_AVGDL,
        stopwords: Iterable[str] = SNOWBALL_ENGLISH_STOPWORDS,
        stem: bool = True,
        context_weight: float = CONTEXT_WEIGHT,
    ) -> None:
        if k1 <= 0 or not 0 <= b <= 1 or avgdl <= 0 or not 0 <= context_weight <= 1:
            raise ValueError("need k1 > 0, 0 <= b <= 1, avgdl > 0 and 0 <= context_weight <= 1")
        self.context_weight = context_weight
        self.k1 = k1
        self.b = b
        self.avgdl = avgdl
        self._stopwords = frozenset(stopwords)
        self._stem = stem
        # PyStemmer objects are not thread-safe: one per thread, as services encode in
        # worker threads to keep the event loop free.
        self._local = threading.local()

    def tokenize(self, text: str) -> list[str]:
        """Split text into index terms.

        Args:
            text: Any Unicode text.

        Returns:
            Stemmed terms in text order, duplicates kept (their count is the term frequency).
        """
        folded = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
        words = [
            w
            for w in _WORD.findall(folded)
            if w not in self._stopwords and (len(w) > 1 or w.isdigit())
        ]
        if self._stem:
            stemmer = getattr(self._local, "stemmer", None)
            if stemmer is None:
                stemmer = self._local.stemmer = Stemmer.Stemmer("english")
            words = stemmer.stemWords(words)
        return words

    def encode_document(self, text: str, context: Sequence[str] = ()) -> SparseVector:
        """BM25 document vector: term-frequency saturation per term (IDF left to the store).

        With ``context`` this is BM25F (Robertson, Zaragoza & Taylor, "Simple BM25 extension to
        multiple weighted fields", CIKM 2004) with two fields: the text itself (weight 1) and
        its context (weight ``context_weight``): tf = tf_text + w·tf_context and
        dl = dl_text + w·dl_context, then the saturation above with one shared ``avgdl``.

        Args:
            text: The text to index (a memory's own content).
            context: Texts that help find it but should count less, e.g. the preceding turns
                of a conversation or metadata values.

        Returns:
            A sparse vector with one entry per distinct term (values in (0, k1 + 1)); empty
            when there are no index terms.
        """
        tf: dict[str, float] = dict(Counter(self.tokenize(text)))
        for ctx in context:
            for term, n in Counter(self.tokenize(ctx)).items():
                tf[term] = tf.get(term, 0.0) + self.context_weight * n
        dl = sum(tf.values())
        norm = self.k1 * (1 - self.b + self.b * dl / self.avgdl)
        return _to_sparse({term: f * (self.k1 + 1) / (f + norm) for term, f in tf.items()})

    def encode_query(self, text: str) -> SparseVector:
        """BM25 query vector: weight 1.0 per distinct term.

        Args:
            text: The search text.

        Returns:
            A sparse vector with value 1.0 per distinct term; empty when it has no terms.
        """
        return _to_sparse(dict.fromkeys(self.tokenize(text), 1.0))


def _to_sparse(weights: dict[str, float]) -> SparseVector:
    by_id: dict[int, float] = {}
    for term, weight in weights.items():
        # A 32-bit hash collision merges two terms into one dimension; indices stay unique.
        tid = term_id(term)
        by_id[tid] = by_id.get(tid, 0.0) + weight
    ids = sorted(by_id)
    return SparseVector(indices=ids, values=[by_id[i] for i in ids])


_DEFAULT = BM25Encoder()


def tokenize(text: str) -> list[str]:
    """:meth:`BM25Encoder.tokenize` with the default settings."""
    return _DEFAULT.tokenize(text)


def encode_document(text: str, context: Sequence[str] = ()) -> SparseVector:
    """:meth:`BM25Encoder.encode_document` with the default settings."""
    return _DEFAULT.encode_document(text, context)


def encode_query(text: str) -> SparseVector:
    """:meth:`BM25Encoder.encode_query` with the default settings."""
    return _DEFAULT.encode_query(text)
