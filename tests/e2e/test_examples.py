"""The programs in examples/ run and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.timeout(120)


def test_polite_app_example_installs_2_0_after_one_deferral() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "polite_app.py")],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "app: busy, ask me again in 1 s" in lines
    assert lines.index("app: busy, ask me again in 1 s") < lines.index(
        "app: 2.0 verified, install now"
    )
    assert lines[-1] == "installed 2.0"


def test_fota_demo_unattended_exits_0_and_shows_the_polite_flow(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fota", "demo", "--dir", str(tmp_path), "--size", "300000"],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for step in (
        "first install is immediate",
        "download authorization",
        "deferred 3 s",
        "install authorization",
        "2.0.0: success",
        "RESULT: installed digest matches",
    ):
        assert step in text, step
