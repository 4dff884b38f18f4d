"""Verification of a tenant's chain against its checkpoints.

Walks the entries in sequence order and stops at the first one that is broken:

1. ``SEQUENCE_GAP``: the next sequence number is missing (a deleted row); the missing
   number is named.
2. ``HASH_MISMATCH``: the stored hash is not the hash of the entry's fields (an altered row).
3. ``LINK_MISMATCH``: ``previous_hash`` is not the stored hash of the entry before (a row
   removed and the rest renumbered, or entries reordered).
4. ``CHECKPOINT_MISMATCH``: a checkpoint's sequence holds another hash (the chain was
   rewritten consistently from some entry on), or the chain ends before a checkpoint's
   sequence (truncated); the checkpoint's entry, or the first missing one, is named.

Checks 1-3 are of the chain alone; only checkpoints, recorded by a separate job into a
table that is append-only too, detect a tail that was cut off or recomputed.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from aeterna_governance.audit.chain import GENESIS_HASH, AuditRecord, recompute


class Break(enum.IntEnum):
    """Why a chain does not verify (``AuditBreak`` numbers)."""

    HASH_MISMATCH = 1
    LINK_MISMATCH = 2
    SEQUENCE_GAP = 3
    CHECKPOINT_MISMATCH = 4


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A recorded chain head.

    Attributes:
        sequence: The head's sequence then.
        hash: The head's hash then.
        time: When it was recorded.
    """

    sequence: int
    hash: str
    time: datetime


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of :func:`verify`.

    Attributes:
        entries_checked: Entries read before stopping (all of them when valid).
        head_hash: Stored hash of the last entry that verified (:data:`GENESIS_HASH` for
            none).
        broken_sequence: The first broken entry's sequence, or ``None`` when valid.
        reason: Why it is broken, or ``None``.
        checkpoint: The latest checkpoint, if any.
    """

    entries_checked: int
    head_hash: str
    broken_sequence: int | None
    reason: Break | None
    checkpoint: Checkpoint | None

    @property
    def valid(self) -> bool:
        """Whether the whole chain verifies."""
        return self.reason is None


async def verify(
    entries: AsyncIterable[AuditRecord], checkpoints: Sequence[Checkpoint]
) -> Verification:
    """Verify a tenant's chain (see the module docstring).

    Args:
        entries: The tenant's entries in ascending sequence order.
        checkpoints: The tenant's checkpoints, any order.

    Returns:
        The outcome, naming the first broken entry.
    """
    by_sequence = {c.sequence: c for c in checkpoints}
    latest = max(checkpoints, key=lambda c: c.sequence, default=None)
    expected, previous, checked = 1, GENESIS_HASH, 0

    def broken(sequence: int, reason: Break) -> Verification:
        return Verification(checked, previous, sequence, reason, latest)

    async for entry in entries:
        if entry.sequence != expected:
            return broken(expected, Break.SEQUENCE_GAP)
        checked += 1
        if recompute(entry) != entry.hash:
            return broken(entry.sequence, Break.HASH_MISMATCH)
        if entry.previous_hash != previous:
            return broken(entry.sequence, Break.LINK_MISMATCH)
        mark = by_sequence.get(entry.sequence)
        if mark is not None and mark.hash != entry.hash:
            return broken(entry.sequence, Break.CHECKPOINT_MISMATCH)
        previous = entry.hash
        expected += 1
    if latest is not None and latest.sequence >= expected:
        return broken(expected, Break.CHECKPOINT_MISMATCH)
    return Verification(checked, previous, None, None, latest)
