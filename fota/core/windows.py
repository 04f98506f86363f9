"""Maintenance windows: weekly stretches of local wall-clock time in which updates may happen.

Theory of operation. A window such as ``"Mon-Fri 02:00-04:00"`` names, for each day it starts on,
one stretch of local time. Each such *occurrence* is turned into a span of real time,
``[opens, closes)`` in UTC epoch seconds, and every question (are we inside, when does one open,
when does the open stretch end) is answered from those spans. Deciding on spans rather than on
the wall clock keeps the three answers consistent with each other even on the two days a year
when the wall clock jumps:

- A start or end that the clock skips (spring forward) resolves to the first instant after it,
  which is the instant of the jump: ``02:30`` on a Berlin spring-forward day opens at 03:00
  local. A window that lies wholly inside the skipped hour is empty that day.
- A start or end that the clock shows twice (fall back) resolves to its first occurrence. So a
  window lasts from the first time the clock shows its start to the first time it shows its
  end; near a fall-back hour that can differ from reading the wall clock alone, by design.

Nothing here reads a clock: ``now`` and the time zone are passed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo

from fota.core.text import show
from fota.errors import ConfigError

_FIELD = "maintenance_windows"
_DAY_MINUTES = 1440
_SCAN_DAYS = 8
"""Days ahead of today scanned: windows repeat weekly, so a week and a day always finds one."""

_DAY_NAMES = {
    name: index
    for index, names in enumerate(
        (
            ("mon", "monday"),
            ("tue", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        )
    )
    for name in names
}
_EVERY_DAY = ("daily", "*")
_TIMES = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", re.ASCII)
_EXAMPLE = "expected '<days> HH:MM-HH:MM', e.g. 'Mon-Fri 02:00-04:00'"


@dataclass(frozen=True, slots=True)
class Window:
    """One weekly maintenance window in local wall-clock time.

    Attributes:
        days: the days the window starts on, 0 = Monday .. 6 = Sunday.
        start: minutes after local midnight at which it opens, 0..1439.
        end: minutes after local midnight at which it closes, 1..1440; ``end <= start`` means
            the window runs past midnight and closes on the next day.
        text: the text it was parsed from, for messages and docs.
    """

    days: frozenset[int]
    start: int
    end: int
    text: str

    def __post_init__(self) -> None:
        # The span arithmetic below trusts these; a Window built by hand gets the same checks.
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError(f"Window.days: {sorted(self.days)} must be a non-empty subset of 0..6")
        if not 0 <= self.start < _DAY_MINUTES:
            raise ValueError(f"Window.start: {self.start} is not in 0..1439")
        if not 0 < self.end <= _DAY_MINUTES:
            raise ValueError(f"Window.end: {self.end} is not in 1..1440")
        if self.start == self.end:
            raise ValueError(f"Window: start and end are both {self.start} (an empty window)")


def parse_window(text: str) -> Window:
    """Parse one window such as ``"Mon-Fri 02:00-04:00"``.

    The days are ``daily`` or ``*``, or a comma-separated list of day names (``Mon``..``Sun`` or
    full names, any case) and day ranges (``Mon-Fri``; ``Fri-Mon`` wraps over the weekend). The
    times are ``HH:MM-HH:MM`` in local time; ``24:00`` may end a window, and an end at or before
    the start means the window runs past midnight (``daily 22:00-06:00``).

    Args:
        text: the window as written in the configuration.

    Returns:
        The parsed window; ``text`` is kept as given.

    Raises:
        ConfigError: the text is malformed; the message quotes it and says what is wrong.
    """
    if not isinstance(text, str):
        # Configuration files can hand over a number or a table where a string belongs.
        raise ConfigError(f"{_FIELD}: {show(text)} is not a string ({_EXAMPLE})")
    tokens = text.split()
    if len(tokens) < 2:
        raise _error(text, _EXAMPLE)
    # The time range is the last word; checked first, so a stray space inside it ("02:00 04:00")
    # is reported as a bad time range rather than as an unknown day.
    start, end = _parse_times(text, tokens[-1])
    # Spaces inside the day list ("Sat, Sun") are harmless.
    days = _parse_days(text, "".join(tokens[:-1]).lower())
    return Window(days=days, start=start, end=end, text=text)


def parse_windows(texts: Iterable[str]) -> tuple[Window, ...]:
    """Parse a list of windows (see :func:`parse_window`); an empty list means no restriction.

    Args:
        texts: the windows as written in the configuration.

    Returns:
        The windows, in the given order.

    Raises:
        ConfigError: ``texts`` is a single string, or one of the windows is malformed.
    """
    if isinstance(texts, str):
        # Iterating a string would parse it one character at a time, with a baffling message.
        raise ConfigError(f"{_FIELD}: must be a list of windows, not the single string {texts!r}")
    return tuple(parse_window(text) for text in texts)


def in_window(now: float, windows: Sequence[Window], tz: tzinfo) -> bool:
    """Whether ``now`` lies inside any of ``windows``.

    Args:
        now: the instant, UTC epoch seconds.
        windows: the windows, in local time of ``tz``.
        tz: the time zone the windows are read in.

    Returns:
        True inside a window, and always when ``windows`` is empty (no restriction).
    """
    if not windows:
        return True
    # An occurrence that contains now started today or yesterday (local); tomorrow is checked
    # too, for zones whose clock falls back across midnight.
    return any(opens <= now < closes for opens, closes in _spans(now, windows, tz, -1, 1))


def next_open(now: float, windows: Sequence[Window], tz: tzinfo) -> float | None:
    """When the next window opens.

    Args:
        now: the instant, UTC epoch seconds.
        windows: the windows, in local time of ``tz``.
        tz: the time zone the windows are read in.

    Returns:
        The earliest instant after ``now`` (UTC epoch seconds) at which a window opens; None
        when ``windows`` is empty or ``now`` is already inside one.
    """
    if not windows:
        return None
    spans = _spans(now, windows, tz, -1, _SCAN_DAYS)
    if any(opens <= now < closes for opens, closes in spans):
        return None
    return min((opens for opens, _ in spans if opens > now), default=None)


def next_close(now: float, windows: Sequence[Window], tz: tzinfo) -> float | None:
    """When the open stretch that contains ``now`` ends.

    Windows that overlap or follow each other without a gap count as one stretch. A stretch
    that never ends (``daily 00:00-24:00``) is cut at the last window scanned, about eight
    days ahead; the caller asks again then.

    Args:
        now: the instant, UTC epoch seconds.
        windows: the windows, in local time of ``tz``.
        tz: the time zone the windows are read in.

    Returns:
        The instant (UTC epoch seconds) the stretch ends; None when ``now`` is outside every
        window or ``windows`` is empty.
    """
    if not windows:
        return None
    spans = _spans(now, windows, tz, -1, _SCAN_DAYS)
    ends = [closes for opens, closes in spans if opens <= now < closes]
    if not ends:
        return None
    end = max(ends)
    # Sorted by opening: once a span opens after the stretch ends, no later one can extend it.
    for opens, closes in spans:
        if opens > end:
            break
        end = max(end, closes)
    return end


def _spans(
    now: float, windows: Sequence[Window], tz: tzinfo, first: int, last: int
) -> list[tuple[float, float]]:
    """The non-empty ``(opens, closes)`` spans of the occurrences, sorted by opening.

    Only occurrences starting on local days ``first``..``last`` (relative to the local date of
    ``now``) are built.
    """
    today = datetime.fromtimestamp(now, tz).date()
    spans: list[tuple[float, float]] = []
    for offset in range(first, last + 1):
        day = today + timedelta(days=offset)
        weekday = day.weekday()
        for window in windows:
            if weekday not in window.days:
                continue
            opens = _instant(day, window.start, tz)
            closes_on = day + timedelta(days=1) if window.end <= window.start else day
            closes = _instant(closes_on, window.end, tz)
            # Empty when the whole window falls into a skipped hour.
            if closes > opens:
                spans.append((opens, closes))
    spans.sort()
    return spans


def _instant(day: date, minute: int, tz: tzinfo) -> float:
    """The instant (UTC epoch seconds) of local wall-clock ``minute`` on ``day`` in ``tz``.

    A repeated time resolves to its first occurrence, a skipped time to the first instant
    after it (the instant the clock jumps).
    """
    if minute == _DAY_MINUTES:
        day, minute = day + timedelta(days=1), 0
    wall = datetime(day.year, day.month, day.day, minute // 60, minute % 60)
    # fold=0 selects the first occurrence of a repeated time.
    early = wall.replace(tzinfo=tz, fold=0).timestamp()
    if _wall(early, tz) == wall:
        return early
    # The time does not exist. A nonexistent time still converts without error (zoneinfo uses
    # the offset from before the jump for fold=0 and from after it for fold=1), so the two folds
    # land on either side of the jump: bisect between them for the first instant whose wall
    # clock is not before ``wall``.
    late = wall.replace(tzinfo=tz, fold=1).timestamp()
    low, high = math.floor(min(early, late)), math.ceil(max(early, late))
    # Another tzinfo may resolve both folds to the same side; widen until the jump is bracketed.
    for _ in range(48):
        if _wall(low, tz) < wall:
            break
        low -= 3600
    for _ in range(48):
        if _wall(high, tz) >= wall:
            break
        high += 3600
    if _wall(low, tz) >= wall or _wall(high, tz) < wall:
        return early  # No jump found nearby: a tzinfo this odd gets its own answer.
    # Offsets and jumps fall on whole seconds, so bisecting whole seconds finds the jump exactly.
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(middle, tz) < wall:
            low = middle
        else:
            high = middle
    return float(high)


def _wall(instant: float, tz: tzinfo) -> datetime:
    """The naive local wall-clock time of ``instant`` in ``tz`` (naive: compares without fold)."""
    return datetime.fromtimestamp(instant, tz).replace(tzinfo=None)


def _parse_days(text: str, spec: str) -> frozenset[int]:
    """The days of a lower-cased, space-free day list (``mon-fri,sun``, ``daily``, ``*``)."""
    if spec in _EVERY_DAY:
        return frozenset(range(7))
    days: set[int] = set()
    for item in spec.split(","):
        if not item:
            raise _error(text, "empty entry in the day list")
        if "-" not in item:
            days.add(_day(text, item))
            continue
        first_name, _, last_name = item.partition("-")
        if not first_name or not last_name or "-" in last_name:
            raise _error(text, f"day range {item!r} must be two days, e.g. 'Mon-Fri'")
        first, last = _day(text, first_name), _day(text, last_name)
        # Ranges wrap over the end of the week: Fri-Mon is Fri, Sat, Sun, Mon.
        days.update((first + step) % 7 for step in range((last - first) % 7 + 1))
    return frozenset(days)


def _day(text: str, name: str) -> int:
    """The index (0 = Monday) of one lower-cased day name."""
    try:
        return _DAY_NAMES[name]
    except KeyError:
        raise _error(
            text, f"unknown day {name!r} (use Mon..Sun, full day names, 'daily' or '*')"
        ) from None


def _parse_times(text: str, spec: str) -> tuple[int, int]:
    """The start and end minutes of ``HH:MM-HH:MM``."""
    match = _TIMES.fullmatch(spec)
    if match is None:
        raise _error(text, f"{spec!r} is not a time range HH:MM-HH:MM")
    start_hour, start_minute, end_hour, end_minute = (int(group) for group in match.groups())
    start = _minutes(text, start_hour, start_minute)
    end = _minutes(text, end_hour, end_minute)
    if start == _DAY_MINUTES:
        raise _error(text, "a window cannot start at 24:00 (start at 00:00 of the next day)")
    if start == end:
        raise _error(text, f"start and end are both {spec.partition('-')[0]}: the window is empty")
    if end == 0:
        # 00:00 as an end means the coming midnight; store it as 1440 so end is always 1..1440.
        end = _DAY_MINUTES
    return start, end


def _minutes(text: str, hour: int, minute: int) -> int:
    """Minutes after midnight of ``hour:minute``; 24:00 (the end of the day) is allowed."""
    if hour > 24:
        raise _error(text, f"hour {hour} is not in 0..24")
    if minute > 59:
        raise _error(text, f"minute {minute} is not in 0..59")
    if hour == 24 and minute:
        raise _error(text, f"24:{minute:02d} is past the end of the day (24:00 is the latest)")
    return hour * 60 + minute


def _error(text: str, problem: str) -> ConfigError:
    """The error for a malformed window: the setting, the text as written, what is wrong."""
    return ConfigError(f"{_FIELD}: {show(text, 80)}: {problem}")
