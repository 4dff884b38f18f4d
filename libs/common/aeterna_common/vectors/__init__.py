"""Vector index port and its adapters.

``from aeterna_common.vectors import EdgeVectorIndex, QdrantVectorIndex`` imports the adapter
(and its backend library) on first use only, so importing the port stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aeterna_common.vectors.port import (
    DENSE_VECTOR,
    SPARSE_VECTOR,
    FieldMatch,
    IndexFilter,
    IndexPoint,
    ScoredId,
    SparseVector,
    VectorIndex,
)

if TYPE_CHECKING:
    from aeterna_common.vectors.edge import EdgeTuning, EdgeVectorIndex, VectorIndexLockedError
    from aeterna_common.vectors.qdrant import QdrantVectorIndex

_LAZY = {
    "EdgeTuning": "aeterna_common.vectors.edge",
    "EdgeVectorIndex": "aeterna_common.vectors.edge",
    "VectorIndexLockedError": "aeterna_common.vectors.edge",
    "QdrantVectorIndex": "aeterna_common.vectors.qdrant",
}

__all__ = [
    "DENSE_VECTOR",
    "SPARSE_VECTOR",
    "EdgeTuning",
    "EdgeVectorIndex",
    "FieldMatch",
    "IndexFilter",
    "IndexPoint",
    "QdrantVectorIndex",
    "ScoredId",
    "SparseVector",
    "VectorIndex",
    "VectorIndexLockedError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
