"""What is indexed with each memory, besides its content.

A conversational turn is often unintelligible alone ("Yes, last Saturday!"): the preceding
turns of the same session carry its subject, and the session's time carries its "when".
The service knows both at write time, so it indexes them with the turn: a standard
document-expansion lever of retrieval (contextual chunk enrichment). The stored content is
never changed; only the index text is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aeterna_memory.domain.model import Layer, NewMemory


@dataclass(frozen=True, slots=True)
class IndexingPolicy:
    """How index texts are built.

    Attributes:
        dense_context: Preceding memories of the same session included in the dense text.
        lexical_context: Preceding memories of the same session included in the BM25 text.
        metadata_keys: Metadata keys whose (string or number) values are appended to both
            texts, e.g. ``session_time``.
    """

    dense_context: int = 1
    lexical_context: int = 2
    metadata_keys: Sequence[str] = ("session_time",)

    @property
    def context_needed(self) -> int:
        """How many preceding memories of a session the policy reads."""
        return max(self.dense_context, self.lexical_context)


def has_session(memory: NewMemory) -> bool:
    """Whether the memory belongs to a conversation whose earlier turns give context."""
    return memory.layer is Layer.SESSION and bool(memory.scope.user_id and memory.scope.session_id)


def _metadata_suffix(metadata: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = [
        str(metadata[k])
        for k in keys
        if isinstance(metadata.get(k), (str, int, float)) and not isinstance(metadata[k], bool)
    ]
    return " ".join(parts)


def build_texts(
    memory: NewMemory, previous: Sequence[str], policy: IndexingPolicy
) -> tuple[str, str]:
    """The dense and lexical index texts of a memory.

    Args:
        memory: The memory being written.
        previous: Contents of the preceding memories of its session, oldest first (empty
            outside a session).
        policy: The indexing policy.

    Returns:
        ``(dense_text, lexical_text)``: context, then the content, then metadata values.
    """
    suffix = _metadata_suffix(memory.metadata, policy.metadata_keys)

    def text(n: int) -> str:
        context = list(previous[-n:]) if n > 0 else []
        return "\n".join(p for p in [*context, memory.content, suffix] if p)

    return text(policy.dense_context), text(policy.lexical_context)
