"""The promotion rules every service applies to a memory (DOMAIN.md, Memory: Promotion):
the promotion score, the threshold, the ``sensitive``/``private`` exclusion and the
redaction of e-mail addresses and phone numbers.

Memory applies them to promote memories to a broader layer
(``aeterna_memory.domain.promotion``); sync applies them to propose knowledge drafts from
memories (``aeterna_sync.proposals``), over the values memory's API returns. One place, so
both promote by the same score and redact the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

DEFAULT_THRESHOLD = 0.8
"""Promotion score from which a memory is promoted (DOMAIN.md)."""

EXCLUDING_KEYS = ("sensitive", "private")
"""Metadata keys that, when set to anything but false/empty, keep a memory where it is."""

# Reviewed patterns, linear in the input (no nested quantifiers): an e-mail address is
# local@domain.tld with the characters RFC 5322's dot-atom allows in practice; a phone number
# is an optional + and 7-15 digits (E.164's maximum) with single spaces, dots, dashes or
# parentheses between digit groups.
EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+"
)
PHONE = re.compile(r"(?<![\w+])\+?(?:\(?\d{1,4}\)?[ .-]?){2,6}\d{2,4}(?!\w)")
REDACTED_EMAIL = "[email redacted]"
REDACTED_PHONE = "[phone redacted]"


def score(
    importance: float, access_count: int, last_accessed_at: datetime | None, now: datetime
) -> float:
    """0.6·importance + 0.3·min(access_count/10, 1) + 0.1·max(0, 1 − days since last
    access) (DOMAIN.md; a memory never accessed gets 0 for the last term).

    Args:
        importance: The memory's importance in [0, 1].
        access_count: Times it was read or found.
        last_accessed_at: When it was last accessed (timezone-aware), or None.
        now: The current time (timezone-aware).

    Returns:
        The score in [0, 1].
    """
    recency = 0.0
    if last_accessed_at is not None:
        days = (now - last_accessed_at).total_seconds() / 86_400
        recency = max(0.0, 1.0 - days)
    return 0.6 * importance + 0.3 * min(access_count / 10, 1.0) + 0.1 * recency


def _digits(match: re.Match[str]) -> int:
    return sum(c.isdigit() for c in match.group(0))


def redact(text: str) -> str:
    """Replace e-mail addresses and phone numbers (7-15 digits) in ``text``."""
    text = EMAIL.sub(REDACTED_EMAIL, text)
    return PHONE.sub(lambda m: REDACTED_PHONE if 7 <= _digits(m) <= 15 else m.group(0), text)


def excluded(metadata: Mapping[str, Any]) -> bool:
    """Whether the metadata marks the memory ``sensitive`` or ``private``."""
    return any(metadata.get(k) not in (None, False, "", "false", 0) for k in EXCLUDING_KEYS)
