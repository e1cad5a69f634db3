"""Where a client command finds its URL and token: flags, environment, profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from roost.cli.errors import UsageError
from roost.cli.profiles import Profile, profile_path, resolve, save_profile

URL = "http://127.0.0.1:8765"


def test_a_broken_profile_does_not_stop_a_command_that_needs_nothing_from_it(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = profile_path(env)
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    assert resolve([URL], "rt_flag", env) == ([URL], "rt_flag")
    assert resolve(None, None, {**env, "ROOST_URL": URL, "ROOST_TOKEN": "rt_env"}) == ([URL], "rt_env")
    # A command that falls back on it is told what is wrong with it.
    with pytest.raises(UsageError, match="cannot read the profile"):
        resolve([URL], None, env)
    with pytest.raises(UsageError, match="cannot read the profile"):
        resolve(None, "rt_flag", env)


def test_the_profile_fills_in_what_flags_and_environment_leave_out(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    save_profile(Profile([URL], "rt_saved"), profile_path(env))
    assert resolve(None, None, env) == ([URL], "rt_saved")
    assert resolve(None, "rt_flag", env) == ([URL], "rt_flag")
    # Its token goes only to its own URLs.
    with pytest.raises(UsageError, match="no token for that URL"):
        resolve(["http://127.0.0.1:9999"], None, env)
