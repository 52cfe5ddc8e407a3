"""Per-service NATS users: credentials files and the nats-server `authorization` block.

Each service kind (and the CLI, user `admin`) gets its own user and a random
password, kept in `<dir>/<user>.json` (mode 0600, directory 0700), reused on
the next start so running processes keep working across a broker restart. The
permissions come from one table, `proto.subjects.PERMISSIONS`; the broker
config that carries the passwords is written 0600 too. Passwords are never
logged and never appear in a command line (a process gets the path of its
credentials file).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ikefarm.proto import subjects

CREDENTIALS_DIR = "nats-auth"
SERVER_CONFIG = "authorization.conf"
ENV_CREDENTIALS = "IKEFARM_NATS_CREDENTIALS"


class CredentialsError(RuntimeError):
    pass


@dataclass(frozen=True)
class BusUser:
    user: str
    password: str = field(repr=False)
    path: Path | None = None


def users() -> tuple[str, ...]:
    return tuple(subjects.PERMISSIONS)


def write_private(path: Path, text: str) -> None:
    """Create or replace `path` with mode 0600 from the start (no window where it is readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_credentials(directory: Path) -> dict[str, BusUser]:
    """Every user's credentials in `directory`, created where missing."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    found: dict[str, BusUser] = {}
    for name in users():
        path = directory / f"{name}.json"
        try:
            found[name] = read_credentials(path)
            if found[name].user != name:
                raise CredentialsError(f"{path}: names user {found[name].user!r}, not {name!r}")
            continue
        except FileNotFoundError:
            pass
        user = BusUser(name, secrets.token_urlsafe(32), path)
        write_private(path, json.dumps({"user": name, "password": user.password}) + "\n")
        found[name] = user
    return found


def credentials_for(path: str | Path, user: str) -> Path:
    """A credentials file, or in a credentials directory the file of `user`."""
    path = Path(path)
    return path / f"{user}.json" if path.is_dir() else path


def read_credentials(path: str | Path) -> BusUser:
    """The user and password of a credentials file; FileNotFoundError if there is none."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
        return BusUser(str(data["user"]), str(data["password"]), path)
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{path}: not an ikefarm NATS credentials file") from None


def _quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def authorization_block(credentials: dict[str, BusUser], *, with_passwords: bool = True) -> str:
    """The nats-server `authorization { users = [...] }` block for these users."""
    lines = ["authorization {", "  users = ["]
    for name, user in credentials.items():
        allowed = subjects.permissions(name)
        password = json.dumps(user.password) if with_passwords else '"<see credentials file>"'
        lines += [
            f"    {{ user: {json.dumps(name)}, password: {password}, permissions: {{",
            f"        publish: {{ allow: {_quoted(allowed['publish'])} }}",
            f"        subscribe: {{ allow: {_quoted(allowed['subscribe'])} }}",
            "        allow_responses: true",
            "    } }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def write_server_config(directory: Path, credentials: dict[str, BusUser]) -> Path:
    """The broker's include file (0600): it holds the passwords."""
    path = directory / SERVER_CONFIG
    write_private(path, authorization_block(credentials))
    return path
