"""Settings precedence: flags over TENSORGATE_* over the TOML file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorgate.server.settings import ServerSettings


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "tensorgate.toml"
    config.write_text('address = "0.0.0.0:9000"\nmax_queue_size = 10\ngrace_period = 5\nlog_level = "DEBUG"\n')
    env = {"TENSORGATE_MAX_QUEUE_SIZE": "20", "TENSORGATE_GRACE_PERIOD": "7.5", "UNRELATED": "x"}
    settings = ServerSettings.from_sources({"grace_period": "9", "address": None}, environ=env, config_file=config)
    assert settings.address == "0.0.0.0:9000"  # file (no flag, no env)
    assert settings.max_queue_size == 20  # env over file
    assert settings.grace_period == 9.0  # flag over env
    assert settings.log_level == "DEBUG"
    assert settings.repository == Path("models")  # default


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="'max_queue_size': 'lots' is not a valid int"):
        ServerSettings.from_sources({}, environ={"TENSORGATE_MAX_QUEUE_SIZE": "lots"})
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        ServerSettings().with_values({"colour": "blue"})
