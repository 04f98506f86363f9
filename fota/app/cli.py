"""The ``fota`` command: manifests, a client process, the test server, and the demo.

fota manifest keygen | create | inspect
fota daemon   the client as a service: TOML config, control socket, systemd
fota config check
fota status | watch | authorize | reject | defer | resume | check | inhibit | release
              talk to a running daemon over its control socket
fota run      a client process for one device (flags instead of a config file)
fota server   the CoAP test update server
fota demo     a server and a client on loopback doing a polite update
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING


def _structlog_without_rich() -> None:
    """Import structlog first, without letting it import rich.

    structlog imports rich, when it is installed, only to pretty-print tracebacks on a
    terminal: about 80 ms of every start of the updater, and so of a restarted download's time
    to its first new byte (``bench/resume.py``). fota's console lines use plain tracebacks
    anyway (``fota.app.logs``), and rich stays importable afterwards for the views that draw with
    it. Does nothing when either is imported already (fota used as a library).
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` fails meanwhile
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_structlog_without_rich()

import structlog  # noqa: E402

from fota.app.logs import configure  # noqa: E402
from fota.errors import ConfigError, FotaError, StateDirLocked  # noqa: E402
from fota.statedir import LOCKED_EXIT  # noqa: E402

if TYPE_CHECKING:
    from fota.app.settings import Settings
    from fota.config import Config
    from fota.handler import UpdateHandler
    from fota.tools.server_view import Publisher, View

# Each command imports what it needs, so `fota fetch` starts without the state machine,
# aiocoap and cryptography (start-up time and memory are part of what it is measured on).
COMPONENTS = ["firmware", "application", "other"]
SEVERITIES = ["optional", "mandatory", "critical"]


# -- fota manifest ----------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """``fota manifest keygen``."""
    from fota import keys
    from fota.core import manifest as mf

    key = keys.generate(args.alg)
    pub = keys.save_keypair(key, Path(args.out))
    print(
        json.dumps(
            {"private": args.out, "public": str(pub), "kid": mf.kid_for(key.public_key()).hex()}
        )
    )
    return 0


def _instant(text: str) -> int:
    """An instant for ``--deadline``: epoch seconds, or ISO 8601 with a time zone."""
    from datetime import datetime

    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither epoch seconds nor ISO 8601"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z for UTC)")
    return int(when.timestamp())


def cmd_create(args: argparse.Namespace) -> int:
    """``fota manifest create``."""
    from fota import keys
    from fota.core import manifest as mf
    from fota.core.manifest import Component, ManifestBody, Severity
    from fota.testing.server import file_sha256, fragment_digests

    key = keys.load_private(Path(args.key))
    image = Path(args.image)
    sha = file_sha256(image)
    body = ManifestBody(
        sequence=args.sequence,
        component=Component[args.component.upper()],
        version=args.version,
        device_class=args.device_class,
        image_size=image.stat().st_size,
        image_sha256=sha,
        image_uri=args.uri or f"../img/{sha.hex()}",
        fragment_size=args.fragment_size,
        fragment_sha256=fragment_digests(image, args.fragment_size),
        polite=not args.impolite,
        severity=Severity[args.severity.upper()],
        max_deferral=args.max_deferral,
        deadline=args.deadline,
    )
    raw = mf.sign(body, key, bytes.fromhex(args.kid) if args.kid else mf.kid_for(key.public_key()))
    # Check what we wrote with the same decoder a device uses (limits included).
    mf.decode_body(body.to_cbor(), max_image_size=1 << 62)
    Path(args.out).write_bytes(raw)
    print(json.dumps(mf.inspect(raw)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``fota manifest inspect``."""
    from fota import keys
    from fota.core import manifest as mf

    raw = Path(args.manifest).read_bytes()
    info = mf.inspect(raw)
    if args.trust:
        mf.verify(raw, keys.trust_store([Path(p) for p in args.trust]))
        info["signature"] = "valid"
    print(json.dumps(info, indent=2))
    return 0


# -- fota run ---------------------------------------------------------------------------


async def _run_client(config: Config, handler: UpdateHandler | None) -> int:
    from fota.client import Client

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Client(config, handler=handler):
        await stop.wait()
    return 0


def _config_from_args(args: argparse.Namespace) -> Config:
    from fota import keys
    from fota.app.settings import load_install_settings
    from fota.config import Config

    install = load_install_settings(Path(args.install_config)) if args.install_config else {}
    return Config(
        server=args.server,
        device_id=args.device_id,
        device_class=args.device_class,
        state_dir=Path(args.state_dir),
        trust=keys.trust_store([Path(p) for p in args.trust]),
        target=Path(args.target) if args.target else None,
        poll_interval=args.poll_interval,
        block_size=args.block_size,
        ack_timeout=args.ack_timeout,
        **install,
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``fota run``."""
    from fota.handler import AutoAuthorize

    config = _config_from_args(args)
    handler: UpdateHandler | None = AutoAuthorize() if args.auto_authorize else None
    return asyncio.run(_run_client(config, handler))


# -- fota daemon, fota config check ----------------------------------------------------


def _load_settings(path: str) -> Settings:
    from fota.app.settings import load_settings

    return load_settings(Path(path))


def cmd_daemon(args: argparse.Namespace) -> int:
    """``fota daemon``."""
    from fota.app.daemon import serve
    from fota.app.systemd import Notifier

    # The configuration is read and checked before anything starts: a bad file fails at
    # once with the key's name, and systemd sees the unit fail instead of a restart loop
    # of half-started daemons.
    settings = _load_settings(args.config)
    configure(args.log_level or settings.log.level, format=args.log_format or settings.log.format)
    try:
        return asyncio.run(serve(settings, notifier=Notifier.from_env()))
    except StateDirLocked as exc:
        # Another instance holds the state directory: not a configuration error, so
        # systemd's Restart=on-failure tries again and starts once the holder is gone.
        structlog.get_logger("fota.app.daemon").error(
            "daemon_already_running", error=str(exc), state_dir=str(exc.path), pid=exc.pid
        )
        return LOCKED_EXIT
    except ConfigError as exc:
        # Logged as one line in the configured format (a JSON log stays JSON); exit 2 so
        # systemd's RestartPreventExitStatus=2 does not loop on a setting that is wrong.
        structlog.get_logger("fota.app.daemon").error("daemon_failed", error=str(exc))
        return 2
    except FotaError as exc:
        # Anything else (an unreadable disk, a journal write that failed) may pass: exit 1,
        # and systemd restarts the daemon. Exit 2 is for configuration errors only.
        structlog.get_logger("fota.app.daemon").error("daemon_failed", error=str(exc))
        return 1
    except Exception:
        structlog.get_logger("fota.app.daemon").exception("daemon_crashed")
        return 1


def cmd_config_check(args: argparse.Namespace) -> int:
    """``fota config check``."""
    from fota.app.settings import describe

    settings = _load_settings(args.config)
    width = max((len(k) for k, _ in describe(settings)), default=0)
    for key, value in describe(settings):
        print(f"{key:<{width}}  {value}")
    print(f"{args.config}: OK")
    return 0


# -- fota fetch -------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    """``fota fetch``."""
    from fota.fetch import fetch

    out = Path(args.out)
    expected = bytes.fromhex(args.sha256) if args.sha256 else None
    if args.attempts < 1:
        raise ConfigError(f"--attempts: {args.attempts} must be at least 1")
    started = time.perf_counter()
    for attempt in range(1, args.attempts + 1):
        try:
            result = asyncio.run(
                fetch(
                    args.uri,
                    out,
                    sha256=expected,
                    window=args.window,
                    block_size=args.block_size,
                    ack_timeout=args.ack_timeout,
                    fsync_every=args.fsync_every,
                    oscore=Path(args.oscore) if args.oscore else None,
                    retransmission=args.retransmission,
                    congestion=args.congestion,
                    min_rto=args.min_rto,
                    restart=args.restart and attempt == 1,
                )
            )
            break
        except FotaError as exc:
            # Like the client's attempts: the next one resumes from the verified fragments.
            if not exc.retryable or attempt == args.attempts:
                raise
            print(f"fota fetch: attempt {attempt}: {exc}; resuming", file=sys.stderr)
    print(
        json.dumps(
            {
                "out": str(out),
                "bytes": result.size,
                "sha256": result.sha256.hex(),
                "resumed_fragments": result.resumed_fragments,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
    )
    return 0


# -- fota server ------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    import contextlib

    from fota import keys
    from fota.core import manifest as mf
    from fota.errors import ConfigError
    from fota.testing.server import ALL_DEVICES, UpdateServer
    from fota.tools.server_view import ImageDirectory, Publisher, Served, choose_mode, make_view

    if args.watch and not args.images:
        raise ConfigError("--watch: needs --images DIR (the directory to watch)")
    directory = found = None
    if args.images:
        directory = ImageDirectory(
            Path(args.images),
            device_class=args.device_class,
            polite=not args.impolite,
            watching=args.watch,
        )
        # A bad directory or fota-images.toml stops here, before anything is bound or signed.
        found = directory.scan()
        if not found and not args.watch:
            raise ConfigError(
                f"{directory.path}: no images (files named NAME-VERSION.EXT, like gw-2.1.0.bin)"
            )
    key = keys.load_private(Path(args.key))
    kid = mf.kid_for(key.public_key())
    mode = choose_mode(json_lines=args.json, plain=args.plain, terminal=sys.stdout.isatty())
    secured = bool(args.oscore)
    lifetime = args.announcement_lifetime
    async with UpdateServer(
        Path(args.root),
        key,
        kid,
        host=args.host,
        port=args.port,
        oscore=secured,
        sign_announcements=args.sign_announcements,
        announcement_lifetime=lifetime,
        # Re-signed at half the lifetime: an observing device gets a fresh one well before
        # the last one expires (docs/security.md, freshness).
        announcement_refresh=lifetime / 2 if args.sign_announcements else None,
    ) as server:
        for spec in args.oscore or []:
            device, _, folder = spec.partition("=")
            if not device or not folder:
                raise ConfigError(f"--oscore: {spec!r}: expected DEVICE=DIR")
            # The device's half of a fresh context pair: give it to the device (Config.oscore).
            server.provision_oscore(device, Path(folder))
        with make_view(mode, server.devices) as view:
            server.device_hook = view.changed
            for spec in args.publish or []:
                path, _, version = spec.partition("=")
                published = server.publish(
                    Path(path),
                    version or "1.0",
                    device_class=args.device_class,
                    polite=not args.impolite,
                )
                view.add(Served.of(published, Path(path), version or "1.0", (ALL_DEVICES,)))
                view.line({"published": path, "update_id": published.update_id})
            publisher = None
            if directory is not None and found is not None:
                publisher = Publisher(server, directory)
                for served in publisher.publish_all(found):
                    view.add(served)
                    view.line(served.line())
            # Scripts and tests wait for this line: the socket is bound and serving.
            view.line({"uri": server.uri})
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            watcher = None
            if args.watch and publisher is not None:
                watcher = asyncio.create_task(_watch(publisher, view, args.watch_interval))
            try:
                await stop.wait()
            finally:
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
    return 0


async def _watch(publisher: Publisher, view: View, interval: float) -> None:
    """``fota server --watch``: look at the images directory every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        served, problem = await publisher.poll()
        for image in served:
            view.add(image)
            view.line(image.line())
        if problem is not None:
            view.problem(problem)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (``--watch-interval``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def cmd_server(args: argparse.Namespace) -> int:
    """``fota server``."""
    return asyncio.run(_serve(args))


# -- fota fleet -------------------------------------------------------------------------


def cmd_fleet(args: argparse.Namespace) -> int:
    """``fota fleet``: ``fota.testing.fleet``'s command (imported only when used)."""
    from fota.testing.fleet import main as fleet_main

    return fleet_main(args.rest, prog="fota fleet")


# -- fota demo --------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """``fota demo``."""
    from fota.tools.demo import run

    configure(args.log_level or "warning")
    return asyncio.run(run(args))


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fota`` command."""
    p = argparse.ArgumentParser(prog="fota", description="Polite FOTA over CoAP.")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for the demo, whose story goes to stdout)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    man = sub.add_parser("manifest", help="keys and signed manifests").add_subparsers(
        dest="manifest_command", required=True
    )
    kg = man.add_parser("keygen", help="generate a signing key (and KEY.pub)")
    kg.add_argument("--out", required=True)
    kg.add_argument("--alg", choices=["ed25519", "es256"], default="ed25519")
    kg.set_defaults(func=cmd_keygen)

    cr = man.add_parser("create", help="sign a manifest for an image")
    cr.add_argument("--key", required=True)
    cr.add_argument("--kid", help="key id as hex (default: derived from the key)")
    cr.add_argument("--image", required=True)
    cr.add_argument("--version", required=True)
    cr.add_argument("--device-class", required=True)
    cr.add_argument("--sequence", type=int, required=True)
    cr.add_argument("--uri", help="image URI reference (default ../img/<sha256>)")
    cr.add_argument("--component", choices=COMPONENTS, default="firmware")
    cr.add_argument("--severity", choices=SEVERITIES, default="optional")
    cr.add_argument("--impolite", action="store_true", help="updates after this image do not ask")
    cr.add_argument("--fragment-size", type=int, default=64 * 1024)
    cr.add_argument(
        "--max-deferral", type=int, default=0, help="longest cumulative deferral, seconds"
    )
    cr.add_argument(
        "--deadline",
        type=_instant,
        help="past this UTC instant the update proceeds without asking or waiting "
        "(ISO 8601 with a zone, e.g. 2027-01-31T02:00Z, or epoch seconds)",
    )
    cr.add_argument("--out", required=True)
    cr.set_defaults(func=cmd_create)

    ins = man.add_parser("inspect", help="decode a manifest (and verify it with --trust)")
    ins.add_argument("manifest")
    ins.add_argument("--trust", action="append", help="public key PEM (repeatable)")
    ins.set_defaults(func=cmd_inspect)

    dm = sub.add_parser("daemon", help="run the client as a service (systemd Type=notify)")
    dm.add_argument("--config", default="/etc/fota/fota.toml", help="the TOML configuration")
    dm.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="default: [log] format"
    )
    dm.set_defaults(func=cmd_daemon)

    cf = sub.add_parser("config", help="configuration files").add_subparsers(
        dest="config_command", required=True
    )
    ck = cf.add_parser("check", help="read and check a daemon configuration, then exit")
    ck.add_argument("--config", default="/etc/fota/fota.toml")
    ck.set_defaults(func=cmd_config_check)

    from fota.app.cli_control import add_parsers

    add_parsers(sub)

    run = sub.add_parser("run", help="run a client for one device until SIGTERM")
    run.add_argument("--server", required=True, help="coap://host:port")
    run.add_argument("--state-dir", required=True)
    run.add_argument("--trust", action="append", required=True, help="public key PEM (repeatable)")
    run.add_argument("--target", help="file the image replaces (the file installer)")
    run.add_argument(
        "--install-config",
        metavar="FILE.toml",
        help="installers, self-test and restart settings (docs/installers.md)",
    )
    run.add_argument("--device-id", default=os.uname().nodename)
    run.add_argument("--device-class", required=True)
    run.add_argument("--auto-authorize", action="store_true", help="authorize every update at once")
    run.add_argument("--poll-interval", type=float, help="poll instead of observe (seconds)")
    run.add_argument("--block-size", type=int, default=1024)
    run.add_argument("--ack-timeout", type=float, default=2.0)
    run.set_defaults(func=cmd_run)

    fe = sub.add_parser("fetch", help="download one image, resumable, verified (like coap-client)")
    fe.add_argument("uri", help="coap://host:port/path")
    fe.add_argument("--out", required=True)
    fe.add_argument("--sha256", help="expected SHA-256 (hex); exit 0 only when it matches")
    fe.add_argument("--window", type=int, default=16, help="requests in flight")
    fe.add_argument("--block-size", type=int, default=1024)
    fe.add_argument("--ack-timeout", type=float, default=2.0)
    fe.add_argument("--fsync-every", type=int, default=1, help="fragments (64 KiB) per fsync")
    fe.add_argument("--restart", action="store_true", help="ignore a previous partial fetch")
    fe.add_argument("--oscore", metavar="DIR", help="OSCORE security context (fota[oscore])")
    fe.add_argument(
        "--retransmission",
        choices=["cocoa", "rfc7252"],
        default="cocoa",
        help="timeout: adaptive (CoCoA) or RFC 7252's fixed one",
    )
    fe.add_argument(
        "--congestion",
        choices=["aimd", "fixed"],
        default="aimd",
        help="window: adapts to losses (AIMD) or stays at --window",
    )
    fe.add_argument("--min-rto", type=float, default=0.2, help="CoCoA's lowest timeout, s")
    fe.add_argument(
        "--attempts",
        type=int,
        default=5,
        help="transfers tried, each resuming the last (a retryable error ends one)",
    )
    fe.set_defaults(func=cmd_fetch)

    srv = sub.add_parser(
        "server",
        help="run the CoAP test update server (for manual testing; docs/cli.md)",
        description="Serve images to devices, and show the devices and their states live.",
    )
    srv.add_argument("--root", required=True, help="directory for images and manifests")
    srv.add_argument("--key", required=True, help="signing key PEM")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=5683, help="UDP port; 0: the OS picks one")
    srv.add_argument("--device-class", default="gateway", help="of images that name none")
    images = srv.add_mutually_exclusive_group()
    images.add_argument(
        "--publish", action="append", metavar="IMAGE=VERSION", help="publish one image (repeatable)"
    )
    images.add_argument(
        "--images",
        metavar="DIR",
        help="publish every image of DIR (NAME-VERSION.EXT; options in DIR/fota-images.toml)",
    )
    srv.add_argument(
        "--watch", action="store_true", help="with --images: publish new and changed files"
    )
    srv.add_argument(
        "--watch-interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how often --watch looks at DIR (default 1)",
    )
    srv.add_argument("--impolite", action="store_true", help="images that do not say are impolite")
    srv.add_argument(
        "--oscore",
        action="append",
        metavar="DEVICE=DIR",
        help="serve OSCORE only; write DEVICE's security context to DIR (repeatable)",
    )
    srv.add_argument(
        "--sign-announcements",
        action="store_true",
        help="sign announcements with --key, with an expiry (devices with"
        " require_signed_announcements need it)",
    )
    srv.add_argument(
        "--announcement-lifetime",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="a signed announcement expires this long after it is issued; re-signed and"
        " sent again at half of it (default 3600)",
    )
    view = srv.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object per device change")
    view.add_argument(
        "--plain", action="store_true", help="one line per device change, even on a terminal"
    )
    srv.set_defaults(func=cmd_server)

    fleet = sub.add_parser(
        "fleet",
        help="simulate N devices with random polite decisions against one test server",
        add_help=False,  # the fleet module's own parser gives --help, with its options
    )
    fleet.add_argument("rest", nargs=argparse.REMAINDER)
    fleet.set_defaults(func=cmd_fleet)

    demo = sub.add_parser("demo", help="a server and a client on loopback doing a polite update")
    demo.add_argument("--dir", help="work directory (default: a new temporary one)")
    demo.add_argument("--size", type=int, default=2 * 1024 * 1024, help="bytes of the v2 image")
    demo.add_argument("--yes", action="store_true", help="unattended even on a terminal")
    demo.add_argument("--timeout", type=float, default=300.0)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fota`` console script."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if "fleet" in raw:
        # Everything after "fleet" is the fleet module's, its --help included; argparse
        # would take options it knows for its own. Only --log-level may come before.
        at = raw.index("fleet")
        before = raw[:at]
        if not before or (len(before) == 2 and before[0] == "--log-level"):
            return cmd_fleet(argparse.Namespace(rest=raw[at + 1 :]))
    args = build_parser().parse_args(raw)
    if args.command not in ("demo", "daemon", "fleet"):
        # The daemon configures logging from its file; the demo tells its story on stdout.
        configure(args.log_level or ("warning" if getattr(args, "quiet_logs", False) else "info"))
    try:
        code: int = args.func(args)
    except StateDirLocked as exc:
        print(f"fota: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return LOCKED_EXIT
    except FotaError as exc:
        print(f"fota: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
