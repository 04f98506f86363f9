"""Announcements, from the transport to the engine's inbox.

Announcements are unsigned (or signed by a key a keyset may bring), so each goes through the
same gate before the machine hears of it: its locations must be on an allowed origin, the
keyset it names is fetched first (bounded), then its signature, expiry and replay are checked
(:mod:`fota.core.announce_sig`). A fresh one (signed, recent) restarts the freshness window;
when none came for ``Config.freshness_window`` the device says so, once per lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

import structlog

from fota.config import Config
from fota.core import announce_sig
from fota.core import events as ev
from fota.core.text import show
from fota.core.uri import allowed
from fota.effects import Effects
from fota.transport import Announcement, Transport
from fota.trust import Trust

log = structlog.get_logger("fota.engine")

KEYSET_WAIT = 30.0
"""Longest an announcement waits for the keyset it names, seconds."""
KEYSET_RETRY = 600.0
"""After a keyset failed, the same one is not fetched again for this long, seconds."""


class Intake:
    """The announcement watcher and the freshness watch (two of the engine's kept tasks).

    Args:
        config: client settings (allowed origins, trust, freshness window).
        transport: where announcements come from.
        trust: the root keys and current keyset.
        effects: fetches a keyset an announcement names.
        clock: wall-clock time, seconds since the epoch.
        post: puts an event into the engine's inbox.
        tell: tells the listeners a notice (``kind``, update id, fields).
    """

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport,
        trust: Trust,
        effects: Effects,
        clock: Callable[[], float],
        post: Callable[[ev.Event], None],
        tell: Callable[..., None],
    ) -> None:
        self.config = config
        self.transport = transport
        self.trust = trust
        self.effects = effects
        self.clock = clock
        self.post = post
        self.tell = tell
        self.keyset_failed: tuple[str, int, float] | None = None
        """(uri, version, monotonic instant before which it is not fetched again)."""
        # Freshness (Config.freshness_window): measured in monotonic time, so a stepped wall
        # clock neither hides a frozen device nor makes a live one look frozen.
        self.fresh_since = time.monotonic()
        self.wake = asyncio.Event()
        self.newest_issued: int | None = None  # of the newest signed announcement taken
        self.stale = False
        """No fresh announcement for ``Config.freshness_window`` (until the next fresh one)."""
        self.last_fresh: float | None = None
        """When the last fresh announcement arrived (wall clock), None: none since the start."""

    async def watch(self) -> None:
        """Read announcements until the transport ends; post the ones taken."""
        async for ann in self.transport.announcements():
            log.debug("announcement_received", sequence=ann.sequence, uri=ann.manifest_uri)
            ann = self.allowed_locations(ann)
            # The keyset first (it verifies by the root keys, whoever announced it): the
            # announcement may be signed by a key that keyset brings.
            await self.keyset_of(ann)
            if not self.take(ann):
                continue
            self.post(
                ev.AnnouncementReceived(
                    ann.sequence, ann.manifest_digest, ann.manifest_uri, ann.cancel
                )
            )

    def take(self, ann: Announcement) -> bool:
        """Whether to act on an announcement (signature, expiry, replay); note freshness."""
        verdict = announce_sig.check(
            ann.signed,
            self.config.trust,
            required=self.config.require_signed_announcements,
            now=self.clock(),
            newest=self.newest_issued,
        )
        if verdict.reason is not None:
            log.warning("announcement_ignored", reason=verdict.reason, sequence=ann.sequence)
            return False
        if verdict.issued_at is not None:
            self.newest_issued = max(self.newest_issued or 0, verdict.issued_at)
        if verdict.fresh:
            self.freshened()
        return True

    def freshened(self) -> None:
        """A fresh announcement arrived: the window starts again; say so if it was stale."""
        self.fresh_since = time.monotonic()
        self.last_fresh = self.clock()
        self.wake.set()
        if self.stale:
            self.stale = False
            log.info("announcements_fresh", last_fresh=self.last_fresh)
            self.tell("fresh", None, last_fresh=self.last_fresh)

    async def watch_freshness(self, window: float) -> None:
        """Say so when no fresh announcement arrived for ``window`` seconds (once per lapse)."""
        while True:
            due = self.fresh_since + window - time.monotonic()
            if due <= 0 and not self.stale:
                self.stale = True
                log.warning("announcements_stale", window=window, last_fresh=self.last_fresh)
                self.tell("stale", None, window=window, last_fresh=self.last_fresh)
                # A report too, through the machine's durable outbox: delivered if the server
                # can still hear the device (a path that only freezes announcements).
                self.post(ev.AnnouncementsStale(window, self.last_fresh))
            self.wake.clear()
            # A timer for the window, not synchronisation; a fresh announcement wakes it.
            timeout = None if self.stale else max(0.0, due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def keyset_of(self, ann: Announcement) -> None:
        """Fetch a newer keyset the announcement names, before its manifest is looked at.

        The manifest may be signed by a key this keyset brings. Bounded (``KEYSET_WAIT``), and
        not tried again soon after a failure (``KEYSET_RETRY``): the announced version is
        unsigned, and a keyset nobody serves must not hold back every later announcement.
        """
        version, uri = ann.keyset_version, ann.keyset_uri
        if version is None or uri is None or version <= self.trust.version:
            return
        failed = self.keyset_failed
        if failed is not None and failed[:2] == (uri, version) and time.monotonic() < failed[2]:
            return
        try:
            async with asyncio.timeout(KEYSET_WAIT):
                applied = await self.effects.fetch_keyset(uri, version)
            if applied is not None:
                # Before the announcement it came with: its manifest is judged after this.
                self.post(applied)
        except TimeoutError:
            log.warning("keyset_fetch_timed_out", uri=uri, seconds=KEYSET_WAIT)
        if version > self.trust.version:
            self.keyset_failed = (uri, version, time.monotonic() + KEYSET_RETRY)

    def allowed_locations(self, ann: Announcement) -> Announcement:
        """Drop announced locations outside the allowed origins (announcements are unsigned)."""
        origins = self.config.origins()
        for field in ("manifest_uri", "keyset_uri"):
            uri = getattr(ann, field)
            if uri is not None and not allowed(uri, origins):
                log.warning("announced_location_refused", field=field, uri=show(uri, 120))
                if field == "manifest_uri":
                    ann = dataclasses.replace(ann, manifest_uri=None, manifest_digest=None)
                else:
                    ann = dataclasses.replace(ann, keyset_uri=None, keyset_version=None)
        return ann
