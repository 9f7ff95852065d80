"""The MLX backend with only the library faked: ``mlx.core``, ``mlx_lm.load`` and mlx-lm's prompt cache are
replaced by numpy stand-ins (MLX runs on Apple Silicon only). Everything above that boundary — the prompt from
the tokenizer's chat template, the KV-cache trimming, scoring — is the real code."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from annotator.backends import load_backend
from annotator.backends.base import Pair, order_pairs
from annotator.backends.mlx import MLXBackend
from tests.annotator.fakes import FakeHFTokenizer

VOCAB_SIZE = 4096


@dataclass
class FakeKVCache:
    """One layer's cache: the tokens whose keys/values it holds."""

    tokens: list[int] = field(default_factory=list)


@dataclass
class FakeMLXModel:
    """Logits after the tokens in the cache: "yes" wins when the word "tilt" is among them, "no" otherwise.

    Reading the cache (not just the new tokens) is the point: a cache that was trimmed wrong changes the answer.
    """

    tokenizer: FakeHFTokenizer
    ran: list[int] = field(default_factory=list)  # tokens run per call
    fail_next: bool = False

    def __call__(self, inputs: np.ndarray, cache: list[FakeKVCache]) -> np.ndarray:
        new = [int(t) for t in inputs[0]]
        cache[0].tokens.extend(new)  # the real model writes the cache before it can fail
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("out of memory")
        self.ran.append(len(new))
        logits = np.zeros((1, len(new), VOCAB_SIZE), dtype=np.float32)
        relevant = self.tokenizer.vocab.get("tilt") in cache[0].tokens
        for word in ("yes", "Yes", "YES"):
            logits[0, -1, self.tokenizer.vocab[word]] = 2.0 if relevant else -2.0
        for word in ("no", "No", "NO"):
            logits[0, -1, self.tokenizer.vocab[word]] = -2.0 if relevant else 2.0
        return logits


def make_prompt_cache(model: FakeMLXModel) -> list[FakeKVCache]:
    return [FakeKVCache()]


def trim_prompt_cache(cache: list[FakeKVCache], n: int) -> int:
    for layer in cache:
        del layer.tokens[len(layer.tokens) - n :]
    return n


@pytest.fixture
def fake_mlx(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeMLXModel]]:
    """Installs the stand-in modules; yields the list of models that ``mlx_lm.load`` has built."""
    loaded: list[FakeMLXModel] = []

    def load(path: str) -> tuple[FakeMLXModel, FakeHFTokenizer]:
        tokenizer = FakeHFTokenizer()
        model = FakeMLXModel(tokenizer)
        loaded.append(model)
        return model, tokenizer

    core = types.ModuleType("mlx.core")
    core.array = np.array  # type: ignore[attr-defined]
    core.eval = lambda *arrays: None  # type: ignore[attr-defined]
    core.float32 = np.float32  # type: ignore[attr-defined]
    mlx = types.ModuleType("mlx")
    mlx.core = core  # type: ignore[attr-defined]
    mlx_lm = types.ModuleType("mlx_lm")
    mlx_lm.load = load  # type: ignore[attr-defined]
    models = types.ModuleType("mlx_lm.models")
    cache = types.ModuleType("mlx_lm.models.cache")
    cache.make_prompt_cache = make_prompt_cache  # type: ignore[attr-defined]
    cache.trim_prompt_cache = trim_prompt_cache  # type: ignore[attr-defined]
    mlx_lm.models = models  # type: ignore[attr-defined]
    models.cache = cache  # type: ignore[attr-defined]
    for name, module in {"mlx": mlx, "mlx.core": core, "mlx_lm": mlx_lm, "mlx_lm.models": models,
                         "mlx_lm.models.cache": cache}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    yield loaded


def cache_tokens(backend: MLXBackend) -> list[int]:
    layer: FakeKVCache = backend.cache[0]
    return layer.tokens


PAIRS = [
    Pair("a1", "what causes seasons", "axial tilt causes them"),
    Pair("b1", "capital of australia", "canberra"),
    Pair("a2", "what causes seasons", "bananas are yellow"),
]


def test_load_backend_builds_mlx_on_the_models_own_chat_template(fake_mlx: list[FakeMLXModel], tmp_path: Path) -> None:
    backend = load_backend("mlx", tmp_path / "qwen-4bit")
    assert isinstance(backend, MLXBackend)
    tokenizer = backend.tokenizer
    # ChatML from the tokenizer: the prefix opens the system turn, the rest ends with the assistant header.
    assert backend.builder.before_query[0] == tokenizer.vocab["<|im_start|>"]
    assert backend.builder.after_document[-3:] == tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_scores_reuse_the_cached_prefix_and_the_cache_holds_exactly_the_prompt(fake_mlx: list[FakeMLXModel]) -> None:
    backend = MLXBackend("/models/qwen-4bit", n_ctx=512, max_document_tokens=256)
    model = fake_mlx[0]
    ordered = order_pairs(PAIRS)
    scores = []
    for pair in ordered:
        [score] = backend.score_pairs([pair])
        scores.append(score)
        assert cache_tokens(backend) == backend.builder.build(pair.query, pair.document).ids
    assert [s.pair_id for s in scores] == ["a1", "a2", "b1"]
    assert scores[0].p_relevant > 0.9 and scores[1].p_relevant < 0.1 and scores[2].p_relevant < 0.1
    answer_mass = 3 * np.exp(2.0) + 3 * np.exp(-2.0)  # three spellings each of yes and no; every other logit is 0
    assert scores[0].yes_no_mass == pytest.approx(answer_mass / (answer_mass + VOCAB_SIZE - 6))
    second = backend.builder.build(ordered[1].query, ordered[1].document)
    # The second pair of a query runs only its document part; the model saw exactly that many tokens.
    assert scores[1].evaluated_tokens == len(second.rest) == model.ran[1]
    assert scores[0].evaluated_tokens == scores[0].prompt_tokens
    assert backend.stats.pairs == 3


def test_a_failed_forward_pass_starts_the_next_pair_from_an_empty_cache(fake_mlx: list[FakeMLXModel]) -> None:
    backend = MLXBackend("/models/qwen-4bit", n_ctx=512, max_document_tokens=256)
    model = fake_mlx[0]
    [first] = backend.score_pairs([PAIRS[0]])
    model.fail_next = True
    with pytest.raises(RuntimeError, match="out of memory"):
        list(backend.score_pairs([PAIRS[2]]))
    # The half-written cache is gone: the next pair (same query) runs in full and sees no stale tokens.
    [again] = backend.score_pairs([PAIRS[2]])
    assert again.evaluated_tokens == again.prompt_tokens
    assert cache_tokens(backend) == backend.builder.build(PAIRS[2].query, PAIRS[2].document).ids
    assert first.p_relevant > 0.9 and again.p_relevant < 0.1
