"""What the machine's commands do: one coroutine per command, returning the event it ends with.

The engine (:mod:`fota.engine`) decides when each runs: a supervised child task per command,
whose returned event goes into the engine's inbox (a crash becomes the command's failure
event there). The bodies here do the I/O (the network, the installer, check commands) and
never touch the machine or the journal: the manifest, the policy and the settings they need
are passed in, and what happened comes back as a fact.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import structlog

from fota import crashpoints, hooks
from fota.config import Config
from fota.core import events as ev
from fota.core import policy as pol
from fota.core.keyset import MAX_KEYSET_BYTES
from fota.core.manifest import MAX_MANIFEST_BYTES, Manifest, envelope_id, fetched_key, verify
from fota.core.record import Report
from fota.download import NO_SPACE
from fota.errors import (
    ConfigError,
    FotaError,
    InstallError,
    IntegrityError,
    JournalError,
    ManifestError,
    PermanentServerError,
    ResourceMissing,
    StorageError,
)
from fota.fileops import seal_candidate
from fota.handler import Decision, DecisionKind, UpdateHandler, UpdateInfo
from fota.install import Installer
from fota.journal import Journal
from fota.transport import Transport
from fota.trust import Trust

log = structlog.get_logger("fota.engine")

SelfTest = Callable[[Manifest], Awaitable[tuple[bool, str]]]
"""A post-install health check: returns (passed, detail)."""
Condition = Callable[[], Awaitable[bool]]
"""A local condition (battery, mains power, network type): True when an update may proceed."""
Progress = Callable[[int], None]
"""An installer's progress callback (percent); safe to call from a worker thread."""

REPORT_RETRY = 0.2
"""First pause between report delivery attempts, seconds (doubling to ``report_retry_cap``)."""
RESTART_RETRY = 30.0
RESTART_RETRY_CAP = 600.0
"""Pauses between runs of a restart command that failed (doubling, capped)."""

_T = TypeVar("_T")


async def run_check(
    name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[bool, str]:
    """Run a check command (condition, self-test, restart); exit 0 passes.

    Any other exit, a timeout or a missing program fails, with a detail saying which.
    """
    try:
        done = await hooks.run(argv, name=name, timeout=timeout, env=env)
    except hooks.CommandNotFound as exc:
        log.warning("command_missing", command=name, error=str(exc))
        return False, str(exc)
    except Exception as exc:  # the check must end with an answer, or the update waits forever
        log.error("command_crashed", command=name, error=repr(exc))
        return False, f"{name}: {exc!r}"
    return done.ok, "" if done.ok else hooks.describe(name, done, timeout)


def manifest_env(manifest: Manifest) -> dict[str, str]:
    """What a self-test or restart command learns about the update."""
    return {
        "FOTA_UPDATE_ID": manifest.update_id,
        "FOTA_VERSION": manifest.body.version,
        "FOTA_COMPONENT": manifest.body.component.name.lower(),
    }


def factory_manifest(path: Path, config: Config) -> Manifest:
    """The running image's manifest a provisioned device ships with (``Config.factory_manifest``).

    Raises:
        ConfigError: it cannot be read, does not verify, or is another device class's.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"factory_manifest: cannot read {path}: {exc.strerror}") from exc
    try:
        # The running image's manifest, like the journal's installed one: a key a keyset
        # rotated out (or revoked) since still vouches for it; only a new manifest needs a
        # key trusted now (else a device that lost its journal after a rotation is stuck).
        manifest = verify(raw, config.trust, max_image_size=1 << 62, revoked_ok=True)
        if manifest.body.device_class != config.device_class:
            raise ManifestError(
                "wrong_device_class",
                "device_class",
                f"{manifest.body.device_class!r} is not this device's {config.device_class!r}",
            )
    except ManifestError as exc:
        raise ConfigError(f"factory_manifest: {path}: {exc}") from exc
    return manifest


def read_boot_id(path: Path | None) -> str:
    """This boot's id (Linux: ``/proc/sys/kernel/random/boot_id``); "" if it cannot be read."""
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except OSError as exc:
        log.warning("boot_id_unreadable", path=str(path), error=exc.strerror)
        return ""


# -- the application's hooks ---------------------------------------------------------------


def decision_event(update_id: str, decision: Decision) -> ev.Event | None:
    """The event an application's decision stands for (None while it is pending)."""
    if decision.kind is DecisionKind.AUTHORIZE:
        return ev.Authorized(update_id)
    if decision.kind is DecisionKind.REJECT:
        return ev.Rejected(update_id, decision.reason)
    if decision.kind is DecisionKind.DEFER:
        assert decision.until is not None
        return ev.Deferred(update_id, decision.until.timestamp(), decision.reason)
    return None


def _hook(handler: UpdateHandler, step: str) -> Callable[[UpdateInfo], Awaitable[Decision]]:
    if step == "download":
        return handler.on_download_authorization
    return handler.on_install_authorization


async def ask(handler: UpdateHandler, info: UpdateInfo, step: str) -> ev.Event | None:
    """Ask the application's hook whether ``step`` may proceed.

    Returns:
        The event its answer stands for; None when the answer is pending (it comes through
        the Client API) or the hook failed (the application's bug: the update waits for an
        answer through the API, or the next restart, which asks again).
    """
    try:
        decision = await _hook(handler, step)(info)
    except Exception:
        log.exception("authorization_hook_failed", step=step, update_id=info.update_id)
        return None
    log.info(
        "authorization_answered",
        step=step,
        update_id=info.update_id,
        decision=decision.kind.value,
    )
    return decision_event(info.update_id, decision)


async def inform(handler: UpdateHandler, info: UpdateInfo, step: str) -> None:
    """Call the hook for information only: the running image is not polite."""
    try:
        decision = await _hook(handler, step)(info)
    except Exception:
        log.exception("authorization_hook_failed", step=step, update_id=info.update_id)
        return
    if decision.kind is not DecisionKind.AUTHORIZE:
        log.info(
            "answer_ignored",
            step=step,
            update_id=info.update_id,
            decision=decision.kind.value,
            why="the running image is not polite",
        )


class Effects:
    """The bodies of the engine's child tasks.

    Args:
        config: client settings.
        transport: the network.
        journal: where the candidate is (its path and file operations).
        installer: puts verified images in place.
        trust: the root keys and the keyset they vouch for.
        rng: the engine's random source: every back-off draws its jitter from it.
        self_test: the in-process post-install check, or None.
        conditions: the in-process local conditions by name (the engine's own dict: a
            condition registered later counts too).
    """

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport,
        journal: Journal,
        installer: Installer,
        trust: Trust,
        rng: random.Random,
        self_test: SelfTest | None,
        conditions: Mapping[str, Condition],
    ) -> None:
        self.config = config
        self.transport = transport
        self.journal = journal
        self.installer = installer
        self.trust = trust
        self.rng = rng
        self.health = self_test
        self.conditions = conditions

    # -- the network -----------------------------------------------------------------------

    async def fetch_manifest(self, uri: str, digest: bytes) -> ev.ManifestFetched | None:
        """The announced manifest, retried with back-off; None: given up (logged why)."""
        policy = self.config.policy()
        attempt, missing_since = 0, None
        while attempt < policy.max_attempts:
            attempt += 1
            try:
                raw = await self.transport.fetch(uri, limit=MAX_MANIFEST_BYTES)
            except ResourceMissing as exc:
                missing_since = await self.wait_missing("manifest", uri, exc, missing_since)
                if missing_since is None:
                    return None
                attempt -= 1  # not a failed attempt: the manifest is addressed by its digest
                continue
            except PermanentServerError as exc:
                log.warning("manifest_fetch_failed", uri=uri, error=str(exc))
                return None
            except FotaError as exc:
                log.info("manifest_fetch_retry", uri=uri, error=str(exc), attempt=attempt)
                await asyncio.sleep(pol.retry_delay(attempt, policy, self.rng.random()))
                continue
            key = digest  # past the size limit: refused as oversize, never hashed
            if len(raw) <= MAX_MANIFEST_BYTES:
                # The announcement names the manifest's identity (or, from an older server,
                # the SHA-256 of its bytes).
                if digest not in (hashlib.sha256(raw).digest(), envelope_id(raw)):
                    # Not the announced manifest: corrupted on the way (fetch again, like a
                    # lost block), or changed on the server (then the attempts run out and
                    # the next announcement brings the new digest). Bytes nobody announced
                    # are never judged.
                    log.warning("manifest_digest_mismatch", uri=uri, attempt=attempt)
                    await asyncio.sleep(pol.retry_delay(attempt, policy, self.rng.random()))
                    continue
                # The core files it under its identity only once a trusted signature
                # vouches for it (issue 16 §3): see fetched_key.
                key = fetched_key(raw, self.config.trust)
            return ev.ManifestFetched(raw, uri, key)
        return None

    async def fetch_keyset(self, uri: str, version: int) -> ev.KeysetApplied | None:
        """Fetch the announced keyset and apply it; a bad one changes nothing (None).

        A 4.04 is waited out for ``not_found_budget`` (:meth:`wait_missing`); the caller
        bounds the whole (``KEYSET_WAIT``).
        """
        policy = self.config.policy()
        attempt, missing_since = 1, None
        while attempt <= policy.max_attempts:
            try:
                raw = await self.transport.fetch(uri, limit=MAX_KEYSET_BYTES)
                keyset = self.trust.offer(raw)
            except ManifestError as exc:
                log.warning(
                    "keyset_refused", uri=uri, announced=version, kind=exc.kind, error=str(exc)
                )
                return None
            except ResourceMissing as exc:
                missing_since = await self.wait_missing("keyset", uri, exc, missing_since)
                if missing_since is None:
                    return None
                continue  # not a failed attempt: the keyset is addressed by its digest
            except PermanentServerError as exc:
                log.warning("keyset_fetch_failed", uri=uri, error=str(exc))
                return None
            except (FotaError, OSError) as exc:
                log.info("keyset_fetch_retry", uri=uri, error=str(exc), attempt=attempt)
                await asyncio.sleep(pol.retry_delay(attempt, policy, self.rng.random()))
                attempt += 1
                continue
            if keyset.version != version:
                log.info("keyset_version_differs", announced=version, applied=keyset.version)
            return ev.KeysetApplied(keyset.version, keyset.floor_reset)
        return None

    async def wait_missing(
        self, what: str, uri: str, error: ResourceMissing, since: float | None
    ) -> float | None:
        """Wait out a 4.04 on a manifest or keyset (issue 17 §3); None: the budget is spent.

        Both are addressed by a digest the announcement names, so a 4.04 is far more often
        "not here for a moment" (a server restarted and refilling its files) than "gone". As
        for the image (``Model.pause_download``): each wait is as long as the stall so far,
        ``retry_base`` to ``retry_cap``, jittered by this device's own draw, with one last
        try when ``not_found_budget`` (counted from the first 4.04, on the monotonic clock)
        ends. Past it the fetch stops as it always did: logged ``<what>_fetch_failed``, and
        the next announcement fetches it again.

        Returns:
            When the first 4.04 came (pass it back in), or None when the budget is spent.
        """
        policy = self.config.policy()
        now = time.monotonic()
        since = now if since is None else since
        left = since + policy.not_found_budget - now
        if left <= 0:
            log.warning(
                f"{what}_fetch_failed",
                uri=uri,
                error=str(error),
                missing_for=round(now - since, 3),
            )
            return None
        delay = min(pol.stall_delay(now - since, policy, self.rng.random()), left)
        log.info(f"{what}_missing", uri=uri, error=str(error), retry_in=round(delay, 3))
        await asyncio.sleep(delay)  # the back-off itself, not synchronisation
        return since

    # -- reports -----------------------------------------------------------------------------

    async def deliver_reports(
        self,
        oldest: Callable[[], Report | None],
        delivered: Callable[[int], Awaitable[None]],
    ) -> None:
        """Send the outbox, oldest first, until it is empty.

        Args:
            oldest: the report at the head of the journal's outbox now, None when empty.
            delivered: journals that the server has report ``sequence`` (the engine's
                ``ReportDelivered``, handled before this returns).
        """
        # The task outlives the state it was spawned in: its lines say which report they are
        # about (update and state of the report), not the context of its spawning.
        structlog.contextvars.unbind_contextvars("update_id", "version", "state")
        failures = 0
        while (report := oldest()) is not None:
            about = {
                "sequence": report.sequence,
                "update_id": report.update_id,
                "state": report.state.name,
            }
            try:
                await self.transport.post_report(report.to_cbor(self.config.device_id))
            except PermanentServerError as exc:
                log.warning("report_refused", error=str(exc), **about)
            except FotaError as exc:
                failures += 1
                delay = self._report_backoff(failures)
                log.info("report_retry", error=str(exc), delay=round(delay, 3), **about)
                await asyncio.sleep(delay)  # back-off between delivery attempts
                continue
            crashpoints.point("report:acknowledged")
            try:
                await delivered(report.sequence)
            except JournalError as exc:
                # The server has it, the journal does not say so yet: send it again after a
                # pause (the server de-duplicates by sequence) rather than end the task and
                # leave the outbox waiting for the next report to be queued.
                failures += 1
                delay = self._report_backoff(failures)
                log.warning("report_not_dropped", error=str(exc), delay=round(delay, 3), **about)
                await asyncio.sleep(delay)
                continue
            failures = 0

    def _report_backoff(self, failures: int) -> float:
        cap = max(REPORT_RETRY, self.config.report_retry_cap)
        return pol.backoff(failures, REPORT_RETRY, cap, self.rng.random(), self.config.retry_jitter)

    # -- local holds -----------------------------------------------------------------------

    async def check_gates(
        self, update_id: str, step: str, installed: Manifest | None, policy: pol.Policy
    ) -> ev.GatesChecked:
        """Evaluate the conditions (callbacks, then commands) and report which fail."""
        failing: list[str] = []
        if pol.needs_check(step, installed, policy):
            for name, condition in self.conditions.items():
                try:
                    ok = bool(await asyncio.wait_for(condition(), self.config.hook_timeout))
                except Exception as exc:  # a broken condition holds the update; say why
                    log.warning("condition_failed", condition=name, error=repr(exc))
                    ok = False
                if not ok:
                    failing.append(name)
            for name, argv in self.config.condition_commands.items():
                ok, _ = await run_check(f"condition {name}", argv, self.config.hook_timeout)
                if not ok:
                    failing.append(name)
        return ev.GatesChecked(update_id, tuple(failing))

    # -- the image and the installer -------------------------------------------------------

    async def verify(self, manifest: Manifest) -> ev.ImageChecked:
        """Hash the whole candidate (cut to the signed size) against the manifest."""
        uid = manifest.update_id
        path = self.journal.candidate_path
        try:
            digest = await asyncio.to_thread(seal_candidate, path, manifest.body.image_size)
        except OSError as exc:
            # Not a mismatch: the storage failed under the image. Reported as what it is
            # (FAILED, with the error), not as INTEGRITY_FAILURE, and not refetched in full.
            log.error("candidate_unreadable", error=str(exc))
            error = StorageError(f"candidate unreadable: {type(exc).__name__}: {exc}")
            return ev.ImageChecked(uid, False, error)
        return ev.ImageChecked(uid, digest == manifest.body.image_sha256)

    async def install(self, manifest: Manifest, progress: Progress) -> ev.InstallFinished:
        """Check the candidate once more, then hand it to the installer."""
        uid = manifest.update_id
        try:
            # Check again right before installing: a restart (days after VERIFYING, perhaps)
            # must not hand the installer bytes nobody checked since. Sealing cuts any tail
            # past the signed size: RAUC and a command installer read the whole file by path.
            digest = await asyncio.to_thread(
                seal_candidate, self.journal.candidate_path, manifest.body.image_size
            )
            if digest != manifest.body.image_sha256:
                raise IntegrityError("candidate no longer matches the manifest's image_sha256")
            outcome = await self._until_room(
                "install",
                uid,
                lambda: self.installer.install(self.journal.candidate_path, manifest, progress),
            )
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, FotaError)
                else InstallError(f"candidate: {exc}")
                if isinstance(exc, OSError)
                # A third-party installer's bug must not strand the update.
                else InstallError(f"installer crashed: {exc!r}")
            )
            log.error("install_failed", error=str(error), update_id=uid)
            return ev.InstallFinished(uid, error)
        return ev.InstallFinished(uid, restart=outcome.restart)

    async def self_test(self, manifest: Manifest) -> ev.SelfTestFinished:
        """One attempt: the in-process check, then ``Config.self_test_command``."""
        ok, detail = True, ""
        timeout = self.config.hook_timeout
        if self.health is not None:
            try:
                ok, detail = await asyncio.wait_for(self.health(manifest), timeout)
            except TimeoutError:
                ok, detail = False, f"self-test timed out after {timeout:g} s"
            except Exception as exc:
                ok, detail = False, f"self-test crashed: {exc!r}"
        if ok and self.config.self_test_command:
            ok, detail = await run_check(
                "self-test", self.config.self_test_command, timeout, manifest_env(manifest)
            )
        log.info("self_test_finished", ok=ok, detail=detail, update_id=manifest.update_id)
        return ev.SelfTestFinished(manifest.update_id, ok, detail)

    async def request_restart(self, manifest: Manifest) -> None:
        """Run ``Config.restart_command`` until the device restarts (which ends this task).

        A command that fails is run again, with a growing pause: the update cannot go on
        until the restart, and the reboot that kills fota is what ends the loop.
        """
        uid = manifest.update_id
        argv = self.config.restart_command
        if not argv:
            log.warning("restart_required", update_id=uid, why="no restart_command configured")
            return
        failures = 0
        while True:
            log.info("restarting_device", argv=argv, update_id=uid)
            ok, detail = await run_check(
                "restart", argv, self.config.hook_timeout, manifest_env(manifest)
            )
            if ok:  # the device is going down; if it does not, the next start asks again
                return
            failures += 1
            pause = pol.backoff(
                failures,
                RESTART_RETRY,
                RESTART_RETRY_CAP,
                self.rng.random(),
                self.config.retry_jitter,
            )
            log.error("restart_failed", detail=detail, update_id=uid, retry_in=round(pause, 3))
            await asyncio.sleep(pause)  # a back-off timer between attempts

    async def check_boot(self, manifest: Manifest) -> ev.BootChecked:
        """Whether the device now runs the new image (after the restart it asked for)."""
        try:
            ok = await self.installer.booted(manifest)
            detail = "" if ok else "the device runs the previous image"
        except Exception as exc:
            ok, detail = False, f"boot check failed: {exc}"
        return ev.BootChecked(manifest.update_id, ok, detail)

    async def commit(self, manifest: Manifest) -> ev.CommitFinished:
        """Make the new image permanent."""
        uid = manifest.update_id
        try:
            await self._until_room("commit", uid, lambda: self.installer.commit(manifest))
        except FotaError as exc:
            return ev.CommitFinished(uid, exc)
        except Exception as exc:
            return ev.CommitFinished(uid, InstallError(f"commit crashed: {exc!r}"))
        return ev.CommitFinished(uid)

    async def rollback(self, manifest: Manifest) -> ev.RollbackFinished:
        """Put the previous image back."""
        uid = manifest.update_id
        try:
            outcome = await self._until_room(
                "rollback", uid, lambda: self.installer.rollback(manifest)
            )
        except FotaError as exc:
            log.error("rollback_failed", error=str(exc), update_id=uid)
            return ev.RollbackFinished(uid, exc)
        except Exception as exc:
            log.error("rollback_failed", error=repr(exc), update_id=uid)
            return ev.RollbackFinished(uid, InstallError(f"rollback crashed: {exc!r}"))
        return ev.RollbackFinished(uid, restart=outcome.restart)

    async def _until_room(self, step: str, update_id: str, run: Callable[[], Awaitable[_T]]) -> _T:
        """Run an installer step; a full disk (ENOSPC, EDQUOT) it meets is waited out.

        A full disk is seldom for good (a log rotated, a download elsewhere finished): the
        step runs again ``journal_retry`` seconds later, up to ``max_attempts`` tries, before
        the error counts (an install, commit or rollback that failed for good). Installers
        allow a step to run again (``installers.md``). Anything else is raised at once.
        """
        tries = 1
        while True:
            try:
                return await run()
            except OSError as exc:
                if exc.errno not in NO_SPACE or tries >= self.config.max_attempts:
                    raise
                log.warning(
                    "installer_disk_full",
                    step=step,
                    error=str(exc),
                    delay=round(pause := self.journal_pause(), 3),
                    update_id=update_id,
                )
            await asyncio.sleep(pause)  # a pause, not a synchronisation
            tries += 1

    def journal_pause(self) -> float:
        """The pause before a write the disk refused is tried again.

        The journal's and an installer step's alike: ``journal_retry`` jittered, not doubled,
        since room may come back at any moment.
        """
        retry = self.config.journal_retry
        return pol.backoff(1, retry, retry, self.rng.random(), self.config.retry_jitter)
