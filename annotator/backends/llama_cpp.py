"""llama.cpp backend (llama-cpp-python): GGUF models on the CPU (or any GPU llama.cpp was built for).

One forward pass per pair, and the KV cache of the prefix shared by consecutive pairs is kept
(:class:`annotator.backends.base.KVCacheBackend`): ``n_tokens = keep`` makes ``Llama.eval`` drop the KV cells
after the common prefix, and only the rest is evaluated. With pairs grouped by query, the template + query
run once per query instead of once per pair.

``logits_all`` stays off: we read only the last position's logits (``llama_get_logits_ith(ctx, -1)``), and
computing the 150k-way output layer for every prompt token would cost more than the rest of a small model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from annotator.backends.base import KVCacheBackend, PromptTokenizer
from annotator.prompt import PromptTemplate, PromptVersion, chatml_template, get_prompt

if TYPE_CHECKING:
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_types import ChatCompletionRequestMessage
    from numpy.typing import NDArray


def default_threads() -> int:
    # llama-cpp-python defaults to half the cores; a volunteer who starts us wants all the cores we may use.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(KVCacheBackend):
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
        prompt_version: str | None = None,
    ) -> None:
        import llama_cpp  # lazy: only volunteers on this backend have it installed

        self.llm: Llama = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads or default_threads(),
            n_gpu_layers=n_gpu_layers,
            logits_all=False,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        prompt = get_prompt(prompt_version)
        template = self._prompt_template(prompt)
        # Template text is tokenized with special tokens on, so a BOS the template writes out becomes the
        # BOS token by itself; add one only when the model wants it and the template did not write it.
        bos_text = self.token_text(self.llm.token_bos())
        wants_bos = self._wants_bos() and not (bos_text and template.before_query.startswith(bos_text))
        bos = (self.llm.token_bos(),) if wants_bos else ()
        super().__init__(
            PromptTokenizer(template, self._tokenize, bos, prompt),
            n_ctx=n_ctx,
            max_document_tokens=max_document_tokens,
            reuse_prefix=reuse_prefix,
        )

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def token_text(self, token: int) -> str:
        """How the vocabulary spells one token, special tokens included."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _wants_bos(self) -> bool:
        return self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"

    def _prompt_template(self, prompt: PromptVersion) -> PromptTemplate:
        """The model's own chat template from the GGUF metadata; ChatML when it carries none."""
        source = self.llm.metadata.get("tokenizer.chat_template")
        if not source:
            return chatml_template(prompt.version)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template=source,
            eos_token=self.token_text(self.llm.token_eos()),
            bos_token=self.token_text(self.llm.token_bos()),
            add_generation_prompt=True,
        )
        return PromptTemplate.from_rendered(formatter(messages=_sentinel_chat(prompt)).prompt)

    def _forward(self, ids: list[int], *, keep: int, cached: int) -> NDArray[np.float32]:
        import llama_cpp
        import numpy as np

        self.llm.n_tokens = keep  # Llama.eval removes the KV cells from n_tokens on before decoding
        self.llm.eval(ids[keep:])
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self.llm.close()


def _sentinel_chat(prompt: PromptVersion) -> list[ChatCompletionRequestMessage]:
    """The sentinel prompt as llama-cpp-python's typed chat messages (it renders only system and user turns)."""
    chat: list[ChatCompletionRequestMessage] = []
    for message in prompt.sentinel_messages():
        if message["role"] == "system":
            chat.append({"role": "system", "content": message["content"]})
        elif message["role"] == "user":
            chat.append({"role": "user", "content": message["content"]})
        else:
            raise ValueError(f"the prompt has a {message['role']!r} message that llama.cpp's formatter cannot take")
    return chat
