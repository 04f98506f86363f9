"""Named crash points: every persistence point of install, commit and rollback.

A test (or an integrator checking a new installer on real hardware) sets the environment
variable ``FOTA_CRASH_AT`` to one name below and starts fota; the process kills itself with
SIGKILL the first time it passes that point, exactly as a power cut would stop it there (no
``finally`` blocks run, nothing is flushed). Started again without the variable, fota must
end on exactly one complete image, old or new, and report it once
(``tests/interop/test_install_crash.py`` does this for every point).

``FOTA_CRASH_AT=name@N`` kills at the N-th pass (1 = the first).

Unset (production), :func:`point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

from fota.core.record import Record
from fota.core.states import State

ENV = "FOTA_CRASH_AT"

POINTS: dict[str, str] = {
    # The engine, right after the journal made a state durable (before its work starts).
    "journal:installing": "the journal says INSTALLING; the installer has not run",
    "journal:await_restart": "installed; the journal says a restart is needed",
    "journal:await_commit": "installed; the journal says AWAIT_COMMIT; no self-test yet",
    "journal:tested": "the self-test passed and is journaled; the commit has not run",
    "journal:idle": "committed; the journal says IDLE with the success report queued",
    "journal:rolling_back": "the journal says ROLLING_BACK; the rollback has not run",
    "journal:failed": "rolled back; the journal says FAILED with the final report queued",
    "report:acknowledged": "the server acknowledged a report; the journal still holds it",
    # The file installer.
    "file:previous_saved": "the running file is copied aside for rollback",
    "file:temp_written": "the new file is written and fsynced under a temporary name",
    "file:replaced": "the new file replaced the target",
    "file:committed": "commit removed the copy kept for rollback",
    "file:rolled_back": "rollback put the previous file back",
    # The A/B slot installer.
    "ab:planned": "the slot to write is journaled by the installer",
    "ab:slot_written": "the inactive slot holds the new image, verified",
    "ab:switched": "the boot pointer (symlink or bootloader) names the new slot",
    "ab:committed": "commit ran",
    "ab:switched_back": "rollback pointed back at the previous slot",
    # The archive installer.
    "archive:staged": "every target directory has a staged new copy",
    "archive:before_done": "the recipe's before command ran",
    "archive:swapped_one": "the first target directory was swapped (others may not be)",
    "archive:swapped": "every target directory was swapped",
    "archive:packages_done": "the package steps ran",
    "archive:after_done": "the recipe's after command ran",
    "archive:committed": "commit removed the old directories",
    "archive:restored_one": "rollback swapped the first directory back",
    "archive:rolled_back": "rollback restored every directory and ran the recipe's rollback",
    # The command, RAUC and SWUpdate installers.
    "command:installed": "the install command exited successfully",
    "rauc:installed": "rauc install exited successfully",
    "swupdate:installed": "swupdate -i exited successfully",
}
"""Every crash point, with what is durable when it fires."""

_counts: dict[str, int] = {}


def point(name: str) -> None:
    """Die here (SIGKILL) if ``FOTA_CRASH_AT`` names this point (at this pass)."""
    armed = os.environ.get(ENV)
    if not armed:
        return
    if name not in POINTS:  # a typo in the code must not silently never fire
        raise AssertionError(f"unknown crash point {name!r}")
    target, _, nth = armed.partition("@")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)


_DURABLE_STATES = {
    State.INSTALLING: "journal:installing",
    State.AWAIT_RESTART: "journal:await_restart",
    State.AWAIT_COMMIT: "journal:await_commit",
    State.ROLLING_BACK: "journal:rolling_back",
}


def after_save(old: Record, new: Record) -> None:
    """The crash points of the install steps, right after the journal made one durable."""
    if new.state is not old.state:
        if new.state in _DURABLE_STATES:
            point(_DURABLE_STATES[new.state])
        elif new.state is State.IDLE and old.state is State.AWAIT_COMMIT:
            point("journal:idle")
        elif new.state is State.FAILED and old.state is State.ROLLING_BACK:
            point("journal:failed")
    elif new.tested and not old.tested:
        point("journal:tested")
