"""Test doubles at the annotator's two boundaries: the network (an in-memory kombinat behind
httpx.MockTransport, which records every request byte for the privacy test) and the model (a backend with
scripted scores, and a Hugging Face-shaped tokenizer for the vLLM and MLX backends, whose libraries cannot
be installed here). The real kombinat is exercised in test_integration.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from annotator.backends.base import Backend, Pair, Score


@dataclass
class FakeKombinat:
    """Implements the work endpoints of docs/api.md closely enough for the worker's logic."""

    pairs: list[dict[str, str]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail_next: list[int | str] = field(default_factory=list)  # status codes (or "connect") to answer first
    expire_after_submits: int | None = None  # the lease of every batch dies after this many submits
    submits: int = 0

    def add_pairs(self, n: int, queries: int = 3) -> list[dict[str, str]]:
        new = [
            {
                "pair_id": str(uuid.uuid4()),
                "query": f"secret query {i % queries}",
                "document": f"secret doc {i}",
            }
            for i in range(n)
        ]
        self.pairs.extend(new)
        return new

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail_next:
            failure = self.fail_next.pop(0)
            if failure == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(int(failure), json={"detail": "scripted failure"})
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/api/v1/models":
            return httpx.Response(200, json={"models": []})
        if path == "/api/v1/batches/claim":
            leased = {pid for b in self.batches.values() if b["live"] for pid in b["pairs"]}
            free = [p for p in self.pairs if p["pair_id"] not in self.labels and p["pair_id"] not in leased]
            take = free[: body["size"]]
            batch_id = str(uuid.uuid4())
            self.batches[batch_id] = {"pairs": {p["pair_id"] for p in take}, "live": bool(take)}
            return httpx.Response(
                200, json={"batch_id": batch_id, "lease_expires_at": "2030-01-01T00:00:00Z", "pairs": take}
            )
        if path.endswith("/labels"):
            batch = self.batches[path.split("/")[-2]]
            self.submits += 1
            if self.expire_after_submits is not None and self.submits > self.expire_after_submits:
                batch["live"] = False
            if not batch["live"]:
                return httpx.Response(409, json={"detail": "The lease expired or was released."})
            if any(label["pair_id"] not in batch["pairs"] for label in body["labels"]):
                return httpx.Response(403, json={"detail": "outside the lease"})
            accepted = duplicates = 0
            for label in body["labels"]:
                if label["pair_id"] in self.labels:
                    duplicates += 1
                else:
                    self.labels[label["pair_id"]] = label
                    accepted += 1
            return httpx.Response(
                200,
                json={
                    "accepted": accepted,
                    "duplicates": duplicates,
                    "lease_expires_at": "2030-01-01T00:00:00Z",
                },
            )
        if path.endswith("/release"):
            batch = self.batches[path.split("/")[-2]]
            ids = body.get("pair_ids")
            released = [pid for pid in batch["pairs"] if pid not in self.labels and (ids is None or pid in ids)]
            batch["pairs"] -= set(released)
            return httpx.Response(200, json={"released": len(released)})
        return httpx.Response(404, json={"detail": f"no route {path}"})


class ScriptedBackend(Backend):
    """Scores every pair with P = 0.8 if its document ends in an even digit, else 0.1; can fail on demand."""

    name = "llama_cpp"

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.fail_after = fail_after

    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        for pair in pairs:
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise KeyboardInterrupt  # stands in for a crash in the middle of a batch
            self.seen.append(pair.pair_id)
            p = 0.8 if pair.document[-1] in "02468" else 0.1
            yield Score(pair.pair_id, p, False, 0.01, 10, 5, 0.9)


class FakeHFTokenizer:
    """Word-level tokenizer with ChatML special tokens, shaped like a Hugging Face tokenizer."""

    all_special_tokens = ("<|im_start|>", "<|im_end|>")
    bos_token = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<|im_start|>": 0, "<|im_end|>": 1}
        self.encode_calls: list[str] = []

    def token_id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False  # the backend never lets the tokenizer add BOS/EOS on its own
        self.encode_calls.append(text)
        ids: list[int] = []
        rest = text
        while rest:
            specials = [(rest.find(s), s) for s in self.all_special_tokens if s in rest]
            if not specials:
                ids += [self.token_id(w) for w in rest.replace("\n", " \n ").split(" ") if w]
                break
            pos, special = min(specials)
            ids += [self.token_id(w) for w in rest[:pos].replace("\n", " \n ").split(" ") if w]
            ids.append(self.vocab[special])
            rest = rest[pos + len(special) :]
        return ids

    def apply_chat_template(self, msgs: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
