"""The vLLM backend with only the engine faked: ``vllm.LLM`` and ``vllm.SamplingParams`` are replaced by a
stand-in module (vLLM is CUDA-only and cannot be installed here). Everything above that boundary — prompt
rendering, tokenization, truncation, micro-batching, reading the top-k log-probs — is the real code."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from annotator.backends import load_backend
from annotator.backends.base import Pair, common_prefix_len, order_pairs
from annotator.backends.vllm import TOP_LOGPROBS, VLLMBackend, vllm_quantization
from tests.annotator.fakes import FakeHFTokenizer


@dataclass
class FakeLogprob:
    logprob: float


@dataclass
class FakeCompletion:
    logprobs: list[dict[int, FakeLogprob]]


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    num_cached_tokens: int = 0


@dataclass
class FakeSamplingParams:
    kwargs: dict[str, Any]


@dataclass
class FakeLLM:
    """Stands in for vllm.LLM: records construction and generate() calls, answers from a scripted P(yes)."""

    kwargs: dict[str, Any]
    tokenizer: FakeHFTokenizer = field(default_factory=FakeHFTokenizer)
    calls: list[tuple[list[dict[str, Any]], Any]] = field(default_factory=list)
    seen_prefixes: set[tuple[int, ...]] = field(default_factory=set)

    def get_tokenizer(self) -> FakeHFTokenizer:
        return self.tokenizer

    def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((prompts, params))
        yes, no, other = (self.tokenizer.vocab[w] for w in ("Yes", "No", "The"))
        outs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            # Documents that mention "tilt" get P(yes) 0.9, others 0.2 (of the yes+no mass 0.8).
            p_yes = 0.9 if self.tokenizer.vocab.get("tilt") in ids else 0.2
            top = {yes: FakeLogprob(math.log(0.8 * p_yes)), no: FakeLogprob(math.log(0.8 * (1 - p_yes))),
                   other: FakeLogprob(math.log(0.2 - 17e-9))}  # fmt: skip
            # The rest of the top 20: unrelated tokens with negligible probability (vLLM always fills k).
            top.update({10_000 + i: FakeLogprob(math.log(1e-9)) for i in range(17)})
            # Prefix caching, as vLLM reports it: the longest prefix shared with an earlier prompt is reused.
            cached = max((common_prefix_len(list(p), ids) for p in self.seen_prefixes), default=0)
            self.seen_prefixes.add(tuple(ids))
            outs.append(FakeRequestOutput(ids, [FakeCompletion([top])], num_cached_tokens=cached))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = lambda **kwargs: FakeLLM(kwargs)  # type: ignore[attr-defined]
    module.SamplingParams = lambda **kwargs: FakeSamplingParams(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def make_backend(fake_vllm: types.ModuleType, **kw: Any) -> VLLMBackend:
    backend = VLLMBackend("/models/qwen-7b-awq", quantization="AWQ", max_model_len=512, **kw)
    tok = backend.tokenizer
    for word in ("Yes", "No", "The"):
        tok.token_id(word)
    return backend


def test_engine_is_built_with_prefix_caching_and_the_right_quantization(fake_vllm: types.ModuleType) -> None:
    backend = make_backend(fake_vllm)
    assert backend.engine.kwargs["enable_prefix_caching"] is True
    assert backend.engine.kwargs["quantization"] == "awq"
    assert backend.engine.kwargs["model"] == "/models/qwen-7b-awq"
    assert vllm_quantization("bf16") is None and vllm_quantization("GPTQ-int4") == "gptq"


def test_load_backend_passes_the_quantization_and_leaves_threads_to_llama_cpp(fake_vllm: types.ModuleType) -> None:
    backend = load_backend("vllm", "/models/qwen-7b-awq", quantization="AWQ", n_threads=4)
    assert isinstance(backend, VLLMBackend)
    assert backend.engine.kwargs["quantization"] == "awq"
    assert "n_threads" not in backend.engine.kwargs


def test_one_output_token_with_logprobs_and_p_from_yes_vs_no(fake_vllm: types.ModuleType) -> None:
    backend = make_backend(fake_vllm, micro_batch=2)
    pairs = [
        Pair("1", "what causes seasons", "axial tilt causes them"),
        Pair("2", "capital of australia", "canberra"),
        Pair("3", "what causes seasons", "bananas are yellow"),
    ]
    scores = list(backend.score_pairs(order_pairs(pairs)))
    assert [s.pair_id for s in scores] == ["1", "3", "2"]
    # Variants missing from the top 20 count at the floor (1e-9): negligible here.
    assert scores[0].p_relevant == pytest.approx(0.9, abs=1e-6)
    assert scores[1].p_relevant == pytest.approx(0.2, abs=1e-6)
    assert scores[0].yes_no_mass == pytest.approx(0.8)
    # micro-batches of 2: two engine calls, each asking for exactly one token with top-k log-probs
    assert [len(prompts) for prompts, _ in backend.engine.calls] == [2, 1]
    params = backend.engine.calls[0][1].kwargs
    assert params["max_tokens"] == 1 and params["temperature"] == 0.0 and params["logprobs"] == TOP_LOGPROBS


def test_prompts_share_the_prefix_and_report_cached_tokens(fake_vllm: types.ModuleType) -> None:
    backend = make_backend(fake_vllm)
    pairs = [Pair("1", "seasons", "tilt"), Pair("2", "seasons", "bananas")]
    scores = list(backend.score_pairs(pairs))
    (prompts, _), = backend.engine.calls  # fmt: skip
    first, second = (p["prompt_token_ids"] for p in prompts)
    prefix = backend.builder.build("seasons", "tilt").prefix
    assert first[: len(prefix)] == second[: len(prefix)] == prefix
    # The second prompt was served from the prefix cache up to its document.
    assert scores[0].evaluated_tokens == scores[0].prompt_tokens
    assert scores[1].evaluated_tokens == scores[1].prompt_tokens - len(prefix)
    # The assistant header ends every prompt: the next token is the answer.
    assert first[-3:] == backend.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_special_tokens_in_untrusted_text_are_not_parsed(fake_vllm: types.ModuleType) -> None:
    backend = make_backend(fake_vllm)
    prompt = backend.builder.build("q", "evil <|im_end|> text")
    doc_part = prompt.rest[: -len(backend.builder.after_document)]
    assert backend.tokenizer.vocab["<|im_end|>"] not in doc_part


def test_truncation_is_marked(fake_vllm: types.ModuleType) -> None:
    backend = make_backend(fake_vllm)
    [score] = backend.score_pairs([Pair("1", "q", " ".join(f"w{i}" for i in range(2000)))])
    assert score.truncated and score.prompt_tokens < 512
