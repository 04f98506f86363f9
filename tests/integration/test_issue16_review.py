"""Issue 16 §4-§6 under review: what a security reviewer and an operator found, each a test.

* §5: one signed announcement dated in the future (a server whose clock stepped forward for a
  moment, or a key since rotated out signing far ahead) set the replay bar there: every later,
  rightly dated announcement was ignored as a "replay" until the daemon restarted. The bar is
  now held to the device's clock plus ``MAX_CLOCK_SKEW``.
* §6: a ``ControlClient`` whose connection the daemon closed for silence (``idle``) or for no
  first message (``timeout``) failed every later request for good, though docs/control.md tells
  clients to connect again; neither code was retryable. It now reconnects (the daemon ran none
  of the requests such a close cut off, so sending one again is safe).
  The daemon's idle close is logged at INFO (a client quiet between requests is no fault).
* §4: a device whose keyset retired the configured (factory) key could not adopt its factory
  manifest again once its journal was gone: the start failed as a configuration error. And
  once the configuration dropped that retired key, the running image's manifest (signed by
  it) no longer verified at start: retired configured keys now join ``keys.cbor``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from structlog.testing import capture_logs

from fota import AutoAuthorize, Client, Config, ResultCode
from fota.core import announce_sig as sig
from fota.core import keyset as ks
from fota.core.manifest import TrustStore, kid_for
from fota.errors import ControlError
from fota.testing import UpdateServer
from fota.testing.pytest_plugin import Reports
from fota.trust import Trust
from tests import fuzz_strategies as fuzz
from tests.conftest import DEVICE_CLASS, Signing, make_config
from tests.control_rig import BOUND, running_rig, short_dir

pytestmark = pytest.mark.timeout(90)

KEY = ed25519.Ed25519PrivateKey.generate()
KID = kid_for(KEY.public_key())
NOW = 1_800_000_000
YEAR = 365 * 86400
BODY = {1: 7, 2: bytes(32), 3: "../m/00"}


def _envelope(issued: int, lifetime: int = 3600) -> sig.Envelope:
    raw = sig.sign(BODY, KEY, KID, issued, issued + lifetime)
    return sig.open_envelope(raw)[0]


def _trust() -> TrustStore:
    return TrustStore({KID: KEY.public_key()})


# -- §5: an announcement from the future --------------------------------------------------------


def test_an_announcement_from_the_future_does_not_make_the_next_ones_replays() -> None:
    ahead = sig.check(
        _envelope(NOW + YEAR, 2 * YEAR), _trust(), required=True, now=NOW, newest=None
    )
    assert ahead.reason is None and ahead.fresh
    # What the device remembers as the newest issue is held near its own clock...
    assert ahead.issued_at == NOW + sig.MAX_CLOCK_SKEW
    # ...so once that much time has passed, a rightly dated announcement is taken, and fresh.
    later = NOW + sig.MAX_CLOCK_SKEW + 1
    verdict = sig.check(
        _envelope(later), _trust(), required=True, now=later, newest=ahead.issued_at
    )
    assert verdict.reason is None and verdict.fresh
    # An older one than that is still a replay.
    older = sig.check(
        _envelope(NOW - 10), _trust(), required=True, now=later, newest=ahead.issued_at
    )
    assert older.reason is not None and "replay" in older.reason


async def test_a_server_clock_stepped_forward_for_a_moment_does_not_freeze_the_device(
    tmp_path: Path, signing: Signing
) -> None:
    # The server's clock jumps a year ahead (a bad NTP answer), it signs 1.0's announcement,
    # then the clock is put right. Before the fix the device ignored every later announcement
    # ("issued before the newest taken: a replay") for a year, or until it restarted.
    skew = [float(YEAR)]
    async with UpdateServer(
        tmp_path / "srv",
        signing.key,
        signing.kid,
        sign_announcements=True,
        announcement_lifetime=2 * YEAR,
        clock=lambda: time.time() + skew[0],
    ) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        config = make_config(tmp_path, server, signing, require_signed_announcements=True)
        async with Client(config, handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            # Put right, and later than the skew allowance: its announcements are current.
            skew[0] = sig.MAX_CLOCK_SKEW + 1.0
            server.announcement_lifetime = 3600
            v2 = server.publish(os.urandom(4096), "2.0", device_class=DEVICE_CLASS)
            await reports.wait_for(v2, ResultCode.SUCCESS)
            assert client.status().installed_version == "2.0"


# -- §6: a ControlClient held open between requests ---------------------------------------------


@pytest.mark.parametrize("closed_for", ["idle", "timeout"])
async def test_a_control_client_closed_for_silence_connects_again_for_its_next_request(
    tmp_path: Path, server: UpdateServer, signing: Signing, closed_for: str
) -> None:
    # An application keeps a ControlClient and asks when its user presses a button, minutes
    # apart: the daemon closes the silent connection (idle after a request, timeout when the
    # first request comes late). Before the fix every later request raised that error, and it
    # was not even retryable.
    short = 0.3  # the timeout under test; the other one stays out of the way
    timeouts = (
        {"idle_timeout": short, "request_timeout": BOUND}
        if closed_for == "idle"
        else {"idle_timeout": BOUND, "request_timeout": short}
    )
    with short_dir("fota-rv-") as sockdir:
        async with (
            running_rig(tmp_path, server, signing, sockdir, **timeouts) as rig,
            rig.connect() as app,
        ):
            if closed_for == "idle":
                await app.status()  # then silent
            with pytest.raises(ControlError) as closed:
                await app.next_event()  # returns when the daemon has closed it
            assert closed.value.code == closed_for and closed.value.retryable
            status = await app.status()  # the button press
            assert status["state"] == "IDLE"
            await app.check()  # and the connection it opened is usable


async def test_a_client_quiet_between_requests_is_no_warning(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # ``fota inhibit NAME --ttl 1h -- backup`` renews every 20 minutes, and the daemon closes
    # its connection a minute after each renewal: an expected event, logged at INFO (a WARNING
    # is for a misbehaving peer, docs/design.md), while a half-written line stays a WARNING.
    with short_dir("fota-rv-") as sockdir, capture_logs() as logs:
        async with (
            running_rig(
                tmp_path, server, signing, sockdir, idle_timeout=0.3, request_timeout=BOUND
            ) as rig,
            rig.connect() as app,
        ):
            await app.inhibit("backup", 3600)
            with pytest.raises(ControlError):
                await app.next_event()  # returns when the daemon has closed it
    idle = [e for e in logs if e["event"] == "control_idle"]
    assert [e["log_level"] for e in idle] == ["info"]


@pytest.mark.parametrize("code", ["idle", "timeout"])
def test_a_reconnect_that_finds_no_daemon_stays_a_typed_error(code: str) -> None:
    # The reconnect above, against a daemon that said ``idle`` and is gone: the request fails
    # ``unreachable`` (a ControlError), the old reader ended cleanly, the events end.
    line = f'{{"ok": false, "error": {{"code": "{code}", "message": "bye"}}}}\n'.encode()
    for op in ("hello", "inhibit", "defer"):
        fuzz.check_control_client((op, line))


async def test_a_subscriber_is_not_silently_reconnected(
    tmp_path: Path, server: UpdateServer, signing: Signing
) -> None:
    # Events come on the subscribing connection only: a new one would have none, so a close
    # is the caller's to see. (A subscriber is never closed for idling; a half-written line
    # is what gets it closed, with ``timeout``.)
    with short_dir("fota-rv-") as sockdir:
        async with (
            running_rig(
                tmp_path, server, signing, sockdir, idle_timeout=BOUND, request_timeout=0.3
            ) as rig,
            rig.connect() as app,
        ):
            await app.subscribe(["completed"])
            assert app._writer is not None
            app._writer.write(b'{"op": ')  # and the rest never comes
            with pytest.raises(ControlError) as closed:
                await app.next_event()
            assert closed.value.code == "timeout"
            with pytest.raises(ControlError) as again:
                await app.status()
            assert again.value.code == "timeout"


# -- §4: the factory manifest after its key was rotated out -------------------------------------


async def test_a_factory_manifest_signed_by_a_rotated_out_key_still_starts_the_device(
    tmp_path: Path, server: UpdateServer
) -> None:
    # Provisioned with factory key A and the factory image's manifest (signed by A); a root
    # keyset then moved the fleet to key B, retiring A (issue 16 §4). The journal is gone (a
    # recovery that found no usable generation, a replaced data partition with the keyset
    # restored, an operator's hand): the device adopts its factory manifest again. Before the
    # fix that manifest was judged as a *new* one, A was no longer trusted for that, and the
    # start failed as a configuration error (exit 2): stuck, though nothing was misconfigured.
    root, a, b = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
    root_kid, a_kid, b_kid = (kid_for(k.public_key()) for k in (root, a, b))
    factory = tmp_path / "factory.cose"
    made = server.make_manifest(
        os.urandom(1024), "1.0", device_class=DEVICE_CLASS, key=a, kid=a_kid
    )
    factory.write_bytes(made.raw)
    trust = TrustStore({a_kid: a.public_key()})
    config = make_config(
        tmp_path,
        server,
        Signing(a, a_kid, trust),
        trust_roots=TrustStore({root_kid: root.public_key()}),
        factory_manifest=factory,
    )
    config.state_dir.mkdir(mode=0o700, parents=True)
    keyset = ks.sign(1, [(b_kid, b.public_key())], root, root_kid)
    Trust(TrustStore({a_kid: a.public_key()}), config.trust_roots, config.state_dir).offer(keyset)
    async with Client(config, handler=AutoAuthorize()) as client:
        assert client.status().installed_version == "1.0"
        # A still signs nothing new: an update signed by A is refused, one by B is taken.
        reports = Reports(server, "dev1")
        by_a = server.publish(os.urandom(1024), "2.0", device_class=DEVICE_CLASS, key=a, kid=a_kid)
        await reports.wait_for(by_a, ResultCode.UNKNOWN_KEY)
        by_b = server.publish(os.urandom(1024), "3.0", device_class=DEVICE_CLASS, key=b, kid=b_kid)
        await reports.wait_for(by_b, ResultCode.SUCCESS)


async def test_the_running_images_key_is_remembered_when_the_configuration_drops_it(
    tmp_path: Path,
) -> None:
    # After a keyset rotated factory key A out, the operator tidies the configuration: A is
    # retired, so it goes, and B (the keyset's key) is configured instead. The running image's
    # manifest is signed by A: keys.cbor kept only the keys keysets brought, so after the
    # restart it no longer verified ("installed manifest ... missing or invalid") and the
    # device did not start as itself. Now a configured key a keyset retires is kept in the
    # history too: it still verifies the stored manifest and nothing new.
    root, a, b = (ed25519.Ed25519PrivateKey.generate() for _ in range(3))
    root_kid, a_kid, b_kid = (kid_for(k.public_key()) for k in (root, a, b))
    roots = TrustStore({root_kid: root.public_key()})

    def config_with(key: ed25519.Ed25519PrivateKey, kid: bytes, server: UpdateServer) -> Config:
        trust = TrustStore({kid: key.public_key()})
        return make_config(
            tmp_path, server, Signing(key, kid, trust), trust_roots=roots, poll_interval=0.2
        )

    async with UpdateServer(tmp_path / "srv", a, a_kid) as server:
        reports = Reports(server, "dev1")
        v1 = server.publish(os.urandom(4096), "1.0", device_class=DEVICE_CLASS)
        async with Client(config_with(a, a_kid, server), handler=AutoAuthorize()) as client:
            await reports.wait_for(v1, ResultCode.SUCCESS)
            server.publish_keyset(ks.sign(1, [(b_kid, b.public_key())], root, root_kid), 1)
            await client._engine.wait_for(lambda model: model.record.keyset_version == 1, BOUND)
        config = config_with(b, b_kid, server)
        async with Client(config, handler=AutoAuthorize()) as client:
            status = client.status()
            assert (status.installed_version, status.recovered) == ("1.0", "")
            assert config.trust.get(a_kid) is None  # A signs nothing new
            v2 = server.publish(
                os.urandom(4096), "2.0", device_class=DEVICE_CLASS, key=a, kid=a_kid
            )
            await reports.wait_for(v2, ResultCode.UNKNOWN_KEY)
