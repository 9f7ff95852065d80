"""MLX backend (mlx-lm): Apple Silicon, 4-bit MLX checkpoints in unified memory.

Same scheme as llama.cpp: one forward pass per pair over the tokens not already in the KV cache. The
prompt cache holds the tokens of the previous pair; before a pair we trim it back to the common prefix
(``trim_prompt_cache``) and run only the rest, so a query's template + query are computed once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from annotator.backends.base import (
    AnswerTokens,
    Backend,
    Pair,
    PromptBuilder,
    Score,
    Stopwatch,
    p_relevant_from_logits,
)
from annotator.backends.llama_cpp import common_prefix_len
from annotator.backends.vllm import _encode_plain
from annotator.prompt import PromptTemplate, sentinel_messages


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, max_document_tokens: int = 3072) -> None:
        super().__init__()
        import mlx.core as mx  # lazy: the [mlx] extra, Apple Silicon
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        self._mx = mx
        self._trim = trim_prompt_cache
        self._make_cache = make_prompt_cache
        self.model, self.tokenizer = load(str(model_path))
        self.cache = make_prompt_cache(self.model)
        rendered = self.tokenizer.apply_chat_template(sentinel_messages(), tokenize=False, add_generation_prompt=True)
        # The rendered template already spells out any BOS; template text is encoded with special tokens on.
        self.builder = PromptBuilder(
            PromptTemplate.from_rendered(rendered),
            self._tokenize,
            n_ctx=n_ctx,
            max_document_tokens=max_document_tokens,
        )
        self.answers = AnswerTokens.from_tokenizer(self._tokenize)
        self._in_cache: list[int] = []

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        if special:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return _encode_plain(self.tokenizer, text)

    def next_token_logits(self, ids: list[int]) -> tuple[Any, int]:
        import numpy as np

        mx = self._mx
        n_keep = min(common_prefix_len(self._in_cache, ids), len(ids) - 1)
        drop = len(self._in_cache) - n_keep
        if drop:
            self._trim(self.cache, drop)
        try:
            logits = self.model(mx.array(ids[n_keep:])[None], cache=self.cache)[0, -1]
            mx.eval(logits)
        except BaseException:
            # A half-updated cache would silently corrupt every later pair: start from an empty one.
            self.cache = self._make_cache(self.model)
            self._in_cache = []
            raise
        self._in_cache = list(ids)
        return np.array(logits.astype(mx.float32)), len(ids) - n_keep

    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        for pair in pairs:
            watch = Stopwatch()
            prompt = self.builder.build(pair.query, pair.document)
            logits, evaluated = self.next_token_logits(prompt.ids)
            p, mass = p_relevant_from_logits(logits, self.answers)
            score = Score(
                pair_id=pair.pair_id,
                p_relevant=p,
                truncated=prompt.truncated,
                seconds=watch.elapsed(),
                prompt_tokens=len(prompt.ids),
                evaluated_tokens=evaluated,
                yes_no_mass=mass,
            )
            self._account(score)
            yield score
