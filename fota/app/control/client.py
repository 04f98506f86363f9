"""A small asyncio client of the daemon's control socket (docs/control.md).

    async with ControlClient("/run/fota/control.sock") as fota:
        status = await fota.subscribe(answers=True)
        async for event in fota.events():
            if event["event"] == "authorization_needed":
                await fota.defer(seconds=3600, reason="shift in progress")

Answers and events share one connection: a reader task routes answers to the request that
waits for them (requests are answered in order) and queues events for :meth:`events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from fota.app.control import protocol as proto
from fota.errors import ControlError

DEFAULT_SOCKET = Path("/run/fota/control.sock")
"""Where the daemon listens unless ``[control] socket`` says otherwise."""

SOCKET_ENV = "FOTA_CONTROL_SOCKET"
"""Environment variable that overrides :data:`DEFAULT_SOCKET` for clients."""

_RECONNECT = ("idle", "timeout")
"""Closes for silence (docs/control.md): the daemon ran none of the requests they cut off, so a
client that subscribed to nothing sends them again over a new connection."""


def default_socket() -> Path:
    """``$FOTA_CONTROL_SOCKET``, else :data:`DEFAULT_SOCKET`."""
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


def _error_of(message: dict[str, Any], default: str) -> ControlError:
    """The ControlError an error answer carries (its ``error`` may be anything on the wire)."""
    error = message.get("error")
    if not isinstance(error, dict):
        error = {}
    code, text = error.get("code", default), error.get("message", "")
    # The protocol says text here; str() of anything else could be a deep list's RecursionError.
    return ControlError(
        code if isinstance(code, str) else default, text if isinstance(text, str) else ""
    )


def _text_field(result: dict[str, Any], op: str, name: str = "update_id") -> str:
    value = result.get(name)
    if not isinstance(value, str):
        raise ControlError("internal", f"the daemon's answer to {op} has no text {name}")
    return value


def _number_field(result: dict[str, Any], op: str, name: str) -> float:
    value = result.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError("internal", f"the daemon's answer to {op} has no number {name}")
    try:
        return float(value)
    except OverflowError:  # an integer past float's range: no instant of ours
        raise ControlError(
            "internal", f"the daemon's answer to {op}: {name} is out of range"
        ) from None


class ControlClient:
    """One connection to the daemon.

    Args:
        path: the control socket (default: :func:`default_socket`).
        timeout: seconds to wait for each answer.
        max_message: longest line accepted from the daemon, bytes.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        timeout: float = 30.0,
        max_message: int = 1 << 20,
    ) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.timeout = timeout
        self.max_message = max_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._next_id = 0
        self._abandoned: set[int] = set()  # ids whose request timed out: late answers ignored
        self._closed: ControlError | None = None
        self._subscribed = False  # a subscription lives on its connection: never reconnected

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> ControlClient:
        """Open the connection.

        Raises:
            ControlError: ``unreachable`` (no daemon, or no permission), naming the socket.
        """
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.path), limit=self.max_message
            )
        except PermissionError:
            raise ControlError(
                "unreachable",
                f"{self.path}: permission denied (the socket's group and mode decide who"
                " may connect; see [control] in the daemon's configuration)",
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                "unreachable", f"{self.path}: no fota daemon is listening there"
            ) from None
        except OSError as exc:
            raise ControlError("unreachable", f"{self.path}: {exc.strerror or exc}") from None
        self._task = asyncio.create_task(self._read_loop(), name="fota-control-client")
        return self

    async def aclose(self) -> None:
        """Close the connection (inhibitor locks stay until released or expired)."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail(ControlError("closed", "the control connection is closed"))

    async def __aenter__(self) -> ControlClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: "[[[[..." too deep
                    continue  # not ours to judge: a daemon bug is logged on its side
                if not isinstance(message, dict):
                    continue
                if "event" in message:
                    if isinstance(message["event"], str):  # else no event kind to route by
                        self._events.put_nowait(message)
                    continue
                rid = message.get("id")
                if rid is not None:
                    # Our ids are ints (a bool is an int to Python, but `true` is no id of ours).
                    if isinstance(rid, int) and not isinstance(rid, bool):
                        future = self._waiting.pop(rid, None)
                        if future is None:
                            self._abandoned.discard(rid)  # a late answer: its caller gave up
                        elif not future.done():
                            future.set_result(message)
                    continue
                # An answer to no request: the daemon refused the connection (busy) or a line
                # it could not read (too large); it closes after this.
                if not message.get("ok", True):
                    self._closed = _error_of(message, "closed")
        except (OSError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        self._fail(self._closed or ControlError("closed", "the daemon closed the connection"))

    def _fail(self, error: ControlError) -> None:
        self._closed = self._closed or error
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._closed)
        self._waiting.clear()
        self._events.put_nowait(None)

    # -- requests ---------------------------------------------------------------------

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its ``result``.

        A connection the daemon closed for silence (``idle``, ``timeout``: a client may hold
        one open between requests for longer than the daemon's ``idle_timeout``) is opened
        again for the request, unless it subscribed (events come on that connection only).

        Raises:
            ControlError: the daemon's error (its ``code`` and message), or the connection's.
        """
        if self._writer is None:
            await self.connect()
        elif self._closed is not None and self._may_reconnect(self._closed):
            await self._reconnect()
        try:
            return await self._request(op, args)
        except ControlError as exc:
            if not self._may_reconnect(exc):
                raise
        # Closed for silence just as the request went out: the daemon read none of it (it
        # closes only between messages, or before a message's newline), so it goes again.
        await self._reconnect()
        return await self._request(op, args)

    def _may_reconnect(self, exc: ControlError) -> bool:
        return exc.code in _RECONNECT and not self._subscribed

    async def _reconnect(self) -> None:
        # The daemon hangs up right after saying why, so the old reader ends at that end of
        # input; it must be over before a new connection exists (it reads self._reader).
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self.timeout)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._closed = None
        self._events = asyncio.Queue()  # the old reader queued its end-of-events marker
        try:
            await self.connect()
        except ControlError as exc:
            self._closed = exc  # every later request says why (no writes to a dead socket)
            self._events.put_nowait(None)  # and the events have ended
            raise

    async def _request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        assert self._writer is not None
        if self._closed is not None:
            raise self._closed
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        message = {"id": rid, "op": op, **{k: v for k, v in args.items() if v is not None}}
        try:
            self._writer.write(proto.encode(message))
            await self._writer.drain()
            reply = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:  # before OSError: TimeoutError is one
            self._abandoned.add(rid)
            raise ControlError("closed", f"no answer to {op} within {self.timeout:g} s") from None
        except (OSError, ConnectionError) as exc:
            # The daemon may have said why it closed (idle) just before: that decides whether
            # the request may go again, so the reader gets to finish first.
            self._waiting.pop(rid, None)
            future.cancel()  # no answer comes now; the reader must not fail it unawaited
            if self._task is not None:
                await asyncio.wait({self._task}, timeout=self.timeout)
            if self._closed is not None and self._may_reconnect(self._closed):
                raise self._closed from None
            raise ControlError("closed", f"{self.path}: {exc}") from None
        finally:
            self._waiting.pop(rid, None)
        if not reply.get("ok"):
            raise _error_of(reply, "internal")
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def hello(self) -> dict[str, Any]:
        """The daemon's protocol version, fota version and pid."""
        return await self.request("hello")

    async def status(self) -> dict[str, Any]:
        """The client's status (docs/control.md, "status")."""
        return await self.request("status")

    async def subscribe(
        self, events: Iterable[str] | None = None, *, answers: bool = False
    ) -> dict[str, Any]:
        """Receive events (all kinds, or those named) from now on; returns the status.

        With ``answers=True`` this connection counts as an application that answers
        authorizations: while none is connected, ``unanswered`` in the daemon's
        configuration decides what a polite update does.
        """
        status = await self.request(
            "subscribe", events=list(events) if events is not None else None, answers=answers
        )
        self._subscribed = True
        return status

    async def authorize(self, update_id: str | None = None) -> str:
        """Authorize the waiting step of ``update_id`` (default: the pending update)."""
        return _text_field(await self.request("authorize", update_id=update_id), "authorize")

    async def reject(self, update_id: str | None = None, reason: str = "") -> str:
        """Reject the pending update (it is reported and not offered again)."""
        result = await self.request("reject", update_id=update_id, reason=reason or None)
        return _text_field(result, "reject")

    async def defer(
        self,
        until: datetime | float | None = None,
        *,
        seconds: float | None = None,
        reason: str = "",
        update_id: str | None = None,
    ) -> float | None:
        """Defer the waiting step until ``until`` (aware datetime or epoch) or for ``seconds``.

        Returns:
            When the deferral ends (epoch seconds; earlier than asked when a bound or the
            deadline cut it), or None when it was not granted and the step proceeds, forced.
        """
        if (until is None) == (seconds is None):
            raise ValueError("defer: give exactly one of until and seconds")
        if isinstance(until, datetime):
            if until.tzinfo is None:
                raise ValueError("defer: until must be timezone-aware")
            until = until.timestamp()
        result = await self.request(
            "defer", update_id=update_id, until=until, reason=reason or None, **{"for": seconds}
        )
        end = result.get("until")
        return _number_field(result, "defer", "until") if end is not None else None

    async def resume(self) -> None:
        """End the current deferral now (the application is asked again)."""
        await self.request("resume")

    async def check(self) -> None:
        """Look for an update now (and at due timers)."""
        await self.request("check")

    async def inhibit(self, name: str, ttl: float) -> float:
        """Take or renew the inhibitor lock ``name`` for ``ttl`` seconds; returns its expiry.

        The lock outlives this connection until it expires: renew it before then to keep
        holding it, and release it when done.
        """
        result = await self.request("inhibit", name=name, ttl=ttl)
        return _number_field(result, "inhibit", "expires")

    async def release(self, name: str) -> None:
        """Release the inhibitor lock ``name``."""
        await self.request("release", name=name)

    # -- events -----------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event (after :meth:`subscribe`).

        Raises:
            ControlError: ``closed`` when the connection ended.
            TimeoutError: none arrived within ``timeout``.
        """
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)  # stays closed for every later call
            raise self._closed or ControlError("closed", "the control connection is closed")
        return event

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event until the connection closes."""
        while True:
            try:
                yield await self.next_event()
            except ControlError:
                return

    async def wait_event(
        self,
        kinds: str | Iterable[str],
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Skip events until one of ``kinds`` (that ``predicate`` accepts) arrives."""
        wanted = {kinds} if isinstance(kinds, str) else set(kinds)

        async def find() -> dict[str, Any]:
            while True:
                event = await self.next_event()
                if event["event"] in wanted and (predicate is None or predicate(event)):
                    return event

        return await asyncio.wait_for(find(), timeout)
