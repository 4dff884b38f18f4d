"""The embedding port: what a service needs from a text embedding model, whatever the backend.

Two adapters implement it: :class:`aeterna_common.embedding.onnx_minilm.MiniLMEmbedder`
(all-MiniLM-L6-v2 in process, ONNX Runtime) and
:class:`aeterna_common.embedding.openai_compat.OpenAICompatibleEmbedder` (any server speaking
the OpenAI ``/v1/embeddings`` protocol).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable


class Embeddings(list[list[float]]):
    """Vectors of ``n`` texts in input order, with the number of tokens the model read for
    each (what embedding usage bills, :data:`aeterna_common.usage.EMBEDDING_TOKENS`).

    A list of the vectors, so a caller that needs only them indexes, slices and zips it like
    any list; :attr:`tokens` is aligned with it.

    Args:
        vectors: ``n`` vectors.
        tokens: ``n`` token counts (each >= 0). How each adapter counts is part of its
            contract: :class:`~aeterna_common.embedding.onnx_minilm.MiniLMEmbedder` counts the
            WordPiece tokens it fed the model, [CLS] and [SEP] included, after truncation.

    Raises:
        ValueError: ``tokens`` is not as long as ``vectors`` or holds a negative count.
    """

    tokens: list[int]

    def __init__(self, vectors: Iterable[list[float]] = (), tokens: Iterable[int] = ()) -> None:
        super().__init__(vectors)
        self.tokens = [int(t) for t in tokens]
        if len(self.tokens) != len(self) or any(t < 0 for t in self.tokens):
            raise ValueError(f"{len(self)} vectors need as many token counts >= 0")

    @property
    def total_tokens(self) -> int:
        """Sum of :attr:`tokens`."""
        return sum(self.tokens)


class EmbeddingError(RuntimeError):
    """An embedding backend failed or returned something unusable (HTTP error, wrong size)."""


class EmbeddingUnavailableError(EmbeddingError):
    """The embedding backend cannot be reached or is overloaded (connection refused or
    reset, timeout, HTTP 408, 429 or 5xx, embedder closed); retrying later or on another
    replica may succeed. Services answer ``UNAVAILABLE`` with reason
    ``EMBEDDING_UNAVAILABLE`` (:func:`aeterna_common.errors.outage`)."""


@runtime_checkable
class EmbeddingPort(Protocol):
    """A text embedding model producing L2-normalised dense vectors.

    Vectors of different ``model`` values live in different spaces and must never be compared;
    callers store ``model`` and ``dimension`` next to every vector.
    """

    @property
    def model(self) -> str:
        """Model name recorded with each vector, e.g. ``"all-MiniLM-L6-v2"``."""
        ...

    @property
    def dimension(self) -> int:
        """Length of every returned vector (384 for all-MiniLM-L6-v2)."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts.

        Args:
            texts: ``n`` UTF-8 strings (``n`` may be 0).

        Returns:
            ``n`` vectors of ``dimension`` floats, each with Euclidean norm 1, in input order,
            with each text's token count.

        Raises:
            EmbeddingError: The backend failed or returned vectors of the wrong size.
        """
        ...

    async def embed_query(self, texts: Sequence[str]) -> Embeddings:
        """Embed search queries: the same vectors as :meth:`embed`, on a path that never
        queues behind document batches (an in-process model keeps a separate lane for them).

        Args:
            texts: ``n`` UTF-8 strings (usually one).

        Returns:
            ``n`` vectors of ``dimension`` floats, each with Euclidean norm 1, in input order,
            with each text's token count.

        Raises:
            EmbeddingError: The backend failed or returned vectors of the wrong size.
        """
        ...

    async def close(self) -> None:
        """Release sessions and connections; the embedder is unusable afterwards."""
        ...
