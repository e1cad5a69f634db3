"""Where client commands find their server and token.

Each of the two is taken from the first place that has it:

1. the flags ``--url`` (repeatable) and ``--token``;
2. the environment: ``ROOST_URL`` (several separated by commas) and ``ROOST_TOKEN``;
3. the profile ``roost login`` saved: ``$XDG_CONFIG_HOME/roost/profile.json``
   (``~/.config/roost/profile.json`` by default), mode 0600.

The profile's token goes only to the profile's own URLs: with a ``--url`` or
``ROOST_URL`` that names another server, a token must come from a flag or the
environment too, so a token is never sent to a server it was not made for.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from roost.cli.errors import UsageError
from roost.client.client import InvalidArgument, check_url

PROFILE_FILE = "profile.json"


@dataclass(frozen=True, slots=True)
class Profile:
    urls: list[str]
    token: str


def profile_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "roost" / PROFILE_FILE


def load_profile(path: Path) -> Profile | None:
    try:
        data = json.loads(path.read_text())
        urls, token = data["urls"], data["token"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the profile {path}: {exc} (run `roost login` again)") from None
    if not (isinstance(urls, list) and all(isinstance(u, str) for u in urls) and isinstance(token, str)):
        raise UsageError(f"the profile {path} is not one roost login wrote (run `roost login` again)")
    return Profile(urls, token)


def save_profile(profile: Profile, path: Path) -> None:
    """Write the profile readable by its owner only, replacing any earlier one whole."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    # Created 0600 (not chmod-ed after): the token is never readable by others.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"urls": profile.urls, "token": profile.token}, out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def remove_profile(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def split_urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def checked_urls(urls: list[str]) -> list[str]:
    try:
        return [check_url(u) for u in urls]
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None


def checked_token(token: str) -> str:
    if not token.strip():
        raise UsageError("the token is empty")
    return token.strip()


def resolve(
    flag_urls: list[str] | None, flag_token: str | None, env: Mapping[str, str] = os.environ
) -> tuple[list[str], str]:
    """The URLs and token a client command uses (see the module's docstring)."""
    urls = flag_urls or split_urls(env.get("ROOST_URL", ""))
    token = flag_token if flag_token is not None else env.get("ROOST_TOKEN")
    # Read only when needed: a broken profile does not stop a command given both.
    profile = load_profile(profile_path(env)) if not urls or token is None else None
    urls = urls or (profile.urls if profile else [])
    if not urls:
        raise UsageError("no server URL: give --url, set ROOST_URL or run `roost login`")
    urls = checked_urls(urls)
    if token is None and profile is not None and urls == profile.urls:
        token = profile.token
    if token is None:
        where = " for that URL" if profile is not None else ""
        raise UsageError(f"no token{where}: give --token, set ROOST_TOKEN or run `roost login`")
    return urls, checked_token(token)
