"""What is indexed with each memory, besides its content.

A conversational turn is often unintelligible alone ("Yes, last Saturday!"): the preceding
turns of the same session carry its subject, and the session's time carries its "when".
The service knows both at write time, so it indexes them with the turn, a standard
document-expansion lever (contextual enrichment). The stored content never changes; only
what is indexed does:

* dense text: the content, optionally prefixed ``"[{time}] "`` and followed by preceding
  turns (both off by default: on LoCoMo dev they moved recall@10 by < 0.01 and cost 25-200 %
  more embedding time, the ingest bottleneck);
* lexical (BM25F) context: the time and the preceding turns, counted at a lower weight than
  the content's own terms (see :mod:`aeterna_common.search.lexical`).

Defaults were chosen on LoCoMo dev conversations for robustness, not peak score: every
neighbouring setting (0-3 context turns, with or without time) stays within ±0.02 recall@10
(``bench/locomo_eval.py research``).
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
        dense_context: Preceding memories of the same session appended to the dense text.
        lexical_context: Preceding memories of the same session in the BM25 context.
        metadata_keys: Metadata keys whose string or number values (e.g. ``session_time``)
            join the BM25 context and, with ``dense_metadata``, prefix the dense text in
            brackets.
        dense_metadata: Prefix the dense text with those values.
    """

    dense_context: int = 0
    lexical_context: int = 2
    metadata_keys: Sequence[str] = ("session_time",)
    dense_metadata: bool = False

    @property
    def context_needed(self) -> int:
        """How many preceding memories of a session the policy reads."""
        return max(self.dense_context, self.lexical_context)


@dataclass(frozen=True, slots=True)
class IndexTexts:
    """What is embedded and what is BM25-encoded for one memory.

    Attributes:
        dense: The text embedded into the dense vector.
        lexical_context: Context texts encoded at the context weight beside the content.
    """

    dense: str
    lexical_context: tuple[str, ...]


def has_session(memory: NewMemory) -> bool:
    """Whether the memory belongs to a conversation whose earlier turns give context."""
    return memory.layer is Layer.SESSION and bool(memory.scope.user_id and memory.scope.session_id)


def _metadata_values(metadata: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [
        str(metadata[k])
        for k in keys
        if isinstance(metadata.get(k), (str, int, float))
        and not isinstance(metadata[k], bool)
        and str(metadata[k]).strip()
    ]


def build_texts(memory: NewMemory, previous: Sequence[str], policy: IndexingPolicy) -> IndexTexts:
    """The index texts of a memory.

    Args:
        memory: The memory being written.
        previous: Contents of the preceding memories of its session, oldest first (empty
            outside a session).
        policy: The indexing policy.

    Returns:
        The dense text and the lexical context.
    """
    values = _metadata_values(memory.metadata, policy.metadata_keys)
    prefix = f"[{' '.join(values)}] " if values and policy.dense_metadata else ""
    dense_ctx = list(previous[-policy.dense_context :]) if policy.dense_context > 0 else []
    lexical_ctx = list(previous[-policy.lexical_context :]) if policy.lexical_context > 0 else []
    dense = "\n".join([prefix + memory.content, *dense_ctx])
    return IndexTexts(dense=dense, lexical_context=(*values, *lexical_ctx))
