"""fota's pytest plugin as a device project uses it: a test file run by pytester.

pytester runs the files below in a fresh pytest session (in process), with the plugin loaded
the way a user gets it: from the ``pytest11`` entry point of the installed package.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(120)

pytest_plugins = ["pytester"]

INI = "[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"

USER_TESTS = """
import pytest
from fota import AutoAuthorize, BaseHandler, Decision, ResultCode, State

pytestmark = pytest.mark.asyncio


async def test_first_install_then_polite_update(fota_publish, fota_client, fota_reports):
    v1 = fota_publish("1.0")
    client = await fota_client(handler=AutoAuthorize())
    await fota_reports.wait_for(v1, ResultCode.SUCCESS)
    v2 = fota_publish("2.0", size=100_000)
    await fota_reports.wait_for(v2, ResultCode.SUCCESS)
    assert client.status().installed_version == "2.0"
    fota_reports.assert_in_order(v2, ResultCode.INITIAL, ResultCode.SUCCESS)
    fota_reports.assert_final(v2, ResultCode.SUCCESS)
    fota_reports.assert_no_duplicates()


class Rejecter(BaseHandler):
    async def on_download_authorization(self, update):
        return Decision.reject("not on this site")


async def test_a_rejection_is_reported(fota_publish, fota_client, fota_reports):
    fota_publish("1.0")
    client = await fota_client(handler=Rejecter())
    await client.wait_for(lambda s: s.installed_version == "1.0", 30)
    v2 = fota_publish("2.0")
    report = await fota_reports.wait_for(v2, ResultCode.REJECTED)
    assert report.detail == "not on this site"
    fota_reports.assert_final(v2, ResultCode.REJECTED)


async def test_faults_are_set_per_test(fota_server, fota_publish, fota_client, fota_reports):
    fota_server.faults.corrupt(3)  # block 3 is served corrupted once: refetched, verified
    v1 = fota_publish("1.0")
    await fota_client()
    await fota_reports.wait_for(v1, ResultCode.SUCCESS)
    assert fota_server.faults.corrupt_blocks == {3: 0}


async def test_two_devices(fota_publish, fota_client, fota_server):
    from fota.testing.pytest_plugin import Reports

    v1 = fota_publish("1.0")
    await fota_client("gw-a")
    await fota_client("gw-b")
    for device in ("gw-a", "gw-b"):
        await Reports(fota_server, device).wait_for(v1, ResultCode.SUCCESS)
"""


def test_a_user_project_runs_the_plugin_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(mode="strict"))
    pytester.makepyfile(test_device=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4)


def test_a_failed_report_assertion_reads_well(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(mode="auto"))
    pytester.makepyfile(
        test_wrong="""
from fota import AutoAuthorize, ResultCode

async def test_expects_a_rollback(fota_publish, fota_client, fota_reports):
    v1 = fota_publish("1.0")
    await fota_client(handler=AutoAuthorize())
    await fota_reports.wait_for(v1, ResultCode.SUCCESS)
    fota_reports.assert_final(v1, ResultCode.ROLLED_BACK)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines(
        [r".*AssertionError: dev1: expected one final report ROLLED_BACK, got \['SUCCESS'\]"]
    )


def test_the_fixtures_are_listed(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    text = result.stdout.str()
    for name in (
        "fota_server",
        "fota_signing",
        "fota_publish",
        "fota_client",
        "fota_reports",
        "fota_faults",
        "fota_seed",
    ):
        assert name in text, name


SEEDED = """
from fota import AutoAuthorize, ResultCode


async def test_lossy_link(fota_seed, fota_faults, fota_publish, fota_client, fota_reports):
    print("SEED", fota_seed)
    fota_faults.lose(20).duplicate(30).reorder(30)
    v1 = fota_publish("1.0", size=64 * 1024)
    await fota_client(handler=AutoAuthorize(), max_attempts=10)
    await fota_reports.wait_for(v1, ResultCode.SUCCESS)
    assert fota_faults.seed == fota_seed
    assert False, "failing on purpose, to see the seed in the report"
"""


def test_faults_are_seeded_and_a_failure_names_the_seed(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(mode="auto"))
    pytester.makepyfile(test_seeded=SEEDED)
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-s")
    first.assert_outcomes(failed=1)
    seeds = [line.split()[1] for line in first.outlines if line.startswith("SEED ")]
    assert len(seeds) == 1
    seed = seeds[0]
    first.stdout.fnmatch_lines([f"*fault plan seed {seed}: repeat with --fota-seed {seed}*"])
    # The default seed comes from the test id: the same on the next run.
    again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-s")
    assert [line for line in again.outlines if line.startswith("SEED ")] == [f"SEED {seed}"]
    # --fota-seed sets it.
    chosen = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "-s", "--fota-seed", "7")
    assert [line for line in chosen.outlines if line.startswith("SEED ")] == ["SEED 7"]
    chosen.stdout.fnmatch_lines(["*repeat with --fota-seed 7*"])


class _Received:
    """What `Reports` reads from a server: the raw reports of one device."""

    def __init__(self, reports: list[dict[int, object]]) -> None:
        self.reports = reports

    def reports_for(self, device: str) -> list[dict[int, object]]:
        return self.reports


def test_assert_final_takes_one_final_report_per_attempt() -> None:
    from fota import ResultCode, State
    from fota.testing.pytest_plugin import Reports

    uid = "ab" * 8

    def report(seq: int, state: State, result: ResultCode, attempt: int = 0) -> dict[int, object]:
        raw: dict[int, object] = {1: "dev", 2: seq, 3: state, 4: result, 5: uid}
        if attempt:
            raw[10] = attempt
        return raw

    failed = report(0, State.FAILED, ResultCode.INVALID_URI)
    revived = report(2, State.IDLE, ResultCode.SUCCESS, attempt=1)
    step = report(1, State.DOWNLOADING, ResultCode.AUTHORIZED, attempt=1)
    reports = Reports(_Received([failed, step, revived]), "dev")  # type: ignore[arg-type]
    reports.assert_final(uid, ResultCode.SUCCESS)  # attempt 0 failed, attempt 1 succeeded
    with pytest.raises(AssertionError, match=r"INVALID_URI \(attempt 1\), got \['SUCCESS'\]"):
        reports.assert_final(uid, ResultCode.INVALID_URI)
    twice = Reports(_Received([failed, revived, {**revived, 2: 3}]), "dev")  # type: ignore[arg-type]
    with pytest.raises(
        AssertionError, match=r"SUCCESS \(attempt 1\), got \['SUCCESS', 'SUCCESS'\]"
    ):
        twice.assert_final(uid, ResultCode.SUCCESS)
    twice_first = Reports(_Received([failed, failed, revived]), "dev")  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="one final report per attempt"):
        twice_first.assert_final(uid, ResultCode.SUCCESS)
    with pytest.raises(AssertionError, match=r"got \[\]"):
        Reports(_Received([step]), "dev").assert_final(uid, ResultCode.SUCCESS)  # type: ignore[arg-type]
