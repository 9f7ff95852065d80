"""The pipeline's side of kombinat's admin API (docs/api.md): enqueue, honeypots, exports, counts."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import httpx


class KombinatError(RuntimeError):
    """kombinat answered with an error, or could not be reached after retries; the message says which."""


class KombinatAdminClient:
    """Synchronous admin client with bounded retries on network errors and 5xx (never on 4xx)."""

    def __init__(self, base_url: str, admin_token: str, timeout: float = 60.0, retries: int = 5) -> None:
        if not admin_token:
            raise KombinatError("no kombinat admin token: set KOMBINAT_ADMIN_TOKEN (kombinat create-admin-token)")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers={"Authorization": f"Bearer {admin_token}"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KombinatAdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise KombinatError(f"kombinat at {self.base_url} unreachable: {exc}") from exc
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise KombinatError(f"{method} {path}: {response.status_code} {_detail(response)}")
                    return response.json() if response.content else None
                if attempt == self.retries:
                    raise KombinatError(f"{method} {path}: {response.status_code} {_detail(response)}")
            time.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def enqueue(self, pairs: list[dict[str, Any]]) -> dict[str, int]:
        return self._request("POST", "/api/v1/admin/pairs", json={"pairs": pairs})

    def load_honeypots(self, honeypots: list[dict[str, Any]]) -> dict[str, int]:
        return self._request("POST", "/api/v1/admin/honeypots", json={"honeypots": honeypots})

    def queue_counts(self, split: str | None = None, cycle: str | None = None) -> dict[str, int]:
        params = {k: v for k, v in {"split": split, "cycle": cycle}.items() if v}
        return self._request("GET", "/api/v1/admin/queue", params=params)

    def labels_page(
        self, after: str | None, limit: int, split: str | None = None, cycle: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        params = {k: v for k, v in {"after": after, "limit": limit, "split": split, "cycle": cycle}.items() if v}
        page = self._request("GET", "/api/v1/admin/labels", params=params)
        return page["labels"], page["next_cursor"]

    def verified(
        self, split: str | None = None, cycle: str | None = None, status: str = "verified", page_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        after: str | None = None
        while True:
            params = {"split": split, "cycle": cycle, "status": status, "limit": page_size, "after": after}
            page = self._request(
                "GET", "/api/v1/admin/verified", params={k: v for k, v in params.items() if v is not None}
            )
            yield from page["pairs"]
            if len(page["pairs"]) < page_size:
                return
            after = page["next_cursor"]

    def contributors(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/admin/contributors", params={"limit": 1000})["contributors"]

    def model_quality(self) -> dict[str, Any]:
        return self._request("GET", "/api/v1/admin/model-quality")

    def models(self) -> list[dict[str, Any]]:
        """The model registry as volunteers' annotators read it (GET /api/v1/models)."""
        return self._request("GET", "/api/v1/models")["models"]

    def upsert_models(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create or replace registry entries by name (admitted flag and qualification JSON included)."""
        return self._request("PUT", "/api/v1/admin/models", json={"models": entries})["models"]


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:300]
