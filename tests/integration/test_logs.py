"""fota.app.logs: every line through the same processors, JSON or console, with the bound context.

Each case configures logging in a subprocess, so the configuration does not leak into the
other tests.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fota.app.logs import configure

ROOT = Path(__file__).resolve().parents[2]

# argv: format ("-" for the default), level, and "json=true|false" for the old keyword.
PROGRAM = r"""
import asyncio, logging, sys
import structlog
from fota.app.logs import configure

fmt, level = sys.argv[1], sys.argv[2]
kwargs = {}
if len(sys.argv) > 3:
    kwargs["json"] = sys.argv[3] == "json=true"
if fmt != "-":
    kwargs["format"] = fmt
configure(level, **kwargs)

log = structlog.get_logger("fota.engine")
log.info("outside_update")
log.debug("debug_line")


async def runner():
    # As the engine's runner task does; update_id bound to None first, then a value.
    structlog.contextvars.bind_contextvars(update_id=None, version=None, state=None)
    log.info("idle_line")
    structlog.contextvars.bind_contextvars(update_id="u-1", version="1.5.0", state="DOWNLOADING")
    log.info("fragment_stored", offset=4096)
    logging.getLogger("coap").warning("peer %s misbehaves", "[::1]:61616")
    logging.getLogger("transitions.core").warning("transition rejected")
    logging.getLogger("coap").info("coap info is quieter")
    logging.getLogger("transitions.core").info("transitions info is quieter")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("handler_failed")
        logging.getLogger("coap").exception("coap failed")
    log.info("explicit_none", state=None)


asyncio.run(runner())
"""


def run(*args: str, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # each line one JSON object


def by_event(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["event"]: line for line in lines}


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


@pytest.mark.parametrize("args", [("-", "info"), ("auto", "info"), ("json", "INFO")])
def test_json_lines_when_stderr_is_a_pipe(args: tuple[str, str]) -> None:
    out = run(*args)
    assert out.stdout == ""
    lines = json_lines(out.stderr)
    for line in lines:
        assert {"timestamp", "level", "logger", "event"} <= line.keys(), line
        assert TIMESTAMP.fullmatch(line["timestamp"]), line["timestamp"]
    events = by_event(lines)

    bound = {"update_id": "u-1", "version": "1.5.0", "state": "DOWNLOADING"}
    ours = events["fragment_stored"]
    coap = events["peer [::1]:61616 misbehaves"]
    transitions = events["transition rejected"]
    assert ours == {**bound, "offset": 4096, "event": "fragment_stored", "level": "info",
                    "logger": "fota.engine", "timestamp": ours["timestamp"]}  # fmt: skip
    # stdlib records: the same processors, the same keys, the bound context too.
    assert coap.keys() == transitions.keys() == ours.keys() - {"offset"}
    assert coap["logger"] == "coap" and coap["level"] == "warning"
    assert transitions["logger"] == "transitions.core" and transitions["level"] == "warning"
    for line in (coap, transitions):
        assert {k: line[k] for k in bound} == bound


def test_bound_none_is_dropped_and_explicit_none_is_kept() -> None:
    events = by_event(json_lines(run("json", "info").stderr))
    assert set(events["outside_update"]) == {"timestamp", "level", "logger", "event"}
    assert set(events["idle_line"]) == {"timestamp", "level", "logger", "event"}
    assert events["explicit_none"]["state"] is None


def test_exceptions_are_one_string_field() -> None:
    out = run("json", "info")
    events = by_event(json_lines(out.stderr))  # a traceback did not break the line format
    for name in ("handler_failed", "coap failed"):
        line = events[name]
        assert line["level"] == "error"
        assert isinstance(line["exception"], str)
        assert line["exception"].startswith("Traceback (most recent call last):")
        assert "ZeroDivisionError: division by zero" in line["exception"]
        assert "exc_info" not in line
    assert events["coap failed"]["update_id"] == "u-1"


def test_level_filtering() -> None:
    info = by_event(json_lines(run("json", "info").stderr))
    assert "debug_line" not in info
    # coap and transitions stay at WARNING unless debug was asked for.
    assert "coap info is quieter" not in info
    assert "transitions info is quieter" not in info

    debug = by_event(json_lines(run("json", "debug").stderr))
    assert debug["debug_line"]["level"] == "debug"
    assert "coap info is quieter" in debug
    assert "transitions info is quieter" in debug

    error = by_event(json_lines(run("json", "error").stderr))
    # Not even the dependencies' warnings: never below the level asked for.
    assert set(error) == {"handler_failed", "coap failed"}


def test_console_format_is_not_json() -> None:
    out = run("console", "info")
    lines = out.stderr.splitlines()
    assert any("fragment_stored" in line for line in lines)
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    coap = next(line for line in lines if "peer [::1]:61616 misbehaves" in line)
    assert "update_id=u-1" in coap and "coap" in coap
    # The console renderer prints the traceback as text of its own.
    assert "ZeroDivisionError" in out.stderr
    assert "\x1b[" not in out.stderr  # no colours when stderr is not a terminal


@pytest.mark.parametrize(("flag", "is_json"), [("json=true", True), ("json=false", False)])
def test_the_json_keyword_still_works(flag: str, is_json: bool) -> None:
    text = run("-", "info", flag).stderr
    first = text.splitlines()[0]
    if is_json:
        assert json.loads(first)["event"] == "outside_update"
    else:
        assert "outside_update" in first
        with pytest.raises(json.JSONDecodeError):
            json.loads(first)


def _read_pty(master: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end (it exited)
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=10)
    return b"".join(chunks).decode(errors="replace")


def test_auto_uses_the_console_renderer_on_a_terminal() -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, "auto", "info"],
            stdout=subprocess.DEVNULL,
            stderr=slave,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        os.close(slave)  # only the child holds it now: EOF (EIO) when it exits
        slave = -1
        text = _read_pty(master, proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, text
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line for line in plain.splitlines() if line.strip()]
    assert any("fragment_stored" in line for line in lines), plain
    assert any("transition rejected" in line for line in lines), plain
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


def test_unknown_level_or_format_is_refused_before_anything_changes() -> None:
    with pytest.raises(ValueError, match="log format: expected one of auto, json, console"):
        configure("info", format="yaml")
    with pytest.raises(ValueError, match="log level: expected one of"):
        configure("loud")


def test_the_command_starts_without_rich_and_leaves_it_importable() -> None:
    """structlog imports rich (when installed) only for pretty tracebacks: about 80 ms of every
    start of `fota run`, `fota daemon` and `fota fetch`. `fota.app.cli` imports structlog without
    it; rich still imports afterwards for the views that draw with it, and the console lines
    keep their plain traceback."""
    program = (
        "import sys, fota.app.cli, structlog.dev\n"
        "assert 'rich' not in sys.modules, 'rich imported at start'\n"
        "assert structlog.dev.rich is None\n"
        "import rich.console\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    # And console lines look the same when rich was imported first (this program imports
    # structlog itself, so structlog found rich): a plain traceback, not rich's box.
    text = run("console", "info").stderr
    assert "Traceback (most recent call last):" in text and 'File "' in text
    assert "\u256d" not in text and "\u2500" not in text
