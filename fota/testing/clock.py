"""A wall clock that tests and simulations move by hand.

Pass a :class:`ManualClock` wherever fota takes a ``clock`` (``Client(clock=...)``,
``Engine(clock=...)``): it is a callable returning UTC epoch seconds, like ``time.time``.
Components that wait for a wall-clock instant subscribe to it, so moving the clock wakes them
at once instead of a test sleeping until a timer fires.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class ManualClock:
    """A controllable wall clock: epoch seconds (UTC) that change only when told to.

    The time may go backwards (:meth:`set` to an earlier instant, or a negative
    :meth:`advance`): real wall clocks jump too (NTP corrections, a wrong RTC after a
    power loss), and code under test must cope.

    Every :meth:`advance` and :meth:`set` first updates the time, then calls each subscriber
    synchronously, in subscription order; an exception from a subscriber propagates to the
    caller (the subscribers after it are not called).

    Args:
        start: the initial time, epoch seconds (default: 2027-01-15, clearly not "now").
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = _finite(start)
        self._subscribers: dict[object, Callable[[], None]] = {}

    def __call__(self) -> float:
        """The current time, epoch seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds`` (negative: back) and notify the subscribers.

        Raises:
            ValueError: ``seconds`` is not a finite number.
        """
        self._now = _finite(self._now + _finite(seconds))
        self._notify()

    def set(self, t: float) -> None:
        """Jump to epoch seconds ``t`` (earlier is allowed) and notify the subscribers.

        Raises:
            ValueError: ``t`` is not a finite number.
        """
        self._now = _finite(t)
        self._notify()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change; return a function that unsubscribes.

        The same callback may be subscribed more than once (it is then called once per
        subscription). Unsubscribing twice, or from inside a callback, is harmless.
        """
        token = object()
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def _notify(self) -> None:
        for token, callback in list(self._subscribers.items()):
            if token in self._subscribers:  # not unsubscribed by an earlier callback
                callback()

    def __repr__(self) -> str:
        return f"ManualClock({self._now!r})"


def _finite(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"clock time {value} is not a finite number of seconds")
    return value
