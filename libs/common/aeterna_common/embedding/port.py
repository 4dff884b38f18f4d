"""The embedding port: what a service needs from a text embedding model, whatever the backend.

Two adapters implement it: :class:`aeterna_common.embedding.onnx_minilm.MiniLMEmbedder`
(all-MiniLM-L6-v2 in process, ONNX Runtime) and
:class:`aeterna_common.embedding.openai_compat.OpenAICompatibleEmbedder` (any server speaking
the OpenAI ``/v1/embeddings`` protocol).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


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

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts.

        Args:
            texts: ``n`` UTF-8 strings (``n`` may be 0).

        Returns:
            ``n`` vectors of ``dimension`` floats, each with Euclidean norm 1, in input order.

        Raises:
            EmbeddingError: The backend failed or returned vectors of the wrong size.
        """
        ...

    async def embed_query(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed search queries: the same vectors as :meth:`embed`, on a path that never
        queues behind document batches (an in-process model keeps a separate lane for them).

        Args:
            texts: ``n`` UTF-8 strings (usually one).

        Returns:
            ``n`` vectors of ``dimension`` floats, each with Euclidean norm 1, in input order.

        Raises:
            EmbeddingError: The backend failed or returned vectors of the wrong size.
        """
        ...

    async def close(self) -> None:
        """Release sessions and connections; the embedder is unusable afterwards."""
        ...
