"""Query embeddings have their own lane: a search's query never waits behind a batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from aeterna_common.embedding.onnx_minilm import MiniLMEmbedder
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
