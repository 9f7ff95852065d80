from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from embedkomb_pipeline.ids import normalize_text, text_hash
from embedkomb_pipeline.sources.pairs import (
    UnknownSplitError,
    iter_hub_split,
    iter_sample_split,
    list_hub_splits,
    write_source_pairs,
)
from tests.pipeline.conftest import scifact_rows, write_hub_mirror


def test_hub_file_listing_maps_files_to_splits() -> None:
    files = [
        "README.md",
        "data/reddit_title_body-00001-of-00002.parquet",
        "data/reddit_title_body-00000-of-00002.parquet",
        "data/s2orc_title_abstract-00000-of-00001.parquet",
    ]
    assert list_hub_splits(files) == {
        "reddit_title_body": [
            "data/reddit_title_body-00000-of-00002.parquet",
            "data/reddit_title_body-00001-of-00002.parquet",
        ],
        "s2orc_title_abstract": ["data/s2orc_title_abstract-00000-of-00001.parquet"],
    }


def test_hub_loader_reads_a_local_mirror_laid_out_like_the_hub(shared_data: Path, tmp_path: Path) -> None:
    rows = scifact_rows(shared_data, 50)
    mirror = write_hub_mirror(tmp_path, "s2orc_title_abstract", rows, files=3)
    batches = list(iter_hub_split("s2orc_title_abstract", local_dir=mirror))
    assert sum(len(b["query"]) for b in batches) == 50
    assert batches[0]["query"][0] == rows["query"][0]
    assert set(batches[0]["dataset"]) == {"scifact"}


def test_unknown_hub_split_names_the_known_ones(shared_data: Path, tmp_path: Path) -> None:
    mirror = write_hub_mirror(tmp_path, "s2orc_title_abstract", scifact_rows(shared_data, 4), files=1)
    with pytest.raises(UnknownSplitError, match="unknown split 'reddit'; known splits: s2orc_title_abstract"):
        list(iter_hub_split("reddit", local_dir=mirror))


def test_unknown_sample_split_is_refused(shared_data: Path) -> None:
    with pytest.raises(UnknownSplitError, match="scifact_title_abstract"):
        list(iter_sample_split("nope", shared_data))


def test_sample_split_is_scifact_titles_to_abstracts(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs.parquet"
    stats = write_source_pairs(iter_sample_split("scifact_title_abstract", shared_data), "scifact_title_abstract", out)
    assert stats.rows_read == 5183
    assert stats.rows_written == stats.unique_documents == 5183
    frame = pl.read_parquet(out)
    assert frame.columns == ["query_id", "doc_id", "query", "document", "source_dataset", "split"]
    first = frame.row(0, named=True)
    assert first["query_id"] == text_hash(first["query"])
    assert first["doc_id"] == text_hash(first["document"])


def test_empty_texts_are_dropped_and_duplicates_collapsed(tmp_path: Path) -> None:
    raw = {
        "query": ["What is A?", "   ", "What is A?", "What  is A?", "What is B?", "Q"],
        "document": ["A is a letter.", "orphan", "A is a letter.", "A is a letter. ", "B too.", "\n\t "],
        "dataset": ["x"] * 6,
    }
    out = tmp_path / "pairs.parquet"
    stats = write_source_pairs([raw], "toy", out)
    # "   " query and whitespace-only document dropped; three spellings of (A, A) collapse to one
    assert stats.as_metadata() == {
        "rows_read": 6,
        "empty_dropped": 2,
        "duplicates_dropped": 2,
        "rows_written": 2,
        "unique_queries": 2,
        "unique_documents": 2,
    }
    frame = pl.read_parquet(out)
    assert sorted(frame["query"].to_list()) == ["What is A?", "What is B?"]


def test_rewriting_the_same_input_gives_identical_bytes(shared_data: Path, tmp_path: Path) -> None:
    rows = scifact_rows(shared_data, 100)
    write_source_pairs([rows], "s", tmp_path / "a.parquet")
    write_source_pairs([rows], "s", tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_normalized_text_is_what_gets_stored() -> None:
    assert normalize_text("  Tabs\tand\u00a0spaces ") == "Tabs and spaces"
