"""CPU work stays off the event loop: BM25 encoding of queries and of indexed memories runs
in worker threads, and query embeddings on the model's query lane."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from aeterna.memory.v1 import memory_service_pb2 as svc
from aeterna.type.v1 import layer_pb2
from aeterna_common.vectors.port import SparseVector
from memory_testkit import MemoryEnv, create, md, memory, new_tenant


async def test_bm25_encoding_runs_off_the_event_loop(env: MemoryEnv) -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, set[int]] = {"query": set(), "document": set()}
    domain, follower = env.domain, env.follower
    encode_query, encode_document = domain.encode_query, follower.encode_sparse

    def query(text: str) -> SparseVector:
        seen["query"].add(threading.get_ident())
        return encode_query(text)

    def document(text: str, context: Sequence[str]) -> SparseVector:
        seen["document"].add(threading.get_ident())
        return encode_document(text, context)

    # The in-process path (AETERNA_MEMORY_BACKGROUND_PROCESS=false): documents are encoded
    # on the follower's own thread (the child-process path: test_lexical_process.py).
    in_child = follower.encode_documents
    follower.encode_documents = None
    domain.encode_query, follower.encode_sparse = query, document
    try:
        t = new_tenant()
        await create(env, t, memory("The garden needs fresh basil", user_id="u"))
        r = await env.stub.SearchMemories(
            svc.SearchMemoriesRequest(
                parent=f"tenants/{t}", query="basil", scope=layer_pb2.Scope(user_id="u")
            ),
            metadata=md(t),
        )
        assert r.results and r.results[0].lexical_score > 0
    finally:
        domain.encode_query, follower.encode_sparse = encode_query, encode_document
        follower.encode_documents = in_child
    assert seen["query"] and loop_thread not in seen["query"]
    assert seen["document"] and loop_thread not in seen["document"]
