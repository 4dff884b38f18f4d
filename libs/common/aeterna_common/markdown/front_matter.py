"""YAML front matter: a strict read with python-frontmatter, a lenient fallback, a normalised
write.

Real decision-record folders hold front matter that strict YAML rejects, most often an
unquoted colon in a title (``title: ADR 5: use Luxon``). Such a block is read line by line
(``key: value`` split at the first colon, ``- item`` lines appended to the key above) rather
than losing the file; the reader reports that it did so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from frontmatter.default_handlers import YAMLHandler

__all__ = ["FrontMatter", "dump_front_matter", "front_matter_lines", "read_front_matter"]

_OPEN = "---"
_CLOSE = ("---", "...")
_KEY_LINE = re.compile(r"^([A-Za-z_][\w-]*)\s*:\s*(.*)$")
_LIST_ITEM = re.compile(r"^\s*-\s+(.*)$")
_HANDLER = YAMLHandler()
_NO_WRAP = 1_000_000  # PyYAML folds lines at 80 characters by default


@dataclass(frozen=True, slots=True)
class FrontMatter:
    """A document split into its front matter and its Markdown body.

    Attributes:
        metadata: The front matter's mapping, keys in file order (empty without front matter).
        body: Everything after the closing delimiter line, byte for byte (the whole text when
            there is no front matter).
        present: Whether the document has a front matter block at all.
        lines: Lines the block takes, delimiters included (0 without one).
        warnings: What the reader had to forgive, e.g. strict YAML rejecting the block.
    """

    metadata: dict[str, Any]
    body: str
    present: bool
    lines: int
    warnings: tuple[str, ...] = field(default=())


def front_matter_lines(lines: list[str]) -> int:
    """How many leading lines a YAML front matter block takes.

    The block has python-frontmatter's (and Jekyll's) shape: a first line ``---`` and a closing
    line ``---`` or YAML's document end marker ``...``.

    Args:
        lines: The document split into lines, without line ends.

    Returns:
        The number of lines, both delimiters included; 0 when there is no closed block.
    """
    if not lines or lines[0].rstrip() != _OPEN:
        return 0
    for index in range(1, len(lines)):
        if lines[index].rstrip() in _CLOSE:
            return index + 1
    return 0


def read_front_matter(text: str) -> FrontMatter:
    """Split a document into front matter and body, reading the front matter leniently.

    Args:
        text: The whole document.

    Returns:
        The split. Values are YAML's (``date: 2024-01-31`` is a :class:`datetime.date`) when
        strict YAML accepts the block, else strings and lists of strings from the line reading.
    """
    lines = text.splitlines(keepends=True)
    count = front_matter_lines([line.rstrip("\r\n") for line in lines])
    if count == 0:
        return FrontMatter(metadata={}, body=text, present=False, lines=0)
    block = "".join(lines[1 : count - 1])
    body = "".join(lines[count:])
    warnings: list[str] = []
    try:
        loaded = _HANDLER.load(block) if block.strip() else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""
        warnings.append(f"front matter is not valid YAML{where}; read line by line")
        return FrontMatter(_lenient(block), body, True, count, tuple(warnings))
    if not isinstance(loaded, dict):
        warnings.append("front matter is not a YAML mapping; read line by line")
        return FrontMatter(_lenient(block), body, True, count, tuple(warnings))
    metadata = {str(key): value for key, value in loaded.items()}
    return FrontMatter(metadata, body, True, count, tuple(warnings))


def dump_front_matter(metadata: Mapping[str, Any]) -> str:
    """A front matter block in normalised form.

    Args:
        metadata: Keys in the order to write, values YAML can represent.

    Returns:
        ``---``, block-style YAML (keys in the given order, Unicode kept, long lines not
        folded), ``---``, each line ending in a line feed; the empty string for an empty mapping.
    """
    if not metadata:
        return ""
    # python-frontmatter's export: PyYAML SafeDumper, block style, Unicode kept.
    dumped = _HANDLER.export(dict(metadata), sort_keys=False, width=_NO_WRAP)
    return f"{_OPEN}\n{dumped}\n{_OPEN}\n"


def _lenient(block: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    last_key: str | None = None
    for raw in block.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        item = _LIST_ITEM.match(raw)
        if item is not None and last_key is not None:
            current = metadata.get(last_key)
            values = (
                current
                if isinstance(current, list)
                else ([] if current in ("", None) else [current])
            )
            values.append(_unquote(item.group(1)))
            metadata[last_key] = values
            continue
        pair = _KEY_LINE.match(raw)
        if pair is None:
            continue
        last_key = pair.group(1)
        value = pair.group(2).strip()
        if value.startswith("[") and value.endswith("]"):
            metadata[last_key] = [_unquote(part) for part in value[1:-1].split(",") if part.strip()]
        else:
            metadata[last_key] = _unquote(value)
    return metadata


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value
