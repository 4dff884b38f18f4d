"""Time understanding for retrieval: a small, deterministic rule set (no network, no model).

Three questions are answered here:

* Is a query asking *when* something happened (:func:`is_temporal_query`)?
* Does a text hold a time expression (:func:`has_time_expression`)? A "when" question is
  usually answered by the memory that says "last Saturday" or "in 2022".
* Which calendar dates do a text's explicit dates (:func:`explicit_dates`) and its relative
  expressions resolved against an anchor time (:func:`resolve_relative`) name? A memory
  written in a session on 8 May 2023 that says "yesterday" is about 7 May 2023.

Dates are :class:`DateSpan` intervals (a day, a month or a year), so "in May 2023" matches a
memory about 7 May 2023. The rules cover English; anything they do not recognise simply gives
no date (the ranking then falls back to the text match). Rules rather than ``dateparser``:
``dateparser`` resolves whole strings, not expressions inside free text, and costs ~1 ms per
call, whereas these regular expressions cost microseconds per memory at query time.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache

MONTHS = {
    name.lower(): i
    for i in range(1, 13)
    for name in (calendar.month_name[i], calendar.month_abbr[i])
}
MONTHS["sept"] = 9
WEEKDAYS = {calendar.day_name[i].lower(): i for i in range(7)}
_NUMBERS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "couple of": 2,
    "few": 3,
}

_MONTH_RE = "|".join(sorted(MONTHS, key=len, reverse=True))
_WEEKDAY_RE = "|".join(WEEKDAYS)
_NUM_RE = r"\d+|" + "|".join(sorted(_NUMBERS, key=len, reverse=True))
_UNIT_RE = r"day|week|month|year|weekend"

_TEMPORAL_QUERY = re.compile(
    r"^\s*(when\b|what (date|day|time|year|month|week)\b|which (year|month|day|week)\b|"
    r"how long\b|how many (days|weeks|months|years)\b|in what (year|month)\b)",
    re.IGNORECASE,
)
_TIME_EXPRESSION = re.compile(
    rf"\b(yesterday|today|tonight|tomorrow|last night|this morning|recently|"
    rf"(last|this|next|past|coming) ({_UNIT_RE}|{_WEEKDAY_RE}|summer|winter|spring|fall|"
    rf"autumn)s?|({_NUM_RE}) ({_UNIT_RE})s? (ago|back|later)|ago|"
    rf"{_WEEKDAY_RE}|(19|20)\d\d|since|\d{{1,2}}(st|nd|rd|th))\b",
    re.IGNORECASE,
)
# Month names only capitalised: "may" and "march" are also common words.
_MONTH_NAME = re.compile(
    r"\b(" + "|".join(sorted((m.capitalize() for m in MONTHS), key=len, reverse=True)) + r")\b"
)
_DAY_MONTH_YEAR = re.compile(
    rf"\b(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?({_MONTH_RE})\.?,? ((?:19|20)\d\d)\b", re.IGNORECASE
)
_MONTH_DAY_YEAR = re.compile(
    rf"\b({_MONTH_RE})\.? (\d{{1,2}})(?:st|nd|rd|th)?,? ((?:19|20)\d\d)\b", re.IGNORECASE
)
_MONTH_YEAR = re.compile(rf"\b({_MONTH_RE})\.?,? (?:of )?((?:19|20)\d\d)\b", re.IGNORECASE)
_ISO = re.compile(r"\b((?:19|20)\d\d)-(\d\d)-(\d\d)\b")
_YEAR = re.compile(r"\b((?:19|20)\d\d)\b")
_RELATIVE = re.compile(
    rf"\b(?:(yesterday|today|tonight|tomorrow|last night|this morning)|"
    rf"(last|this|next|past) ({_UNIT_RE}|{_WEEKDAY_RE})|"
    rf"({_NUM_RE}) ({_UNIT_RE})s? (ago|back))\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True, order=True)
class DateSpan:
    """A closed interval of calendar days: one day, week, month or year.

    Attributes:
        start: First day.
        end: Last day (inclusive).
    """

    start: date
    end: date

    @staticmethod
    def day(d: date) -> DateSpan:
        """The one-day span of ``d``."""
        return DateSpan(d, d)

    @staticmethod
    def month(year: int, month: int) -> DateSpan:
        """The whole month."""
        last = calendar.monthrange(year, month)[1]
        return DateSpan(date(year, month, 1), date(year, month, last))

    @staticmethod
    def year(year: int) -> DateSpan:
        """The whole year."""
        return DateSpan(date(year, 1, 1), date(year, 12, 31))

    def overlaps(self, other: DateSpan) -> bool:
        """Whether the two intervals share at least one day."""
        return self.start <= other.end and other.start <= self.end

    def iso(self) -> str:
        """``YYYY-MM-DD`` for a day, ``YYYY-MM-DD/YYYY-MM-DD`` (ISO 8601 interval) otherwise."""
        if self.start == self.end:
            return self.start.isoformat()
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @staticmethod
    def parse_iso(text: str) -> DateSpan | None:
        """Inverse of :meth:`iso`; None when ``text`` is not one."""
        try:
            if "/" in text:
                a, b = text.split("/", 1)
                return DateSpan(date.fromisoformat(a), date.fromisoformat(b))
            return DateSpan.day(date.fromisoformat(text))
        except ValueError:
            return None


def is_temporal_query(query: str) -> bool:
    """Whether ``query`` asks when / how long ago / in what year something happened."""
    return bool(_TEMPORAL_QUERY.search(query))


@lru_cache(maxsize=65536)
def has_time_expression(text: str) -> bool:
    """Whether ``text`` holds a date, weekday, month, year or relative time expression
    (memoised: search asks it of the same candidates' texts again and again)."""
    return bool(_TIME_EXPRESSION.search(text) or _MONTH_NAME.search(text))


def _safe_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def explicit_dates(text: str) -> tuple[DateSpan, ...]:
    """Explicit calendar dates in ``text``, most precise first, without duplicates.

    Recognised: ``8 May, 2023``, ``May 8th 2023``, ``2023-05-08``, ``May 2023`` and a bare
    year ``2023``. A year already covered by a more precise date is not repeated.

    Args:
        text: Any text (a query, a memory, a session time such as ``1:56 pm on 8 May, 2023``).

    Returns:
        The spans, in order of precision then position.
    """
    days: list[DateSpan] = []
    for m in _DAY_MONTH_YEAR.finditer(text):
        if d := _safe_date(int(m.group(3)), MONTHS[m.group(2).lower()], int(m.group(1))):
            days.append(DateSpan.day(d))
    for m in _MONTH_DAY_YEAR.finditer(text):
        if d := _safe_date(int(m.group(3)), MONTHS[m.group(1).lower()], int(m.group(2))):
            days.append(DateSpan.day(d))
    for m in _ISO.finditer(text):
        if d := _safe_date(int(m.group(1)), int(m.group(2)), int(m.group(3))):
            days.append(DateSpan.day(d))
    months = [
        DateSpan.month(int(m.group(2)), MONTHS[m.group(1).lower()])
        for m in _MONTH_YEAR.finditer(text)
    ]
    covered = {s.start.year for s in (*days, *months)}
    years = [DateSpan.year(int(y)) for y in _YEAR.findall(text) if int(y) not in covered]
    months = [m for m in months if not any(m.overlaps(d) for d in days)]
    return tuple(dict.fromkeys((*days, *months, *years)))


@lru_cache(maxsize=4096)
def anchor_date(session_time: str) -> date | None:
    """The day of a session time such as ``1:56 pm on 8 May, 2023`` or ``2023-05-08T13:56``.

    Returns:
        The first day-precise date found, or None.
    """
    try:
        return datetime.fromisoformat(session_time.strip()).date()
    except ValueError:
        pass
    for span in explicit_dates(session_time):
        if span.start == span.end:
            return span.start
    return None


def _count(word: str) -> int:
    word = word.lower()
    return int(word) if word.isdigit() else _NUMBERS.get(word, 1)


def _shift_months(d: date, months: int) -> DateSpan:
    index = d.year * 12 + d.month - 1 + months
    return DateSpan.month(index // 12, index % 12 + 1)


def _week_of(d: date) -> DateSpan:
    start = d - timedelta(days=d.weekday())
    return DateSpan(start, start + timedelta(days=6))


@lru_cache(maxsize=65536)
def resolve_relative(text: str, anchor: date) -> tuple[DateSpan, ...]:
    """Relative time expressions of ``text`` resolved against ``anchor`` (the day it was said).

    "yesterday" is the day before, "last week" the calendar week (Monday-Sunday) before the
    anchor's, "last Saturday" the latest Saturday strictly before the anchor, "this Friday"
    the Friday of the anchor's week, "two weeks ago" the week around anchor − 14 days, "last
    year" the previous calendar year, and so on.

    Args:
        text: The memory's text.
        anchor: The day the text was said or written.

    Returns:
        The resolved spans, in order of appearance, without duplicates.
    """
    out: list[DateSpan] = []
    for m in _RELATIVE.finditer(text):
        word, which, unit, num, unit2, _ = m.groups()
        if word:
            w = word.lower()
            shift = {"yesterday": -1, "tomorrow": 1}.get(w, 0)
            out.append(DateSpan.day(anchor + timedelta(days=shift)))
        elif which:
            w, u = which.lower(), unit.lower()
            step = {"last": -1, "past": -1, "this": 0, "next": 1}[w]
            if u in WEEKDAYS:
                target = WEEKDAYS[u]
                if step < 0:
                    back = (anchor.weekday() - target) % 7 or 7
                    out.append(DateSpan.day(anchor - timedelta(days=back)))
                else:
                    monday = anchor - timedelta(days=anchor.weekday())
                    out.append(DateSpan.day(monday + timedelta(days=target + 7 * step)))
            elif u in ("week", "weekend"):
                out.append(_week_of(anchor + timedelta(days=7 * step)))
            elif u == "day":
                out.append(DateSpan.day(anchor + timedelta(days=step)))
            elif u == "month":
                out.append(_shift_months(anchor, step))
            else:
                out.append(DateSpan.year(anchor.year + step))
        else:
            n, u = _count(num), unit2.lower()
            if u == "day":
                out.append(DateSpan.day(anchor - timedelta(days=n)))
            elif u in ("week", "weekend"):
                out.append(_week_of(anchor - timedelta(days=7 * n)))
            elif u == "month":
                out.append(_shift_months(anchor, -n))
            else:
                out.append(DateSpan.year(anchor.year - n))
    return tuple(dict.fromkeys(out))


def event_dates(text: str, anchor: date | None) -> tuple[DateSpan, ...]:
    """Every date ``text`` names: its explicit dates, then its relative expressions resolved
    against ``anchor`` (when given)."""
    rel = resolve_relative(text, anchor) if anchor is not None else ()
    return tuple(dict.fromkeys((*explicit_dates(text), *rel)))
