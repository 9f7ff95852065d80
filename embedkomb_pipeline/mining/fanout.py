"""Embedding a split in shards that separate processes compute in parallel, before one step mines.

On a CPU the encoder is mining's bottleneck by two orders of magnitude (about 110 texts/s on 2 cores), so a
large split's texts are cut into ``shard_count`` disjoint slices and each slice is embedded by its own Dagster
step (or run, or machine sharing the cache folder). Every step adds its vectors to the embedding cache as new
Parquet shards — the cache only ever adds files, under a temporary name renamed into place, so concurrent
writers need no lock. The mining step then finds every vector in the cache and embeds nothing.

Which texts a shard holds depends only on the source pairs: the split's unique documents (doc_id order) and
then its unique queries (query_id order), keyed as mine_split keys them, cut into contiguous slices of equal
size. Vectors do not depend on which shard computed them beyond float rounding of the batch they were encoded
in, and tests/pipeline/test_mining_fanout.py checks that 2 shards give the same candidates as 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from embedkomb_pipeline.ids import text_hash
from embedkomb_pipeline.mining.embedding import DenseEncoder, EmbeddingCache


@dataclass(frozen=True)
class EmbeddingShardReport:
    """What one shard did: its slice of the split's texts and how many of them it had to embed."""

    shard_index: int
    shard_count: int
    texts: int  # unique texts in this shard (documents and queries)
    documents: int
    queries: int
    embedded: int  # cache misses: texts this shard encoded
    cached: int  # cache hits: texts some earlier run (or another shard) had embedded already
    seconds: float


def split_texts(source_pairs: Path) -> tuple[list[str], list[str], int]:
    """The split's texts to embed, as (cache keys, texts, number of documents): documents first, each once."""
    frame = pl.read_parquet(source_pairs, columns=["doc_id", "document", "query"])
    if frame.height == 0:
        raise ValueError(f"{source_pairs} holds no source pairs: nothing to embed")
    docs = frame.select("doc_id", "document").unique(subset="doc_id").sort("doc_id")
    hashes: list[str] = docs["doc_id"].to_list()
    texts: list[str] = docs["document"].to_list()
    seen = set(hashes)
    # queries are keyed by the hash of their text (as mine_split embeds them); one that is also a document
    # text is that document's vector already
    for query in frame["query"].unique().sort().to_list():
        key = text_hash(query)
        if key not in seen:
            seen.add(key)
            hashes.append(key)
            texts.append(query)
    return hashes, texts, docs.height


def shard_bounds(n_texts: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of ``n_texts`` that shard ``shard_index`` of ``shard_count`` owns."""
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    edges = np.linspace(0, n_texts, shard_count + 1).round().astype(int)
    return int(edges[shard_index]), int(edges[shard_index + 1])


def embed_split_shard(
    source_pairs: Path,
    shard_index: int,
    shard_count: int,
    encoder: DenseEncoder,
    cache: EmbeddingCache,
    show_progress: bool = False,
) -> EmbeddingShardReport:
    """Embed shard ``shard_index`` of ``shard_count`` of the split's texts into the cache (what is not there)."""
    started = time.perf_counter()
    hashes, texts, n_documents = split_texts(source_pairs)
    start, stop = shard_bounds(len(hashes), shard_index, shard_count)
    hits_before, misses_before = cache.stats.hits, cache.stats.misses
    cache.embed(encoder, texts[start:stop], hashes[start:stop], show_progress=show_progress)
    documents = max(0, min(stop, n_documents) - start)
    return EmbeddingShardReport(
        shard_index=shard_index,
        shard_count=shard_count,
        texts=stop - start,
        documents=documents,
        queries=stop - start - documents,
        embedded=cache.stats.misses - misses_before,
        cached=cache.stats.hits - hits_before,
        seconds=time.perf_counter() - started,
    )
