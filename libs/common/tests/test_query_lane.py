"""Query embeddings have their own lane: a search's query never waits behind a batch."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest
from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder
from aeterna_common.embedding.port import EmbeddingUnavailableError
from aeterna_common.priority import background_executor, lower_thread_priority
from aeterna_common.search.lexical import BM25Encoder
from aeterna_devstack.stack import require_model

BATCH = [f"Turn {i}: we talked about the trip to Lisbon and the budget again" for i in range(1000)]


async def _query_during_batch(emb: MiniLMEmbedder) -> tuple[bool, list[float]]:
    """Start a 1,000-text batch, then embed a query once the batch holds its session.

    Returns:
        Whether the batch was still running when the query's vector came back, and it.
    """
    batch = asyncio.create_task(emb.embed(BATCH))
    await asyncio.sleep(0)  # the batch runs until it waits for its worker thread
    assert emb._pool.qsize() == 0  # it holds the document session
    vector = (await emb.embed_query(["where did we travel?"]))[0]
    still_running = not batch.done()
    assert len(await batch) == len(BATCH)
    return still_running, vector


async def test_query_does_not_wait_behind_a_batch() -> None:
    emb = MiniLMEmbedder(require_model(), quantize=True, batch_size=4)
    try:
        overtook, vector = await _query_during_batch(emb)
        assert overtook
        # Same model, same vector on either lane.
        (plain,) = await emb.embed(["where did we travel?"])
        np.testing.assert_allclose(vector, plain, atol=1e-5)
    finally:
        await emb.close()


async def test_without_the_lane_the_query_queues_behind_the_batch() -> None:
    # The baseline the benchmark compares against: one queue for documents and queries.
    emb = MiniLMEmbedder(require_model(), quantize=True, batch_size=4, query_lane=False)
    try:
        overtook, _ = await _query_during_batch(emb)
        assert not overtook
    finally:
        await emb.close()


def test_bm25_encoding_is_thread_safe() -> None:
    enc = BM25Encoder()
    texts = [f"running runners ran {i} marathons in the hills" for i in range(2000)]
    expected = [enc.encode_document(t) for t in texts]
    results: dict[int, list[object]] = {}

    def work(k: int) -> None:
        results[k] = [enc.encode_document(t) for t in texts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results.values())


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_document_threads_yield_the_cpu_and_the_query_lane_does_not() -> None:
    emb = MiniLMEmbedder(require_model(), quantize=True, batch_size=4, document_nice=7)
    try:
        await emb.embed(["a document"])
        await emb.embed_query(["a query"])
        base = os.getpriority(os.PRIO_PROCESS, 0)
        loop = asyncio.get_running_loop()
        documents = await loop.run_in_executor(emb._executor, _thread_nice)
        queries = await loop.run_in_executor(emb._query_executor, _thread_nice)
        assert (documents, queries) == (min(19, base + 7), base)
        assert _thread_nice() == base  # the caller's thread is untouched
    finally:
        await emb.close()
    with pytest.raises(ValueError, match="document_nice"):
        MiniLMEmbedder(require_model(), document_nice=20)


def test_background_executor_lowers_only_its_threads() -> None:
    base = _thread_nice()
    with background_executor("bulk", 2, 3) as pool:
        assert set(pool.map(lambda _: _thread_nice(), range(4))) == {min(19, base + 3)}
    with background_executor("normal", 1, 0) as pool:
        assert pool.submit(_thread_nice).result() == base
    assert _thread_nice() == base
    with pytest.raises(ValueError):
        lower_thread_priority(20)
    with pytest.raises(ValueError):
        background_executor("bad", 0, 1)


async def test_documents_embedded_in_a_lowered_child_process() -> None:
    # The process lane: documents are embedded by a child process at the lowered priority,
    # with the same vectors; queries stay in this process on their own lane.
    local = MiniLMEmbedder(require_model(), quantize=True, batch_size=4)
    emb = MiniLMEmbedder(
        require_model(), quantize=True, batch_size=4, document_nice=7, document_process=True
    )
    try:
        (child,) = emb.process_ids()
        assert child != os.getpid()
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, child) == min(19, base + 7)
        texts = ["the deploy moved to Friday", "my sister starts with the vet", "x" * 3000]
        np.testing.assert_allclose(await emb.embed(texts), await local.embed(texts), atol=1e-5)
        np.testing.assert_allclose(
            emb.embed_sync(texts[:1]), local.embed_sync(texts[:1]), atol=1e-5
        )
        # A query overtakes a running 1,000-text document batch.
        batch = asyncio.create_task(emb.embed(BATCH))
        await asyncio.sleep(0.05)
        await emb.embed_query(["where did we travel?"])
        assert not batch.done()
        assert len(await batch) == len(BATCH)
        # A child that dies fails the calls it had as UNAVAILABLE, and a fresh one serves
        # the next call.
        os.kill(child, 9)
        with pytest.raises(EmbeddingUnavailableError):
            async with asyncio.timeout(60):
                while True:  # until the pool has noticed the death
                    await emb.embed(["after the kill"])
                    await asyncio.sleep(0.05)
        assert len(await emb.embed(["a fresh child"])) == 1
        assert emb.process_ids() and emb.process_ids() != [child]
    finally:
        await emb.close()
        await local.close()
