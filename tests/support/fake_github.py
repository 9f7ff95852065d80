"""A small real HTTP server that plays GitHub for the OAuth device flow.

Endpoints: ``POST /login/device/code``, ``POST /login/oauth/access_token`` (form-encoded, answers JSON with
``Accept: application/json``, errors with HTTP 200 like GitHub) and ``GET /user`` (Bearer token).
A test decides what the user does: ``fake.authorize(user_code, login, user_id)`` or ``fake.deny(user_code)``;
until then polling answers ``authorization_pending``.

Usage::

    with FakeGitHub() as gh:
        settings = Settings(github_client_id=gh.client_id, github_oauth_url=gh.url, github_api_url=gh.url)
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from tests.support.http_fake import JsonHandler, LoopbackServer


@dataclass
class _Device:
    device_code: str
    user_code: str
    client_id: str
    state: str = "pending"  # pending | authorized | denied | expired | used
    login: str = ""
    user_id: int = 0


@dataclass
class _State:
    client_id: str
    devices: dict[str, _Device] = field(default_factory=dict)
    tokens: dict[str, tuple[int, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(JsonHandler):
    state: _State  # set on the class by FakeGitHub (one handler class per fake)

    def _form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.read_body().decode()).items()}

    def do_POST(self) -> None:
        state = self.state
        form = self._form()
        state.requests.append(f"POST {self.path}")
        if form.get("client_id") != state.client_id:
            self.send_json(200, {"error": "incorrect_client_credentials"})
            return
        if self.path == "/login/device/code":
            device = _Device(
                device_code=secrets.token_hex(20),
                user_code=f"{secrets.token_hex(2).upper()}-{secrets.token_hex(2).upper()}",
                client_id=form["client_id"],
            )
            with state.lock:
                state.devices[device.device_code] = device
            self.send_json(
                200,
                {
                    "device_code": device.device_code,
                    "user_code": device.user_code,
                    "verification_uri": f"http://{self.headers.get('Host')}/login/device",
                    "expires_in": 900,
                    "interval": 5,
                },
            )
            return
        if self.path == "/login/oauth/access_token":
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:device_code":
                self.send_json(200, {"error": "unsupported_grant_type"})
                return
            with state.lock:
                device = state.devices.get(form.get("device_code", ""))
                if device is None:
                    self.send_json(200, {"error": "incorrect_device_code"})
                    return
                if device.state == "pending":
                    self.send_json(200, {"error": "authorization_pending"})
                elif device.state == "denied":
                    self.send_json(200, {"error": "access_denied"})
                elif device.state in ("expired", "used"):
                    self.send_json(200, {"error": "expired_token"})
                else:
                    token = "gho_" + secrets.token_hex(16)
                    state.tokens[token] = (device.user_id, device.login)
                    device.state = "used"
                    self.send_json(200, {"access_token": token, "token_type": "bearer", "scope": "read:user"})
            return
        self.send_json(404, {"message": "Not Found"})

    def do_GET(self) -> None:
        state = self.state
        state.requests.append(f"GET {self.path}")
        if self.path == "/user":
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").removeprefix("token ").strip()
            user = state.tokens.get(token)
            if user is None:
                self.send_json(401, {"message": "Bad credentials"})
                return
            self.send_json(200, {"id": user[0], "login": user[1], "type": "User"})
            return
        self.send_json(404, {"message": "Not Found"})


class FakeGitHub(LoopbackServer):
    def __init__(self, client_id: str = "Iv1.fakeclient") -> None:
        self.client_id = client_id
        self.state = _State(client_id=client_id)
        super().__init__(type("GitHubHandler", (_Handler,), {"state": self.state}))

    @property
    def requests(self) -> list[str]:
        return list(self.state.requests)

    def _device_by_user_code(self, user_code: str) -> _Device:
        for device in self.state.devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(user_code)

    def authorize(self, user_code: str, login: str, user_id: int) -> None:
        with self.state.lock:
            device = self._device_by_user_code(user_code)
            device.state, device.login, device.user_id = "authorized", login, user_id

    def deny(self, user_code: str) -> None:
        with self.state.lock:
            self._device_by_user_code(user_code).state = "denied"

    def expire(self, user_code: str) -> None:
        with self.state.lock:
            self._device_by_user_code(user_code).state = "expired"
