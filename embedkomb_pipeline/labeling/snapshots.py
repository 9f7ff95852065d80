"""Label snapshots pulled from kombinat, and the statistics the checks judge them by."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from embedkomb_pipeline.labeling.agreement import cohens_kappa
from embedkomb_pipeline.labeling.kombinat_client import KombinatAdminClient

LABEL_SCHEMA = {
    "label_id": pl.Int64,
    "pair_id": pl.String,
    "contributor_id": pl.Int64,
    "relevant": pl.Boolean,
    "p_relevant": pl.Float64,
    "grade": pl.Int64,
    "truncated": pl.Boolean,
    "backend": pl.String,
    "model_id": pl.String,
    "quantization": pl.String,
    "annotator_version": pl.String,
    "created_at": pl.String,
    "quarantined": pl.Boolean,
    "split": pl.String,
    "cycle": pl.String,
}


@dataclass
class SnapshotResult:
    new_labels: int
    total_labels: int
    cursor: str | None
    path: Path


def _atomic_parquet(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)


def pull_labels(
    client: KombinatAdminClient, split: str, cycle: str, directory: Path, page_size: int = 1000
) -> SnapshotResult:
    """Fetch the labels since the stored cursor, append them as a part, and rewrite the snapshot.

    A part is named after the cursor it starts from, so a retry after a crash rewrites the same part;
    the snapshot is de-duplicated on label_id, so nothing is ever counted twice.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cursor_file = directory / "cursor.json"
    cursor = json.loads(cursor_file.read_text())["cursor"] if cursor_file.exists() else None
    new = 0
    while True:
        labels, next_cursor = client.labels_page(cursor, page_size, split=split, cycle=cycle)
        if not labels:
            break
        part = directory / f"part-{re.sub(r'[^0-9A-Za-z]+', '_', cursor or 'start')}.parquet"
        _atomic_parquet(pl.DataFrame(labels, schema=LABEL_SCHEMA), part)
        new += len(labels)
        cursor = next_cursor
        cursor_file.write_text(json.dumps({"cursor": cursor}))
    parts = sorted(directory.glob("part-*.parquet"))
    snapshot = directory / "labels.parquet"
    frame = (
        pl.concat([pl.read_parquet(p) for p in parts]).unique("label_id").sort("label_id")
        if parts
        else pl.DataFrame(schema=LABEL_SCHEMA)
    )
    _atomic_parquet(frame, snapshot)
    return SnapshotResult(new, frame.height, cursor, snapshot)


def per_model_stats(labels: pl.DataFrame) -> list[dict]:
    """Labels, share judged relevant and mean P(relevant) per (backend, model, quantization)."""
    if labels.height == 0:
        return []
    return (
        labels.group_by("backend", "model_id", "quantization")
        .agg(
            pl.len().alias("labels"),
            pl.col("relevant").mean().alias("relevant_rate"),
            pl.col("p_relevant").mean().alias("mean_p_relevant"),
            pl.col("quarantined").sum().alias("quarantined"),
            pl.col("contributor_id").n_unique().alias("contributors"),
        )
        .sort("labels", descending=True)
        .to_dicts()
    )


def contributor_kappas(labels: pl.DataFrame, min_overlap: int = 10) -> list[dict]:
    """Cohen's κ for every two contributors who labeled at least min_overlap of the same pairs.

    One careless or malicious labeler shows up as low κ against everyone else, even when pairs collect
    more labels than two (quarantined labels excluded: they already count for nothing).
    """
    usable = (
        labels.filter(~pl.col("quarantined"))
        .sort("label_id")
        .unique(["pair_id", "contributor_id"], keep="first")
        .select("pair_id", "contributor_id", "relevant")
    )
    joined = usable.join(usable, on="pair_id", suffix="_b").filter(
        pl.col("contributor_id") < pl.col("contributor_id_b")
    )
    out = []
    for (a, b), group in joined.group_by("contributor_id", "contributor_id_b"):
        if group.height >= min_overlap:
            kappa = cohens_kappa(group["relevant"].to_list(), group["relevant_b"].to_list())
            out.append({"contributor_a": a, "contributor_b": b, "kappa": kappa, "shared_pairs": group.height})
    return sorted(out, key=lambda row: (row["kappa"], row["contributor_a"], row["contributor_b"]))


# A label's model configuration: what makes two labels independent evidence or one opinion twice. The
# annotator_version ends in the prompt version ("0.1.0+p1"), so it separates wordings too.
MODEL_CONFIG = ("model_id", "quantization", "annotator_version")


def _first_two_votes(labels: pl.DataFrame) -> pl.DataFrame:
    """Per pair labeled by two or more contributors (quarantine excluded): the first two verdicts, and whether
    they came from the same model configuration."""
    usable = (
        labels.filter(~pl.col("quarantined"))
        .sort("label_id")
        .unique(["pair_id", "contributor_id"], keep="first", maintain_order=True)
        .with_columns(pl.concat_str([pl.col(c).fill_null("") for c in MODEL_CONFIG], separator="|").alias("config"))
    )
    return (
        usable.group_by("pair_id", maintain_order=True)
        .agg(pl.col("relevant").head(2).alias("votes"), pl.col("config").head(2).alias("configs"))
        .filter(pl.col("votes").list.len() == 2)
        .with_columns((pl.col("configs").list.get(0) == pl.col("configs").list.get(1)).alias("same_config"))
    )


def _kappa_of(doubled: pl.DataFrame) -> float | None:
    if doubled.height == 0:
        return None
    votes = doubled["votes"].to_list()
    return cohens_kappa([v[0] for v in votes], [v[1] for v in votes])


def pairwise_kappa(labels: pl.DataFrame) -> tuple[float | None, int]:
    """κ between the first two contributors' labels on every pair labeled by two or more (quarantine excluded)."""
    doubled = _first_two_votes(labels)
    return _kappa_of(doubled), doubled.height


def kappa_by_model_config(labels: pl.DataFrame) -> dict[str, dict[str, float | int | None]]:
    """The same κ, split by whether the two labels came from one model configuration or two.

    Two copies of one deterministic model agree (κ 1.0) by construction: that checks the contributors (broken or
    dishonest ones disagree), not the relevance. Only agreement between different configurations is
    independent evidence about relevance.
    """
    doubled = _first_two_votes(labels)
    out: dict[str, dict[str, float | int | None]] = {}
    for key, same in (("same_model_config", True), ("different_model_configs", False)):
        part = doubled.filter(pl.col("same_config") == same)
        out[key] = {"kappa": _kappa_of(part), "pairs": part.height}
    return out
