"""Maintenance windows: parsing, and open/close decisions in UTC and across DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fota.core.windows import Window, in_window, next_close, next_open, parse_window, parse_windows
from fota.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
WEEK = 7 * 86400
ALL_DAYS = frozenset(range(7))
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def at(tz: tzinfo, year: int, month: int, day: int, hour: int, minute: int) -> float:
    """An unambiguous local time in ``tz`` as UTC epoch seconds."""
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def utc(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return at(UTC, year, month, day, hour, minute)


def ws(*texts: str) -> tuple[Window, ...]:
    return parse_windows(texts)


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [
        ("Mon-Fri 02:00-04:00", {0, 1, 2, 3, 4}, 120, 240),
        ("Sat,Sun 00:00-24:00", {5, 6}, 0, 1440),
        ("daily 22:00-06:00", ALL_DAYS, 1320, 360),
        ("* 01:00-02:00", ALL_DAYS, 60, 120),
        ("DAILY 01:00-02:00", ALL_DAYS, 60, 120),
        ("Mon 23:30-01:00", {0}, 1410, 60),
        ("Fri-Mon 01:00-02:00", {4, 5, 6, 0}, 60, 120),  # day ranges wrap over the weekend
        ("Sun-Mon 01:00-02:00", {6, 0}, 60, 120),
        ("Tue-Tue 01:00-02:00", {1}, 60, 120),
        ("monday,WEDNESDAY,Friday 8:05-9:00", {0, 2, 4}, 485, 540),
        ("mon,Tue,wED,thu,FRI,sat,Sun 00:00-00:30", ALL_DAYS, 0, 30),
        ("Sat, Sun  10:00-12:00", {5, 6}, 600, 720),  # spaces in the day list are harmless
        ("Mon-Wed,Sat 10:00-12:00", {0, 1, 2, 5}, 600, 720),
        ("Mon 22:00-00:00", {0}, 1320, 1440),  # 00:00 as an end is the coming midnight
    ],
)
def test_parse_accepts(text: str, days: set[int], start: int, end: int) -> None:
    window = parse_window(text)
    assert window == Window(days=frozenset(days), start=start, end=end, text=text)


def test_parse_windows_keeps_order_and_an_empty_list_means_none() -> None:
    assert parse_windows([]) == ()
    parsed = parse_windows(["Sat 01:00-02:00", "Mon 01:00-02:00"])
    assert [w.text for w in parsed] == ["Sat 01:00-02:00", "Mon 01:00-02:00"]


def test_the_error_message_names_the_setting_the_text_and_the_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_window("Mon 25:00-26:00")
    assert str(info.value) == "maintenance_windows: 'Mon 25:00-26:00': hour 25 is not in 0..24"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected '<days> HH:MM-HH:MM'"),
        ("Mon-Fri", "expected '<days> HH:MM-HH:MM'"),
        ("Mon 02:60-03:00", "minute 60 is not in 0..59"),
        ("Mon 24:30-01:00", "24:30 is past the end of the day"),
        ("Mon 01:00-24:01", "24:01 is past the end of the day"),
        ("Mon 24:00-02:00", "cannot start at 24:00"),
        ("Mon 02:00-02:00", "start and end are both 02:00: the window is empty"),
        ("Mon 00:00-00:00", "the window is empty"),
        ("Mnday 02:00-03:00", "unknown day 'mnday'"),
        ("Mon,,Tue 02:00-03:00", "empty entry in the day list"),
        ("Mon- 02:00-03:00", "day range 'mon-' must be two days"),
        ("Mon-Wed-Fri 02:00-03:00", "day range 'mon-wed-fri' must be two days"),
        ("Mon 2-3", "'2-3' is not a time range HH:MM-HH:MM"),
        ("Mon 02:00 04:00", "'04:00' is not a time range"),
        ("Mon 02:00-", "'02:00-' is not a time range"),
        ("Mon \uff10\uff12:00-03:00", "is not a time range"),  # full-width digits
    ],
)
def test_parse_refuses(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_window(text)
    message = str(info.value)
    assert message.startswith(f"maintenance_windows: {text!r}: ")
    assert problem in message


def test_parse_refuses_what_is_not_a_string() -> None:
    with pytest.raises(ConfigError, match="maintenance_windows: 5 is not a string"):
        parse_window(5)  # type: ignore[arg-type]
    # A single string would otherwise be parsed one character at a time.
    with pytest.raises(ConfigError, match="must be a list of windows"):
        parse_windows("Mon 02:00-03:00")


def test_a_hand_built_window_is_checked_too() -> None:
    with pytest.raises(ValueError, match="days"):
        Window(days=frozenset({7}), start=0, end=60, text="")
    with pytest.raises(ValueError, match="end"):
        Window(days=ALL_DAYS, start=0, end=1441, text="")
    with pytest.raises(ValueError, match="empty"):
        Window(days=ALL_DAYS, start=60, end=60, text="")


# -- decisions in UTC ------------------------------------------------------------------------
# 2026-11-16 is a Monday.


def test_no_windows_means_no_restriction() -> None:
    now = utc(2026, 11, 16, 12, 0)
    assert in_window(now, (), UTC)
    assert next_open(now, (), UTC) is None
    assert next_close(now, (), UTC) is None


def test_simple_weekday_window() -> None:
    w = ws("Mon-Fri 02:00-04:00")
    assert in_window(utc(2026, 11, 16, 2, 0), w, UTC)  # the start is inside
    assert in_window(utc(2026, 11, 16, 3, 59), w, UTC)
    assert not in_window(utc(2026, 11, 16, 4, 0), w, UTC)  # the end is not
    assert not in_window(utc(2026, 11, 16, 1, 59), w, UTC)
    assert not in_window(utc(2026, 11, 21, 3, 0), w, UTC)  # Saturday
    assert next_close(utc(2026, 11, 16, 3, 0), w, UTC) == utc(2026, 11, 16, 4, 0)
    assert next_open(utc(2026, 11, 16, 3, 0), w, UTC) is None
    assert next_close(utc(2026, 11, 16, 5, 0), w, UTC) is None
    assert next_open(utc(2026, 11, 16, 5, 0), w, UTC) == utc(2026, 11, 17, 2, 0)
    # Friday after the window: the next one is Monday's.
    assert next_open(utc(2026, 11, 20, 5, 0), w, UTC) == utc(2026, 11, 23, 2, 0)
    # Just before the start, and fractions of a second are honoured.
    assert next_open(utc(2026, 11, 16, 2, 0) - 0.25, w, UTC) == utc(2026, 11, 16, 2, 0)


def test_a_window_wraps_past_midnight_into_the_next_day() -> None:
    w = ws("Mon 23:30-01:00")
    assert in_window(utc(2026, 11, 17, 0, 30), w, UTC)  # Tuesday 00:30
    assert not in_window(utc(2026, 11, 16, 0, 30), w, UTC)  # Monday 00:30: Sunday has none
    assert next_open(utc(2026, 11, 16, 12, 0), w, UTC) == utc(2026, 11, 16, 23, 30)
    assert next_close(utc(2026, 11, 17, 0, 30), w, UTC) == utc(2026, 11, 17, 1, 0)
    assert next_open(utc(2026, 11, 17, 1, 0), w, UTC) == utc(2026, 11, 23, 23, 30)
    # Sunday's window wraps into Monday, across the end of the week.
    assert in_window(utc(2026, 11, 16, 0, 30), ws("Sun 23:00-01:00"), UTC)


def test_weekend_only() -> None:
    w = ws("Sat,Sun 00:00-24:00")
    assert not in_window(utc(2026, 11, 20, 23, 59), w, UTC)
    assert in_window(utc(2026, 11, 21, 0, 0), w, UTC)
    assert in_window(utc(2026, 11, 22, 23, 59), w, UTC)
    assert not in_window(utc(2026, 11, 23, 0, 0), w, UTC)
    assert next_open(utc(2026, 11, 18, 12, 0), w, UTC) == utc(2026, 11, 21, 0, 0)
    # Saturday and Sunday chain into one stretch that ends Monday at midnight.
    assert next_close(utc(2026, 11, 21, 10, 0), w, UTC) == utc(2026, 11, 23, 0, 0)


def test_daily_overnight() -> None:
    w = ws("daily 22:00-06:00")
    for day in range(16, 23):
        assert in_window(utc(2026, 11, day, 23, 0), w, UTC)
        assert in_window(utc(2026, 11, day, 5, 59), w, UTC)
        assert not in_window(utc(2026, 11, day, 12, 0), w, UTC)
        assert next_open(utc(2026, 11, day, 12, 0), w, UTC) == utc(2026, 11, day, 22, 0)
        assert next_close(utc(2026, 11, day, 23, 0), w, UTC) == utc(2026, 11, day + 1, 6, 0)


def test_all_day_every_day_is_always_open_and_the_close_is_cut_about_a_week_ahead() -> None:
    w = ws("daily 00:00-24:00")
    now = utc(2026, 11, 16, 12, 0)
    assert in_window(now, w, UTC)
    assert next_open(now, w, UTC) is None
    end = next_close(now, w, UTC)
    assert end is not None
    assert now + WEEK < end < now + 10 * 86400
    assert datetime.fromtimestamp(end, UTC).time() == datetime.min.time()  # a midnight


def test_overlapping_and_touching_windows_make_one_stretch() -> None:
    w = ws("Mon 01:00-03:00", "Mon 02:00-05:00", "Mon 05:00-06:00", "Mon 07:00-08:00")
    assert next_close(utc(2026, 11, 16, 1, 30), w, UTC) == utc(2026, 11, 16, 6, 0)
    assert next_close(utc(2026, 11, 16, 5, 30), w, UTC) == utc(2026, 11, 16, 6, 0)
    assert next_open(utc(2026, 11, 16, 6, 0), w, UTC) == utc(2026, 11, 16, 7, 0)
    # A window that starts inside another but ends earlier does not shorten the stretch.
    w2 = ws("Mon 01:00-05:00", "Mon 02:00-03:00")
    assert next_close(utc(2026, 11, 16, 2, 30), w2, UTC) == utc(2026, 11, 16, 5, 0)
    # Sunday overnight chains into Monday's window.
    w3 = ws("Sun 22:00-02:00", "Mon 02:00-04:00")
    assert next_close(utc(2026, 11, 15, 23, 0), w3, UTC) == utc(2026, 11, 16, 4, 0)


def test_a_fixed_offset_zone() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    w = ws("Mon 02:00-04:00")
    assert next_open(utc(2026, 11, 15, 12, 0), w, india) == utc(2026, 11, 15, 20, 30)
    assert in_window(utc(2026, 11, 15, 21, 0), w, india)


# -- DST: Europe/Berlin ----------------------------------------------------------------------
# 2026-03-29 (Sunday): 02:00 CET -> 03:00 CEST at 01:00 UTC.
# 2026-10-25 (Sunday): 03:00 CEST -> 02:00 CET at 01:00 UTC.


def test_berlin_spring_a_start_in_the_skipped_hour_opens_when_the_clock_jumps() -> None:
    w = ws("Sun 02:30-04:00")
    saturday = at(BERLIN, 2026, 3, 28, 12, 0)
    jump = utc(2026, 3, 29, 1, 0)
    assert datetime.fromtimestamp(jump, BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
    assert next_open(saturday, w, BERLIN) == jump
    assert not in_window(jump - 1, w, BERLIN)
    assert in_window(jump, w, BERLIN)
    assert next_close(jump, w, BERLIN) == utc(2026, 3, 29, 2, 0)  # 04:00 CEST


def test_berlin_spring_a_window_wholly_in_the_skipped_hour_is_empty_that_day() -> None:
    w = ws("Sun 02:00-03:00")
    assert next_open(at(BERLIN, 2026, 3, 28, 12, 0), w, BERLIN) == utc(2026, 4, 5, 0, 0)
    for minutes in range(-90, 120, 15):
        assert not in_window(utc(2026, 3, 29, 1, 0) + 60 * minutes, w, BERLIN)


def test_berlin_spring_an_end_in_the_skipped_hour_closes_when_the_clock_jumps() -> None:
    w = ws("Sun 01:00-02:30")
    assert next_open(at(BERLIN, 2026, 3, 28, 12, 0), w, BERLIN) == utc(2026, 3, 29, 0, 0)
    assert next_close(utc(2026, 3, 29, 0, 30), w, BERLIN) == utc(2026, 3, 29, 1, 0)
    assert not in_window(utc(2026, 3, 29, 1, 0), w, BERLIN)


def test_berlin_spring_an_overnight_window_is_an_hour_shorter() -> None:
    w = ws("daily 22:00-06:00")
    opens = next_open(at(BERLIN, 2026, 3, 28, 12, 0), w, BERLIN)
    assert opens == utc(2026, 3, 28, 21, 0)  # 22:00 CET
    assert next_close(opens, w, BERLIN) == utc(2026, 3, 29, 4, 0)  # 06:00 CEST: 7 hours


def test_berlin_fall_a_start_in_the_repeated_hour_uses_its_first_occurrence() -> None:
    w = ws("Sun 02:30-04:00")
    opens = next_open(at(BERLIN, 2026, 10, 24, 12, 0), w, BERLIN)
    assert opens == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert next_close(opens, w, BERLIN) == utc(2026, 10, 25, 3, 0)  # 04:00 CET: 2.5 hours
    # Once open it stays open, also while the clock shows 02:00-02:30 the second time.
    for minutes in range(0, 150, 5):
        assert in_window(opens + 60 * minutes, w, BERLIN)
    assert not in_window(opens - 1, w, BERLIN)


def test_berlin_fall_an_end_in_the_repeated_hour_uses_its_first_occurrence() -> None:
    w = ws("Sun 01:00-02:30")
    assert next_open(at(BERLIN, 2026, 10, 24, 12, 0), w, BERLIN) == utc(2026, 10, 24, 23, 0)
    assert next_close(utc(2026, 10, 25, 0, 0), w, BERLIN) == utc(2026, 10, 25, 0, 30)
    # 02:15 CET, the clock's second pass: the window closed at the first 02:30.
    assert not in_window(utc(2026, 10, 25, 1, 15), w, BERLIN)
    assert next_open(utc(2026, 10, 25, 1, 15), w, BERLIN) == utc(2026, 11, 1, 0, 0)


def test_berlin_fall_an_overnight_window_is_an_hour_longer() -> None:
    w = ws("daily 22:00-06:00")
    opens = next_open(at(BERLIN, 2026, 10, 24, 12, 0), w, BERLIN)
    assert opens == utc(2026, 10, 24, 20, 0)  # 22:00 CEST
    assert next_close(opens, w, BERLIN) == utc(2026, 10, 25, 5, 0)  # 06:00 CET: 9 hours


class FoldBlind(tzinfo):
    """Berlin as a tzinfo that ignores ``fold``, as tzinfos written before PEP 495 do.

    A skipped time then converts to an instant before the jump, so both folds land on the
    same side of it.
    """

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        assert dt is not None
        return BERLIN.utcoffset(dt.replace(tzinfo=None, fold=1))

    def dst(self, dt: datetime | None) -> timedelta | None:
        assert dt is not None
        return BERLIN.dst(dt.replace(tzinfo=None, fold=1))

    def tzname(self, dt: datetime | None) -> str | None:
        return "fold-blind Berlin"

    def fromutc(self, dt: datetime) -> datetime:
        return BERLIN.fromutc(dt.replace(tzinfo=BERLIN)).replace(tzinfo=self, fold=0)


def test_a_skipped_start_opens_at_the_jump_also_with_a_tzinfo_that_ignores_fold() -> None:
    blind = FoldBlind()
    w = ws("Sun 02:30-04:00")
    assert datetime(2026, 3, 29, 2, 30, tzinfo=blind).timestamp() < utc(2026, 3, 29, 1, 0)
    assert next_open(at(BERLIN, 2026, 3, 28, 12, 0), w, blind) == utc(2026, 3, 29, 1, 0)


# -- DST: America/New_York -------------------------------------------------------------------
# 2026-03-08 (Sunday): 02:00 EST -> 03:00 EDT at 07:00 UTC.
# 2026-11-01 (Sunday): 02:00 EDT -> 01:00 EST at 06:00 UTC.


def test_new_york_spring() -> None:
    saturday = at(NEW_YORK, 2026, 3, 7, 12, 0)
    skipped = ws("Sun 02:15-02:45")
    assert next_open(saturday, skipped, NEW_YORK) == utc(2026, 3, 15, 6, 15)  # a week later, EDT
    straddling = ws("Sun 02:30-03:30")
    assert next_open(saturday, straddling, NEW_YORK) == utc(2026, 3, 8, 7, 0)  # 03:00 EDT
    assert next_close(utc(2026, 3, 8, 7, 0), straddling, NEW_YORK) == utc(2026, 3, 8, 7, 30)
    weekdays = ws("Mon-Fri 09:00-17:00")
    assert next_open(saturday, weekdays, NEW_YORK) == utc(2026, 3, 9, 13, 0)  # 09:00 EDT


def test_new_york_fall() -> None:
    saturday = at(NEW_YORK, 2026, 10, 31, 12, 0)
    w = ws("Sun 01:30-02:00")
    opens = next_open(saturday, w, NEW_YORK)
    assert opens == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, the first one
    assert next_close(opens, w, NEW_YORK) == utc(2026, 11, 1, 7, 0)  # 02:00 EST
    assert in_window(utc(2026, 11, 1, 6, 15), w, NEW_YORK)  # 01:15 EST, between the two
    early = ws("Sun 00:30-01:30")
    assert next_open(saturday, early, NEW_YORK) == utc(2026, 11, 1, 4, 30)
    assert next_close(utc(2026, 11, 1, 5, 0), early, NEW_YORK) == utc(2026, 11, 1, 5, 30)
    assert not in_window(utc(2026, 11, 1, 6, 45), early, NEW_YORK)  # 01:45 EST


# -- properties ------------------------------------------------------------------------------

ZONES: tuple[tzinfo, ...] = (UTC, BERLIN, NEW_YORK)
# DST changes of both zones in 2026, where the interesting cases are.
CHANGES = (
    utc(2026, 3, 8, 7, 0),
    utc(2026, 3, 29, 1, 0),
    utc(2026, 10, 25, 1, 0),
    utc(2026, 11, 1, 6, 0),
)

quarter_hours = st.integers(0, 96).map(lambda q: q * 15)  # DST changes fall on these
minutes = st.one_of(quarter_hours, st.integers(0, 1440))


def make_window(day_bits: int, start: int, end: int) -> Window:
    # Drawn as plain integers and repaired rather than filtered: much cheaper to generate.
    start %= 1440
    if end in (0, start):
        end = start + 1
    return Window(frozenset(d for d in range(7) if day_bits >> d & 1), start, end, "")


windows = st.builds(make_window, st.integers(1, 127), minutes, minutes)
instants = st.one_of(
    st.integers(int(utc(2024, 1, 1, 0, 0)), int(utc(2031, 1, 1, 0, 0))).map(float),
    st.builds(
        lambda change, offset, fraction: change + offset + fraction,
        st.sampled_from(CHANGES),
        st.integers(-3 * 86400, 3 * 86400).map(lambda s: s - s % 60),
        st.sampled_from([0.0, 0.0, 0.5, 59.999]),
    ),
)
property_settings = settings(derandomize=True, deadline=None, max_examples=200)


def text_of(window: Window) -> str:
    days = ",".join(DAY_NAMES[d] for d in sorted(window.days))
    return f"{days} {hhmm(window.start)}-{hhmm(window.end)}"


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@property_settings
@given(windows)
def test_parse_round_trips(window: Window) -> None:
    parsed = parse_window(text_of(window))
    assert (parsed.days, parsed.start, parsed.end) == (window.days, window.start, window.end)


@property_settings
@given(instants, st.lists(windows, min_size=1, max_size=3), st.sampled_from(ZONES))
def test_next_open_and_next_close_agree_with_in_window(
    now: float, ws: list[Window], tz: tzinfo
) -> None:
    opens, closes = next_open(now, ws, tz), next_close(now, ws, tz)
    if in_window(now, ws, tz):
        assert opens is None
        assert closes is not None
        assert closes > now
        # The whole stretch up to the close is open ...
        for k in range(8):
            assert in_window(now + (closes - now) * k / 8, ws, tz)
        # ... and it is closed at the close, unless the scan cut a stretch that runs on.
        assert not in_window(closes, ws, tz) or closes > now + WEEK
    else:
        assert closes is None
        # A window exists, so one opens within the scan, and no later than a week and a day.
        assert opens is not None
        assert now < opens < now + WEEK + 86400 + 3600
        assert in_window(opens, ws, tz)
        for k in range(8):
            assert not in_window(now + (opens - now) * k / 8, ws, tz)
        if opens - now > 0.5:
            assert not in_window(opens - 0.5, ws, tz)


@property_settings
@given(instants, st.lists(windows, min_size=1, max_size=3))
def test_in_utc_the_answers_match_minute_of_week_arithmetic(now: float, ws: list[Window]) -> None:
    # An independent model: each occurrence is an arc on a 604800-second circle starting Monday.
    second_of_week = (now + 3 * 86400) % WEEK  # 1970-01-01 was a Thursday
    arcs = [
        ((day * 1440 + w.start) * 60, ((w.end - w.start) % 1440 or 1440) * 60)
        for w in ws
        for day in w.days
    ]
    inside = any((second_of_week - start) % WEEK < length for start, length in arcs)
    assert in_window(now, ws, UTC) == inside
    if not inside:
        wait = min((start - second_of_week) % WEEK for start, _ in arcs)
        assert next_open(now, ws, UTC) == pytest.approx(now + wait, abs=1e-3)
