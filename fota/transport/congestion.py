"""Retransmission timing and the request window for lossy links (pure: no I/O, no clock).

RFC 7252's timing is fixed: the first timeout is ACK_TIMEOUT (2 s) times a random factor up
to 1.5, doubled per retransmission. On a cellular or mesh link that loses a few percent of
datagrams, every loss then costs seconds. Two mechanisms replace it in the windowed fetcher:

* :class:`CocoaRto`, the retransmission timeout of CoCoA (draft-ietf-core-cocoa-03): two
  RFC 6298 estimators fed by measured round trips. The *strong* one takes exchanges answered
  without a retransmission (RTO = SRTT + 4 RTTVAR); the *weak* one takes exchanges answered
  after a retransmission (RTO = SRTT + 1 RTTVAR), so a lossy path still teaches the
  estimator. One deviation: CoCoA measures a weak sample from the *first* transmission,
  because a CoAP retransmission carries the same message id and token and the answer cannot be
  told apart. fota's windowed fetcher puts the transmission's number in the token, so a weak
  sample is measured from the transmission that was answered; measured from the first, the
  timeouts themselves became "round trip": at 30 % random loss the RTO grew to 0.8 s on
  loopback and a 512 KiB download took 44 s instead of 3 s. The overall RTO moves
  half-way to each strong estimate and a quarter of the way to each weak one. The backoff
  factor depends on the RTO (1.5 above 3 s, else 2; see :meth:`CocoaRto.backoff` for why not
  CoCoA's 3 below 1 s), an RTO not updated for a
  while ages toward 1 to 3 s, and it stays within ``[min_rto, max_rto]``: a lower bound keeps a
  loopback or LAN RTT of microseconds from turning into a retransmission storm.
* :class:`AimdWindow`: the number of requests in flight grows by one per answer up to the
  slow-start threshold, then by about one per window of answers (additive increase), and is
  halved on a loss (multiplicative decrease), at most once per window of requests, so one
  burst of losses halves it once. It never exceeds the configured ``Config.window``, and never
  drops below 2: on a link that loses at random (radio, not congestion) a window of one would
  let every lost block stall the transfer for a whole timeout.

:class:`Rfc7252Rto` and :class:`FixedWindow` are the RFC 7252 behaviour, for networks that
require it (``Config.retransmission = "rfc7252"``, ``Config.congestion = "fixed"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

ALPHA = 1 / 8
BETA = 1 / 4
K_STRONG = 4.0
K_WEAK = 1.0


class Rto(Protocol):
    """What the fetcher asks of a retransmission timer."""

    def timeout(self, tries: int, draw: float) -> float:
        """Seconds to wait for an answer to transmission number ``tries`` (1-based).

        ``draw`` is a random number in [0, 1) for the dithering (passed in: pure code).
        """
        ...

    def answered(self, rtt: float, tries: int, now: float) -> None:
        """Transmission number ``tries`` of a request was answered ``rtt`` seconds after it."""
        ...

    def age(self, now: float) -> None:
        """Let an RTO nobody confirmed for long move toward the middle ground."""
        ...


@dataclass
class Rfc7252Rto:
    """RFC 7252 §4.2: ACK_TIMEOUT * [1, ACK_RANDOM_FACTOR), doubled per retransmission.

    Attributes:
        ack_timeout: ACK_TIMEOUT, seconds.
        random_factor: ACK_RANDOM_FACTOR.
    """

    ack_timeout: float = 2.0
    random_factor: float = 1.5

    def timeout(self, tries: int, draw: float) -> float:
        """The RFC's timeout for transmission number ``tries``."""
        first = self.ack_timeout * (1 + (self.random_factor - 1) * draw)
        return first * 2.0 ** (tries - 1)

    def answered(self, rtt: float, tries: int, now: float) -> None:
        """RFC 7252 timing does not learn."""

    def age(self, now: float) -> None:
        """Nor does it age."""


@dataclass
class _Estimator:
    """One RFC 6298 estimator (SRTT, RTTVAR)."""

    k: float
    srtt: float | None = None
    rttvar: float = 0.0

    def sample(self, rtt: float) -> float:
        """Take a sample; return the estimator's RTO (SRTT + K * RTTVAR)."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt
        return self.srtt + self.k * self.rttvar


@dataclass
class CocoaRto:
    """CoCoA's RTO: strong and weak estimators, variable backoff, aging, bounds.

    Attributes:
        initial: the RTO before any sample, seconds (``Config.ack_timeout``).
        min_rto: the lowest RTO, seconds.
        max_rto: the highest RTO, and the longest backed-off timeout, seconds.
        dither: timeouts are drawn in ``[RTO, RTO * (1 + dither))``, so that requests lost
            together are not sent again together.
        rto: the overall RTO now.
        updated: the time of the last sample (None: none yet).
    """

    initial: float = 2.0
    min_rto: float = 0.2
    max_rto: float = 32.0
    dither: float = 0.25
    rto: float = 0.0
    updated: float | None = None
    strong: _Estimator = field(default_factory=lambda: _Estimator(K_STRONG))
    weak: _Estimator = field(default_factory=lambda: _Estimator(K_WEAK))

    def __post_init__(self) -> None:
        if not 0 < self.min_rto <= self.max_rto:
            raise ValueError(f"min_rto {self.min_rto} must be in (0, max_rto {self.max_rto}]")
        self.rto = self._bounded(self.rto or self.initial)

    def _bounded(self, rto: float) -> float:
        return min(self.max_rto, max(self.min_rto, rto))

    @staticmethod
    def backoff(rto: float) -> float:
        """The backoff factor for an RTO: 1.5 above 3 s (CoCoA's variable backoff), else 2.

        CoCoA backs off by 3 below 1 s, so that the retransmissions of a small RTO spread
        out. Here every timeout is dithered and the window halves on a loss, which spread
        them already; a factor of 3 only made the unluckiest block's chain of timeouts the
        tail of every lossy download (512 KiB at 30 % loss: 40 s, against 9 s with 2).
        """
        return 1.5 if rto > 3.0 else 2.0

    def age(self, now: float) -> None:
        """Move an RTO nobody confirmed for long toward the 1 to 3 s middle ground.

        A small RTO learnt on a path that has since gone quiet may be too small for what the
        path is now (RTO below 1 s, 16 RTOs without a sample: half-way to 1 s); a large one
        learnt in a bad moment would stall every later loss (above 3 s, 4 RTOs without a
        sample: ``1 s + RTO / 2``).
        """
        if self.updated is None:
            return
        idle = now - self.updated
        if self.rto < 1.0 and idle > 16 * self.rto:
            self.rto, self.updated = self._bounded((1.0 + self.rto) / 2), now
        elif self.rto > 3.0 and idle > 4 * self.rto:
            self.rto, self.updated = self._bounded(1.0 + self.rto / 2), now

    def timeout(self, tries: int, draw: float) -> float:
        """The RTO for transmission ``tries``: dithered, backed off, at most ``max_rto``."""
        first = self.rto * (1 + self.dither * draw)
        return min(self.max_rto, first * self.backoff(self.rto) ** (tries - 1))

    def answered(self, rtt: float, tries: int, now: float) -> None:
        """Feed a round trip: transmission ``tries``'s, strong if it was the first."""
        if rtt < 0:
            return
        self.age(now)
        if tries == 1:
            self.rto = self._bounded(0.5 * self.strong.sample(rtt) + 0.5 * self.rto)
        else:
            # CoCoA takes weak samples up to the third transmission only: measured from the
            # first, later ones are mostly timeout. Measured from the answered transmission
            # (see the module docstring), every one is a round trip.
            self.rto = self._bounded(0.25 * self.weak.sample(rtt) + 0.75 * self.rto)
        self.updated = now


class Window(Protocol):
    """What the fetcher asks of a window: how many requests may be in flight."""

    def allowed(self) -> int:
        """Requests that may be in flight now (at least 1)."""
        ...

    def sent(self) -> int:
        """Count one transmission; return its number (for :meth:`lost`)."""
        ...

    def answered(self) -> None:
        """A request was answered."""
        ...

    def lost(self, number: int) -> None:
        """The transmission numbered ``number`` (from :meth:`sent`) timed out."""
        ...


@dataclass
class FixedWindow:
    """Always ``size`` requests in flight (the fetcher's behaviour before AIMD)."""

    size: int
    _count: int = 0

    def allowed(self) -> int:
        """The fixed size."""
        return self.size

    def sent(self) -> int:
        """Number a transmission."""
        self._count += 1
        return self._count

    def answered(self) -> None:
        """Nothing changes."""

    def lost(self, number: int) -> None:
        """Nothing changes."""


@dataclass
class AimdWindow:
    """Additive increase, multiplicative decrease, between ``minimum`` and ``maximum``.

    Attributes:
        maximum: the most requests in flight (``Config.window``).
        minimum: the fewest (at most ``maximum``).
        cwnd: the window now (fractional: the additive increase adds 1/cwnd per answer).
        ssthresh: below it the window grows by one per answer (slow start).
        decreases: how many times a loss halved it.
    """

    maximum: int
    minimum: int = 2
    cwnd: float = 4.0
    ssthresh: float = float("inf")
    decreases: int = 0
    _count: int = 0
    _recover: int = 0  # losses of transmissions up to this number were already acted on

    def __post_init__(self) -> None:
        if self.maximum < 1:
            raise ValueError(f"window maximum {self.maximum} must be at least 1")
        self.minimum = max(1, min(self.minimum, self.maximum))
        self.cwnd = min(float(self.maximum), max(float(self.minimum), self.cwnd))

    def allowed(self) -> int:
        """``floor(cwnd)``, within ``minimum..maximum``."""
        return max(self.minimum, min(self.maximum, int(self.cwnd)))

    def sent(self) -> int:
        """Number a transmission."""
        self._count += 1
        return self._count

    def answered(self) -> None:
        """Grow: by one in slow start, else by 1/cwnd (about one per window of answers)."""
        if self.cwnd < self.ssthresh:
            self.cwnd += 1.0
        else:
            self.cwnd += 1.0 / self.cwnd
        self.cwnd = min(float(self.maximum), self.cwnd)

    def lost(self, number: int) -> None:
        """Halve, unless this loss belongs to a window already halved for."""
        if number <= self._recover:
            return  # the same burst: sent before the last decrease
        self.ssthresh = max(self.cwnd / 2, float(self.minimum))
        self.cwnd = self.ssthresh
        self._recover = self._count
        self.decreases += 1
