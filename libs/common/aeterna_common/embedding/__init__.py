"""Text embeddings: the :class:`EmbeddingPort` protocol and its adapters.

Adapters (imported from their modules so that loading the port stays light):
:class:`aeterna_common.embedding.onnx_minilm.MiniLMEmbedder` (in process, ONNX Runtime, from a
model directory) and :class:`aeterna_common.embedding.openai_compat.OpenAICompatibleEmbedder`
(HTTP). :mod:`aeterna_common.embedding.export` builds that model directory (``make model``);
it alone needs torch, from the ``model-export`` extra.
"""

from aeterna_common.embedding.port import (
    EmbeddingError,
    EmbeddingPort,
    Embeddings,
    EmbeddingUnavailableError,
)

__all__ = ["EmbeddingError", "EmbeddingPort", "EmbeddingUnavailableError", "Embeddings"]
