"""MLX backend (mlx-lm): Apple Silicon, 4-bit MLX checkpoints in unified memory.

Same scheme as llama.cpp (:class:`annotator.backends.base.KVCacheBackend`): one forward pass per pair over
the tokens not already in the KV cache. The prompt cache holds the tokens of the previous pair; before a
pair we trim it back to the common prefix (``trim_prompt_cache``) and run only the rest, so a query's
template + query are computed once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from annotator.backends.base import KVCacheBackend, PromptTokenizer

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray


class MLXBackend(KVCacheBackend):
    name = "mlx"

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        max_document_tokens: int = 3072,
        prompt_version: str | None = None,
    ) -> None:
        from mlx_lm import load  # lazy: the [mlx] extra, Apple Silicon

        # mlx-lm's model and tokenizer wrapper: typed only as far as mlx-lm itself is.
        self.model: Any
        self.tokenizer: Any
        self.model, self.tokenizer = load(str(model_path))
        self.cache = self._new_cache()
        super().__init__(
            PromptTokenizer.from_hugging_face(self.tokenizer, prompt_version),
            n_ctx=n_ctx,
            max_document_tokens=max_document_tokens,
        )

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return list(make_prompt_cache(self.model))

    def _forward(self, ids: list[int], *, keep: int, cached: int) -> NDArray[np.float32]:
        import mlx.core as mx
        import numpy as np
        from mlx_lm.models.cache import trim_prompt_cache

        if cached > keep:
            trim_prompt_cache(self.cache, cached - keep)
        try:
            logits = self.model(mx.array(ids[keep:])[None], cache=self.cache)[0, -1]
            mx.eval(logits)
        except BaseException:
            # A half-updated cache would silently corrupt every later pair: start from an empty one.
            self.cache = self._new_cache()
            raise
        return np.array(logits.astype(mx.float32))
