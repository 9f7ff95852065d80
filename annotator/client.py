"""HTTP client for the kombinat API (docs/api.md), with the retry policy volunteers need.

- Network errors and 5xx (and 429) are transient: retried with exponential backoff and full jitter
  (sleep uniform(0, min(cap, base·2^attempt))), so a fleet of annotators does not stampede a restarted
  server, until ``max_elapsed`` seconds have passed.
- Any other 4xx is the caller's problem and is never retried: it raises :class:`ApiError` carrying
  kombinat's ``detail`` sentence, so the CLI can print it and stop.

Everything the annotator sends passes through :meth:`KombinatClient._request`: pair IDs, labels, model
metadata, the device-flow code and the token. Nothing else about the machine or the texts is ever sent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from annotator import __version__

USER_AGENT = f"embedkomb-annotator/{__version__}"
API = "/api/v1"


class ApiError(RuntimeError):
    """kombinat answered 4xx: a request we must not repeat as it is."""

    def __init__(self, status: int, detail: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.path = path
        super().__init__(f"kombinat refused {method} {path}: {status} {detail}")


class LeaseLost(ApiError):
    """409 on a batch: the lease expired or was released; that batch's remaining work is void."""


class Unavailable(RuntimeError):
    """kombinat stayed unreachable (or 5xx) for longer than the retry budget."""


class UnexpectedResponse(RuntimeError):
    """kombinat accepted a request but answered with a body this client cannot read (another API version?)."""


RetryHook = Callable[[int, float, str], None]  # (attempt, sleep seconds, what went wrong)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's 422: a list of field errors
        return "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', []))}: {err.get('msg')}" if isinstance(err, dict) else str(err)
            for err in detail
        )
    return str(detail)


class KombinatClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_elapsed: float = 900.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        on_retry: RetryHook | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.max_elapsed = max_elapsed
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.on_retry = on_retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KombinatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        start = time.monotonic()
        attempt = 0
        while True:
            problem: str
            try:
                response = self._http.request(method, API + path, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:  # connect refused, reset, timeouts: the server may come back
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                if response.status_code < 500 and response.status_code != 429:
                    error = LeaseLost if response.status_code == 409 else ApiError
                    raise error(response.status_code, _detail(response), method, path)
                problem = f"HTTP {response.status_code}: {_detail(response)}"
            delay = self.backoff(attempt)
            if time.monotonic() - start + delay > self.max_elapsed:
                raise Unavailable(f"kombinat at {self.base_url} unavailable for {self.max_elapsed:g}s: {problem}")
            attempt += 1
            if self.on_retry:
                self.on_retry(attempt, delay, problem)
            self._sleep(delay)

    def _request_object(self, method: str, path: str, *, json: Any = None, auth: bool = True) -> dict[str, Any]:
        """A request whose answer must be a JSON object (every endpoint except token revocation)."""
        body = self._request(method, path, json=json, auth=auth)
        if not isinstance(body, dict):
            raise UnexpectedResponse(f"kombinat answered {method} {path} with {type(body).__name__}, not an object")
        return body

    # --- sign-in --------------------------------------------------------------------------------------
    def device_start(self) -> dict[str, Any]:
        return self._request_object("POST", "/auth/device/start", json={}, auth=False)

    def device_poll(self, device_code: str) -> dict[str, Any]:
        return self._request_object("POST", "/auth/device/poll", json={"device_code": device_code}, auth=False)

    def me(self) -> dict[str, Any]:
        return self._request_object("GET", "/me")

    def revoke_token(self) -> None:
        self._request("DELETE", "/auth/token")

    # --- registry and work ----------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        return list(self._request_object("GET", "/models", auth=False)["models"])

    def claim(self, size: int, model: Mapping[str, str]) -> dict[str, Any]:
        return self._request_object("POST", "/batches/claim", json={"size": size, "model": dict(model)})

    def submit(self, batch_id: str, model: Mapping[str, str], labels: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"model": dict(model), "labels": labels}
        return self._request_object("POST", f"/batches/{batch_id}/labels", json=body)

    def release(self, batch_id: str, pair_ids: list[str] | None) -> dict[str, Any]:
        return self._request_object("POST", f"/batches/{batch_id}/release", json={"pair_ids": pair_ids})
