"""vLLM backend: NVIDIA GPUs, Hugging Face checkpoints (fp16/bf16 or AWQ).

The engine runs with automatic prefix caching on, and each pair is one request for exactly one output
token with its top log-probabilities: the prompt pass is the forward pass we need, and the single "sampled"
token is never used. Pairs are sent in micro-batches (in query-grouped order), so vLLM schedules them
together and serves the template + query of a group from its prefix cache.

Only ``_generate`` touches the engine; unit tests fake ``vllm.LLM`` / ``vllm.SamplingParams`` there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from annotator.backends.base import (
    Pair,
    PromptBackend,
    PromptTokenizer,
    Score,
    Stopwatch,
    TokenPrompt,
    p_relevant_from_logprobs,
)

# vLLM returns at most `max_logprobs` (default 20) alternatives per position; ask for all of them so that
# every spelling of an answer the model puts real mass on is seen.
TOP_LOGPROBS = 20


def vllm_quantization(quantization: str) -> str | None:
    """Map the registry's quantization label to vLLM's argument ("awq-int4" → "awq"; fp16/bf16 → None)."""
    q = quantization.lower()
    for method in ("awq", "gptq", "fp8"):
        if q.startswith(method):
            return method
    return None


class VLLMBackend(PromptBackend):
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        quantization: str = "bf16",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.85,
        micro_batch: int = 64,
        max_document_tokens: int = 3072,
        prompt_version: str | None = None,
        engine: Any = None,
    ) -> None:
        # The engine is a vllm.LLM (or a test double): typed only as far as vLLM itself is.
        if engine is None:
            from vllm import LLM  # lazy: the [gpu] extra, CUDA machines only

            engine = LLM(
                model=model_path,
                quantization=vllm_quantization(quantization),
                enable_prefix_caching=True,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
            )
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.micro_batch = micro_batch
        super().__init__(
            PromptTokenizer.from_hugging_face(self.tokenizer, prompt_version),
            n_ctx=max_model_len,
            max_document_tokens=max_document_tokens,
        )

    def _sampling_params(self) -> Any:
        from vllm import SamplingParams

        # temperature 0 and one token: the prompt's forward pass is all we want from the engine.
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS, detokenize=False)

    def _generate(self, prompts: list[TokenPrompt]) -> list[Any]:
        requests = [{"prompt_token_ids": p.ids} for p in prompts]
        return list(self.engine.generate(requests, self._sampling_params(), use_tqdm=False))

    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        iterator = iter(pairs)
        while chunk := list(islice(iterator, self.micro_batch)):
            watch = Stopwatch()
            prompts = [self.builder.build(p.query, p.document) for p in chunk]
            outputs = self._generate(prompts)
            if len(outputs) != len(chunk):
                raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(chunk)} prompts")
            per_pair = watch.elapsed() / len(chunk)
            for pair, prompt, out in zip(chunk, prompts, outputs, strict=True):
                completion = out.outputs[0]
                top = completion.logprobs[0] if completion.logprobs else {}
                logprobs = {int(tok): _logprob(lp) for tok, lp in top.items()}
                p, mass = p_relevant_from_logprobs(logprobs, self.answers)
                cached = getattr(out, "num_cached_tokens", None) or 0
                score = Score(
                    pair_id=pair.pair_id,
                    p_relevant=p,
                    truncated=prompt.truncated,
                    seconds=per_pair,
                    prompt_tokens=len(prompt.ids),
                    evaluated_tokens=len(prompt.ids) - cached,
                    yes_no_mass=mass,
                )
                self._account(score)
                yield score


def _logprob(value: Any) -> float:
    # vLLM gives Logprob objects (with .logprob); older versions and fakes may give bare floats.
    return float(value.logprob if hasattr(value, "logprob") else value)
