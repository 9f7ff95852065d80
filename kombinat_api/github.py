"""GitHub OAuth device flow, proxied: the annotator talks only to kombinat, kombinat talks to GitHub.

The GitHub access token is used once, to learn who signed in, and then dropped; kombinat issues its own
token. Base URLs are settings so tests (and GitHub Enterprise) can point elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Errors GitHub returns while polling that the annotator must act on; passed through verbatim.
POLL_ERRORS = {"authorization_pending", "slow_down", "expired_token", "access_denied"}


class GitHubError(Exception):
    """GitHub answered something kombinat cannot use (misconfiguration or an outage)."""


@dataclass
class GitHubUser:
    id: int
    login: str


class GitHubClient:
    def __init__(self, client_id: str, oauth_url: str, api_url: str, scope: str, timeout: float) -> None:
        self.client_id = client_id
        self.oauth_url = oauth_url.rstrip("/")
        self.api_url = api_url.rstrip("/")
        self.scope = scope
        self.timeout = timeout

    def _post(self, path: str, data: dict[str, str]) -> dict[str, Any]:
        try:
            resp = httpx.post(
                f"{self.oauth_url}{path}",
                data=data,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise GitHubError(f"GitHub is unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise GitHubError(f"GitHub answered {resp.status_code} with a non-JSON body") from exc
        if not isinstance(body, dict):
            raise GitHubError("GitHub answered an unexpected JSON shape")
        return body

    def start_device_flow(self) -> dict[str, Any]:
        body = self._post("/login/device/code", {"client_id": self.client_id, "scope": self.scope})
        if "error" in body:
            raise GitHubError(f"GitHub refused to start the device flow: {body.get('error')}")
        missing = {"device_code", "user_code", "verification_uri"} - body.keys()
        if missing:
            raise GitHubError(f"GitHub's device-code answer lacks {sorted(missing)}")
        return {
            "device_code": body["device_code"],
            "user_code": body["user_code"],
            "verification_uri": body["verification_uri"],
            "interval": int(body.get("interval", 5)),
            "expires_in": int(body.get("expires_in", 900)),
        }

    def poll(self, device_code: str) -> tuple[str | None, str | None]:
        """Returns (access_token, None) once authorized, or (None, error) for the documented poll errors."""
        body = self._post(
            "/login/oauth/access_token",
            {"client_id": self.client_id, "device_code": device_code, "grant_type": DEVICE_GRANT},
        )
        if body.get("access_token"):
            return str(body["access_token"]), None
        error = str(body.get("error", ""))
        if error in POLL_ERRORS:
            return None, error
        if error == "incorrect_device_code":
            return None, "expired_token"
        raise GitHubError(f"GitHub refused the device code: {error or 'no token and no error'}")

    def user(self, access_token: str) -> GitHubUser:
        try:
            resp = httpx.get(
                f"{self.api_url}/user",
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/vnd.github+json"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise GitHubError(f"GitHub is unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise GitHubError(f"GitHub rejected the access token ({resp.status_code})")
        body = resp.json()
        try:
            return GitHubUser(id=int(body["id"]), login=str(body["login"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise GitHubError("GitHub's /user answer lacks id or login") from exc
