"""Policy: the pure decisions about waiting, retrying, politeness and forcing.

Each rule is a function of values (the manifests involved, the journal record, the time passed
in as ``now``, the settings), never of the world. docs/polite-deployment.md gives the rules as a
table; the names here follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, tzinfo

from fota.core.manifest import Manifest
from fota.core.record import Record
from fota.core.windows import Window, in_window, next_open

DEADLINE = "deadline"
DEFERRAL_LIMIT = "deferral limit"
UNANSWERED = "unanswered"
"""Forcing rules, as reported to the server and told to the application."""

SPENT = 0.001
"""Seconds of deferral left below which the bound counts as spent. A deferral cut to the bound
ends at ``now + (bound - so far)``; adding the timestamps back up can miss the bound by a
rounding error, and an exact comparison would then grant a deferral of zero length again and
again."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the core decides with (built from :class:`fota.Config`).

    Attributes:
        device_class: this device's class; manifests for another class are refused.
        max_image_size: largest image accepted, in bytes.
        progress_step: the application hears about progress every this many percent.
        max_attempts: failed download attempts before the update fails.
        retry_base: first retry delay in seconds; doubles per attempt.
        retry_cap: longest retry delay in seconds.
        retry_jitter: retry delays are spread by this fraction either way.
        restart_limit: process restarts during one update's active steps before it fails
            (breaks reboot loops).
        max_download_bytes: data budget: bytes received for one update, across attempts and
            restarts (metered links); None: no limit.
        max_download_time: wall-clock seconds from the first download start; None: no limit.
        resume: after a restart in DOWNLOADING: ``resume`` from the verified fragments,
            ``restart`` from zero, or ``none`` (the update fails and is reported).
        max_deferral: cumulative deferral allowed per severity (optional, mandatory,
            critical), seconds; None: unbounded. A manifest's ``max_deferral`` tightens it.
        deadline_after: per severity, seconds after an update is first seen at which it is
            forced; None: only the manifest's ``deadline`` forces.
        unanswered: ``wait`` (an update nobody answers waits) or ``proceed`` (after
            ``unanswered_grace`` seconds without a registered handler, it proceeds, forced).
        unanswered_grace: see ``unanswered``.
        quiet_period: seconds after the first start during which updates are held.
        windows: maintenance windows (local time in ``tz``); empty: any time.
        tz: the time zone the windows are in.
        conditions: names of the configured conditions (callbacks or commands) the engine
            evaluates before a held step proceeds.
        condition_recheck: seconds before failing conditions are evaluated again.
        gates_download: locks, windows, quiet period and conditions hold the download too
            (not only the install).
        max_locks: most inhibitor locks held at once.
        max_lock_ttl: longest time to live of a lock, seconds (a crashed holder's lock expires).
        self_test_deadline: seconds after the new image starts (after the install, or after
            the restart it needed) within which the self-test must pass; else roll back.
        self_test_interval: seconds between self-test attempts until it passes.
        origins: where manifests, keysets and images may be fetched from (as
            :func:`fota.core.uri.origin` spells them); empty: anywhere.
        not_found_budget: seconds a download keeps retrying an image the server answers
            4.04 for (it is addressed by its digest: seldom really gone), counted from the
            first 4.04 since the last verified fragment; then the update fails.
    """

    device_class: str
    max_image_size: int = 1 << 30
    progress_step: int = 5
    max_attempts: int = 5
    retry_base: float = 1.0
    retry_cap: float = 300.0
    restart_limit: int = 8
    retry_jitter: float = 0.25
    max_download_bytes: int | None = None
    max_download_time: float | None = None
    resume: str = "resume"
    max_deferral: tuple[float | None, float | None, float | None] = (None, 7 * 86400.0, 86400.0)
    deadline_after: tuple[float | None, float | None, float | None] = (None, None, None)
    unanswered: str = "wait"
    unanswered_grace: float = 3600.0
    quiet_period: float = 0.0
    windows: tuple[Window, ...] = ()
    tz: tzinfo = field(default=UTC)
    conditions: tuple[str, ...] = ()
    condition_recheck: float = 300.0
    gates_download: bool = False
    max_locks: int = 32
    max_lock_ttl: float = 86400.0
    self_test_deadline: float = 300.0
    self_test_interval: float = 10.0
    origins: tuple[str, ...] = ()
    not_found_budget: float = 600.0


def must_ask(installed: Manifest | None) -> bool:
    """Whether the application decides when the next update downloads and installs.

    The running image's manifest decides, not the new one: an image that declares itself
    polite gets polite updates. With no running image (first install on an empty device)
    there is nothing to interrupt, so the update proceeds at once.
    """
    return installed is not None and installed.body.polite


def backoff(attempt: int, base: float, cap: float, draw: float, jitter: float) -> float:
    """The one back-off of fota: the wait before retry number ``attempt`` (1-based).

    ``base`` doubling per attempt up to ``cap``, spread over +/- ``jitter`` (a fraction) by
    ``draw``, a random number in [0, 1) the caller passes in (the core has no random source),
    so a fleet that lost its server at the same moment does not come back at the same moment.
    0.5 gives the plain delay. Every retry of the engine, its child tasks and the transport's
    announcement watch waits this (with its own base, cap and jitter).
    """
    nominal = min(cap, base * 2.0 ** min(max(0, attempt - 1), 64))
    return float(nominal * (1 + jitter * (2 * draw - 1)))


def retry_delay(attempt: int, policy: Policy, draw: float = 0.5) -> float:
    """Delay before retry number ``attempt`` of a failed step: :func:`backoff` by the policy.

    ``retry_base`` doubling to ``retry_cap``, spread by ``retry_jitter``.
    """
    return backoff(attempt, policy.retry_base, policy.retry_cap, draw, policy.retry_jitter)


def stall_delay(elapsed: float, policy: Policy, draw: float = 0.5) -> float:
    """Delay before asking again for a download that stalled ``elapsed`` seconds ago.

    A stall (the image answered 4.04, the disk is full) is not a failed attempt: it is
    waited out. Each wait is as long as the stall so far (so the waits double), from
    ``retry_base`` to ``retry_cap``, spread by ``retry_jitter`` with ``draw`` as in
    :func:`retry_delay`.
    """
    base = min(policy.retry_cap, max(policy.retry_base, elapsed))
    return float(base * (1 + policy.retry_jitter * (2 * draw - 1)))


# -- deferral and forcing ------------------------------------------------------------------


def deadline_of(manifest: Manifest, record: Record, policy: Policy) -> float | None:
    """The instant the update is forced past every wait.

    The manifest's deadline, or the severity's ``deadline_after`` counted from when the update
    was first seen, whichever is earlier.
    """
    found: list[float] = []
    if manifest.body.deadline is not None:
        found.append(float(manifest.body.deadline))
    after = policy.deadline_after[manifest.body.severity]
    if after is not None and record.first_seen is not None:
        found.append(record.first_seen + after)
    return min(found) if found else None


def deferral_bound(manifest: Manifest, policy: Policy) -> float | None:
    """Cumulative deferral allowed for the update, seconds (None: unbounded).

    The device's bound for the severity, tightened by the manifest's ``max_deferral`` (0 in the
    manifest means it sets none).
    """
    bound = policy.max_deferral[manifest.body.severity]
    if manifest.body.max_deferral > 0:
        mine = float(manifest.body.max_deferral)
        bound = mine if bound is None else min(bound, mine)
    return bound


def deferred_so_far(record: Record, now: float) -> float:
    """Seconds deferred: every ended deferral plus the current one up to ``now``."""
    current = 0.0
    if record.defer_since is not None and record.defer_until is not None:
        current = max(0.0, min(now, record.defer_until) - record.defer_since)
    return record.deferred_total + current


def force_reason(now: float, manifest: Manifest, record: Record, policy: Policy) -> str:
    """The rule that forces the update past the application now, or "".

    ``deadline``: the deadline passed (it also forces past locks, windows and conditions).
    ``deferral limit``: the cumulative deferral reached its bound (the application may not
    defer again; local holds still apply until the deadline).
    """
    deadline = deadline_of(manifest, record, policy)
    if deadline is not None and now >= deadline:
        return DEADLINE
    bound = deferral_bound(manifest, policy)
    if bound is not None and deferred_so_far(record, now) >= bound - SPENT:
        return DEFERRAL_LIMIT
    return ""


def clamp_deferral(
    now: float, until: float, manifest: Manifest, record: Record, policy: Policy
) -> float:
    """The end of a deferral asked until ``until``, cut to the bound and the deadline.

    A result ``<= now`` means no deferral is allowed: the step proceeds, forced.
    """
    end = until
    bound = deferral_bound(manifest, policy)
    if bound is not None:
        end = min(end, now + max(0.0, bound - deferred_so_far(record, now)))
    deadline = deadline_of(manifest, record, policy)
    if deadline is not None:
        end = min(end, deadline)
    return end


# -- local holds (gates) -------------------------------------------------------------------


def active_locks(record: Record, now: float) -> tuple[tuple[str, float], ...]:
    """Inhibitor locks not yet expired."""
    return tuple(lock for lock in record.locks if lock[1] > now)


def capped_locks(record: Record, now: float, max_ttl: float) -> tuple[tuple[str, float], ...]:
    """Active locks, none expiring later than ``now + max_ttl``.

    A lock's expiry is capped when it is taken; after the wall clock stepped back (an RTC
    reset), a journaled expiry can lie further ahead than that, and a crashed holder's lock
    must still end within ``max_ttl``.
    """
    return tuple((name, min(until, now + max_ttl)) for name, until in active_locks(record, now))


def holds_apply(step: str, installed: Manifest | None, policy: Policy) -> bool:
    """Whether local holds apply to ``step`` at all.

    A first install on an empty device has nothing to interrupt; downloads are held only when
    configured.
    """
    return installed is not None and (step == "install" or policy.gates_download)


def in_quiet_period(now: float, record: Record, policy: Policy) -> bool:
    """Whether ``now`` is within ``quiet_period`` seconds after the first start.

    A wall clock earlier than the first start is a clock that was stepped back (the first
    start was read from it): that is no quiet period, or a step back of days would hold every
    update for days, and with ``quiet_period = 0`` too (found by tests/e2e/test_chaos.py).
    """
    start = record.provisioned_at
    return start is not None and start <= now < start + policy.quiet_period


def blockers(
    now: float,
    step: str,
    record: Record,
    installed: Manifest | None,
    policy: Policy,
    failing: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """What holds ``step`` now, by name (empty: it may proceed).

    ``failing`` are the conditions the engine found failing; the rest is decided here.
    """
    if not holds_apply(step, installed, policy):
        return ()
    found: list[str] = []
    if in_quiet_period(now, record, policy):
        found.append("quiet period")
    if not in_window(now, policy.windows, policy.tz):
        found.append("maintenance window")
    found += [f"lock {name}" for name, _ in active_locks(record, now)]
    found += [f"condition {name}" for name in failing]
    return tuple(found)


def needs_check(step: str, installed: Manifest | None, policy: Policy) -> bool:
    """Conditions must be evaluated (by the engine) before ``step`` may proceed."""
    return holds_apply(step, installed, policy) and bool(policy.conditions)


def next_check(
    now: float,
    record: Record,
    policy: Policy,
    failing: tuple[str, ...],
    deadline: float | None,
) -> float | None:
    """When a held step should be looked at again.

    The earliest of the quiet period's end, the next window, a lock's expiry, a condition
    re-check and the deadline.
    """
    found: list[float] = []
    start = record.provisioned_at
    if start is not None and in_quiet_period(now, record, policy):
        found.append(start + policy.quiet_period)
    opens = next_open(now, policy.windows, policy.tz)
    if opens is not None:
        found.append(opens)
    found += [until for _, until in active_locks(record, now)]
    if failing:
        found.append(now + policy.condition_recheck)
    if deadline is not None:
        found.append(deadline)
    return min(found) if found else None
