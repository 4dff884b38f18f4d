"""all-MiniLM-L6-v2 served in process with ONNX Runtime, from a model directory.

The directory is a build artifact made by :mod:`aeterna_common.embedding.export` (``make
model``; the image's builder stage): the fp32 ONNX graph, its int8 quantization, a fixed
tokenizer and a manifest. Serving needs only ``onnxruntime``, ``tokenizers`` and ``numpy``;
nothing here exports, so a service never needs torch and never writes to the directory.
Pooling follows the model's sentence-transformers configuration (``1_Pooling/config.json``:
mean of the token embeddings weighted by the attention mask, then L2 normalisation), so the
vectors match ``SentenceTransformer.encode(..., normalize_embeddings=True)`` to cosine > 0.9999.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from aeterna_common.embedding.port import EmbeddingError, Embeddings, EmbeddingUnavailableError
from aeterna_common.priority import (
    background_executor,
    init_background_child,
    stop_background_pool,
)

MODEL_NAME = "all-MiniLM-L6-v2"
"""Name recorded with every vector."""

DIMENSION = 384
"""Output size (``word_embedding_dimension`` in the model's ``1_Pooling/config.json``)."""

MAX_SEQ_LENGTH = 256
"""Token limit including [CLS]/[SEP] (``max_seq_length`` in ``sentence_bert_config.json``)."""

ONNX_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
"""Written last by the export: a directory without it is incomplete."""

FloatArray = npt.NDArray[np.float32]
Counted = tuple[FloatArray, list[int]]
"""Vectors (``(n, 384)``) and the token count of each text (see :meth:`MiniLMEmbedder.embed`)."""


class ModelUnavailableError(EmbeddingError):
    """The model directory is missing, incomplete, unreadable or holds another model."""


def read_manifest(directory: Path | str) -> dict[str, Any]:
    """Check a model directory and return its manifest.

    Args:
        directory: A directory written by :func:`aeterna_common.embedding.export.export_model`.

    Returns:
        The manifest: ``model``, ``dimension``, ``files`` (``fp32``, ``int8``, ``tokenizer``
        file names), ``source`` and export details.

    Raises:
        ModelUnavailableError: The directory or a file is missing or unreadable, the manifest
            is not valid JSON, or it describes another model.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelUnavailableError(f"model directory {directory} does not exist")
    path = directory / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        model, dimension = manifest["model"], manifest["dimension"]
        files = [str(f) for f in manifest["files"].values()]
    except FileNotFoundError:
        raise ModelUnavailableError(
            f"{directory} holds no {MANIFEST_FILE}: not a model directory, or its export "
            "was interrupted"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelUnavailableError(f"cannot read {path}: {exc!r}") from exc
    if model != MODEL_NAME or dimension != DIMENSION:
        raise ModelUnavailableError(
            f"{directory} holds {model!r} ({dimension}-d), expected {MODEL_NAME!r} ({DIMENSION}-d)"
        )
    for name in files:
        if not os.access(directory / name, os.R_OK) or not (directory / name).is_file():
            raise ModelUnavailableError(f"{directory / name} is missing or unreadable")
    return manifest


def configure_tokenizer(tokenizer: Tokenizer) -> None:
    """Pad nothing and truncate at the model's 256-token limit.

    The shipped ``tokenizer.json`` pads every input to 128 and truncates at 128; padding is
    done per batch (to its longest member) in :meth:`MiniLMEmbedder._run`.

    Args:
        tokenizer: Changed in place.
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)


def _mean_pool_normalise(hidden: FloatArray, mask: npt.NDArray[np.int64]) -> FloatArray:
    """Masked mean over tokens, then L2 normalisation (sentence-transformers ``Pooling`` +
    ``Normalize``; the 1e-9 and 1e-12 floors are theirs and ``torch.nn.functional.normalize``'s).
    """
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    unit: FloatArray = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d, L2-normalised) on ONNX Runtime, CPU.

    Construction loads the ONNX sessions from a model directory (about a second); it blocks,
    so build the embedder at startup. :meth:`embed` tokenises, sorts the inputs by token count
    (less padding), runs batches of ``batch_size`` in a worker thread and returns the vectors
    in input order. A pool of ``sessions`` ONNX sessions serves concurrent calls; a call waits
    for a free session, so with the default single session calls are serialised and never
    oversubscribe the CPU.

    Search queries have a lane of their own (``query_lane``): :meth:`embed_query` runs on a
    separate session and thread, so a query embedding never waits behind a document batch
    (a 1,000-memory import holds the document session for seconds). The event loop never
    runs tokenisation or inference: both happen on the lanes' threads.

    Args:
        model_dir: A model directory (see :func:`read_manifest`); only read.
        intra_op_threads: ONNX Runtime intra-op threads per session (default 1: measured
            fastest per core on a shared machine).
        batch_size: Maximum texts per inference call (default 64).
        sessions: Number of independent sessions (default 1); each one holds its own copy of
            the weights (~90 MB fp32, ~23 MB int8).
        query_lane: Serve :meth:`embed_query` on its own session (another copy of the
            weights) and thread; ``False`` sends queries through the document sessions'
            queue (the behaviour before the lane existed, kept as a benchmark baseline).
        quantize: Serve the dynamic int8 (per-channel) quantization of the same graph: about
            2x faster on CPUs with int8 dot products, with LoCoMo dense recall@10 0.491 vs
            0.493 for fp32 (measured here). Its vectors are a different space: :attr:`model`
            is ``all-MiniLM-L6-v2-int8`` so they never mix.
        document_nice: Nice increment (0-19) of the document sessions' threads, so that a
            bulk import gives the CPU to searches when they need it and takes the rest (see
            :mod:`aeterna_common.priority`); 0 keeps them at the process's priority. The
            query lane's thread keeps the process's priority (without a query lane, queries
            share the document threads and their priority).
        document_process: Embed documents in ``sessions`` child processes instead of
            threads of this one (the query lane stays here). Each child runs at
            ``document_nice`` as a whole (ONNX Runtime, the tokenizer's thread pool and the
            Python that prepares each batch), so the serving process's GIL is never held by
            document work: a lowered thread of this process that holds the GIL (numpy
            preparation of a batch, the conversion of its vectors) while it waits for the
            CPU stalls the event loop with it. Costs a child interpreter per session
            (spawned, ~1-2 s at construction) and another copy of the weights.
        document_idle: Run those children under ``SCHED_IDLE`` instead of
            ``document_nice`` (:func:`aeterna_common.priority.idle_scheduling`): they take
            only CPU time that no normal task of the machine wants. Ignored without
            ``document_process`` (a thread of this process may hold the GIL).

    Raises:
        ValueError: A numeric argument is below 1, or ``document_nice`` is outside 0-19.
        ModelUnavailableError: The directory is missing, incomplete or unreadable, or ONNX
            Runtime cannot load its graph.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        intra_op_threads: int = 1,
        batch_size: int = 64,
        sessions: int = 1,
        quantize: bool = False,
        query_lane: bool = True,
        document_nice: int = 0,
        document_process: bool = False,
        document_idle: bool = False,
    ) -> None:
        if min(intra_op_threads, batch_size, sessions) < 1:
            raise ValueError("intra_op_threads, batch_size and sessions must be >= 1")
        if not 0 <= document_nice <= 19:
            raise ValueError(f"document_nice must be 0-19, got {document_nice}")
        directory = Path(model_dir)
        files = read_manifest(directory)["files"]
        graph = directory / files["int8" if quantize else "fp32"]
        self._model = f"{MODEL_NAME}-int8" if quantize else MODEL_NAME
        self._batch_size = batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._pool: asyncio.Queue[ort.InferenceSession] = asyncio.Queue()
        self._query_pool: asyncio.Queue[ort.InferenceSession] = self._pool
        try:
            self._tokenizer = Tokenizer.from_file(str(directory / files["tokenizer"]))
            # With the process lane, documents never use a session of this process: load one
            # only for queries without a lane of their own.
            local_sessions = sessions if not document_process else 0 if query_lane else 1
            for _ in range(local_sessions):
                self._pool.put_nowait(
                    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
                )
            if query_lane:
                self._query_pool = asyncio.Queue()
                self._query_pool.put_nowait(
                    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
                )
        except Exception as exc:  # tokenizers and onnxruntime raise their own types
            raise ModelUnavailableError(f"cannot load {graph}: {exc}") from exc
        configure_tokenizer(self._tokenizer)
        self._process_args = (
            str(directory),
            intra_op_threads,
            batch_size,
            quantize,
            document_nice,
            document_idle,
        )
        self._process: ProcessPoolExecutor | None = None
        if document_process:
            self._process = self._start_process_lane(sessions)
        # Own threads per lane: a busy default executor (BM25 encoding, other blocking work)
        # never delays inference, and document batches never take the query thread. With one
        # intra-op thread ONNX Runtime computes on the calling thread, so the document
        # threads' lower priority covers the inference itself; Session.run releases the GIL.
        self._executor = background_executor("onnx-documents", sessions, document_nice)
        self._query_executor = (
            ThreadPoolExecutor(1, thread_name_prefix="onnx-queries")
            if query_lane
            else self._executor
        )
        self._sessions = local_sessions
        self._process_workers = sessions
        self._query_lane = query_lane
        self._closed = False

    @property
    def model(self) -> str:
        """``"all-MiniLM-L6-v2"``, or ``"all-MiniLM-L6-v2-int8"`` when quantized."""
        return self._model

    @property
    def dimension(self) -> int:
        """384."""
        return DIMENSION

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts (see :meth:`EmbeddingPort.embed`); longer texts are cut at 256 tokens.

        Args:
            texts: ``n`` strings.

        Returns:
            ``n`` unit vectors of 384 floats, in input order. Each text's token count is the
            sum of its attention mask: the WordPiece tokens the model read, [CLS] and [SEP]
            included, after truncation at 256 (so 2 for an empty text, at most 256).

        Raises:
            EmbeddingError: The embedder is closed or ONNX Runtime failed.
        """
        if self._process is None:
            return await self._embed_on(self._pool, self._executor, texts, parallel=True)
        if self._closed:
            raise EmbeddingUnavailableError("embedder is closed")
        if not texts:
            return Embeddings()
        pool = self._process
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                pool, _child_embed, list(texts)
            )
        except BrokenProcessPool as exc:
            # A child died (killed, out of memory): later calls get a fresh pool.
            if self._process is pool and not self._closed:
                self._process = self._start_process_lane(self._process_workers, warm=False)
            stop_background_pool(pool)
            raise EmbeddingUnavailableError(f"document embedding process died: {exc}") from exc
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EmbeddingError(f"ONNX inference failed: {exc}") from exc
        return Embeddings(vectors.tolist(), tokens)

    def _start_process_lane(self, workers: int, *, warm: bool = True) -> ProcessPoolExecutor:
        """``workers`` spawned children that load the model; with ``warm`` wait until each
        has loaded it (a broken model fails here, at construction, not on the first write)."""
        # spawn, not fork: the parent runs gRPC and event loop threads that fork would copy
        # in an undefined state.
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=self._process_args,
        )
        if warm:
            try:
                for f in [pool.submit(_child_pid) for _ in range(workers)]:
                    f.result(timeout=120)
            except Exception as exc:
                stop_background_pool(pool)
                raise ModelUnavailableError(
                    f"the document embedding process did not start: {exc!r}"
                ) from exc
        return pool

    def process_ids(self) -> list[int]:
        """Process ids of the document embedding children (empty without them).

        Returns:
            The pids of the live children of the process lane.
        """
        if self._process is None:
            return []
        procs = getattr(self._process, "_processes", None) or {}
        return sorted(int(pid) for pid in procs)

    async def embed_query(self, texts: Sequence[str]) -> Embeddings:
        """Embed search queries on the query lane (see :meth:`EmbeddingPort.embed_query`).

        Args:
            texts: ``n`` query strings (usually one).

        Returns:
            ``n`` unit vectors of 384 floats, in input order, and token counts; the same as
            :meth:`embed` gives.

        Raises:
            EmbeddingError: The embedder is closed or ONNX Runtime failed.
        """
        return await self._embed_on(self._query_pool, self._query_executor, texts, parallel=False)

    async def _embed_on(
        self,
        pool: asyncio.Queue[ort.InferenceSession],
        executor: ThreadPoolExecutor,
        texts: Sequence[str],
        *,
        parallel: bool,
    ) -> Embeddings:
        if self._closed:
            raise EmbeddingUnavailableError("embedder is closed")
        if not texts:
            return Embeddings()
        session = await pool.get()
        try:
            loop = asyncio.get_running_loop()
            vectors, tokens = await loop.run_in_executor(
                executor, self._embed_sync, session, list(texts), parallel
            )
        except EmbeddingError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EmbeddingError(f"ONNX inference failed: {exc}") from exc
        finally:
            pool.put_nowait(session)
        return Embeddings(vectors.tolist(), tokens)

    def embed_sync(self, texts: Sequence[str]) -> FloatArray:
        """Blocking variant for scripts and benchmarks (not for use on an event loop thread).

        Args:
            texts: ``n`` strings.

        Returns:
            A float32 array of shape ``(n, 384)``, rows L2-normalised, in input order.
        """
        return self._counted_sync(texts)[0]

    def _counted_sync(self, texts: Sequence[str]) -> Counted:
        """:meth:`embed_sync` with each text's token count (what a child process returns)."""
        if self._process is not None:
            counted: Counted = self._process.submit(_child_embed, list(texts)).result()
            return counted
        session = self._pool.get_nowait()
        try:
            return self._embed_sync(session, list(texts))
        finally:
            self._pool.put_nowait(session)

    def _embed_sync(
        self, session: ort.InferenceSession, texts: list[str], parallel: bool = True
    ) -> Counted:
        out = np.zeros((len(texts), DIMENSION), dtype=np.float32)
        if not texts:
            return out, []
        # encode_batch tokenizes on the tokenizers library's own (rayon) thread pool, which
        # the document lane's threads created and which shares their lower priority and
        # their queue: queries are tokenized on their own lane's thread instead.
        encodings = (
            self._tokenizer.encode_batch(texts)
            if parallel
            else [self._tokenizer.encode(t) for t in texts]
        )
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            out[chunk] = self._run(session, [encodings[i] for i in chunk])
        # No padding here (configure_tokenizer), so the mask is all ones: its sum is the
        # number of tokens the model read, special tokens included.
        return out, [sum(e.attention_mask) for e in encodings]

    @staticmethod
    def _run(session: ort.InferenceSession, batch: list[Encoding]) -> FloatArray:
        width = max(len(e.ids) for e in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)  # [PAD] is id 0
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, enc in enumerate(batch):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            mask[row, :n] = enc.attention_mask
            types[row, :n] = enc.type_ids
        (hidden,) = session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        return _mean_pool_normalise(np.asarray(hidden, dtype=np.float32), mask)

    async def close(self) -> None:
        """Drop the ONNX sessions once in-flight calls have finished."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._sessions):
            await self._pool.get()
        if self._query_lane:
            await self._query_pool.get()
        self._executor.shutdown(wait=False)
        self._query_executor.shutdown(wait=False)
        if self._process is not None:
            stop_background_pool(self._process)


_CHILD: MiniLMEmbedder | None = None
"""The model of a document embedding child process (see ``document_process``)."""


def _child_init(
    model_dir: str, intra_op_threads: int, batch_size: int, quantize: bool, nice: int, idle: bool
) -> None:
    # Lowered before ONNX Runtime and the tokenizer start their threads, which inherit it:
    # the whole child runs at ``nice`` (or SCHED_IDLE); it exits when this process is gone.
    init_background_child(nice, idle=idle)
    global _CHILD
    _CHILD = MiniLMEmbedder(
        model_dir,
        intra_op_threads=intra_op_threads,
        batch_size=batch_size,
        quantize=quantize,
        query_lane=False,
    )


def _child_embed(texts: list[str]) -> Counted:
    if _CHILD is None:
        raise EmbeddingUnavailableError("the embedding child process has no model")
    return _CHILD._counted_sync(texts)


def _child_pid() -> int:
    if _CHILD is None:
        raise EmbeddingUnavailableError("the embedding child process has no model")
    return os.getpid()
