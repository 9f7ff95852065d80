"""llama.cpp backend (llama-cpp-python): GGUF models on the CPU (or any GPU llama.cpp was built for).

One forward pass per pair, and the KV cache of the prefix shared by consecutive pairs is kept: before each
pair we compare its tokens with the tokens whose keys/values sit in the context, keep the common prefix
(``n_tokens = n_keep``; ``Llama.eval`` then drops the KV cells after it) and evaluate only the rest.
With pairs grouped by query, the template + query run once per query instead of once per pair.

``logits_all`` stays off: we read only the last position's logits (``llama_get_logits_ith(ctx, -1)``), and
computing the 150k-way output layer for every prompt token would cost more than the rest of a small model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from annotator.backends.base import (
    AnswerTokens,
    Backend,
    Pair,
    PromptBuilder,
    Score,
    Stopwatch,
    p_relevant_from_logits,
)
from annotator.prompt import CHATML_TEMPLATE, PromptTemplate, sentinel_messages


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def default_threads() -> int:
    # llama-cpp-python defaults to half the cores; a volunteer who starts us wants all the cores we may use.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        reuse_prefix: bool = True,
        max_document_tokens: int = 1536,
    ) -> None:
        super().__init__()
        import llama_cpp  # lazy: only volunteers on this backend have it installed

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads or default_threads(),
            n_gpu_layers=n_gpu_layers,
            logits_all=False,
            verbose=False,
        )
        self.reuse_prefix = reuse_prefix
        self.n_vocab = self.llm.n_vocab()
        template = self._prompt_template()
        # Template text is tokenized with special tokens on, so a BOS the template writes out becomes the
        # BOS token by itself; add one only when the model wants it and the template did not write it.
        bos_text = self._token_text(self.llm.token_bos())
        wants_bos = self._wants_bos() and not (bos_text and template.before_query.startswith(bos_text))
        bos = [self.llm.token_bos()] if wants_bos else []
        self.builder = PromptBuilder(
            template, self._tokenize, n_ctx=n_ctx, bos=bos, max_document_tokens=max_document_tokens
        )
        self.answers = AnswerTokens.from_tokenizer(self._tokenize)
        self._in_context: list[int] = []  # the tokens whose KV cells are in the context now

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _wants_bos(self) -> bool:
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    def _prompt_template(self) -> PromptTemplate:
        """The model's own chat template from the GGUF metadata; ChatML when it carries none."""
        source = self.llm.metadata.get("tokenizer.chat_template")
        if not source:
            return CHATML_TEMPLATE
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template=source,
            eos_token=self._token_text(self.llm.token_eos()),
            bos_token=self._token_text(self.llm.token_bos()),
            add_generation_prompt=True,
        )
        return PromptTemplate.from_rendered(formatter(messages=sentinel_messages()).prompt)

    def next_token_logits(self, ids: list[int]) -> tuple[list[float], int]:
        """Logits after ``ids`` and how many tokens ran: only those not already in the KV cache."""
        import numpy as np

        n_keep = common_prefix_len(self._in_context, ids) if self.reuse_prefix else 0
        # At least one token must run to produce fresh logits, even when the whole prompt is cached.
        n_keep = min(n_keep, len(ids) - 1)
        self.llm.n_tokens = n_keep  # Llama.eval removes the KV cells from n_tokens on before decoding
        self._in_context = []  # if eval raises, the context is in an unknown state: trust nothing of it
        self.llm.eval(ids[n_keep:])
        self._in_context = list(ids)
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return logits, len(ids) - n_keep

    def score_pairs(self, pairs: Iterable[Pair]) -> Iterator[Score]:
        for pair in pairs:
            watch = Stopwatch()
            prompt = self.builder.build(pair.query, pair.document)
            ids = prompt.ids
            logits, evaluated = self.next_token_logits(ids)
            p, mass = p_relevant_from_logits(logits, self.answers)
            score = Score(
                pair_id=pair.pair_id,
                p_relevant=p,
                truncated=prompt.truncated,
                seconds=watch.elapsed(),
                prompt_tokens=len(ids),
                evaluated_tokens=evaluated,
                yes_no_mass=mass,
            )
            self._account(score)
            yield score

    def close(self) -> None:
        self.llm.close()
