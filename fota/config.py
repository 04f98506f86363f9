"""Client settings in one typed object (the daemon's TOML maps onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fota.core.manifest import TrustStore
from fota.core.policy import Policy
from fota.errors import ConfigError


@dataclass(slots=True)
class Config:
    """Every client setting.

    Attributes:
        server: base URI of the update server, ``coap://host:port``.
        device_id: this device's id (names its announcement and report resources).
        device_class: manifests for another class are refused.
        state_dir: journal, manifests and candidate live here.
        trust: manifest verification keys by key id.
        target: the file the file installer replaces (when no installer is given).
        poll_interval: poll the announcement every this many seconds instead of observing.
        observe_refresh: re-register an observation silent this long (a restarted server
            forgets its observers without telling them).
        block_size: CoAP Block2 size asked for, 16..1024.
        window: most image block requests in flight (NON requests; see docs/protocol.md).
        fsync_every: fsync the candidate every this many verified fragments (and at the end);
            a fragment is journaled only after the fsync that covers it.
        ack_timeout: CoAP ACK_TIMEOUT in seconds (RFC 7252: 2.0).
        max_retransmit: CoAP MAX_RETRANSMIT (RFC 7252: 4).
        max_image_size: largest image accepted, bytes.
        progress_step: ``on_progress`` about every this many percent.
        max_attempts: failed download attempts before the update fails.
        retry_base: first retry delay, seconds (doubles per attempt).
        retry_cap: longest retry delay, seconds.
        retry_jitter: retry delays are spread randomly by this fraction either way (0..1).
        restart_limit: restarts during one update's active steps before it fails.
        max_download_bytes: data budget per update (bytes received, across attempts and
            restarts; metered links); None: no limit. Exceeding it fails the update (107).
        max_download_time: seconds from the first download start; None: no limit (108).
        resume: after a restart mid-download: ``resume`` (from the verified fragments),
            ``restart`` (from zero) or ``none`` (the update fails and is reported).
        report_retry_cap: longest delay between report delivery attempts, seconds.
    """

    server: str
    device_id: str
    device_class: str
    state_dir: Path
    trust: TrustStore = field(default_factory=TrustStore)
    target: Path | None = None
    poll_interval: float | None = None
    observe_refresh: float = 300.0
    block_size: int = 1024
    window: int = 16
    fsync_every: int = 1
    ack_timeout: float = 2.0
    max_retransmit: int = 4
    max_image_size: int = 1 << 30
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
        if self.max_attempts < 1:
            raise ConfigError("max_attempts: must be at least 1")
        if self.ack_timeout <= 0:
            raise ConfigError("ack_timeout: must be positive")

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
        )
