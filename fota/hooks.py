"""Run an external command for fota: a hook, a condition, a self-test, an installer backend.

Rules every command run by fota follows (docs/installers.md, "Safety"):

* an argument list, never a shell string: nothing from a manifest or a bundle is ever parsed by
  a shell (a recipe's commands run only when local configuration allows them, as whole
  argument-list prefixes);
* an explicit environment, never the daemon's own (:func:`environment`): ``PATH`` and the
  locale (``LANG``, ``LC_ALL``) taken from the daemon, the usual "do not prompt" switches, and
  what the caller adds (``FOTA_*``, an installer's ``env`` setting). A secret in the daemon's
  environment (a token, a credentials path, ``NOTIFY_SOCKET``) never reaches a hook; ``PATH``
  keeps only directories no one but root can write (:func:`safe_path`);
* stdin is ``/dev/null``, so a command that asks a question gets end-of-file instead of
  hanging the update;
* a timeout: the command runs in a session of its own, and on timeout the whole process group
  is killed (a shell script's children too);
* its output is logged line by line (bounded), and the last lines are kept for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from fota import safefs

log = structlog.get_logger(__name__)

NONINTERACTIVE: Mapping[str, str] = {
    "DEBIAN_FRONTEND": "noninteractive",  # apt, dpkg: no debconf questions
    "PIP_NO_INPUT": "1",  # pip: never prompt
    "CI": "1",  # npm and many tools: no interactive prompts, no progress animations
    "NPM_CONFIG_YES": "true",
    "GIT_TERMINAL_PROMPT": "0",
}
"""Set for every command: each is a documented switch of the tool to never ask."""

PASSED = ("PATH", "LANG", "LC_ALL")
"""The only variables a command gets from the daemon's own environment (when set there)."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` for commands when the daemon has none."""

LOGGED_LINES = 1000
"""Lines of one command's output that are logged; the rest are counted, not logged."""
TAIL_LINES = 20
LINE_LIMIT = 500
DRAIN = 2.0
"""Seconds to keep reading output after the command exited (what is left in the pipe)."""


@dataclass(frozen=True, slots=True)
class Completed:
    """How a command ended.

    Attributes:
        code: its exit status (negative: killed by that signal).
        tail: its last lines of output (stdout and stderr merged), for messages.
        timed_out: it ran past its timeout and was killed.
    """

    code: int
    tail: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exit status 0."""
        return self.code == 0 and not self.timed_out


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a command fota runs: explicit, never ``os.environ``.

    :data:`PASSED` from the daemon's environment (``PATH`` defaults to :data:`DEFAULT_PATH`),
    then :data:`NONINTERACTIVE`, then ``extra`` (the caller's ``FOTA_*`` variables, an
    installer's ``env`` setting), which wins over both. ``PATH`` is then kept to the
    directories a program name may be looked up in as root (:func:`safe_path`).
    """
    env = {name: os.environ[name] for name in PASSED if os.environ.get(name)}
    env.setdefault("PATH", DEFAULT_PATH)
    env = {**env, **NONINTERACTIVE, **(extra or {})}
    env["PATH"] = safe_path(env["PATH"])
    return env


_dropped: set[tuple[str, str]] = set()
"""PATH entries already warned about (one warning each, not one per command)."""


def _entry_problem(entry: str) -> str | None:
    if not entry.startswith("/"):
        # "", "." or "bin": looked up from the command's working directory (an archive
        # hook's is the root the bundle just changed).
        return "not an absolute path: looked up relative to the working directory"
    if os.geteuid() != 0:
        return None  # a development setup: no one gains more than fota's own uid
    here = Path(entry)
    while True:
        try:
            safefs.check_trusted_path(here, allow_writable=False, what="PATH")
            return None
        except safefs.UnsafePathError as exc:
            return str(exc)
        except FileNotFoundError:
            if here.parent == here:
                return "missing"
            # Missing: harmless if only root can create it (its nearest ancestor is root's).
            here = here.parent
        except OSError as exc:
            return str(exc)


def safe_path(value: str) -> str:
    """``value`` without the entries a non-root user could put a program in.

    A program named without a slash (``systemctl``, an allow-list's first word) is looked up
    along ``PATH``; as root, a directory a user can write on it (or a relative entry, looked
    up from the working directory) lets them choose what root runs. Each dropped entry is
    logged once. Such entries are dropped by the rules of :func:`fota.safefs.check_trusted_path`
    (root's, writable by no one else, and so every directory above it); a missing one is kept
    when the directory it would be made in is. When fota is not root, only relative entries
    are dropped.
    """
    kept = []
    for entry in value.split(":"):
        problem = _entry_problem(entry)
        if problem is None:
            kept.append(entry)
        elif (entry, problem) not in _dropped:
            _dropped.add((entry, problem))
            log.warning("path_entry_dropped", entry=entry, reason=problem)
    if not kept and value != DEFAULT_PATH:
        return safe_path(DEFAULT_PATH)
    return ":".join(kept) or "/usr/bin:/bin"


class CommandNotFound(OSError):
    """The program could not be started (missing, not executable)."""


async def run(
    argv: Sequence[str],
    *,
    name: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Completed:
    """Run ``argv`` to completion (or its timeout) and return how it ended.

    Args:
        argv: the program and its arguments.
        name: what it is, for the log (``hook before``, ``condition battery``).
        timeout: seconds; then the process group is killed (SIGKILL).
        env: variables added to the environment; the command gets :func:`environment` of
            them, nothing else of the daemon's environment.
        cwd: the working directory.
        on_line: called with every output line (progress parsing).

    Raises:
        CommandNotFound: the program cannot be started.
    """
    if not argv:
        raise ValueError(f"{name}: empty command")
    full_env = environment(env)
    # Our own pipe, not asyncio's: Process.wait() would otherwise also wait until every
    # process holding the pipe closed it (a daemon the command started keeps it open).
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument or variable
        os.close(read_fd)
        errno = exc.errno if isinstance(exc, OSError) else 22
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CommandNotFound(errno, f"{name}: cannot run {argv[0]!r}: {why}") from exc
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    log.debug("command_started", command=name, argv=list(argv), pid=proc.pid)
    _running.add(proc.pid)
    try:
        return await _supervise(proc, read_fd, name, timeout, on_line)
    finally:
        _running.discard(proc.pid)


async def _supervise(
    proc: asyncio.subprocess.Process,
    read_fd: int,
    name: str,
    timeout: float,
    on_line: Callable[[str], None] | None,
) -> Completed:
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader(loop=loop)
    pipe, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stream, loop=loop),
        os.fdopen(read_fd, "rb", buffering=0),
    )
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lines = 0

    def line_out(raw: bytes) -> None:
        nonlocal lines
        line = raw.decode(errors="replace").rstrip("\r\n")[:LINE_LIMIT]
        tail.append(line)
        lines += 1
        if lines <= LOGGED_LINES:
            log.info("command_output", command=name, line=line)
        if on_line is not None:
            on_line(line)

    async def read() -> None:
        # Chunks, not readline(): a line longer than StreamReader's limit must not end it.
        pending = b""
        while chunk := await stream.read(1 << 16):
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                line_out(raw)
            if len(pending) > 1 << 20:  # a runaway line: cut it
                line_out(pending)
                pending = b""
        if pending:
            line_out(pending)

    timed_out = False
    reader = asyncio.ensure_future(read())
    try:
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
            _running.discard(proc.pid)  # reaped: its pid may be reused from now on
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            await proc.wait()
        except BaseException:  # cancelled: leave nothing running behind us
            _kill_group(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
            raise
        # Outside the timeout: a command that exited in time succeeded, whatever follows. A
        # child it left running may hold the output open (a daemon it started, swupdate's
        # forked helper): read what is buffered, then stop listening.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), DRAIN)
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        pipe.close()
    code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    if lines > LOGGED_LINES:
        log.info("command_output_cut", command=name, lines=lines, logged=LOGGED_LINES)
    done = Completed(code, "\n".join(tail), timed_out)
    if timed_out:
        log.warning("command_timed_out", command=name, timeout=timeout)
    else:
        log.info("command_finished", command=name, code=code)
    return done


_running: set[int] = set()
"""Process groups (their leaders' pids) of the commands running now."""


def kill_all() -> int:
    """SIGKILL the process group of every command running now; returns how many.

    For an exit that cannot wait (the daemon's forced exit): a command left running would go
    on changing the device while the next start runs the same step again.
    """
    pids = list(_running)
    for pid in pids:
        _kill_group(pid)
    return len(pids)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def describe(name: str, done: Completed, timeout: float) -> str:
    """A one-line account of a failed command, for an error message or a report."""
    if done.timed_out:
        what = f"timed out after {timeout:g} s"
    elif done.code < 0:
        what = f"killed by signal {-done.code}"
    else:
        what = f"exit status {done.code}"
    last = done.tail.strip().splitlines()[-1:] if done.tail.strip() else []
    return f"{name}: {what}" + (f" ({last[0]})" if last else "")
