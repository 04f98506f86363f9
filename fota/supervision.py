"""The engine's child tasks: named, supervised, and restarted when they are meant to last.

Every command's work runs as a child task here (:meth:`Supervisor.spawn`). An exception that
escapes one (not a cancellation) is logged with its reason where it happens and becomes the
failure event of its command in the engine's inbox, so the update ends with a result instead
of waiting forever for an event that never comes. Long-lived tasks (the announcement watcher,
the timers, freshness, report delivery) are kept (:meth:`Supervisor.keep`): started again after
a crash, after the one back-off (:func:`fota.core.policy.backoff`) with jitter, so a bug that
crashes a fleet at once does not restart it in lockstep.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from fota.core import events as ev
from fota.core import policy as pol
from fota.errors import TaskCrashed

log = structlog.get_logger("fota.engine")

SUPERVISE_RETRY = 1.0
SUPERVISE_RETRY_CAP = 300.0
"""Pause before a crashed long-lived task (announcement watcher, timers, freshness, report
delivery) runs again, seconds: doubling from ``SUPERVISE_RETRY`` to the cap, with jitter."""

Failure = Callable[[TaskCrashed], "ev.Event | None"]
"""What a supervised child task's crash stands for: the failure event of its command (None:
the crash is only logged, e.g. a notification hook)."""


def _log_crash(task: asyncio.Task[None]) -> None:
    # A child task's exception would otherwise vanish until the task is collected.
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "task_crashed",
            task=task.get_name(),
            error=repr(task.exception()),
            exc_info=task.exception(),
        )


class Supervisor:
    """The engine's child tasks: at most one per name, any number without one.

    Args:
        post: puts an event into the engine's inbox (a crashed task's failure event).
        rng: the engine's random source, for the restart back-off's jitter.
    """

    def __init__(self, post: Callable[[ev.Event], None], rng: random.Random) -> None:
        self.post = post
        self.rng = rng
        self.closing = False
        """Set when the engine closes: nothing starts any more."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loose: set[asyncio.Task[None]] = set()
        self._retired: set[asyncio.Task[None]] = set()  # cancelled, maybe not finished yet

    def spawn(
        self,
        name: str | None,
        coro: Coroutine[Any, Any, None],
        failure: Failure | None = None,
    ) -> None:
        """Run ``coro`` as a supervised child task (one per ``name``; None: any number).

        A task of the same name still running is cancelled (retired) first. An exception
        that escapes ``coro`` is logged and becomes ``failure(error)``'s event in the inbox.
        """
        if self.closing:
            coro.close()
            return
        task = asyncio.create_task(
            self._supervised(name or "notify", coro, failure), name=f"fota-{name or 'notify'}"
        )
        task.add_done_callback(_log_crash)
        if name is None:
            self._loose.add(task)
            task.add_done_callback(self._loose.discard)
            return
        old = self._tasks.get(name)
        if old is not None and not old.done():
            self._retire(old)
        self._tasks[name] = task

    def keep(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``run()`` as a child task that is started again after a crash (with back-off).

        It ends when ``run()`` returns (the report task, when the outbox is empty).
        """
        self.spawn(name, self.restarting(name, run))

    def running(self, name: str) -> bool:
        """Whether the task of ``name`` runs now."""
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def cancel(self, name: str) -> None:
        """Cancel the task of ``name``, if it runs (it is awaited at :meth:`close`)."""
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            self._retire(task)

    async def close(self) -> None:
        """Cancel every child, the ones cancelled earlier too, and wait for them all."""
        self.closing = True
        tasks = [*self._tasks.values(), *self._loose, *self._retired]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._retired.clear()

    async def restarting(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``run()`` until it returns; after a crash, again, after the back-off."""
        crashes = 0
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Jitter: a bug that crashes a fleet at once must not restart it in lockstep.
                crashes += 1
                delay = pol.backoff(
                    crashes, SUPERVISE_RETRY, SUPERVISE_RETRY_CAP, self.rng.random(), 0.5
                )
                log.error(
                    "task_crashed",
                    task=name,
                    error=str(TaskCrashed(name, exc)),
                    restart_in=round(delay, 3),
                    exc_info=exc,
                )
                await asyncio.sleep(delay)  # back-off before the task runs again

    async def _supervised(
        self, name: str, coro: Coroutine[Any, Any, None], failure: Failure | None
    ) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = TaskCrashed(name, exc)
            event = failure(error) if failure is not None else None
            log.error(
                "task_crashed",
                task=name,
                error=str(error),
                becomes=type(event).__name__ if event is not None else None,
                exc_info=exc,
            )
            if event is not None:
                self.post(event)

    def _retire(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
