"""A small real HTTP server that plays the Hugging Face Hub for dataset uploads (huggingface_hub's HfApi).

Endpoints: ``POST /api/repos/create``, ``POST /api/validate-yaml``,
``POST /api/datasets/<owner>/<name>/preupload/<rev>`` (answers "regular" for every file, so contents come
inline) and ``POST /api/datasets/<owner>/<name>/commit/<rev>`` (NDJSON; stores the files). ``fake.files``
holds what was committed, by repo and path; ``fake.requests`` the paths that were called.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        fake = self.server.fake
        fake.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {fake.token}":
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/repos/create"):
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or fake.user}/{payload['name']}"
            fake.files.setdefault(repo_id, {})
            self._json(200, {"url": f"{fake.url}/datasets/{repo_id}", "name": repo_id})
        elif self.path.startswith("/api/validate-yaml"):
            self._json(200, {"errors": [], "warnings": []})
        elif len(parts) >= 6 and parts[1] == "datasets" and parts[4] == "preupload":
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})  # fmt: skip
        elif len(parts) >= 6 and parts[1] == "datasets" and parts[4] == "commit":
            repo_id = f"{parts[2]}/{parts[3]}"
            stored = fake.files.setdefault(repo_id, {})
            for line in body.splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    stored[value["path"]] = base64.b64decode(value["content"])
            fake.commits += 1
            oid = f"{fake.commits:040x}"
            self._json(200, {"commitUrl": f"{fake.url}/datasets/{repo_id}/commit/{oid}", "commitOid": oid})
        else:
            self._json(404, {"error": f"fake hub has no {self.path}"})


class _Server(ThreadingHTTPServer):
    fake: FakeHub


class FakeHub:
    def __init__(self, token: str = "hf_test_token", user: str = "embedkomb") -> None:
        self.token = token
        self.user = user
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.commits = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
