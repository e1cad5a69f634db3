"""``roost serve`` settings from a TOML file and ``ROOST_*`` environment variables.

The settings are not listed here: they are the ``serve`` sub-parser's own
argparse actions, so a flag added to ``serve`` later is configurable with no
change here. Each value from a file or the environment is converted and checked
by the action's own ``type`` and ``choices``, as if it had been given as a flag.

Precedence: a flag on the command line > ``ROOST_<NAME>`` > the ``--config``
file > the flag's default.
"""

from __future__ import annotations

import argparse
import math
import tomllib
import urllib.parse
from collections.abc import Mapping
from typing import Any

from roost.cli.errors import UsageError

ENV_PREFIX = "ROOST_"
# The file itself: --config, or this variable.
CONFIG_ENV = "ROOST_CONFIG"
# Flags about the configuration, not settings of the server.
_META = frozenset({"help", "config", "print_config"})
# ROOST_* variables that already belong to other commands (the client commands'
# server URL and token; the storage-fault hooks of `roost verify`): never read
# as a serve setting, even if serve gains a flag of the same name.
_OTHER_COMMANDS_ENV = frozenset(
    {"ROOST_URL", "ROOST_TOKEN", "ROOST_STORAGE_FAULTS", "ROOST_STORAGE_FAULTS_DIR", CONFIG_ENV}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# A setting whose name says it is a secret is shown masked whole.
_SECRET_WORDS = ("password", "secret", "token")
MASK = "***"


def settings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The configurable settings of ``parser``: dest name -> its action."""
    return {
        action.dest: action
        for action in parser._actions
        if action.dest not in _META and action.dest != argparse.SUPPRESS and action.option_strings
    }


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` sub-parser of the ``roost`` parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices["serve"]
            return found
    raise LookupError("roost has no serve command")


def given_on_command_line(
    parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str]
) -> set[str]:
    """The dests of ``sub`` that ``argv`` sets explicitly (parsed again with no defaults)."""
    actions = settings(sub)
    saved = {dest: action.default for dest, action in actions.items()}
    try:
        for action in actions.values():
            action.default = argparse.SUPPRESS
        explicit = vars(parser.parse_args(argv))
    finally:
        for dest, default in saved.items():
            actions[dest].default = default
    return {dest for dest in actions if dest in explicit}


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: not valid TOML: {exc}") from None
    return data


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    """``raw`` (a TOML value or an environment string) as the flag would have parsed it."""
    if action.nargs == 0:  # store_true / store_false / store_const / --x/--no-x
        if isinstance(raw, str):
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                raise UsageError(f"{where}: expected true or false, got {raw!r}")
            raw = word in _TRUE
        if not isinstance(raw, bool):
            raise UsageError(f"{where}: expected true or false, got {raw!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return raw
        if isinstance(action.const, bool):  # store_true / store_false
            return action.const if raw else not action.const
        return action.const if raw else action.default
    many = (
        action.nargs in ("*", "+")
        or isinstance(action.nargs, int)
        or isinstance(action, argparse._AppendAction)
    )
    if many:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise UsageError(f"{where}: expected a list, got {raw!r}")
        return [_convert_one(parser, action, item, where) for item in items]
    return _convert_one(parser, action, raw, where)


def _convert_one(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise UsageError(f"{where}: expected a {'string' if action.type is None else 'value'}, got {raw!r}")
    if action.type is None and not isinstance(raw, str):
        raise UsageError(f"{where}: expected a string, got {raw!r}")
    try:
        value = parser._get_value(action, str(raw))
        parser._check_value(action, value)
    except argparse.ArgumentError as exc:
        raise UsageError(f"{where}: {exc.message}") from None
    return value


def settle(
    parser: argparse.ArgumentParser,
    argv: list[str],
    args: argparse.Namespace,
    environ: Mapping[str, str],
) -> argparse.Namespace:
    """``args`` of ``roost serve`` with each setting not given as a flag taken from the
    environment, else the config file, else left at its default. Raises ``UsageError``
    naming the key of an unknown setting or a bad value."""
    sub = serve_parser(parser)
    actions = settings(sub)
    explicit = given_on_command_line(parser, sub, argv)
    path = args.config or environ.get(CONFIG_ENV) or None
    from_file: dict[str, tuple[str, Any]] = {}
    if path:
        for key, raw in load_file(path).items():
            dest = key.replace("-", "_")
            if dest not in actions:
                raise UsageError(f"config file {path}: unknown key {key!r}")
            if dest in from_file:
                raise UsageError(f"config file {path}: {key!r} is set twice")
            from_file[dest] = (key, raw)
    for dest, action in actions.items():
        if dest in explicit:
            continue
        name = env_name(dest)
        if name in environ and name not in _OTHER_COMMANDS_ENV:
            value = _convert(sub, action, environ[name], f"environment {name}")
        elif dest in from_file:
            key, raw = from_file[dest]
            value = _convert(sub, action, raw, f"config file {path}: {key}")
        else:
            continue
        setattr(args, dest, value)
    return args


def mask(dest: str, value: Any) -> Any:
    """``value`` with secrets hidden: a password in a URL, or all of a secret-named setting."""
    if not isinstance(value, str):
        return value
    if any(word in dest for word in _SECRET_WORDS):
        return MASK
    try:
        parts = urllib.parse.urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        user = urllib.parse.quote(parts.username or "", safe="")
        parts = parts._replace(netloc=f"{user}:{MASK}@{host}")
    # libpq also takes it as a parameter: postgresql://db/roost?password=...
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "password" for name, _ in query):
        hidden = [(name, MASK if name == "password" else v) for name, v in query]
        parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
    return parts.geturl()


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return _toml_string(str(value))


def render(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective ``serve`` settings as TOML (a valid ``--config`` file), secrets masked.

    TOML has no null: a setting left unset (its default is "none") is shown as a comment."""
    lines = ["# roost serve: effective settings (flags > ROOST_* > --config file > defaults)"]
    for dest in settings(serve_parser(parser)):
        value = getattr(args, dest, None)
        if value is None:
            lines.append(f"# {dest} = (unset)")
        else:
            lines.append(f"{dest} = {_toml_value(mask(dest, value))}")
    return "\n".join(lines) + "\n"
