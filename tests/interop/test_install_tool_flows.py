"""Whole updates through the real RAUC and SWUpdate, driven by the real client and server.

Like tests/integration/test_install_flows.py, but the installer is a real tool:
``swupdate -i`` writing a signed ``.swu``'s rawfile into a directory, and ``rauc install``
writing a plain bundle into
the other of two file slots (a private D-Bus, ``rauc service``; a "reboot" restarts the
service with the slot the bootloader boots and changes the boot id). Each installs, and rolls
back on a failing self-test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fota import Client, Config, ResultCode, State, Status
from fota.testing import UpdateServer
from tests.conftest import DEVICE_CLASS, RecordingHandler, Signing, make_config
from tests.rauc_env import Keys as RaucKeys
from tests.rauc_env import RaucSystem, make_bundle
from tests.rauc_env import make_keys as rauc_keys
from tests.rauc_env import require_tools as rauc_tools
from tests.swupdate_env import Keys as SwuKeys
from tests.swupdate_env import make_keys as swu_keys
from tests.swupdate_env import make_swu
from tests.swupdate_env import require_tools as swu_tools

pytestmark = [pytest.mark.timeout(120)]

BOUND = 60.0
OLD, NEW = os.urandom(100 * 1024), os.urandom(150 * 1024)


def settled(state: State, version: str) -> Callable[[Status], bool]:
    return lambda s: s.state is state and s.installed_version == version and not s.reports_pending


def in_state(state: State) -> Callable[[Status], bool]:
    return lambda s: s.state is state


async def final(server: UpdateServer, update_id: str) -> dict[int, Any]:
    finals = {int(ResultCode.SUCCESS), int(ResultCode.ROLLED_BACK), int(ResultCode.ROLLBACK_FAILED)}
    return await server.wait_for_report(lambda r: r.get(5) == update_id and r[4] in finals, BOUND)


def factory(tmp_path: Path, server: UpdateServer) -> Path:
    path = tmp_path / "factory.cose"
    path.write_bytes(server.make_manifest(OLD, "1.0", device_class=DEVICE_CLASS).raw)
    return path


# -- SWUpdate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swu(tmp_path_factory: pytest.TempPathFactory) -> SwuKeys:
    swu_tools()
    return swu_keys(tmp_path_factory.mktemp("swu-keys"))


def swu_config(
    tmp_path: Path, server: UpdateServer, signing: Signing, keys: SwuKeys, **kw: Any
) -> Config:
    app = tmp_path / "target" / "app.bin"
    return make_config(
        tmp_path,
        server,
        signing,
        installers={"default": {"kind": "swupdate", "args": keys.args(), "backup": [str(app)]}},
        factory_manifest=factory(tmp_path, server),
        **kw,
    )


@pytest.mark.parametrize("healthy", [True, False], ids=["commits", "rolls-back"])
async def test_a_swupdate_image_installs_and_rolls_back_on_a_failing_self_test(
    tmp_path: Path, server: UpdateServer, signing: Signing, swu: SwuKeys, healthy: bool
) -> None:
    app = tmp_path / "target" / "app.bin"
    app.parent.mkdir()
    app.write_bytes(OLD)
    image = make_swu(tmp_path / "v2.swu", swu, NEW, app, version="2.0").read_bytes()
    config = swu_config(
        tmp_path,
        server,
        signing,
        swu,
        self_test_command=["true" if healthy else "false"],
        self_test_deadline=300 if healthy else 0.001,
    )
    async with Client(config, handler=RecordingHandler()) as client:
        v2 = server.publish(image, "2.0", device_class=DEVICE_CLASS)
        report = await final(server, v2.update_id)
        await client.wait_for(
            settled(State.IDLE if healthy else State.FAILED, "2.0" if healthy else "1.0"), BOUND
        )
    assert report[4] == (ResultCode.SUCCESS if healthy else ResultCode.ROLLED_BACK)
    assert app.read_bytes() == (NEW if healthy else OLD)


# -- RAUC -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rauc(tmp_path_factory: pytest.TempPathFactory) -> tuple[RaucKeys, bytes]:
    rauc_tools()
    root = tmp_path_factory.mktemp("rauc-bundles")
    keys = rauc_keys(root / "keys")
    return keys, make_bundle(root, keys, "v2", NEW, "2.0").read_bytes()


@pytest.fixture
def system(tmp_path: Path, rauc: tuple[RaucKeys, bytes]) -> Iterator[RaucSystem]:
    sys_ = RaucSystem(tmp_path / "sys", rauc[0], OLD)
    sys_.start()
    try:
        yield sys_
    finally:
        sys_.stop()


def reboot(system: RaucSystem, boot_id: Path) -> None:
    system.reboot()
    boot_id.write_text(str(uuid.uuid4()))


@pytest.mark.parametrize("healthy", [True, False], ids=["commits", "rolls-back"])
async def test_a_rauc_bundle_restarts_into_the_new_slot_and_rolls_back_on_a_failing_self_test(
    tmp_path: Path,
    server: UpdateServer,
    signing: Signing,
    rauc: tuple[RaucKeys, bytes],
    system: RaucSystem,
    healthy: bool,
) -> None:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(str(uuid.uuid4()))
    config = make_config(
        tmp_path,
        server,
        signing,
        installers={"default": {"kind": "rauc", "env": dict(system.env), "timeout": 60}},
        factory_manifest=factory(tmp_path, server),
        boot_id_path=boot_id,
        self_test_command=["true" if healthy else "false"],
        self_test_deadline=300 if healthy else 0.001,
    )
    v2 = server.publish(rauc[1], "2.0", device_class=DEVICE_CLASS)
    async with Client(config, handler=RecordingHandler()) as client:
        await client.wait_for(in_state(State.AWAIT_RESTART), BOUND)
    assert system.primary == "B" and system.slot("B")[: len(NEW)] == NEW
    reboot(system, boot_id)
    assert system.booted == "B"
    async with Client(config, handler=RecordingHandler()) as client:
        if healthy:
            report = await final(server, v2.update_id)
            await client.wait_for(settled(State.IDLE, "2.0"), BOUND)
        else:  # switched back to A, which runs after the next restart
            await client.wait_for(
                lambda s: s.state is State.ROLLING_BACK and system.primary == "A", BOUND
            )
    if not healthy:
        reboot(system, boot_id)
        async with Client(config, handler=RecordingHandler()) as client:
            report = await final(server, v2.update_id)
            await client.wait_for(settled(State.FAILED, "1.0"), BOUND)
    assert report[4] == (ResultCode.SUCCESS if healthy else ResultCode.ROLLED_BACK)
    assert system.booted == ("B" if healthy else "A")
    if healthy:
        assert system.boot_state("B") == "good"
    else:
        assert system.slot("A")[: len(OLD)] == OLD
