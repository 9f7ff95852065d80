"""Source pairs: the known (query, document) positives of one domain split, normalized, de-duplicated, keyed.

Two origins share one output format:
- the Hub dataset `nomic-ai/nomic-embed-unsupervised-data` (29 domain splits, ~235M rows; parquet files
  `data/<split>-NNNNN-of-NNNNN.parquet` with columns query, document, dataset, shard), read file by file;
- sample splits derived from the real BEIR data in the configured data folder (SciFact titles → abstracts
  is shaped like the source's `s2orc_title_abstract`; NFCorpus titles → texts is a medical one).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from embedkomb_pipeline.ids import normalize_text, text_hash
from embedkomb_pipeline.sources.beir import iter_jsonl, resolve_beir_root

HUB_REPO_ID = "nomic-ai/nomic-embed-unsupervised-data"
HUB_DATA_DIR = "data"
_HUB_FILE = re.compile(rf"^{HUB_DATA_DIR}/(?P<split>.+?)-\d{{5}}-of-\d{{5}}\.parquet$")

SOURCE_PAIRS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("query", pa.large_string()),
        ("document", pa.large_string()),
        ("source_dataset", pa.string()),
        ("split", pa.string()),
    ]
)


@dataclass(frozen=True)
class SampleSplit:
    """A weakly-supervised split derived from a local BEIR corpus: each document's title → its text."""

    name: str
    beir_name: str
    description: str


SAMPLE_SPLITS: dict[str, SampleSplit] = {
    s.name: s
    for s in (
        SampleSplit(
            "scifact_title_abstract",
            "scifact",
            "SciFact paper titles → abstracts (like s2orc_title_abstract)",
        ),
        SampleSplit("nfcorpus_title_abstract", "nfcorpus", "NFCorpus article titles → texts (medical)"),
    )
}


class UnknownSplitError(KeyError):
    def __init__(self, split: str, known: Iterable[str]) -> None:
        self.split = split
        self.known = sorted(known)
        super().__init__(f"unknown split {split!r}; known splits: {', '.join(self.known) or 'none'}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class SourceStats:
    rows_read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    rows_written: int = 0
    unique_queries: int = 0
    unique_documents: int = 0

    def as_metadata(self) -> dict[str, int]:
        return dict(self.__dict__)


RawBatch = dict[str, list[str]]  # columns query, document, dataset


def iter_sample_split(split: str, location: str | Path) -> Iterator[RawBatch]:
    """Raw (title, text) pairs of a sample split, straight from corpus.jsonl, in file order.

    location is the BEIR folder (or a data folder holding it by name), or a Hub dataset id.
    """
    spec = SAMPLE_SPLITS.get(split)
    if spec is None:
        raise UnknownSplitError(split, SAMPLE_SPLITS)
    location_path = Path(location)
    if location_path.is_dir() and not (location_path / "corpus.jsonl").exists():
        location_path = location_path / spec.beir_name
    root = resolve_beir_root(location_path if location_path.is_dir() else str(location))
    corpus_path = next(p for p in (root / "corpus.jsonl", root / "corpus.jsonl.gz") if p.exists())
    batch: RawBatch = {"query": [], "document": [], "dataset": []}
    for _, obj in iter_jsonl(corpus_path):
        batch["query"].append(str(obj.get("title") or ""))
        batch["document"].append(str(obj.get("text") or ""))
        batch["dataset"].append(spec.beir_name)
        if len(batch["query"]) >= 10_000:
            yield batch
            batch = {"query": [], "document": [], "dataset": []}
    if batch["query"]:
        yield batch


def list_hub_splits(repo_files: Iterable[str]) -> dict[str, list[str]]:
    """split name → its parquet files (sorted), from the repository's file listing."""
    splits: dict[str, list[str]] = {}
    for name in repo_files:
        match = _HUB_FILE.match(name)
        if match:
            splits.setdefault(match["split"], []).append(name)
    return {split: sorted(files) for split, files in splits.items()}


def iter_hub_split(
    split: str,
    repo_id: str = HUB_REPO_ID,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    batch_rows: int = 50_000,
) -> Iterator[RawBatch]:
    """Stream one split of the unsupervised source dataset, one parquet file and row group at a time.

    With local_dir, reads a directory laid out like the Hub repository (an offline mirror); otherwise lists
    the repository and downloads each file through huggingface_hub's cache.
    """
    if local_dir is not None:
        base = Path(local_dir)
        files = [p.relative_to(base).as_posix() for p in sorted((base / HUB_DATA_DIR).glob("*.parquet"))]
        fetch: Callable[[str], str] = lambda name: str(base / name)  # noqa: E731
    else:
        from huggingface_hub import HfApi, hf_hub_download

        files = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision)
        fetch = lambda name: hf_hub_download(repo_id, name, repo_type="dataset", revision=revision)  # noqa: E731
    splits = list_hub_splits(files)
    if split not in splits:
        raise UnknownSplitError(split, splits)
    for name in splits[split]:
        parquet = pq.ParquetFile(fetch(name))
        missing = {"query", "document"} - set(parquet.schema_arrow.names)
        if missing:
            raise ValueError(f"{name}: missing column(s) {sorted(missing)}; found {parquet.schema_arrow.names}")
        columns = ["query", "document"] + (["dataset"] if "dataset" in parquet.schema_arrow.names else [])
        for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            data = record_batch.to_pydict()
            if "dataset" not in data:
                data["dataset"] = [split] * record_batch.num_rows
            yield {"query": data["query"], "document": data["document"], "dataset": data["dataset"]}


def write_source_pairs(raw_batches: Iterable[RawBatch], split: str, out_path: Path) -> SourceStats:
    """Normalize, drop empty texts, key by text hash, de-duplicate (query_id, doc_id), and write sorted Parquet.

    Sorting by (query_id, doc_id) makes the file byte-identical on every re-run. The de-duplication runs in
    polars' streaming engine over a spill file, so a split larger than memory still works.
    """
    stats = SourceStats()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        spill = Path(tmp) / "normalized.parquet"
        with pq.ParquetWriter(spill, SOURCE_PAIRS_SCHEMA) as writer:
            for batch in raw_batches:
                columns: dict[str, list[str]] = {name: [] for name in SOURCE_PAIRS_SCHEMA.names}
                for query, document, dataset in zip(batch["query"], batch["document"], batch["dataset"], strict=True):
                    stats.rows_read += 1
                    query_n = normalize_text(query or "")
                    document_n = normalize_text(document or "")
                    if not query_n or not document_n:
                        stats.empty_dropped += 1
                        continue
                    columns["query_id"].append(text_hash(query_n))
                    columns["doc_id"].append(text_hash(document_n))
                    columns["query"].append(query_n)
                    columns["document"].append(document_n)
                    columns["source_dataset"].append(str(dataset or split))
                    columns["split"].append(split)
                if columns["query_id"]:
                    writer.write_table(pa.table(columns, schema=SOURCE_PAIRS_SCHEMA))
        deduplicated = (
            pl.scan_parquet(spill)
            .unique(subset=["query_id", "doc_id"], keep="first", maintain_order=True)
            .sort(["query_id", "doc_id"])
        )
        tmp_out = Path(tmp) / "out.parquet"
        deduplicated.sink_parquet(tmp_out)
        counts = (
            pl.scan_parquet(tmp_out)
            .select(
                pl.len().alias("rows"),
                pl.col("query_id").n_unique().alias("queries"),
                pl.col("doc_id").n_unique().alias("docs"),
            )
            .collect()
        )
        tmp_out.replace(out_path)
    stats.rows_written = int(counts["rows"][0])
    stats.unique_queries = int(counts["queries"][0])
    stats.unique_documents = int(counts["docs"][0])
    stats.duplicates_dropped = stats.rows_read - stats.empty_dropped - stats.rows_written
    return stats
