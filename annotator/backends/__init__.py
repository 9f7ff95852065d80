"""Scoring backends behind one interface (:class:`annotator.backends.base.Backend`).

Each backend module imports its model library lazily, inside the constructor, so that importing
``annotator.backends`` costs nothing and works on a base install.
"""

from __future__ import annotations

from pathlib import Path

from annotator.backends.base import Backend, ModelMeta, Pair, Score, order_pairs

BACKENDS = ("vllm", "mlx", "llama_cpp")
# The Python module each backend needs; `doctor` checks them with importlib.util.find_spec (no import).
BACKEND_MODULES = {"llama_cpp": "llama_cpp", "vllm": "vllm", "mlx": "mlx_lm"}
BACKEND_EXTRAS = {"llama_cpp": "cpu", "vllm": "gpu", "mlx": "mlx"}


def load_backend(
    name: str,
    model_path: str | Path,
    *,
    quantization: str = "",
    n_threads: int | None = None,
    prompt_version: str | None = None,
    max_document_tokens: int | None = None,
) -> Backend:
    """Construct the named backend on a local model file (GGUF) or directory (HF/MLX checkpoint).

    ``prompt_version`` is the wording the model's registry entry names (default p1). ``max_document_tokens``
    caps each document (None: the backend's default); a cut document's label is marked truncated.
    ``n_threads`` (CPU threads; None: all this process may use) is llama.cpp's alone: vLLM and MLX run on
    the accelerator and ignore it.
    """
    if name == "llama_cpp":
        from annotator.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(
            model_path,
            n_threads=n_threads,
            prompt_version=prompt_version,
            max_document_tokens=max_document_tokens or 1536,
        )
    if name == "vllm":
        from annotator.backends.vllm import VLLMBackend

        return VLLMBackend(
            str(model_path),
            quantization=quantization,
            prompt_version=prompt_version,
            max_document_tokens=max_document_tokens or 3072,
        )
    if name == "mlx":
        from annotator.backends.mlx import MLXBackend

        return MLXBackend(model_path, prompt_version=prompt_version, max_document_tokens=max_document_tokens or 3072)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "ModelMeta", "Pair", "Score", "load_backend", "order_pairs"]
