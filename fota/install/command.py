"""The command installer: an external program of the integrator's does the work.

The program is configured locally (never taken from a manifest) as an argument list; fota runs
it as ``program [args...] ACTION`` with ACTION one of ``install``, ``booted``, ``commit``,
``rollback``, stdin closed, under a timeout. What it gets (docs/installers.md):

* ``FOTA_ACTION``, ``FOTA_CANDIDATE`` (install: the verified image), ``FOTA_MANIFEST`` (a file
  with the signed manifest's bytes), ``FOTA_UPDATE_ID``, ``FOTA_VERSION``, ``FOTA_COMPONENT``,
  ``FOTA_IMAGE_SHA256`` (hex), ``FOTA_IMAGE_SIZE``;
* exit status 0: done; 10: done, but the image runs (install) or the old one is back
  (rollback) only after a restart; for ``booted``, 0 means the new image runs and 1 that it
  does not; any other status, a signal or the timeout is a failure (rollback follows);
* output lines ``progress N`` or ``N%`` report progress; every line is logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from fota import crashpoints, hooks
from fota.core.manifest import Manifest
from fota.errors import ConfigError, InstallError
from fota.fileops import FileOps
from fota.install.base import DONE, RESTART, Outcome, Progress

log = structlog.get_logger(__name__)

EXIT_RESTART = 10
"""Exit status of ``install`` or ``rollback``: done, effective after a restart."""
MANIFEST_NAME = "install-manifest.cose"

_PROGRESS = re.compile(r"^\s*(?:progress[:\s]\s*(\d{1,3})\s*%?|(\d{1,3})\s*%)\s*$", re.IGNORECASE)


def parse_progress(line: str) -> int | None:
    """The percentage in a ``progress N`` or ``N%`` line, or None."""
    m = _PROGRESS.match(line)
    if m is None:
        return None
    value = int(m.group(1) or m.group(2))
    return value if value <= 100 else None


class CommandInstaller:
    """Install, check, commit and roll back by running one configured program.

    Args:
        command: the program and its first arguments (the action is appended).
        state_dir: where the manifest file handed to the program is written.
        timeout: seconds each action may take.
        env: extra environment variables (from local configuration).

    Raises:
        ConfigError: an empty command.
    """

    def __init__(
        self,
        command: Sequence[str],
        state_dir: Path,
        *,
        timeout: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not command:
            raise ConfigError("command installer: command: must not be empty")
        self.command = list(command)
        self.timeout = timeout
        self.env = dict(env or {})
        self.manifest_path = Path(state_dir) / MANIFEST_NAME
        self._ops = FileOps()

    async def _run(
        self,
        action: str,
        manifest: Manifest,
        candidate: Path | None = None,
        progress: Progress | None = None,
    ) -> hooks.Completed:
        self._ops.write_atomic(self.manifest_path, manifest.raw)
        body = manifest.body
        env = {
            **self.env,
            "FOTA_ACTION": action,
            "FOTA_MANIFEST": str(self.manifest_path),
            "FOTA_UPDATE_ID": manifest.update_id,
            "FOTA_VERSION": body.version,
            "FOTA_COMPONENT": body.component.name.lower(),
            "FOTA_IMAGE_SHA256": body.image_sha256.hex(),
            "FOTA_IMAGE_SIZE": str(body.image_size),
        }
        if candidate is not None:
            env["FOTA_CANDIDATE"] = str(candidate)

        def on_line(line: str) -> None:
            value = parse_progress(line)
            if value is not None and progress is not None:
                progress(value)

        try:
            return await hooks.run(
                [*self.command, action],
                name=f"installer {action}",
                timeout=self.timeout,
                env=env,
                on_line=on_line,
            )
        except hooks.CommandNotFound as exc:
            raise InstallError(f"command installer: {exc}") from exc

    def _failed(self, action: str, done: hooks.Completed) -> InstallError:
        return InstallError(
            "command installer: " + hooks.describe(f"{action} command", done, self.timeout)
        )

    async def install(self, candidate: Path, manifest: Manifest, progress: Progress) -> Outcome:
        """Run ``program install``."""
        done = await self._run("install", manifest, candidate, progress)
        if done.code not in (0, EXIT_RESTART) or done.timed_out:
            raise self._failed("install", done)
        crashpoints.point("command:installed")
        return RESTART if done.code == EXIT_RESTART else DONE

    async def booted(self, manifest: Manifest) -> bool:
        """Run ``program booted``: 0 = the new image runs, 1 = it does not."""
        done = await self._run("booted", manifest)
        if done.code not in (0, 1) or done.timed_out:
            raise self._failed("booted", done)
        return done.code == 0

    async def commit(self, manifest: Manifest) -> None:
        """Run ``program commit``."""
        done = await self._run("commit", manifest)
        if not done.ok:
            raise self._failed("commit", done)

    async def rollback(self, manifest: Manifest) -> Outcome:
        """Run ``program rollback``."""
        done = await self._run("rollback", manifest)
        if done.code not in (0, EXIT_RESTART) or done.timed_out:
            raise self._failed("rollback", done)
        return RESTART if done.code == EXIT_RESTART else DONE
