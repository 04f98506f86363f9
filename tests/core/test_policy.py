"""Pure policy functions."""

from __future__ import annotations

import pytest

from fota import Config, ConfigError
from fota.core.policy import Policy, retry_delay

P = Policy(device_class="gw", retry_base=1.0, retry_cap=60.0, retry_jitter=0.25)


@pytest.mark.parametrize(
    ("attempt", "draw", "expected"),
    [
        (1, 0.5, 1.0),
        (2, 0.5, 2.0),
        (3, 0.0, 3.0),  # 4 s, 25 % early
        (3, 0.999999, 4.99999),  # 4 s, almost 25 % late
        (10, 0.5, 60.0),  # capped
        (10, 0.0, 45.0),  # the cap is jittered too: a fleet at the cap does not line up
    ],
)
def test_retry_delay_is_exponential_capped_and_jittered(
    attempt: int, draw: float, expected: float
) -> None:
    assert retry_delay(attempt, P, draw) == pytest.approx(expected, rel=1e-5)


def test_config_refuses_a_jitter_out_of_range(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="retry_jitter"):
        Config(server="coap://h", device_id="d", device_class="c", state_dir="s", retry_jitter=1.5)  # type: ignore[arg-type]
