"""Policy: the pure decisions about waiting, retrying and politeness.

Later rules (deadlines, severity, maintenance windows) grow here; each is a function of values
(the manifests involved, the clock passed in, the settings), never of the world.
"""

from __future__ import annotations

from dataclasses import dataclass

from fota.core.manifest import Manifest


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the core decides with (built from :class:`fota.Config`).

    Attributes:
        device_class: this device's class; manifests for another class are refused.
        max_image_size: largest image accepted, in bytes.
        progress_step: the application hears about progress every this many percent.
        max_attempts: failed download attempts before the update fails.
        retry_base: first retry delay in seconds; doubles per attempt.
        retry_cap: longest retry delay in seconds.
        retry_jitter: retry delays are spread by this fraction either way.
        restart_limit: process restarts during one update's active steps before it fails
            (breaks reboot loops).
        max_download_bytes: data budget: bytes received for one update, across attempts and
            restarts (metered links); None: no limit.
        max_download_time: wall-clock seconds from the first download start; None: no limit.
        resume: after a restart in DOWNLOADING: ``resume`` from the verified fragments,
            ``restart`` from zero, or ``none`` (the update fails and is reported).
    """

    device_class: str
    max_image_size: int = 1 << 30
    progress_step: int = 5
    max_attempts: int = 5
    retry_base: float = 1.0
    retry_cap: float = 300.0
    restart_limit: int = 8
    retry_jitter: float = 0.25
    max_download_bytes: int | None = None
    max_download_time: float | None = None
    resume: str = "resume"


def must_ask(installed: Manifest | None) -> bool:
    """Whether the application decides when the next update downloads and installs.

    The running image's manifest decides, not the new one: an image that declares itself
    polite gets polite updates. With no running image (first install on an empty device)
    there is nothing to interrupt, so the update proceeds at once.
    """
    return installed is not None and installed.body.polite


def retry_delay(attempt: int, policy: Policy, draw: float = 0.5) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, with jitter.

    ``draw`` is a random number in [0, 1) passed in by the engine (the core has no random
    source); it spreads the delay over +/- ``retry_jitter`` so a fleet that lost its server at
    the same moment does not come back at the same moment. 0.5 gives the plain delay.
    """
    base = min(policy.retry_cap, policy.retry_base * (2 ** max(0, attempt - 1)))
    return float(base * (1 + policy.retry_jitter * (2 * draw - 1)))
