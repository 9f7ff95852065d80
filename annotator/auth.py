"""Sign-in: the GitHub device flow through kombinat, and the token file.

The volunteer opens a URL, types a short code, and kombinat exchanges the GitHub grant for its own API
token (we never see a GitHub token). The token is written to the user config directory with mode 0600 —
created with that mode, never chmod-ed after the fact — because it lets anyone submit labels in the
volunteer's name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

from annotator.client import ApiError, KombinatClient

APP_NAME = "embedkomb-annotator"
DEFAULT_SERVER = "http://127.0.0.1:8000"


def config_dir() -> Path:
    # ANNOTATOR_CONFIG_DIR lets tests (and people with several identities) keep separate credentials.
    override = os.environ.get("ANNOTATOR_CONFIG_DIR")
    return Path(override) if override else Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    override = os.environ.get("ANNOTATOR_DATA_DIR")
    return Path(override) if override else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    override = os.environ.get("ANNOTATOR_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir(APP_NAME))


def token_path() -> Path:
    return config_dir() / "credentials.json"


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str
    login: str
    contributor_id: str


def _normalize(server: str) -> str:
    return server.rstrip("/")


def _read_all() -> dict[str, Any]:
    try:
        data = json.loads(token_path().read_text())
    except FileNotFoundError:
        return {"default": None, "servers": {}}
    except ValueError as exc:
        raise RuntimeError(f"{token_path()} is not valid JSON; delete it and log in again") from exc
    if not isinstance(data, dict):
        raise RuntimeError(f"{token_path()} is not a credentials file; delete it and log in again")
    data.setdefault("servers", {})
    return data


def _write_all(data: dict[str, Any]) -> None:
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    # O_CREAT with 0600: the secret is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)  # an older file of ours with a looser mode is fixed on the next write
    os.replace(tmp, path)


def save(creds: Credentials) -> Path:
    data = _read_all()
    data["servers"][_normalize(creds.server)] = asdict(creds)
    data["default"] = _normalize(creds.server)
    _write_all(data)
    return token_path()


def load(server: str | None = None) -> Credentials | None:
    """Credentials for ``server`` (or the last server logged in to), or None."""
    data = _read_all()
    key = _normalize(server) if server else data.get("default")
    entry = data["servers"].get(key) if key else None
    return Credentials(**entry) if entry else None


def default_server() -> str:
    env = os.environ.get("ANNOTATOR_SERVER")
    if env:
        return _normalize(env)
    data = _read_all()
    return data.get("default") or DEFAULT_SERVER


def forget(server: str) -> bool:
    data = _read_all()
    removed = data["servers"].pop(_normalize(server), None) is not None
    if data.get("default") == _normalize(server):
        data["default"] = next(iter(data["servers"]), None)
    _write_all(data)
    return removed


class LoginFailed(RuntimeError):
    pass


def device_login(
    client: KombinatClient,
    show_code: Callable[[str, str, int], None],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Credentials:
    """Run the device flow to the end: show the code, poll at the server's pace, return the credentials."""
    start = client.device_start()
    interval = float(start.get("interval") or 5)
    deadline = clock() + float(start.get("expires_in") or 900)
    show_code(start["verification_uri"], start["user_code"], int(start.get("expires_in") or 900))
    while True:
        if clock() > deadline:
            raise LoginFailed("the code expired before it was entered; run `annotator login` again")
        sleep(interval)
        try:
            grant = client.device_poll(start["device_code"])
        except ApiError as exc:
            if exc.status != 400:
                raise
            if exc.detail == "authorization_pending":
                continue
            if exc.detail == "slow_down":
                interval += 5  # what GitHub's device flow asks of a client that polls too fast
                continue
            if exc.detail == "expired_token":
                raise LoginFailed("the code expired before it was entered; run `annotator login` again") from exc
            if exc.detail == "access_denied":
                raise LoginFailed("sign-in was denied on GitHub") from exc
            raise
        return Credentials(
            server=client.base_url,
            token=str(grant["token"]),
            login=str(grant["login"]),
            contributor_id=str(grant["contributor_id"]),
        )
