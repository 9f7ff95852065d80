"""A small real HTTP server that plays the Hugging Face Hub for uploads (huggingface_hub's HfApi).

Endpoints, for dataset and model repositories alike (``<kind>`` is ``datasets`` or ``models``):
``POST /api/repos/create``, ``POST /api/validate-yaml``, ``POST /api/<kind>/<owner>/<name>/preupload/<rev>``
(answers "regular" for every file, so contents come inline), ``POST /api/<kind>/<owner>/<name>/commit/<rev>``
(NDJSON; stores the files), ``POST /api/<kind>/<owner>/<name>/tag/<rev>`` and
``DELETE /api/<kind>/<owner>/<name>/tag/<tag>``. ``fake.files`` holds what was committed, by repo and path;
``fake.tags`` the tags, by repo, as tag → commit oid; ``fake.requests`` the paths that were called.
"""

from __future__ import annotations

import base64
import json

from tests.support.http_fake import JsonHandler, LoopbackServer

REPO_KINDS = ("datasets", "models")


class _Handler(JsonHandler):
    fake: FakeHub  # set on the class by FakeHub (one handler class per fake)

    def _authorized(self) -> bool:
        fake = self.fake
        fake.requests.append(f"{self.command} {self.path}")
        if self.headers.get("Authorization") != f"Bearer {fake.token}":
            self.send_json(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    def do_DELETE(self) -> None:
        if not self._authorized():
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        tags = self.fake.tags.get(f"{parts[2]}/{parts[3]}", {}) if len(parts) >= 6 else {}
        if len(parts) >= 6 and parts[1] in REPO_KINDS and parts[4] == "tag" and parts[5] in tags:
            del tags[parts[5]]
            self.send_json(200, {})
        else:
            self.send_json(404, {"error": f"fake hub has no {self.path}"})

    def do_POST(self) -> None:
        body = self.read_body()
        fake = self.fake
        if not self._authorized():
            return
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/repos/create"):
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or fake.user}/{payload['name']}"
            fake.files.setdefault(repo_id, {})
            prefix = "" if payload.get("type", "model") == "model" else f"{payload['type']}s/"
            self.send_json(200, {"url": f"{fake.url}/{prefix}{repo_id}", "name": repo_id})
        elif self.path.startswith("/api/validate-yaml"):
            self.send_json(200, {"errors": [], "warnings": []})
        elif len(parts) >= 6 and parts[1] in REPO_KINDS and parts[4] == "preupload":
            files = json.loads(body)["files"]
            self.send_json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})  # fmt: skip
        elif len(parts) >= 6 and parts[1] in REPO_KINDS and parts[4] == "tag":
            repo_id = f"{parts[2]}/{parts[3]}"
            tags = fake.tags.setdefault(repo_id, {})
            tag = json.loads(body)["tag"]
            if tag in tags:
                self.send_json(409, {"error": f"tag {tag} already exists"})
            else:
                tags[tag] = parts[5]
                self.send_json(200, {})
        elif len(parts) >= 6 and parts[1] in REPO_KINDS and parts[4] == "commit":
            repo_id = f"{parts[2]}/{parts[3]}"
            stored = fake.files.setdefault(repo_id, {})
            for line in body.splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    stored[value["path"]] = base64.b64decode(value["content"])
            fake.commits += 1
            oid = f"{fake.commits:040x}"
            prefix = "" if parts[1] == "models" else "datasets/"
            self.send_json(200, {"commitUrl": f"{fake.url}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid})
        else:
            self.send_json(404, {"error": f"fake hub has no {self.path}"})


class FakeHub(LoopbackServer):
    def __init__(self, token: str = "hf_test_token", user: str = "embedkomb") -> None:
        self.token = token
        self.user = user
        self.files: dict[str, dict[str, bytes]] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.requests: list[str] = []
        self.commits = 0
        super().__init__(type("HubHandler", (_Handler,), {"fake": self}))
