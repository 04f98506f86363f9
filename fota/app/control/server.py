"""The daemon's side of the control socket: one task per connection, answers in order.

Out-of-process applications (any language: a JSON line per message) take part in polite
deployment through it: they subscribe to events, answer authorizations, defer, take inhibitor
locks and read the status. Every connection is bounded (message size, queued events), so a
broken or hostile local client costs the daemon one connection, never the update.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from fota.app.control import protocol as proto
from fota.client import Client, Status
from fota.core.states import State
from fota.errors import (
    ConfigError,
    ControlError,
    FotaError,
    InvalidTransition,
    JournalError,
    PolicyError,
)
from fota.notices import Notice

log = structlog.get_logger(__name__)

QUEUE_LIMIT = 1024
"""Messages waiting to be written to one connection. Past it, the connection's next request
waits (a client that sends a burst is slowed down, not dropped), and an event drops the
connection: a subscriber that stopped reading must not make the daemon's memory grow."""

CLOSE_GRACE = 2.0
"""Seconds a closing connection gets to flush what is queued before it is aborted."""

REQUEST_TIMEOUT = 10.0
"""Default seconds a message line may take from its first byte (for a new connection: from
the connect) to its newline (``[control] request_timeout``). Past it the connection is answered
``timeout`` and closed: half-written lines cannot hold ``max_clients`` slots."""

IDLE_TIMEOUT = 60.0
"""Default seconds a connection that subscribed to nothing may stay silent between messages
(``[control] idle_timeout``); then it is answered ``idle`` and closed. Subscribers wait for
events and are never closed for silence."""

_AWAITING = {State.AWAIT_DOWNLOAD_AUTH: "download", State.AWAIT_INSTALL_AUTH: "install"}
_DEFERRED = {State.DOWNLOAD_DEFERRED: "download", State.INSTALL_DEFERRED: "install"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fota")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def status_dict(status: Status) -> dict[str, Any]:
    """A :class:`~fota.client.Status` as the control protocol's ``status`` object."""
    out = asdict(status)
    out["state"] = status.state.name
    out["held"] = list(status.held)
    out["locks"] = [{"name": n, "expires": at} for n, at in status.locks]
    out["awaiting"] = _AWAITING.get(status.state)
    out["deferred_step"] = _DEFERRED.get(status.state)
    out["line"] = status_line(status)
    return out


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "?"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _mib(n: int | None) -> str:
    return f"{(n or 0) / (1 << 20):.1f}"


def status_line(s: Status) -> str:
    """One line saying what the client is doing (systemd ``STATUS=``, ``fota status``)."""
    line = _state_line(s)
    if s.stale:
        # A device frozen by its server or path says so wherever it shows its status.
        last = _when(s.last_fresh) if s.last_fresh is not None else "none since the start"
        line += f"; announcements stale (last fresh: {last})"
    return line


def _state_line(s: Status) -> str:
    v = s.version or "?"
    why = f" ({s.defer_reason})" if s.defer_reason else ""
    held = ", ".join(s.held) or "local conditions"
    match s.state:
        case State.IDLE:
            if s.installed_version is None:
                return "Idle; no image installed yet"
            return f"Idle; running {s.installed_version}"
        case State.AWAIT_DOWNLOAD_AUTH:
            return f"Update {v}: waiting for download authorization"
        case State.DOWNLOAD_DEFERRED:
            return f"Update {v}: download deferred until {_when(s.defer_until)}{why}"
        case State.DOWNLOAD_HELD:
            return f"Update {v}: download held by {held}"
        case State.DOWNLOADING:
            size = s.image_size or 0
            pct = 100 * s.verified_bytes // size if size else 0
            paused = f"; paused: {s.paused}" if s.paused else ""
            return f"Downloading {v}: {pct}% ({_mib(s.verified_bytes)} of {_mib(size)} MiB){paused}"
        case State.VERIFYING:
            return f"Verifying {v}"
        case State.AWAIT_INSTALL_AUTH:
            return f"Update {v}: downloaded, waiting for install authorization"
        case State.INSTALL_DEFERRED:
            return f"Update {v}: install deferred until {_when(s.defer_until)}{why}"
        case State.INSTALL_HELD:
            return f"Update {v}: install held by {held}"
        case State.INSTALLING:
            return f"Installing {v}"
        case State.AWAIT_RESTART:
            return f"Installed {v}; waiting for the device to restart"
        case State.AWAIT_COMMIT:
            return f"Self-testing {v}"
        case State.ROLLING_BACK:
            return f"Rolling back {v}"
        case State.FAILED:
            return f"Update {v} failed"
    return s.state.name  # pragma: no cover - every state is listed above


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The connecting process's (pid, uid, gid), from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class _Connection:
    def __init__(self, server: ControlServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.events: frozenset[str] = frozenset()
        self.answers = False
        sock = writer.get_extra_info("socket")
        try:
            self.pid, self.uid, self.gid = peer_credentials(sock)
        except (OSError, AttributeError, struct.error):
            self.pid = self.uid = self.gid = -1
        self.dropped = False
        self.room = asyncio.Event()
        self.room.set()

    @property
    def listening(self) -> bool:
        """It subscribed (to events, or as an answering application): silence is its job."""
        return bool(self.events) or self.answers

    def send(self, line: bytes, *, event: bool = False) -> None:
        if self.dropped:
            return
        if event and self.out.qsize() >= QUEUE_LIMIT:
            # It stopped reading while events pile up: drop it, keep the others going.
            log.warning("control_client_too_slow", pid=self.pid, uid=self.uid)
            self.abort()
            return
        self.out.put_nowait(line)
        if self.out.qsize() >= QUEUE_LIMIT:
            self.room.clear()
            self.server.backlogged.set()

    def abort(self) -> None:
        """Hang up now, unsent data and all (a peer that does not read cannot be waited for)."""
        self.dropped = True
        self.writer.transport.abort()
        self.out.put_nowait(None)

    async def write_loop(self) -> None:
        try:
            while True:
                line = await self.out.get()
                if self.out.qsize() < QUEUE_LIMIT:
                    self.room.set()
                if line is None:
                    # Closing our side ends the read loop too (it sees end of input).
                    self.writer.close()
                    return
                self.writer.write(line)
                await self.writer.drain()
        finally:
            # However it ended (a reset peer makes drain() raise): a read loop waiting for
            # room must not wait for ever, holding the connection's slot.
            self.dropped = True
            self.room.set()


class ControlServer:
    """Serves the control protocol on a Unix socket for one :class:`~fota.client.Client`.

    Args:
        client: the running client.
        path: the socket's path. Its directory must exist (systemd's ``RuntimeDirectory``).
        mode: the socket's file mode (who may connect: ``0o660`` is owner and group).
        group: the socket's group id, or None to keep the daemon's.
        max_clients: most connections at once; more are answered ``busy`` and closed.
            Every open connection counts; the two timeouts below make sure that only
            subscribers (and clients that keep talking) can keep a slot.
        max_message: longest message line, bytes.
        request_timeout: seconds from a line's first byte (a new connection's: from the
            connect) to its newline; past it the connection is answered ``timeout`` and
            closed.
        idle_timeout: seconds a connection that subscribed to nothing may stay silent
            between messages; past it it is answered ``idle`` and closed.
        on_answerers: called with the number of connections that subscribed with
            ``answers: true`` whenever it changes (the daemon registers a handler while it
            is not zero, so ``Config.unanswered`` applies when nobody is there to answer).
    """

    def __init__(
        self,
        client: Client,
        path: Path,
        *,
        mode: int = 0o660,
        group: int | None = None,
        max_clients: int = 64,
        max_message: int = proto.MAX_MESSAGE,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        on_answerers: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.path = Path(path)
        self.mode = mode
        self.group = group
        self.max_clients = max_clients
        self.max_message = max_message
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.on_answerers = on_answerers
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode: int | None = None
        self._unlisten: Callable[[], None] | None = None
        self.started = time.time()
        self.backlogged = asyncio.Event()
        """Set when a connection's queue first filled up (its requests now wait)."""

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket (mode and group set before anyone can reach it) and listen.

        Raises:
            ConfigError: naming ``control.socket`` when the path is in use or not creatable.
        """
        sock = self._bind()
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=self.max_message + 1
        )
        self._unlisten = self.client.listen(self._notice)
        log.info("control_listening", socket=str(self.path), mode=oct(self.mode), gid=self.group)

    def _bind(self) -> socket.socket:
        self._clear_stale()
        # Bind inside a private directory, set mode and group, then rename into place: the
        # socket is never reachable with the wrong permissions, whatever the umask.
        try:
            private = Path(tempfile.mkdtemp(prefix=".fota-sock-", dir=self.path.parent))
        except OSError as exc:
            raise ConfigError(
                f"control.socket: cannot create a socket in {self.path.parent}: {exc.strerror}"
            ) from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            temp = private / "s"
            sock.bind(str(temp))
            if self.group is not None:
                os.chown(temp, -1, self.group)
            os.chmod(temp, self.mode)
            os.replace(temp, self.path)
            self._inode = self.path.stat().st_ino
            sock.listen(self.max_clients)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"control.socket: {self.path}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                for leftover in private.iterdir():
                    leftover.unlink()
                private.rmdir()
        return sock

    def _clear_stale(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"control.socket: {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            # Nobody listens: left behind by a daemon that was killed.
            self.path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise ConfigError(f"control.socket: {self.path} is in use by another process")

    async def aclose(self) -> None:
        """Stop listening, tell subscribers, close every connection, remove the socket.

        Bounded: a connection that does not take its last messages within
        :data:`CLOSE_GRACE` is aborted.
        """
        # Leaving connections are not applications going away: the handler stays as it is.
        self.on_answerers = None
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._server is not None:
            self._server.close()
            self._server = None
        stopping = proto.encode({"event": "stopping", "at": self.client.now(), "update_id": None})
        for conn in list(self._connections):
            if "stopping" in conn.events:
                conn.send(stopping)
            conn.out.put_nowait(None)
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for conn in list(self._connections):
                conn.abort()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    # -- connections --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(self, writer)
        try:
            if len(self._connections) >= self.max_clients:
                # Who holds the slots, by uid: a local user hogging them is named in the log.
                holders: dict[int, int] = {}
                for other in self._connections:
                    holders[other.uid] = holders.get(other.uid, 0) + 1
                log.warning(
                    "control_busy",
                    pid=conn.pid,
                    uid=conn.uid,
                    limit=self.max_clients,
                    holders={str(u): n for u, n in sorted(holders.items())},
                )
                writer.write(
                    proto.failure(
                        None,
                        "busy",
                        f"{self.max_clients} connections are open (control.max_clients)",
                    )
                )
                with contextlib.suppress(OSError):
                    await writer.drain()
                return
            self._connections.add(conn)
            log.debug("control_connected", pid=conn.pid, uid=conn.uid, gid=conn.gid)
            writing = asyncio.create_task(conn.write_loop(), name="fota-control-write")
            try:
                await self._read_loop(conn, reader)
            finally:
                conn.out.put_nowait(None)
                try:
                    await asyncio.wait_for(asyncio.shield(writing), CLOSE_GRACE)
                except (OSError, ConnectionError):
                    pass
                except BaseException:
                    # It does not read what is left (or we are cancelled): hang up.
                    conn.abort()
                    writing.cancel()
                    with contextlib.suppress(BaseException):
                        await writing
                    raise
        except (OSError, ConnectionError) as exc:
            log.debug("control_connection_lost", pid=conn.pid, error=str(exc))
        finally:
            was_answering = conn.answers
            self._connections.discard(conn)
            if was_answering:
                self._answerers_changed()
            writer.close()
            with contextlib.suppress(OSError, ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_GRACE)
            self._tasks.discard(task)
            log.debug("control_disconnected", pid=conn.pid, uid=conn.uid)

    async def _read_loop(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        # When the line being read began: a new connection owes its first message from the
        # connect; between messages it is None (the idle rule applies instead).
        began: float | None = loop.time()
        # The last request (a blank keep-alive line does not count): the idle rule's start.
        spoke = loop.time()
        while not conn.dropped:
            # Backpressure: a client that sends faster than it reads its answers waits here.
            if not conn.room.is_set():
                await conn.room.wait()
                spoke = loop.time()  # we were not reading: that was no silence of its own
            head = b""
            if began is None:
                # Between messages. A subscriber waits for events and may stay silent; any
                # other connection gets idle_timeout, so idle clients cannot hold the slots.
                # The first byte is read on its own: it starts the line's clock.
                left = None if conn.listening else spoke + self.idle_timeout - loop.time()
                try:
                    head = await asyncio.wait_for(reader.readexactly(1), left)
                except TimeoutError:
                    self._hang_up(
                        conn,
                        "idle",
                        f"no message for {self.idle_timeout:g} s without a subscription"
                        " (control.idle_timeout)",
                    )
                    return
                except asyncio.IncompleteReadError:
                    return  # end of input between messages: a clean close
                if head == b"\n":
                    continue  # a blank keep-alive line
                began = loop.time()
            try:
                rest = await asyncio.wait_for(
                    reader.readuntil(b"\n"), max(0.0, began + self.request_timeout - loop.time())
                )
            except TimeoutError:
                self._hang_up(
                    conn,
                    "timeout",
                    f"no complete message within {self.request_timeout:g} s"
                    " (control.request_timeout)",
                )
                return
            except asyncio.LimitOverrunError:
                self._too_large(conn)
                return
            except asyncio.IncompleteReadError as exc:
                if (head + exc.partial).strip():
                    conn.send(
                        proto.failure(
                            None,
                            "incomplete",
                            f"end of input after {len(head) + len(exc.partial)} bytes of a"
                            " message (each message ends with a newline)",
                        )
                    )
                return
            began = None
            line = head + rest
            if len(line) - 1 > self.max_message:
                self._too_large(conn)
                return
            if not line.strip():
                continue  # blank lines are keep-alives (they do not reset the idle clock)
            await self._answer(conn, line)
            spoke = loop.time()

    async def _answer(self, conn: _Connection, line: bytes) -> None:
        """Parse, run and answer one request line (errors are answers, never raised)."""
        rid: int | str | None = None
        try:
            request = proto.parse_request(line)
            rid = request.id
            result = await self._dispatch(conn, request)
        except ControlError as exc:
            rid = rid if rid is not None else exc.request_id
            conn.send(proto.failure(rid, exc.code, str(exc)))
            return
        try:
            conn.send(proto.answer(rid, result))
        except (TypeError, ValueError):  # a result JSON cannot carry (NaN): our bug
            log.exception("control_answer_unencodable", op=request.op)
            conn.send(proto.failure(rid, "internal", f"{request.op}: unencodable result"))

    def _too_large(self, conn: _Connection) -> None:
        conn.send(
            proto.failure(
                None,
                "too_large",
                f"message longer than {self.max_message} bytes (control.max_message)",
            )
        )
        log.warning("control_message_too_large", pid=conn.pid, uid=conn.uid, limit=self.max_message)

    def _hang_up(self, conn: _Connection, code: str, message: str) -> None:
        """Answer ``code`` to no request; the caller returns, which closes the connection."""
        conn.send(proto.failure(None, code, message))
        # A half-written line is a misbehaving peer; a client quiet between requests is not
        # (``fota inhibit -- COMMAND`` renews every ttl/3 and is closed in between): INFO.
        emit = log.info if code == "idle" else log.warning
        emit(f"control_{code}", pid=conn.pid, uid=conn.uid, gid=conn.gid)

    # -- requests -----------------------------------------------------------------------

    async def _dispatch(self, conn: _Connection, request: proto.Request) -> dict[str, Any]:
        try:
            return await self._run(conn, request)
        except ControlError:
            raise
        except InvalidTransition as exc:
            raise ControlError("invalid_state", str(exc)) from exc
        except PolicyError as exc:
            raise ControlError("refused", str(exc)) from exc
        except JournalError as exc:
            raise ControlError("journal", str(exc)) from exc
        except ValueError as exc:
            raise ControlError("bad_request", str(exc)) from exc
        except FotaError as exc:
            raise ControlError("refused", str(exc)) from exc
        except Exception as exc:
            log.exception("control_request_crashed", op=request.op)
            raise ControlError("internal", f"{request.op} failed: {exc!r}") from exc

    def _update_id(self, args: dict[str, Any] | Any) -> str:
        uid = args.get("update_id") or self.client.status().update_id
        if uid is None:
            raise ControlError("invalid_state", "no update is pending")
        return str(uid)

    async def _run(self, conn: _Connection, request: proto.Request) -> dict[str, Any]:
        client, args, who = self.client, request.args, {"pid": conn.pid, "uid": conn.uid}
        match request.op:
            case "hello":
                return {"protocol": proto.PROTOCOL, "fota": _version(), "pid": os.getpid()}
            case "status":
                return status_dict(client.status())
            case "subscribe":
                conn.events = frozenset(args.get("events", proto.EVENTS))
                answers = bool(args.get("answers", False))
                if answers != conn.answers:
                    conn.answers = answers
                    self._answerers_changed()
                waiting = client.authorization_notice()
                if waiting is not None and "authorization_needed" in conn.events:
                    # It connected after the client began to wait: tell it now (right after
                    # this answer, which is queued first), or it would never hear of it.
                    line = proto.encode(waiting.as_dict())
                    asyncio.get_running_loop().call_soon(conn.send, line)
                return status_dict(client.status())
            case "unsubscribe":
                conn.events = frozenset()
                if conn.answers:
                    conn.answers = False
                    self._answerers_changed()
                return {}
            case "authorize":
                uid = self._update_id(args)
                await client.authorize(uid)
                log.info("authorized_via_control", update_id=uid, **who)
                return {"update_id": uid}
            case "reject":
                uid = self._update_id(args)
                await client.reject(uid, args.get("reason", ""))
                log.info("rejected_via_control", update_id=uid, **who)
                return {"update_id": uid}
            case "defer":
                uid = self._update_id(args)
                now = client.now()  # the client's clock: a ManualClock in tests
                until = args["until"] if "until" in args else now + args["for"]
                end = await client.defer(
                    uid, datetime.fromtimestamp(until, UTC), args.get("reason", "")
                )
                log.info("deferred_via_control", update_id=uid, until=until, **who)
                return {
                    "update_id": uid,
                    "until": end.timestamp() if end else None,
                    "forced": end is None,
                }
            case "resume":
                await client.resume()
                return {}
            case "check":
                client.check_now()
                return {}
            case "inhibit":
                expires = await client.inhibit(args["name"], args["ttl"])
                log.info("inhibited_via_control", lock=args["name"], ttl=args["ttl"], **who)
                return {"name": args["name"], "expires": expires.timestamp()}
            case "release":
                await client.release(args["name"])
                log.info("released_via_control", lock=args["name"], **who)
                return {"name": args["name"]}
        raise ControlError("unknown_op", f"op: {request.op!r} is unknown")  # pragma: no cover

    # -- events -------------------------------------------------------------------------

    def _notice(self, notice: Notice) -> None:
        line: bytes | None = None
        for conn in list(self._connections):
            if notice.kind in conn.events:
                line = line or proto.encode(notice.as_dict())
                conn.send(line, event=True)

    def _answerers_changed(self) -> None:
        if self.on_answerers is not None:
            self.on_answerers(sum(1 for c in self._connections if c.answers))
