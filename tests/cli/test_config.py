"""``roost serve`` settings from a TOML file and ROOST_* variables (roost/cli/serve_config.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from roost.cli import serve_config
from roost.cli.errors import EXIT_USAGE, UsageError
from roost.cli.main import build_parser, main
from tests.e2e.server import free_port


def settled(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    return serve_config.settle(parser, argv, args, env)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    conf = write(tmp_path / "r.toml", 'port = 9001\nwindow = 7\ndata-dir = "from-file"\n')
    env = {"ROOST_PORT": "9002", "ROOST_WINDOW": "8"}
    args = settled(["serve", "--config", conf, "--port", "9003"], env)
    assert args.port == 9003  # flag
    assert args.window == 8  # environment over file
    assert args.data_dir == "from-file"  # file over default
    assert args.heartbeat == 30.0  # default
    # A flag given with its default value still beats the environment and the file.
    assert settled(["serve", "--config", conf, "--port", "8765"], env).port == 8765
    # The file may also come from ROOST_CONFIG; both key spellings work.
    conf2 = write(tmp_path / "s.toml", "rate_limit = 10\nmax-group-members = 5\n")
    args = settled(["serve"], {"ROOST_CONFIG": conf2})
    assert (args.rate_limit, args.max_group_members) == (10.0, 5)


def test_client_variables_are_not_serve_settings(tmp_path: Path) -> None:
    # ROOST_URL / ROOST_TOKEN belong to the client commands: even a serve flag of that
    # name would not read them.
    parser = build_parser()
    serve_config.serve_parser(parser).add_argument("--token", default="none")
    argv = ["serve"]
    args = serve_config.settle(parser, argv, parser.parse_args(argv), {"ROOST_TOKEN": "rt_x"})
    assert args.token == "none"


def test_unknown_key_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "r.toml", "port = 9001\nheartbeet = 5\n")
    # --print-config: were the key accepted, this would print, not start a server.
    assert main(["serve", "--config", conf, "--print-config"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown key 'heartbeet'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "env", "named"),
    [
        ('port = "x"\n', {}, "port: invalid int value: 'x'"),
        ("port = 1.5\n", {}, "port: invalid int value"),
        ("port = true\n", {}, "port: expected"),
        ("host = 5\n", {}, "host: expected a string"),
        ("handshake-timeout = 0\n", {}, "handshake-timeout: must be more than 0 seconds"),
        ("max_unauthenticated = -1\n", {}, "max_unauthenticated: must be 0 or more"),
        ("commit-interval-ms = -1\n", {}, "commit-interval-ms: must be from 0 to 1000 ms"),
        ("", {"ROOST_COMMIT_INTERVAL_MS": "nan"}, "ROOST_COMMIT_INTERVAL_MS: must be from 0 to 1000 ms"),
        ("", {"ROOST_HEARTBEAT": "soon"}, "ROOST_HEARTBEAT: invalid float value"),
        ("print-config = true\n", {}, "unknown key 'print-config'"),
        ("port = 1\nport_ = 2\n", {}, "unknown key 'port_'"),
        ("data-dir = 'a'\ndata_dir = 'b'\n", {}, "'data_dir' is set twice"),
        ("port = ", {}, "not valid TOML"),
    ],
)
def test_bad_value_is_refused_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], named: str
) -> None:
    conf = write(tmp_path / "r.toml", text)
    with pytest.raises(UsageError) as caught:
        settled(["serve", "--config", conf], env)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_commit_interval_reaches_the_embedded_store(tmp_path: Path) -> None:
    from roost.gateway.server import GatewayConfig, make_store
    from roost.store.sqlite import COMMIT_INTERVAL_SECONDS

    args = settled(["serve"], {"ROOST_COMMIT_INTERVAL_MS": "7.5"})
    assert args.commit_interval_ms == 7.5
    assert settled(["serve"], {}).commit_interval_ms == COMMIT_INTERVAL_SECONDS * 1000
    store = make_store(GatewayConfig(data_dir=tmp_path, commit_interval=0.0075))
    assert store.commit_interval == 0.0075
    assert make_store(GatewayConfig(data_dir=tmp_path)).commit_interval == COMMIT_INTERVAL_SECONDS


def test_serve_hands_the_commit_interval_to_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last step, from the parsed flag to the GatewayConfig that ``serve``
    gets (milliseconds on the command line, seconds in the config)."""
    from roost.gateway import server

    handed: list[server.GatewayConfig] = []

    def fake_serve(config: server.GatewayConfig) -> signal.Signals:
        handed.append(config)
        return signal.SIGTERM

    monkeypatch.setattr(server, "serve", fake_serve)
    data = tmp_path / "data"
    for interval in ("7.5", "0"):
        assert main(["serve", "--data-dir", str(data), "--commit-interval-ms", interval]) == 0
    assert [c.commit_interval for c in handed] == [0.0075, 0.0]


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(UsageError, match=f"config file {missing}: No such file"):
        settled(["serve"], {"ROOST_CONFIG": missing})


def test_a_flag_added_later_is_configurable(tmp_path: Path) -> None:
    # Nothing lists the flags: a new serve flag is a setting at once, checked by its
    # own type and choices.
    parser = build_parser()
    sub = serve_config.serve_parser(parser)
    sub.add_argument("--later-period", type=float, default=1.0)
    sub.add_argument("--later-format", choices=["json", "console"], default="json")
    sub.add_argument("--later-switch", action="store_true")
    conf = write(tmp_path / "r.toml", 'later_period = 2\nlater-format = "console"\nlater-switch = true\n')
    argv = ["serve", "--config", conf]
    args = serve_config.settle(parser, argv, parser.parse_args(argv), {"ROOST_LATER_PERIOD": "4.5"})
    assert (args.later_period, args.later_format, args.later_switch) == (4.5, "console", True)
    bad = write(tmp_path / "bad.toml", 'later-format = "xml"\n')
    argv = ["serve", "--config", bad]
    with pytest.raises(UsageError, match="later-format: invalid choice: 'xml'"):
        serve_config.settle(parser, argv, parser.parse_args(argv), {})


def test_print_config_masks_passwords_and_is_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = write(
        tmp_path / "r.toml",
        'store = "postgresql://roost:hunter2@db:5432/roost"\nport = 9001\n',
    )
    monkeypatch.setenv("ROOST_REGISTRY", "redis://:s3cret@cache:6379/0")
    monkeypatch.setenv("ROOST_GATEWAY_ID", "postgresql://db/roost?sslmode=require&password=pw2")
    assert main(["serve", "--config", conf, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out and "pw2" not in out
    printed = tomllib.loads(out)
    assert printed["store"] == "postgresql://roost:***@db:5432/roost"
    assert printed["registry"] == "redis://:***@cache:6379/0"
    assert printed["gateway_id"] == "postgresql://db/roost?sslmode=require&password=***"
    assert printed["port"] == 9001
    # What it prints is itself a valid config file giving the same settings.
    monkeypatch.delenv("ROOST_REGISTRY")
    monkeypatch.delenv("ROOST_GATEWAY_ID")
    again = write(tmp_path / "again.toml", out)
    args = settled(["serve", "--config", again], {})
    assert (args.port, args.store) == (9001, printed["store"])


def test_serve_starts_on_the_port_from_the_file(tmp_path: Path) -> None:
    port = free_port()
    conf = write(
        tmp_path / "roost.toml",
        f'port = {port}\ndata-dir = {json.dumps(str(tmp_path / "data"))}\nlog_level = "warning"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "roost.cli.main", "serve", "--config", conf],
        stdout=log,
        stderr=log,
        env=env,
        cwd=tmp_path,  # were the file ignored, its default data dir lands here
    )
    try:
        deadline = time.monotonic() + 15
        status = None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    status = resp.status
            except OSError:
                time.sleep(0.05)
        assert status == 200, (tmp_path / "server.log").read_text()
        assert (tmp_path / "data").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        log.close()
