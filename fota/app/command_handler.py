"""The hook-command handler: authorization decided by a command, for integrators without Python.

A configured program answers each authorization request with its exit status, as Mender's
state scripts do (docs/callbacks.md, "The hook-command handler"):

* ``0``: authorize;
* ``21``: defer (Mender's "retry later"), until ``now + defer`` or the time the command printed
  as a ``FOTA_DEFER_UNTIL=`` line;
* any other exit status from 1 to 125: reject, with the reason the command printed as a
  ``FOTA_REASON=`` line, or "authorization command exited N".

A command that cannot run, times out or is killed by a signal is a broken script, not an
answer, and so are the shell's 126 (not executable), 127 (not found) and 128 + N (a child
killed by signal N): the update is deferred by ``retry`` seconds and asked again (the core
bounds deferral by the update's severity and deadline, so a broken script cannot hold an
update forever).

Every command runs through :func:`fota.hooks.run`: an argument list, stdin ``/dev/null``, the
process group killed on timeout.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

import structlog

from fota import hooks
from fota.errors import ResultCode
from fota.handler import BaseHandler, Decision, UpdateInfo

log = structlog.get_logger(__name__)

DEFER_EXIT = 21
"""The exit status that means "ask again later" (Mender's ``21``, retry later)."""
BROKEN_EXITS = frozenset({126, 127})
"""Exit statuses a shell gives for a program it could not run: a broken script, not a no."""

DEFER_UNTIL_KEY = "FOTA_DEFER_UNTIL="
REASON_KEY = "FOTA_REASON="

_EPOCH = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _seconds(value: float) -> str:
    # Whole seconds: shell arithmetic ($(( ... ))) knows only integers.
    return str(math.floor(value))


def _iso(moment: datetime) -> str:
    """``moment`` as ISO 8601 UTC with a ``Z``, to the second (``date -d`` reads it)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def update_env(update: UpdateInfo) -> dict[str, str]:
    """The environment variables that describe ``update`` to a command.

    Args:
        update: what the engine told the handler.

    Returns:
        ``FOTA_UPDATE_ID``, ``FOTA_VERSION``, ``FOTA_INSTALLED_VERSION``, ``FOTA_COMPONENT``,
        ``FOTA_SEVERITY``, ``FOTA_UPDATE_REASON``, ``FOTA_POLITE``, ``FOTA_IMAGE_SIZE``,
        ``FOTA_DEADLINE``, ``FOTA_DEFERRED`` and ``FOTA_DEFERRAL_LIMIT``.
    """
    return {
        "FOTA_UPDATE_ID": update.update_id,
        "FOTA_VERSION": update.version,
        "FOTA_INSTALLED_VERSION": update.installed_version or "",
        "FOTA_COMPONENT": update.component.name.lower(),
        "FOTA_SEVERITY": update.severity.name.lower(),
        "FOTA_UPDATE_REASON": update.reason.value,
        "FOTA_POLITE": "1" if update.polite else "0",
        "FOTA_IMAGE_SIZE": str(update.image_size),
        "FOTA_DEADLINE": _iso(update.deadline) if update.deadline is not None else "",
        "FOTA_DEFERRED": _seconds(update.deferred),
        "FOTA_DEFERRAL_LIMIT": (
            _seconds(update.deferral_limit) if update.deferral_limit is not None else ""
        ),
    }


def parse_defer_until(value: str) -> datetime:
    """Read a ``FOTA_DEFER_UNTIL`` value: ISO 8601 with a zone, or epoch seconds.

    Args:
        value: the text after ``FOTA_DEFER_UNTIL=``.

    Returns:
        The instant, timezone-aware (UTC).

    Raises:
        ValueError: neither form, an ISO 8601 time without a zone, or out of range.
    """
    text = value.strip()
    if _EPOCH.fullmatch(text):
        try:
            return datetime.fromtimestamp(float(text), UTC)
        except (OverflowError, OSError) as exc:
            raise ValueError(f"epoch seconds {text} out of range") from exc
    moment = datetime.fromisoformat(text)  # ValueError names the text
    if moment.tzinfo is None:
        # A local time would depend on the daemon's TZ: ambiguous across a DST change.
        raise ValueError(f"{text!r} has no time zone (add Z or +HH:MM)")
    return moment.astimezone(UTC)


class _Answer:
    """The ``FOTA_DEFER_UNTIL=`` and ``FOTA_REASON=`` lines of one run (the last of each wins)."""

    def __init__(self) -> None:
        self.defer_until: str | None = None
        self.reason = ""

    def line(self, line: str) -> None:
        text = line.strip()
        if text.startswith(DEFER_UNTIL_KEY):
            self.defer_until = text.removeprefix(DEFER_UNTIL_KEY)
        elif text.startswith(REASON_KEY):
            self.reason = text.removeprefix(REASON_KEY).strip()


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"CommandHandler: {name} must be a positive number of seconds, not {value}"
        )
    return value


class CommandHandler(BaseHandler):
    """Answers authorization requests by running a command; tells events to another.

    Args:
        argv: the authorization command (program and arguments, no shell).
        timeout: seconds each command may run; then its process group is killed.
        defer: seconds an exit status 21 defers, when the command names no time.
        retry: seconds to wait before asking again when the command could not run, timed
            out or was killed by a signal.
        event_command: run on completion and on forcing (optional; empty: none).
        clock: wall-clock time in epoch seconds (UTC), as ``time.time``; the base of every
            deferral (tests pass a :class:`fota.testing.ManualClock`).

    Raises:
        ValueError: ``argv`` is empty, or a duration is not a positive number.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        defer: float = 3600.0,
        retry: float = 300.0,
        event_command: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(argv, str) or isinstance(event_command, str):
            # A string is a Sequence[str] too: "sh -c x" would run a program named "s".
            raise ValueError("CommandHandler: commands are argument lists, not strings")
        if not argv:
            raise ValueError("CommandHandler: empty authorization command")
        self.argv = tuple(argv)
        self.timeout = _positive("timeout", timeout)
        self.defer = _positive("defer", defer)
        self.retry = _positive("retry", retry)
        self.event_command = tuple(event_command)
        self.clock = clock
        self._events: set[asyncio.Task[None]] = set()

    # -- authorization ----------------------------------------------------------------

    async def on_download_authorization(self, update: UpdateInfo) -> Decision:
        """Run the command with ``FOTA_STEP=download`` and turn its exit status into a decision."""
        return await self._authorize("download", update)

    async def on_install_authorization(self, update: UpdateInfo) -> Decision:
        """Run the command with ``FOTA_STEP=install`` and turn its exit status into a decision."""
        return await self._authorize("install", update)

    async def _authorize(self, step: str, update: UpdateInfo) -> Decision:
        name = f"authorization {step}"
        answer = _Answer()
        env = {**update_env(update), "FOTA_STEP": step}
        try:
            done = await hooks.run(
                self.argv, name=name, timeout=self.timeout, env=env, on_line=answer.line
            )
        except OSError as exc:  # CommandNotFound, or no pipe / no process left (EMFILE, EAGAIN)
            why = (exc.strerror or str(exc)).removeprefix(f"{name}: ")
            return self._failed(step, update, why)
        if done.timed_out:
            return self._failed(step, update, f"timed out after {self.timeout:g} s")
        if done.code < 0:
            return self._failed(step, update, f"killed by signal {-done.code}")
        if done.code == 0:
            return Decision.authorize()
        if done.code == DEFER_EXIT:
            return Decision.defer(self._defer_until(step, update, answer), answer.reason)
        if done.code in BROKEN_EXITS or done.code >= 128:
            # The shell's "not executable" / "not found", or a child killed by signal N
            # (128 + N): the script broke; rejecting would drop the update for good.
            return self._failed(step, update, f"exit status {done.code} (the script failed)")
        return Decision.reject(answer.reason or f"authorization command exited {done.code}")

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _defer_until(self, step: str, update: UpdateInfo, answer: _Answer) -> datetime:
        now = self._now()
        default = datetime.fromtimestamp(now.timestamp() + self.defer, UTC)
        if answer.defer_until is None:
            return default
        try:
            until = parse_defer_until(answer.defer_until)
        except ValueError as exc:
            why = str(exc)
        else:
            if until > now:
                return until
            why = f"{_iso(until)} is not in the future (now {_iso(now)})"
        # The script's mistake must not turn a deferral into an immediate re-ask loop: say so,
        # and defer by the configured default instead.
        log.warning(
            "defer_until_ignored",
            step=step,
            update_id=update.update_id,
            value=answer.defer_until,
            why=why,
            default=_iso(default),
        )
        return default

    def _failed(self, step: str, update: UpdateInfo, why: str) -> Decision:
        # A broken script is not a rejection: dropping an update for it would be worse than
        # waiting. The core bounds deferral (severity, deadline), so this cannot last forever.
        until = datetime.fromtimestamp(self.clock() + self.retry, UTC)
        log.error(
            "authorization_command_failed",
            step=step,
            update_id=update.update_id,
            error=why,
            retry_at=_iso(until),
        )
        return Decision.defer(until, reason=f"authorization command failed: {why}")

    # -- events -----------------------------------------------------------------------

    async def on_complete(self, update: UpdateInfo, result: ResultCode, detail: str) -> None:
        """Run the event command with ``FOTA_EVENT=completed`` (if one is configured)."""
        await self._event(
            "completed",
            update,
            {
                "FOTA_RESULT": result.name,
                "FOTA_RESULT_CODE": str(int(result)),
                "FOTA_DETAIL": detail,
            },
        )

    async def on_forced(self, update: UpdateInfo, step: str, reason: str) -> None:
        """Run the event command with ``FOTA_EVENT=forced`` (if one is configured)."""
        await self._event(
            "forced", update, {"FOTA_FORCED_STEP": step, "FOTA_FORCED_REASON": reason}
        )

    async def drain(self) -> None:
        """Return when every event command started so far has ended (tests, shutdown)."""
        while self._events:
            # asyncio.wait, not gather: cancelling drain() must not cancel the commands.
            await asyncio.wait(set(self._events))

    async def _event(self, event: str, update: UpdateInfo, extra: Mapping[str, str]) -> None:
        if not self.event_command:
            return
        env = {**update_env(update), "FOTA_EVENT": event, **extra}
        # A task of its own, so that drain() can wait for it; awaiting it here means a
        # cancelled notification (the engine closing) cancels the command too.
        task = asyncio.create_task(self._run_event(event, update, env), name=f"fota-event-{event}")
        self._events.add(task)
        task.add_done_callback(self._events.discard)
        await task

    async def _run_event(self, event: str, update: UpdateInfo, env: Mapping[str, str]) -> None:
        name = f"event {event}"
        try:
            done = await hooks.run(self.event_command, name=name, timeout=self.timeout, env=env)
        except Exception as exc:  # never raised into the engine: a notification only
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("event_command_failed", kind=event, update_id=update.update_id, error=why)
            return
        if not done.ok:
            log.error(
                "event_command_failed",
                kind=event,
                update_id=update.update_id,
                error=hooks.describe(name, done, self.timeout),
            )
