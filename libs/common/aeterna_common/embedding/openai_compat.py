"""Embeddings from any server that speaks the OpenAI ``POST /v1/embeddings`` protocol.

Request ``{"model": ..., "input": [...], "encoding_format": "float"}``; response
``{"data": [{"index": i, "embedding": [...]}, ...]}`` (OpenAI API reference, "Create
embeddings"). vLLM, llama.cpp's server, Ollama, LocalAI and text-embeddings-inference accept it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx

from aeterna_common.embedding.port import EmbeddingError, Embeddings, EmbeddingUnavailableError

CHARS_PER_TOKEN = 4
"""Characters per token when a server reports no usage: OpenAI's rule of thumb for English
("one token is roughly 4 characters", OpenAI tokenizer help page)."""

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that mean the endpoint is down or overloaded, not that the request is wrong
(RFC 9110 sections 15.5.9, 15.6; RFC 6585 section 4)."""


class OpenAICompatibleEmbedder:
    """Remote embedding model behind an OpenAI-compatible HTTP API.

    Vectors are put back in input order by the response's ``index`` field and L2-normalised
    here (servers differ on whether they normalise).

    Token counts: the protocol reports one ``usage.prompt_tokens`` per request, not per text.
    It is split over the request's texts in proportion to their lengths in characters
    (largest remainder), so the counts add up exactly to what the server billed; a server
    that reports no usage gets ``ceil(characters / 4)`` per text (an estimate).

    Args:
        base_url: Server root without ``/v1``, e.g. ``"http://embedder:8080"``.
        model: Model name sent in every request and recorded with the vectors.
        dimension: Expected vector length; any other length is an error.
        api_key: Sent as ``Authorization: Bearer <api_key>`` when given.
        timeout_s: Per-request timeout in seconds (connect, read, write and pool).
        batch_size: Maximum texts per request; longer inputs are split into several requests.
        transport: Optional httpx transport (tests use :class:`httpx.MockTransport`).

    Raises:
        ValueError: ``dimension``, ``timeout_s`` or ``batch_size`` is not positive.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dimension: int,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        *,
        batch_size: int = 128,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if dimension < 1 or timeout_s <= 0 or batch_size < 1:
            raise ValueError("dimension, timeout_s and batch_size must be positive")
        self._model = model
        self._dimension = dimension
        self._batch_size = batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._url = base_url.rstrip("/") + "/v1/embeddings"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport
        )

    @property
    def model(self) -> str:
        """The model name given to the constructor."""
        return self._model

    @property
    def dimension(self) -> int:
        """The expected vector length given to the constructor."""
        return self._dimension

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts with one request per ``batch_size`` texts.

        Args:
            texts: ``n`` strings.

        Returns:
            ``n`` unit vectors of ``dimension`` floats, in input order, with token counts
            (see the class).

        Raises:
            EmbeddingUnavailableError: The endpoint cannot be reached or timed out, or
                answered HTTP 408, 429 or 5xx.
            EmbeddingError: Another HTTP status >= 400, a malformed response, a missing or
                duplicate ``index``, a vector of another length, or a zero vector.
        """
        out = Embeddings()
        for start in range(0, len(texts), self._batch_size):
            batch = await self._embed_batch(list(texts[start : start + self._batch_size]))
            out.extend(batch)
            out.tokens.extend(batch.tokens)
        return out

    async def embed_query(self, texts: Sequence[str]) -> Embeddings:
        """Embed search queries: :meth:`embed`, as requests run concurrently (one pooled
        connection each), so a query never queues behind a document batch here.

        Raises:
            EmbeddingUnavailableError: See :meth:`embed`.
            EmbeddingError: See :meth:`embed`.
        """
        return await self.embed(texts)

    async def _embed_batch(self, texts: list[str]) -> Embeddings:
        payload = {"model": self._model, "input": texts, "encoding_format": "float"}
        try:
            response = await self._client.post(self._url, json=payload)
        except httpx.TransportError as exc:  # connect, read, write, pool, timeouts
            raise EmbeddingUnavailableError(f"POST {self._url} failed: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"POST {self._url} failed: {exc!r}") from exc
        if response.status_code in RETRYABLE_STATUS:
            raise EmbeddingUnavailableError(
                f"POST {self._url} returned HTTP {response.status_code}: {response.text[:500]}"
            )
        if response.status_code >= 400:
            raise EmbeddingError(
                f"POST {self._url} returned HTTP {response.status_code}: {response.text[:500]}"
            )
        try:
            body = response.json()
            data: list[dict[str, Any]] = body["data"]
            by_index = {int(item["index"]): item["embedding"] for item in data}
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"malformed embeddings response from {self._url}") from exc
        if sorted(by_index) != list(range(len(texts))) or len(data) != len(texts):
            raise EmbeddingError(
                f"expected indices 0..{len(texts) - 1} from {self._url}, got {sorted(by_index)}"
            )
        vectors = [self._normalise(by_index[i]) for i in range(len(texts))]
        usage = body.get("usage")
        billed = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return Embeddings(vectors, split_tokens(texts, billed))

    def _normalise(self, vector: Any) -> list[float]:
        if not isinstance(vector, list) or len(vector) != self._dimension:
            got = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise EmbeddingError(
                f"model {self._model!r} returned a vector of size {got}, "
                f"expected dimension {self._dimension}"
            )
        try:
            values = [float(x) for x in vector]
        except (TypeError, ValueError) as exc:
            raise EmbeddingError(f"model {self._model!r} returned non-numeric values") from exc
        norm = math.sqrt(math.fsum(x * x for x in values))
        if norm == 0.0 or not math.isfinite(norm):
            raise EmbeddingError(f"model {self._model!r} returned a zero or non-finite vector")
        return [x / norm for x in values]

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()


def split_tokens(texts: Sequence[str], total: object) -> list[int]:
    """Per-text token counts of one request.

    Args:
        texts: The request's texts.
        total: The server's ``usage.prompt_tokens`` (a non-negative int), or anything else
            when it reported none.

    Returns:
        ``total`` split in proportion to the texts' lengths in characters by the largest
        remainder method (the counts sum to ``total``; equal shares when every text is
        empty), or ``ceil(len / CHARS_PER_TOKEN)`` per text without a usable ``total``.
    """
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        return [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
    if not texts:
        return []
    weights = [len(t) for t in texts]
    if not sum(weights):
        weights = [1] * len(texts)
    scale = sum(weights)
    counts = [total * w // scale for w in weights]
    by_remainder = sorted(range(len(texts)), key=lambda i: -(total * weights[i] % scale))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
