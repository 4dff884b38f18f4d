"""LoCoMo conversations as memories.

LoCoMo (Maharana et al., "Evaluating Very Long-Term Conversational Memory of LLM Agents",
ACL 2024) files are a JSON list of samples: ``sample_id``, ``conversation`` with
``speaker_a``, ``speaker_b``, ``session_N_date_time`` and ``session_N`` (turns with
``speaker``, ``dia_id``, ``text`` and, for shared images, ``blip_caption``), and ``qa``
(``question``, ``answer``, ``evidence`` dia_ids, ``category`` 1-5).

Each conversation is one user scope (user id = ``sample_id``), each session one session id,
each turn one SESSION-layer memory ``"{speaker}: {text}"`` (plus the image caption) with
metadata ``dia_id``, ``speaker`` and ``session_time``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SESSION = re.compile(r"^session_(\d+)$")


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a conversation, ready to store."""

    sample_id: str
    session_id: str
    dia_id: str
    speaker: str
    session_time: str
    content: str


def load(path: str | Path) -> list[dict[str, Any]]:
    """Read a LoCoMo file.

    Raises:
        ValueError: it is not a list of samples with ``sample_id`` and ``conversation``.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(
        isinstance(s, dict) and "sample_id" in s and "conversation" in s for s in data
    ):
        raise ValueError(f"{path}: not a LoCoMo file (a list of samples)")
    return data


def turn_content(turn: Mapping[str, Any]) -> str:
    """``"{speaker}: {text}"`` plus ``" [image: {caption}]"`` when the turn shared an image."""
    text = f"{turn['speaker']}: {turn.get('text', '')}".strip()
    caption = turn.get("blip_caption")
    return f"{text} [image: {caption}]" if caption else text


def sessions(sample: Mapping[str, Any]) -> Iterator[tuple[str, str, list[Mapping[str, Any]]]]:
    """``(session_id, session_time, turns)`` of a sample, in session order."""
    conv = sample["conversation"]
    numbers = sorted(int(m.group(1)) for k in conv if (m := _SESSION.match(k)))
    for n in numbers:
        turns = conv.get(f"session_{n}") or []
        if turns:
            yield f"session_{n}", str(conv.get(f"session_{n}_date_time", "")), list(turns)


def turns(sample: Mapping[str, Any]) -> Iterator[Turn]:
    """Every turn of a sample, in conversation order."""
    for session_id, when, items in sessions(sample):
        for t in items:
            yield Turn(
                sample_id=str(sample["sample_id"]),
                session_id=session_id,
                dia_id=str(t["dia_id"]),
                speaker=str(t["speaker"]),
                session_time=when,
                content=turn_content(t),
            )
