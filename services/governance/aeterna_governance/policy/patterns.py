"""User-supplied regular expressions, compiled with RE2 and bounded.

RE2 (PyPI ``google-re2``) matches in time linear in the input, so no pattern backtracks
catastrophically. Its compile step is bounded too: patterns are at most
:data:`MAX_PATTERN_CHARS` characters, RE2 may use at most :data:`MAX_PROGRAM_MEMORY_BYTES`
for a program, and a compiled program above :data:`MAX_PROGRAM_SIZE` instructions (RE2's
own measure of a pattern's cost) is refused. Patterns are checked when a policy is written;
checks reuse the compiled programs from a small cache.
"""

from __future__ import annotations

import functools
from typing import Protocol

import re2

MAX_PATTERN_CHARS = 1000
"""Longest pattern accepted (the contract's limit on a rule's value)."""

MAX_PROGRAM_MEMORY_BYTES = 8 << 20
"""RE2's ``max_mem`` for one pattern (its default), in bytes; a pattern that needs more
fails to compile."""

MAX_PROGRAM_SIZE = 50_000
r"""Largest compiled program accepted, in RE2 instructions (``programsize``). Measured with
google-re2 1.1: 1,000 literal characters compile to 1,004 instructions, ``.{1000}`` to 8,004;
RE2's cap on counted repetition (1,000 in total) still lets ``\p{L}{40}`` reach ~48,000."""


class Pattern(Protocol):
    """A compiled RE2 pattern (the part of ``re2._Regexp`` this package uses)."""

    def search(self, text: str) -> object | None:
        """The first match anywhere in ``text``, or ``None``."""


class PatternError(ValueError):
    """A pattern that RE2 refuses or that exceeds a bound; the message says which."""


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PROGRAM_MEMORY_BYTES
    options.log_errors = False  # errors go to the caller as INVALID_ARGUMENT, not to stderr
    return options


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Pattern:
    """Compile ``pattern`` with RE2 within the bounds of this module.

    Args:
        pattern: An RE2 pattern (https://github.com/google/re2/wiki/Syntax).

    Returns:
        The compiled pattern; ``search`` finds a match anywhere in a text.

    Raises:
        PatternError: Malformed, longer than :data:`MAX_PATTERN_CHARS`, or compiling to more
            than :data:`MAX_PROGRAM_SIZE` instructions or :data:`MAX_PROGRAM_MEMORY_BYTES`.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PatternError(f"not a valid RE2 pattern: {detail}") from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise PatternError(
            f"pattern too complex: {compiled.programsize} RE2 instructions "
            f"(at most {MAX_PROGRAM_SIZE})"
        )
    pattern_program: Pattern = compiled
    return pattern_program
