"""Text embeddings: the :class:`EmbeddingPort` protocol and its adapters.

Adapters (imported from their modules so that loading the port stays light):
:class:`aeterna_common.embedding.onnx_minilm.MiniLMEmbedder` (in process, ONNX Runtime) and
:class:`aeterna_common.embedding.openai_compat.OpenAICompatibleEmbedder` (HTTP).
"""

from aeterna_common.embedding.port import EmbeddingError, EmbeddingPort

__all__ = ["EmbeddingError", "EmbeddingPort"]
