"""Client settings in one typed object (the daemon's TOML maps onto it)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fota.core.manifest import TrustStore
from fota.core.policy import Policy
from fota.core.uri import SCHEMES, origin
from fota.core.windows import Window, parse_windows
from fota.errors import ConfigError

SEVERITIES = ("optional", "mandatory", "critical")

MAX_RETRANSMIT_LIMIT = 20
"""Largest ``max_retransmit``: past it one exchange would keep retrying for weeks."""


def _default_max_deferral() -> dict[str, float | None]:
    return {"optional": None, "mandatory": 7 * 86400.0, "critical": 86400.0}


def _default_deadline_after() -> dict[str, float | None]:
    return {"optional": None, "mandatory": None, "critical": None}


def local_zone(name: str | None) -> tzinfo:
    """The time zone maintenance windows are read in.

    ``name`` is an IANA name; None means the system's zone (``TZ``, else ``/etc/localtime``),
    falling back to UTC when neither is readable.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        if name:
            return ZoneInfo(name)
        env = os.environ.get("TZ", "").lstrip(":")
        if env:
            return ZoneInfo(env)
        with open("/etc/localtime", "rb") as fp:
            return ZoneInfo.from_file(fp, key="localtime")
    except (ZoneInfoNotFoundError, OSError, ValueError) as exc:
        if name:
            raise ConfigError(f"timezone: {name!r} is not a known IANA time zone") from exc
        return UTC


@dataclass(slots=True)
class Config:
    """Every client setting.

    Every number must be finite (``nan`` and ``inf`` are refused); durations in seconds are
    positive unless said otherwise. A bad value raises :class:`~fota.errors.ConfigError`
    naming the setting.

    Attributes:
        server: base URI of the update server, ``coap://host:port``.
        device_id: this device's id (names its announcement and report resources).
        device_class: manifests for another class are refused.
        state_dir: journal, manifests and candidate live here.
        trust: manifest verification keys by key id (until a keyset lists others: a key it
            leaves out only verifies the running image's stored manifest).
        trust_roots: root keys, which sign keysets (signed key updates: rotation and
            revocation without re-flashing, ``docs/security.md``) and nothing else; empty:
            keysets are refused.
        revoked_keys: key ids (hex) no longer trusted, for manifests or keysets.
        target: the file the file installer replaces (when no installer is given).
        poll_interval: poll the announcement every this many seconds instead of observing.
        observe_refresh: re-register an observation silent this long (a restarted server
            forgets its observers without telling them).
        observe_backoff_base: first wait after a failed observation or poll of the
            announcement, seconds (doubling, jittered, to ``observe_backoff_cap``).
        observe_backoff_cap: longest wait between failed observations or polls, seconds.
        require_signed_announcements: ignore (log) announcements that are not signed by a
            trusted manifest key; a signed one is checked (signature, expiry, replay)
            whatever this says (docs/security.md, freshness).
        freshness_window: seconds of monotonic time without a fresh announcement after which
            the device says it is stale (``fota status``, a ``stale`` event, a WARNING, a
            report); None: not watched.
        block_size: CoAP Block2 size asked for, 16..1024.
        window: most image block requests in flight (NON requests; see docs/protocol.md).
        fsync_every: fsync the candidate (and write the journal) once this many fragments'
            worth of bytes were written to it since the last time (and at the end); a
            fragment is journaled only after the fsync that covers it, and so are the pages
            of fragments still incomplete (the ``partial`` note).
        ack_timeout: CoAP ACK_TIMEOUT in seconds (RFC 7252: 2.0).
        max_retransmit: CoAP MAX_RETRANSMIT (RFC 7252: 4), 0..20.
        retransmission: the image download's retransmission timeout: ``cocoa`` (adaptive,
            from measured round trips: draft-ietf-core-cocoa) or ``rfc7252`` (``ack_timeout``
            times 1 to 1.5, doubling per try). Either way at most ``max_retransmit``
            retransmissions per request.
        congestion: the image download's window: ``aimd`` (grows while answers come back,
            halved on a loss, never above ``window``) or ``fixed`` (``window`` in flight).
        min_rto: CoCoA's lower bound on the retransmission timeout, seconds (0.01..60).
        max_image_size: largest image accepted, bytes, at least 1.
        allowed_origins: servers besides ``server`` that manifests, keysets and images may
            be fetched from (``coap://mirror.example`` or with a port); a manifest whose
            image is elsewhere is refused (``INVALID_URI``), and an announced location
            elsewhere is ignored.
        min_free_space: bytes that must stay free in the state directory's file system after
            the image is downloaded; a download that would leave less is not started
            (``NOT_ENOUGH_SPACE``, result 2).
        progress_step: ``on_progress`` about every this many percent.
        max_attempts: failed download attempts before the update fails.
        retry_base: first retry delay, seconds (doubles per attempt).
        retry_cap: longest retry delay, seconds, at least ``retry_base``.
        retry_jitter: retry delays are spread randomly by this fraction either way (0..1).
        restart_limit: restarts during one update's active steps before it fails.
        max_download_bytes: data budget per update (bytes received, across attempts and
            restarts; metered links); None: no limit. Exceeding it fails the update (107).
        max_download_time: seconds from the first download start; None: no limit (108).
        resume: after a restart mid-download: ``resume`` (from the verified fragments),
            ``restart`` (from zero) or ``none`` (the update fails and is reported).
        report_retry_cap: longest delay between report delivery attempts, seconds.
        journal_retry: pause before an event whose journal write failed (a full disk, an I/O
            error) is handled again, and before an installer step that met a full disk runs
            again (up to ``max_attempts`` tries), seconds.
        not_found_budget: seconds a download keeps retrying (with back-off) an image the
            server answers 4.04 for, from the first 4.04 since the last verified fragment;
            then the update fails (7). 0: fail at the first 4.04. A manifest or keyset
            fetch waits out a 4.04 for as long, from its first 4.04, then stops.
        poll_jitter: each poll interval is spread randomly by this fraction either way.
        max_deferral: cumulative deferral allowed per severity (``optional``, ``mandatory``,
            ``critical``), seconds, across restarts; None: unbounded. A manifest's
            ``max_deferral`` tightens it. Past it the update proceeds, forced.
        deadline_after: per severity, seconds after an update is first seen at which it is
            forced past every wait (like a manifest ``deadline``); None: none.
        unanswered: what a polite update does while no handler is registered: ``wait``
            (default: it is not installed by itself) or ``proceed`` after ``unanswered_grace``.
        unanswered_grace: seconds from when the update is first seen; see ``unanswered``;
            0 or more.
        quiet_period: seconds after the first start (provisioning) during which updates are
            held, unless forced by a deadline; 0 or more.
        maintenance_windows: weekly windows in local time, e.g. ``"Mon-Fri 02:00-04:00"``;
            outside them installs are held (the deadline still forces). Empty: any time.
        timezone: IANA zone of the windows; None: the system's zone.
        condition_commands: conditions as commands (argument lists): exit 0 = may proceed.
        condition_recheck: seconds before failing conditions are evaluated again.
        hook_timeout: seconds a condition (callback or command) may take.
        gates_download: locks, windows, quiet period and conditions hold downloads too.
        max_locks: most inhibitor locks at once.
        max_lock_ttl: longest inhibitor lock time to live, seconds.
        factory_manifest: the signed manifest of the image the device was provisioned with;
            read at the first start so that its ``polite`` flag governs the first update.
        oscore: directory of the OSCORE security context shared with the update server
            (aiocoap's format, ``docs/security.md``; needs ``fota[oscore]``). Every request
            is then protected end to end, nothing goes in plaintext, and the image is fetched
            through aiocoap (``window`` requests at a time). The directory must be writable:
            the context's sequence numbers are kept there.
        installers: installer settings by component (``firmware``, ``application``,
            ``other``, or ``default``), each a table with a ``kind`` (docs/installers.md);
            empty: a file installer for ``target``.
        self_test_command: a health check run after the new image starts (argument list);
            exit 0 passes. It runs after the in-process ``self_test`` callback, if any.
        self_test_deadline: seconds from the new image's start within which the self-test
            must pass (it is retried until then); else the update is rolled back.
        self_test_interval: seconds between self-test attempts.
        restart_command: what restarts the device when an installer needs it (argument
            list, e.g. ``["systemctl", "reboot"]``); None: fota waits for someone to do it.
        boot_id_path: a file whose content changes at every boot; a restart asked for has
            happened when it changed. None: every start counts as that restart.
    """

    server: str
    device_id: str
    device_class: str
    state_dir: Path
    trust: TrustStore = field(default_factory=TrustStore)
    trust_roots: TrustStore = field(default_factory=TrustStore)
    revoked_keys: list[str] = field(default_factory=list)
    target: Path | None = None
    poll_interval: float | None = None
    observe_refresh: float = 300.0
    observe_backoff_base: float = 1.0
    observe_backoff_cap: float = 60.0
    require_signed_announcements: bool = False
    freshness_window: float | None = None
    block_size: int = 1024
    window: int = 16
    fsync_every: int = 1
    ack_timeout: float = 2.0
    max_retransmit: int = 4
    retransmission: str = "cocoa"
    congestion: str = "aimd"
    min_rto: float = 0.2
    max_image_size: int = 1 << 30
    min_free_space: int = 0
    allowed_origins: list[str] = field(default_factory=list)
    progress_step: int = 5
    max_attempts: int = 5
    retry_base: float = 1.0
    retry_cap: float = 300.0
    retry_jitter: float = 0.25
    restart_limit: int = 8
    max_download_bytes: int | None = None
    max_download_time: float | None = None
    resume: str = "resume"
    report_retry_cap: float = 60.0
    journal_retry: float = 5.0
    not_found_budget: float = 600.0
    poll_jitter: float = 0.1
    max_deferral: dict[str, float | None] = field(default_factory=_default_max_deferral)
    deadline_after: dict[str, float | None] = field(default_factory=_default_deadline_after)
    unanswered: str = "wait"
    unanswered_grace: float = 3600.0
    quiet_period: float = 0.0
    maintenance_windows: list[str] = field(default_factory=list)
    timezone: str | None = None
    condition_commands: dict[str, list[str]] = field(default_factory=dict)
    condition_recheck: float = 300.0
    hook_timeout: float = 30.0
    gates_download: bool = False
    max_locks: int = 32
    max_lock_ttl: float = 86400.0
    factory_manifest: Path | None = None
    oscore: Path | None = None
    installers: dict[str, dict[str, Any]] = field(default_factory=dict)
    self_test_command: list[str] | None = None
    self_test_deadline: float = 300.0
    self_test_interval: float = 10.0
    restart_command: list[str] | None = None
    boot_id_path: Path | None = Path("/proc/sys/kernel/random/boot_id")
    _windows: tuple[Window, ...] = field(default=(), init=False, repr=False)
    _zone: tzinfo = field(default=UTC, init=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        if not self.server.startswith("coap://"):
            raise ConfigError(f"server: {self.server!r} must start with coap://")
        if not self.device_id or "/" in self.device_id or len(self.device_id) > 64:
            raise ConfigError("device_id: 1..64 characters without '/'")
        if self.block_size not in (16, 32, 64, 128, 256, 512, 1024):
            raise ConfigError(f"block_size: {self.block_size} must be a power of two in 16..1024")
        if not 1 <= self.window <= 256:
            raise ConfigError(f"window: {self.window} must be in 1..256")
        if self.resume not in ("resume", "restart", "none"):
            raise ConfigError(f"resume: {self.resume!r} is not one of resume, restart, none")
        if not 0 <= self.retry_jitter < 1:
            raise ConfigError(f"retry_jitter: {self.retry_jitter} must be in 0..1")
        if self.fsync_every < 1:
            raise ConfigError("fsync_every: must be at least 1")
        if not 1 <= self.progress_step <= 100:
            raise ConfigError(f"progress_step: {self.progress_step} must be in 1..100")
        if self.restart_limit < 1:
            raise ConfigError(f"restart_limit: {self.restart_limit} must be at least 1")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts: must be at least 1")
        if not 0 <= self.poll_jitter < 1:
            raise ConfigError(f"poll_jitter: {self.poll_jitter} must be in 0..1")
        for name in (
            "ack_timeout",
            "observe_refresh",
            "observe_backoff_base",
            "retry_base",
            "report_retry_cap",
            "journal_retry",
            "max_lock_ttl",
            "condition_recheck",
            "hook_timeout",
            "self_test_deadline",
            "self_test_interval",
        ):
            _positive(name, getattr(self, name))
        for name in ("poll_interval", "max_download_time", "freshness_window"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if _finite("not_found_budget", self.not_found_budget) < 0:
            raise ConfigError(f"not_found_budget: {self.not_found_budget} must not be negative")
        if _finite("retry_cap", self.retry_cap) < self.retry_base:
            raise ConfigError(
                f"retry_cap: {self.retry_cap} must be at least retry_base ({self.retry_base})"
            )
        if _finite("observe_backoff_cap", self.observe_backoff_cap) < self.observe_backoff_base:
            raise ConfigError(
                f"observe_backoff_cap: {self.observe_backoff_cap} must be at least "
                f"observe_backoff_base ({self.observe_backoff_base})"
            )
        _integer_in("max_retransmit", self.max_retransmit, 0, MAX_RETRANSMIT_LIMIT)
        _integer_in("max_image_size", self.max_image_size, 1)
        _integer_in("min_free_space", self.min_free_space, 0)
        if self.max_download_bytes is not None:
            _integer_in("max_download_bytes", self.max_download_bytes, 1)
        for name, table in (
            ("max_deferral", self.max_deferral),
            ("deadline_after", self.deadline_after),
        ):
            unknown = set(table) - set(SEVERITIES)
            if unknown:
                raise ConfigError(f"{name}: unknown severity {sorted(unknown)}, use {SEVERITIES}")
            for severity, value in table.items():
                if value is not None:
                    _not_negative(f"{name}.{severity}", value)
        if self.retransmission not in ("cocoa", "rfc7252"):
            raise ConfigError(
                f"retransmission: {self.retransmission!r} is not one of cocoa, rfc7252"
            )
        if self.congestion not in ("aimd", "fixed"):
            raise ConfigError(f"congestion: {self.congestion!r} is not one of aimd, fixed")
        if not 0.01 <= _finite("min_rto", self.min_rto) <= 60:
            raise ConfigError(f"min_rto: {self.min_rto} must be in 0.01..60 seconds")
        if self.unanswered not in ("wait", "proceed"):
            raise ConfigError(f"unanswered: {self.unanswered!r} is not one of wait, proceed")
        for name in ("unanswered_grace", "quiet_period"):
            _not_negative(name, getattr(self, name))
        if self.max_locks < 1:
            raise ConfigError("max_locks: must be at least 1")
        for name, argv in self.condition_commands.items():
            if not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError(
                    f"condition_commands.{name}: must be a non-empty list of arguments"
                )
        self._windows = parse_windows(self.maintenance_windows)
        self._zone = local_zone(self.timezone)
        if self.factory_manifest is not None:
            self.factory_manifest = Path(self.factory_manifest)
        if self.oscore is not None:
            self.oscore = Path(self.oscore)
        for i, uri in enumerate(self.allowed_origins):
            parts = urlsplit(uri) if isinstance(uri, str) else None
            if parts is None or parts.scheme not in SCHEMES or not parts.hostname:
                raise ConfigError(
                    f"allowed_origins[{i}]: {uri!r} is not a coap:// or coap+tcp:// origin"
                )
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ConfigError(f"allowed_origins[{i}]: {uri!r} has a path; give the origin")
        for i, kid in enumerate(self.revoked_keys):
            try:
                raw = bytes.fromhex(kid) if isinstance(kid, str) else b""
            except ValueError:
                raw = b""
            if not 1 <= len(raw) <= 64:
                raise ConfigError(
                    f"revoked_keys[{i}]: {kid!r} is not a key id (hex, 1 to 64 bytes)"
                )
        for name in ("self_test_command", "restart_command"):
            argv = getattr(self, name)
            if argv is not None and (not argv or not all(isinstance(a, str) and a for a in argv)):
                raise ConfigError(f"{name}: must be a non-empty list of arguments")
        if self.boot_id_path is not None:
            self.boot_id_path = Path(self.boot_id_path)

    def origins(self) -> tuple[str, ...]:
        """The server's origin and ``allowed_origins``, as the core compares them."""
        return tuple(dict.fromkeys(origin(u) for u in (self.server, *self.allowed_origins)))

    def policy(self) -> Policy:
        """The core's view of these settings."""
        return Policy(
            device_class=self.device_class,
            max_image_size=self.max_image_size,
            progress_step=self.progress_step,
            max_attempts=self.max_attempts,
            retry_base=self.retry_base,
            retry_cap=self.retry_cap,
            retry_jitter=self.retry_jitter,
            restart_limit=self.restart_limit,
            max_download_bytes=self.max_download_bytes,
            max_download_time=self.max_download_time,
            resume=self.resume,
            max_deferral=_by_severity({**_default_max_deferral(), **self.max_deferral}),
            deadline_after=_by_severity(self.deadline_after),
            unanswered=self.unanswered,
            unanswered_grace=self.unanswered_grace,
            quiet_period=self.quiet_period,
            windows=self._windows,
            tz=self._zone,
            conditions=tuple(self.condition_commands),
            condition_recheck=self.condition_recheck,
            gates_download=self.gates_download,
            max_locks=self.max_locks,
            max_lock_ttl=self.max_lock_ttl,
            self_test_deadline=self.self_test_deadline,
            self_test_interval=self.self_test_interval,
            origins=self.origins(),
            not_found_budget=self.not_found_budget,
        )


def _finite(name: str, value: object) -> float:
    """``value`` if it is a finite number (an int or a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}: {value!r} must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: {value} must be a finite number")
    return value


def _positive(name: str, value: object) -> None:
    if _finite(name, value) <= 0:
        raise ConfigError(f"{name}: {value} must be positive")


def _not_negative(name: str, value: object) -> None:
    if _finite(name, value) < 0:
        raise ConfigError(f"{name}: {value} must not be negative")


def _integer_in(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: {value!r} must be an integer")
    if high is not None and not low <= value <= high:
        raise ConfigError(f"{name}: {value} must be in {low}..{high}")
    if value < low:
        raise ConfigError(f"{name}: {value} must be at least {low}")


def _by_severity(table: dict[str, float | None]) -> tuple[float | None, float | None, float | None]:
    """A severity table as the core's tuple (index = Severity value); missing: None."""
    return (table.get("optional"), table.get("mandatory"), table.get("critical"))
