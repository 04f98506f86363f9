"""``fota status | watch | authorize | reject | defer | resume | check | inhibit | release``.

Commands that talk to a running ``fota daemon`` over its control socket (docs/control.md),
for people at a shell and for scripts. Every command takes ``--socket PATH`` (default:
``$FOTA_CONTROL_SOCKET``, else ``/run/fota/control.sock``) or ``--config FILE`` (the socket
the daemon's TOML names in ``[control] socket``). docs/cli.md describes each command.

Tables and progress bars use `rich` (the optional extra ``fota[cli]``), so a headless
gateway need not install it: without it (or with ``FOTA_NO_RICH=1``) the same rows and
events are printed as plain aligned text. ``--json`` output never needs it.

Exit status:

- 0: done (``fota defer`` that the daemon did not grant, because a rule forces the update,
  is also 0: the answer says so).
- 1: the daemon refused the request (``fota: <code>: <message>``); ``fota watch
  --until-done`` also exits 1 when the update ends ``failed`` (rejected, cancelled,
  superseded or failed).
- 2: a usage or configuration error (a bad ``--until``, an unreadable ``--config``).
- 3: no daemon could be reached at the socket (or it went away during ``fota watch``).
- 130: interrupted (Ctrl-C) during ``fota watch``.
- ``fota inhibit NAME --ttl T -- COMMAND``: the command's exit status (128 + N when a
  signal N ended it); 126 or 127 when it could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fota.app.control.client import SOCKET_ENV, ControlClient, default_socket
from fota.app.control.protocol import MAX_TEXT
from fota.errors import ControlError, FotaError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

NO_RICH_ENV = "FOTA_NO_RICH"
"""Set (to anything but empty) to print plain text even when `rich` is installed."""

OK, REFUSED, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130
"""The exit statuses listed in the module docstring."""

TIMEOUT = 30.0
"""Seconds to wait for each answer; a daemon that takes longer counts as unreachable."""

RETRY = 10.0
"""Longest wait, seconds, between attempts to renew an inhibitor lock after one failed."""

MIN_RETRY = 0.25
"""Shortest wait, seconds, between attempts to renew a lock that is about to expire."""

_CONNECTION_CODES = ("unreachable", "closed")
_GONE_CODES = (*_CONNECTION_CODES, "busy")
"""Failures after which a connection is useless (``busy``: the daemon refused and closed it)."""
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UsageError(Exception):
    """A bad argument or configuration found after parsing (exit status 2)."""


# -- values on the command line ------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """A positive duration: seconds (``90``), or with units (``90s``, ``30m``, ``2h``, ``1h30m``).

    Raises:
        argparse.ArgumentTypeError: not a duration, or not positive.
    """
    spec = text.strip().lower()
    try:
        seconds = float(spec)
    except ValueError:
        parts = _PART.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration (seconds, or e.g. 90s, 30m, 2h, 1d)"
            ) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def parse_when(text: str) -> float:
    """An instant: epoch seconds, or ISO 8601 with a time zone (``2027-01-01T02:00Z``).

    Raises:
        argparse.ArgumentTypeError: neither, or ISO 8601 without a zone (which would mean
            the daemon's local time, and a gateway's local time is rarely what was meant).
    """
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(epoch) or epoch <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not an instant")
        return epoch
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither ISO 8601 (e.g. 2027-01-01T02:00Z) nor epoch seconds"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z for UTC)")
    return when.timestamp()


def _reason(text: str) -> str:
    # Checked here too so that a bad reason is a usage error (2), not a refusal (1).
    if len(text) > MAX_TEXT:
        raise argparse.ArgumentTypeError(f"{len(text)} characters, at most {MAX_TEXT}")
    if not text.isprintable():
        raise argparse.ArgumentTypeError("control characters are not allowed")
    return text


def _lock_name(text: str) -> str:
    if not 1 <= len(text) <= 64 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to 64 printable characters")
    return text


# -- showing times, sizes and the status ------------------------------------------------


def iso(epoch: float | None) -> str:
    """``2027-01-15T08:00:00Z`` (UTC, whole seconds), or ``-`` for None."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration for people: ``45 s``, ``42 min``, ``1 h 5 min``, ``2 d 3 h``."""
    s = round(abs(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def relative(epoch: float, now: float | None = None) -> str:
    """``in 42 min``, ``5 min ago`` or ``now``, from this machine's clock."""
    delta = epoch - (time.time() if now is None else now)
    if abs(delta) < 1:
        return "now"
    return f"in {span(delta)}" if delta > 0 else f"{span(delta)} ago"


def when(epoch: float | None) -> str:
    """An instant as UTC ISO and relative: ``2027-01-15T08:00:00Z (in 42 min)``."""
    return "-" if epoch is None else f"{iso(epoch)} ({relative(epoch)})"


def size(n: int | float | None) -> str:
    """Bytes for people: ``512 B``, ``8.0 KiB``, ``4.5 MiB``, ``1.2 GiB``."""
    value = float(n or 0)
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def status_line(status: dict[str, Any]) -> str:
    """The daemon's one-line summary (its systemd ``STATUS=``) of a status object."""
    # The daemon's own wording (the status object's "line"), so `fota status` and
    # `systemctl status` agree; the state's name when a daemon does not send it.
    return str(status.get("line") or status.get("state", "?"))


def status_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of ``fota status``: (label, value), the same for the table and plain text."""
    state = str(s.get("state"))
    if s.get("awaiting"):
        state += f" (waiting for {s['awaiting']} authorization)"
    elif s.get("deferred_step"):
        state += f" ({s['deferred_step']} deferred)"
    installed = s.get("installed_version") or "nothing yet"
    if s.get("installed_sequence") is not None:
        installed += f" (sequence {s['installed_sequence']})"
    uid = s.get("update_id")
    pending = f"{uid}, version {s.get('version') or '?'}" if uid else "none"
    total, done = s.get("image_size"), s.get("verified_bytes") or 0
    if uid and total:
        progress = (
            f"{100 * done // total}% ({done} of {total} bytes, {size(done)} of {size(total)})"
        )
    else:
        progress = "-"
    deferral = when(s.get("defer_until"))
    if s.get("defer_until") is not None and s.get("defer_reason"):
        deferral += f": {s['defer_reason']}"
    limit = s.get("deferral_limit")
    so_far = span(s.get("deferred") or 0) + (
        f" of {span(limit)} allowed" if limit is not None else " (no limit)"
    )
    locks = [f"{lk['name']} until {when(lk['expires'])}" for lk in s.get("locks") or ()]
    fresh = "last fresh " + (when(s["last_fresh"]) if s.get("last_fresh") else "never")
    announcements = f"STALE ({fresh})" if s.get("stale") else fresh
    # Shown only after one: the updater recovered from state it could not load by itself.
    recovered = [("Recovered", str(s["recovered"]))] if s.get("recovered") else []
    # Issue 17 §3: a paused download and the last refusal (with the setting that caused it).
    paused = [("Paused", str(s["paused"]))] if s.get("paused") else []
    refusal = [("Last refusal", str(s["last_refusal"]))] if s.get("last_refusal") else []
    return [
        ("State", state),
        ("Status", status_line(s)),
        ("Installed", installed),
        ("Pending update", pending),
        ("Progress", progress),
        ("Deferred until", deferral),
        ("Deferred so far", so_far if uid else "-"),
        ("Deadline", when(s.get("deadline"))),
        ("Forced", s.get("forced") or "no"),
        ("Held by", ", ".join(s.get("held") or ()) or "nothing"),
        ("Locks", "\n".join(locks) or "none"),
        ("Reports pending", str(s.get("reports_pending", 0))),
        ("Announcements", announcements),
        *recovered,
        *paused,
        *refusal,
    ]


def plain_rows(rows: Sequence[tuple[str, str]]) -> str:
    """Rows as aligned text; a value of several lines continues under its first line."""
    width = max((len(label) for label, _ in rows), default=0)
    out = []
    for label, value in rows:
        first, *rest = value.split("\n")
        out.append(f"{label:<{width}}  {first}")
        out.extend(f"{'':<{width}}  {more}" for more in rest)
    return "\n".join(out)


# -- rich, when it is there -------------------------------------------------------------

_hinted = False


def have_rich() -> bool:
    """Whether tables and bars can be drawn: `rich` importable and not turned off."""
    if os.environ.get(NO_RICH_ENV):
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _hint() -> None:
    # Once per run: a script that loops over `fota status` is told, not flooded.
    global _hinted
    if not _hinted:
        _hinted = True
        print(
            "fota: plain text output; `pip install 'fota[cli]'` gives tables and progress bars",
            file=sys.stderr,
        )


def _console() -> Console:
    from rich.console import Console

    # No highlighting: values such as versions and reasons are shown as given.
    return Console(highlight=False)


# -- talking to the daemon --------------------------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    """The socket ``--socket`` or ``--config`` names, else :func:`default_socket`.

    Raises:
        UsageError: the configuration file could not be read.
    """
    if getattr(args, "socket", None):
        return Path(args.socket)
    if getattr(args, "config", None):
        from fota.app.settings import load_settings

        try:
            settings = load_settings(Path(args.config))
        except FotaError as exc:
            raise UsageError(str(exc)) from exc
        except OSError as exc:
            raise UsageError(f"{args.config}: {exc.strerror or exc}") from exc
        return Path(settings.control.socket)
    return default_socket()


def _report(exc: ControlError, path: Path) -> int:
    """Say why a request failed and return the exit status for it."""
    message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    if exc.code in _CONNECTION_CODES:
        print(f"fota: cannot reach the daemon: {message}", file=sys.stderr)
        print(
            "fota: is it running (systemctl status fota)? Another socket: --socket PATH,"
            f" --config FILE or ${SOCKET_ENV}",
            file=sys.stderr,
        )
        return UNREACHABLE
    print(f"fota: {exc.code}: {exc}", file=sys.stderr)
    return REFUSED


def _run(args: argparse.Namespace, body: Callable[[Path], Coroutine[Any, Any, int]]) -> int:
    """Run ``body(socket)`` and turn the failures every command shares into exit statuses."""
    try:
        path = socket_path(args)
    except UsageError as exc:
        print(f"fota: {exc}", file=sys.stderr)
        return USAGE
    try:
        return asyncio.run(body(path))
    except ControlError as exc:
        return _report(exc, path)
    except KeyboardInterrupt:
        return INTERRUPTED


def _connect(path: Path) -> ControlClient:
    return ControlClient(path, timeout=TIMEOUT)


# -- fota status ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """``fota status [--json]``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            status = await daemon.status()
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
            return OK
        rows = status_rows(status)
        if not have_rich():
            _hint()
            print(plain_rows(rows))
            return OK
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"fota status ({path})", box=box.ROUNDED, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for label, value in rows:
            table.add_row(label, Text(value))  # Text: a reason's "[x]" is not markup
        _console().print(table)
        return OK

    return _run(args, body)


# -- fota watch -------------------------------------------------------------------------


def describe(event: dict[str, Any]) -> str:
    """The key fields of one event, in words (``fota watch`` without ``--json``)."""
    kind = event.get("event")
    e = event.get
    version = e("version") or "?"
    match kind:
        case "state":
            text = f"{e('previous')} -> {e('state')}"
            return text + (f" ({e('version')})" if e("version") else "")
        case "update_available":
            polite = "polite" if e("polite") else "not polite"
            text = (
                f"{version} ({e('update_id')}), running {e('installed_version') or 'nothing'};"
                f" {e('severity') or '?'}, {polite}, {size(e('image_size'))}"
            )
            return text + (f", deadline {when(e('deadline'))}" if e("deadline") else "")
        case "authorization_needed":
            limit = e("deferral_limit")
            text = f"{e('step')} of {version}; deferred {span(e('deferred') or 0)}"
            text += f" of {span(limit)} allowed" if limit is not None else " (no limit)"
            if e("deadline"):
                text += f", deadline {when(e('deadline'))}"
            return text + " (fota authorize | defer | reject)"
        case "progress":
            total, done = e("total") or 0, e("done") or 0
            pct = 100 * done // total if total else 0
            return f"{pct}% ({done} of {total} bytes)"
        case "install_progress":
            return f"{e('percent')}%"
        case "deferred":
            text = f"{e('step')} until {when(e('until'))}"
            return text + (f": {e('reason')}" if e("reason") else "")
        case "held":
            held = e("held") or []
            return f"by {', '.join(held)}" if held else "no longer held"
        case "forced":
            return f"{e('step')}: {e('reason')}"
        case "completed" | "failed":
            text = f"{version}: {e('result')}"
            return text + (f" ({e('detail')})" if e("detail") else "")
        case "stopping":
            return "the daemon is stopping"
        case "stale":
            last = when(e("last_fresh")) if e("last_fresh") else "never since the start"
            return f"no fresh announcement for {span(e('window') or 0)} (last: {last})"
        case "fresh":
            return "a fresh announcement arrived"
    rest = {k: v for k, v in event.items() if k not in ("event", "at", "update_id")}
    return json.dumps(rest, sort_keys=True)


def _clock(event: dict[str, Any]) -> str:
    at = event.get("at")
    if not isinstance(at, int | float):
        return "--:--:--Z"
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%SZ")


_STYLES = {
    "authorization_needed": "bold yellow",
    "deferred": "yellow",
    "held": "yellow",
    "forced": "bold magenta",
    "completed": "bold green",
    "failed": "bold red",
    "stopping": "bold red",
    "stale": "bold red",
    "fresh": "green",
    "update_available": "bold cyan",
}


class _Screen:
    """Where ``fota watch`` puts events: JSON lines, plain lines, or rich lines and bars."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.console: Console | None = None
        self.progress: Progress | None = None
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.versions: dict[str, str] = {}
        self.deciles: dict[str, int] = {}

    def __enter__(self) -> _Screen:
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self.console = _console()
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def subscribed(self, path: Path, status: dict[str, Any]) -> None:
        if status.get("update_id") and status.get("version"):
            self.versions[str(status["update_id"])] = str(status["version"])
        if self.mode == "json":
            # The status at the instant of subscribing: a script knows where the events
            # start from (and that it is subscribed) without a second request.
            self._json({"event": "subscribed", "socket": str(path), "status": status})
        else:
            self._line(f"watching {path}: {status_line(status)}", "dim")

    def show(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            self._json(event)
            return
        uid = str(event.get("update_id") or "")
        if uid and event.get("version"):
            self.versions[uid] = str(event["version"])
        kind = str(event.get("event"))
        if self.progress is not None and kind in ("progress", "install_progress"):
            self._bar(kind, uid, event)
            return
        if kind == "progress" and not self._new_decile(uid, event):
            return  # plain text: a line per tenth, not one per fragment
        self._line(f"{_clock(event)} {kind:<20} {describe(event)}", _STYLES.get(kind, ""))

    def _new_decile(self, uid: str, event: dict[str, Any]) -> bool:
        total, done = event.get("total") or 0, event.get("done") or 0
        decile = 10 * done // total if total else 0
        if self.deciles.get(uid) == decile:
            return False
        self.deciles[uid] = decile
        return True

    def _bar(self, kind: str, uid: str, event: dict[str, Any]) -> None:
        assert self.progress is not None
        version = self.versions.get(uid, uid or "?")
        key = (kind, uid)
        if kind == "progress":
            total, done = float(event.get("total") or 0), float(event.get("done") or 0)
            detail = f"{size(done)}/{size(total)}"
            label = f"download {version}"
        else:
            total, done = 100.0, float(event.get("percent") or 0)
            detail, label = "", f"install {version}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(label, total=total or None, detail=detail)
        self.progress.update(self.tasks[key], total=total or None, completed=done, detail=detail)

    def _line(self, text: str, style: str) -> None:
        # The style only where rich draws; plain text stays plain.
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text, style=style))
        else:
            print(text, flush=True)

    @staticmethod
    def _json(message: dict[str, Any]) -> None:
        print(json.dumps(message, sort_keys=True), flush=True)


def cmd_watch(args: argparse.Namespace) -> int:
    """``fota watch [--json] [--until-done]``."""
    if args.json:
        mode = "json"
    elif have_rich():
        mode = "rich"
    else:
        _hint()
        mode = "plain"

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            # Not as an answerer: watching must not change what a polite update does when
            # no application is there to answer it.
            status = await daemon.subscribe(answers=False)
            with _Screen(mode) as screen:
                screen.subscribed(path, status)
                stopping = False
                while True:
                    try:
                        event = await daemon.next_event()
                    except ControlError:
                        why = "it is stopping" if stopping else "it closed the connection"
                        print(f"fota: the daemon at {path} went away: {why}", file=sys.stderr)
                        return UNREACHABLE
                    screen.show(event)
                    kind = event.get("event")
                    stopping = stopping or kind == "stopping"
                    if args.until_done and kind in ("completed", "failed"):
                        return OK if kind == "completed" else REFUSED

    return _run(args, body)


# -- fota authorize | reject | defer | resume | check -------------------------------------


def _what(status: dict[str, Any], uid: str) -> str:
    """``the download of 2.0 (update 1a2b3c4d5e6f7a8b)`` from a status read just before."""
    version = status.get("version") if status.get("update_id") == uid else None
    step = status.get("awaiting") or status.get("deferred_step")
    text = f"the {step} of " if step else ""
    return text + (f"{version} (update {uid})" if version else f"update {uid}")


def cmd_authorize(args: argparse.Namespace) -> int:
    """``fota authorize [UPDATE_ID]``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            before = await daemon.status()  # only for the message: which step, which version
            uid = await daemon.authorize(args.update_id)
        print(f"authorized {_what(before, uid)}")
        return OK

    return _run(args, body)


def cmd_reject(args: argparse.Namespace) -> int:
    """``fota reject [UPDATE_ID] [--reason TEXT]``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            before = await daemon.status()
            uid = await daemon.reject(args.update_id, args.reason)
        why = f": {args.reason}" if args.reason else ""
        print(f"rejected {_what(before, uid)}{why}")
        return OK

    return _run(args, body)


def cmd_defer(args: argparse.Namespace) -> int:
    """``fota defer [UPDATE_ID] (--until WHEN | --for DURATION) [--reason TEXT]``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            before = await daemon.status()
            uid = str(args.update_id or before.get("update_id") or "")
            end = await daemon.defer(
                args.until, seconds=args.seconds, reason=args.reason, update_id=args.update_id
            )
        what = _what(before, uid) if uid else "the pending update"
        if end is None:
            print(f"deferral of {what} not granted: proceeds now (forced)")
            return OK
        text = f"deferred {what} until {when(end)}"
        if args.until is not None and end < args.until - 1:
            text += " (cut short by the deferral limit or the deadline)"
        print(text)
        return OK

    return _run(args, body)


def cmd_resume(args: argparse.Namespace) -> int:
    """``fota resume``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            await daemon.resume()
        print("resumed: the deferral ended, the update is offered again")
        return OK

    return _run(args, body)


def cmd_check(args: argparse.Namespace) -> int:
    """``fota check``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            await daemon.check()
        print("the daemon looks for an update now")
        return OK

    return _run(args, body)


# -- fota inhibit | release ---------------------------------------------------------------


class _Lock:
    """An inhibitor lock held for a command: renewed before it expires, released at the end.

    Renewals are scheduled from the lock's expiry as this process sees it (on the event
    loop's monotonic clock, from when the request that last took it was sent): the next
    one when a third of the time to live has passed; after a failure, again within half the
    time left (at most :data:`RETRY`, at least :data:`MIN_RETRY`; at the ttl/3 pace once it
    has expired). A daemon that goes away meanwhile (a restart) or refuses the connection
    (``busy``) is reconnected to at the next attempt, which takes the lock again; until
    then the lock lives out its time to live.
    """

    def __init__(self, path: Path, name: str, ttl: float) -> None:
        self.path, self.name, self.ttl = path, name, ttl
        self.client: ControlClient | None = None
        self.expires = 0.0  # the daemon's answer (its clock, epoch seconds): for messages
        self.taken = 0.0  # the loop's clock when the request that last took it was sent
        self.ok = True

    async def take(self) -> None:
        """Take the lock (the first time: failures propagate, the command does not run)."""
        client = await self._client(min(TIMEOUT, self.ttl / 3))
        sent = asyncio.get_running_loop().time()
        self.expires = await client.inhibit(self.name, self.ttl)
        self.taken = sent

    def delay(self, now: float) -> float:
        """Seconds from ``now`` (the loop's clock) until the next attempt to renew."""
        if self.ok:
            return max(0.0, self.taken + self.ttl / 3 - now)
        left = self.taken + self.ttl - now
        if left <= 0:
            return min(self.ttl / 3, RETRY)  # expired: nothing left to save, no hurry
        return min(RETRY, max(left / 2, MIN_RETRY))

    async def keep(self) -> None:
        """Renew until cancelled, saying once when renewing fails and once when it works."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.delay(loop.time()))
            try:
                await self.take()
            except Exception as exc:  # any failure: retry, never give up
                if not isinstance(exc, ControlError) or self._gone(exc):
                    await self.close()
                if self.ok:
                    self.ok = False
                    _say(
                        f"fota: cannot renew lock {self.name}: {exc}; it expires at"
                        f" {iso(self.expires)}; retrying"
                    )
            else:
                if not self.ok:
                    self.ok = True
                    _say(f"fota: lock {self.name} renewed again")

    async def release(self) -> None:
        """Release it; on failure, say when it expires by itself."""
        try:
            client = await self._client(TIMEOUT)
            await client.release(self.name)
        except ControlError as exc:
            _say(f"fota: lock {self.name} not released ({exc}); it expires at {iso(self.expires)}")
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the connection (the lock stays until released or expired)."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _client(self, timeout: float) -> ControlClient:
        # A connection that ended (the daemon restarted, or refused it) stays failed: the
        # next request goes over a new one instead of failing on the old one.
        if self.client is not None and self._ended(self.client):
            await self.close()
        if self.client is None:
            self.client = ControlClient(self.path, timeout=timeout)
        return self.client

    def _gone(self, exc: ControlError) -> bool:
        # After a refusal (a bad ttl, too many locks) the connection is fine and is kept.
        return exc.code in _GONE_CODES or (self.client is not None and self._ended(self.client))

    @staticmethod
    def _ended(client: ControlClient) -> bool:
        # ControlClient keeps the error that ended its connection (the daemon closed it, or
        # answered busy or too_large to no request and closed it) and raises it for every
        # later request without reconnecting.
        return client._closed is not None


def _say(text: str) -> None:
    """A line on stderr; one that cannot be written (a closed pipe) is not an error."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr)


async def _hold_while(lock: _Lock, argv: list[str]) -> int:
    """Run ``argv`` as a child while holding ``lock``; the child's exit status."""
    loop = asyncio.get_running_loop()
    child: asyncio.subprocess.Process | None = None
    early: list[int] = []
    taking = asyncio.ensure_future(lock.take())

    def forward(sig: int) -> None:
        # Like systemd-inhibit, fota only wraps the command: the command decides what a
        # signal means, and fota releases the lock once it has ended. Before the command
        # runs, a signal stops fota itself (without running the command). The command is
        # in a session (and process group) of its own, so a terminal's Ctrl-C reaches it
        # only through here: once, to its whole group (a shell and what it runs).
        if child is None:
            early.append(sig)
            taking.cancel()
        elif child.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)

    # Installed before the lock is taken: from then on no signal may leave it behind.
    for signum in _FORWARDED:
        loop.add_signal_handler(signum, forward, int(signum))
    try:
        try:
            await taking
        except ControlError:
            await lock.close()
            raise  # unreachable or refused: the command does not run
        except asyncio.CancelledError:
            if not early:
                raise
        if early:
            await lock.release()  # it may have been granted just before the signal
            return 128 + early[0]
        keeper = asyncio.create_task(lock.keep(), name="fota-inhibit-renew")
        try:
            try:
                # A new session rather than only a process group: a group that is not the
                # terminal's foreground one is stopped (SIGTTIN) when it reads the terminal,
                # while a command without a controlling terminal still reads its stdin.
                child = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
            except OSError as exc:
                print(f"fota: cannot run {argv[0]}: {exc.strerror or exc}", file=sys.stderr)
                return 127 if isinstance(exc, FileNotFoundError) else 126
            for sig in early:  # arrived while the child was being started
                forward(sig)
            code = await child.wait()
            return 128 - code if code < 0 else code
        finally:
            keeper.cancel()
            try:
                await keeper
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the lock is released whatever it was
                _say(f"fota: renewing lock {lock.name} stopped: {exc!r}")
            await lock.release()
    finally:
        for signum in _FORWARDED:
            loop.remove_signal_handler(signum)


def cmd_inhibit(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    """``fota inhibit NAME --ttl DURATION [-- COMMAND ARGS...]``."""
    # argparse (3.11) cannot put "NAME --ttl T -- CMD" into a positional after NAME: the
    # command is taken as REMAINDER, and the options before its "--" are parsed here.
    # argparse drops a "--" right after NAME itself (but not one after an option), so a
    # REMAINDER that starts with a word is the command already.
    words: list[str] = list(args.command)
    options: list[str] = []
    argv = words
    if words and words[0].startswith("-"):
        cut = words.index("--") if "--" in words else len(words)
        options, argv = words[:cut], words[cut + 1 :]
        if cut < len(words) and not argv:
            parser.error("nothing to run after --")
    _options_parser(parser).parse_args(options, namespace=args)
    if args.socket and args.config:
        parser.error("argument --config: not allowed with argument --socket")
    if args.ttl is None:
        parser.error("the following arguments are required: --ttl")
    lock_ttl: float = args.ttl

    async def body(path: Path) -> int:
        lock = _Lock(path, args.name, lock_ttl)
        if argv:
            return await _hold_while(lock, argv)
        try:
            await lock.take()
        finally:
            await lock.close()
        print(f"lock {args.name} held until {when(lock.expires)}")
        return OK

    return _run(args, body)


def _options_parser(outer: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Parses what ``fota inhibit``'s REMAINDER took before the command's ``--``."""

    class Strict(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            outer.error(message)  # the usage the user asked for, not this helper's

        def parse_args(  # type: ignore[override]
            self, args: Sequence[str] | None = None, namespace: Any = None
        ) -> argparse.Namespace:
            ns, extra = self.parse_known_args(args, namespace)
            if extra:
                self.error(
                    f"unexpected {' '.join(extra)!r}: put -- before the command"
                    " (fota inhibit NAME --ttl 10m -- COMMAND ARGS...)"
                )
            assert isinstance(ns, argparse.Namespace)
            return ns

    p = Strict(prog=outer.prog, add_help=False)
    _connection_options(p)
    p.add_argument("--ttl", type=parse_duration)
    return p


def cmd_release(args: argparse.Namespace) -> int:
    """``fota release NAME``."""

    async def body(path: Path) -> int:
        async with _connect(path) as daemon:
            await daemon.release(args.name)
        print(f"released lock {args.name}")
        return OK

    return _run(args, body)


# -- parsers ----------------------------------------------------------------------------


def _connection_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's control socket (default: ${SOCKET_ENV}, else /run/fota/control.sock)",
    )
    where.add_argument(
        "--config", metavar="FILE", help="read the socket from the daemon's TOML ([control] socket)"
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the control commands on the ``fota`` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common)

    def command(name: str, help: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common], description=help)
        # quiet_logs: the library's info lines would drown the one line a command prints.
        p.set_defaults(func=func, quiet_logs=True)
        return p

    st = command("status", "show what the daemon is doing", cmd_status)
    st.add_argument("--json", action="store_true", help="print the raw status object")

    wa = command("watch", "print events and progress as they happen", cmd_watch)
    wa.add_argument("--json", action="store_true", help="print each event as a JSON line")
    wa.add_argument(
        "--until-done",
        action="store_true",
        help="exit at the end of an update: 0 when completed, 1 when failed",
    )

    au = command("authorize", "authorize the waiting download or install", cmd_authorize)
    au.add_argument("update_id", nargs="?", help="default: the pending update")

    rj = command("reject", "reject the pending update (it is not offered again)", cmd_reject)
    rj.add_argument("update_id", nargs="?", help="default: the pending update")
    rj.add_argument("--reason", type=_reason, default="", help="reported to the server")

    df = command("defer", "defer the waiting download or install", cmd_defer)
    df.add_argument("update_id", nargs="?", help="default: the pending update")
    until = df.add_mutually_exclusive_group(required=True)
    until.add_argument(
        "--until",
        type=parse_when,
        metavar="WHEN",
        help="ISO 8601 with a zone (2027-01-01T02:00Z) or epoch seconds",
    )
    until.add_argument(
        "--for",
        dest="seconds",
        type=parse_duration,
        metavar="DURATION",
        help="seconds, or 90s, 30m, 2h, 1d",
    )
    df.add_argument("--reason", type=_reason, default="", help="reported to the server")

    command("resume", "end the current deferral now (asks again)", cmd_resume)
    command("check", "look for an update now", cmd_check)

    ih = command(
        "inhibit",
        "hold an inhibitor lock (for a time, or while a command runs)",
        cmd_inhibit,
    )
    ih.set_defaults(func=functools.partial(cmd_inhibit, parser=ih))
    ih.usage = (
        f"{ih.prog} [-h] [--socket PATH | --config FILE] NAME --ttl DURATION [-- COMMAND ARGS...]"
    )
    ih.add_argument("name", type=_lock_name, metavar="NAME")
    ih.add_argument(
        "--ttl",
        type=parse_duration,
        metavar="DURATION",
        help="the lock's time to live (required): seconds, or 90s, 30m, 2h, 1d",
    )
    ih.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS",
        help="run it while holding the lock (renewed every ttl/3, released after)",
    )

    rl = command("release", "release an inhibitor lock", cmd_release)
    rl.add_argument("name", type=_lock_name, metavar="NAME")
