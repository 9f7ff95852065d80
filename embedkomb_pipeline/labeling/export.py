"""Verified pairs as a Hugging Face dataset: data/<split>/<cycle>.parquet plus a README dataset card.

One config per split, every cycle's file in it, so `load_dataset(path_or_repo, "<split>")` returns all
verified pairs of a split so far. The card is rebuilt from the files on every export.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import polars as pl

EXPORT_SCHEMA: dict[str, pl.DataType] = {
    "query": pl.String(),
    "document": pl.String(),
    "label": pl.Boolean(),
    "p_relevant": pl.Float64(),
    "n_labels": pl.Int64(),
    "agreement": pl.Float64(),
    "status": pl.String(),
    "pair_id": pl.String(),
    "split": pl.String(),
    "cycle": pl.String(),
    "models": pl.List(pl.String()),
}

# what each source's texts may be used for: the card must say it
SOURCE_LICENSES = {
    "scifact": ("cc-by-nc-2.0", "SciFact (AllenAI; abstracts from S2ORC), CC BY-NC 2.0: non-commercial use only"),
    "nfcorpus": ("other", "NFCorpus (Boteva et al., ECIR 2016): free for academic use; NutritionFacts.org terms"),
    "nomic": ("apache-2.0", "nomic-ai/nomic-embed-unsupervised-data, Apache 2.0 (texts keep their sources' terms)"),
}


@dataclass
class ExportResult:
    path: Path
    rows: int
    relevant: int
    mean_agreement: float | None
    models: list[str]


def write_verified(rows: Iterable[dict], root: Path, split: str, cycle: str) -> ExportResult:
    """Write one split × cycle file (replacing it: re-exports never duplicate) and rebuild the card."""
    frame = (
        pl.DataFrame([{name: row.get(name) for name in EXPORT_SCHEMA} for row in rows], schema=EXPORT_SCHEMA)
        .unique("pair_id", keep="last")
        .sort("pair_id")
    )
    out = root / "data" / split / f"{cycle}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    frame.write_parquet(tmp)
    tmp.replace(out)
    write_card(root)
    models = sorted({m for ms in frame["models"].to_list() for m in (ms or [])})
    # Series.mean is annotated for every dtype; a Float64 column's mean is a float, or None when all are null
    agreement = cast("float | None", frame["agreement"].mean()) if frame.height else None
    return ExportResult(out, frame.height, int(frame["label"].sum() or 0), agreement, models)


def _license_for(split: str) -> tuple[str, str]:
    for prefix, value in SOURCE_LICENSES.items():
        if split.startswith(prefix):
            return value
    return SOURCE_LICENSES["nomic"]


class _SplitSummary(TypedDict):
    split: str
    cycles: list[str]
    pairs: int
    relevant: int
    mean_agreement: float | None
    models: list[str]


def write_card(root: Path) -> Path:
    """README.md with the YAML header `datasets` reads (configs, license) and a human summary."""
    splits = sorted(p.name for p in (root / "data").iterdir() if p.is_dir()) if (root / "data").exists() else []
    summary: list[_SplitSummary] = []
    licenses = set()
    for split in splits:
        frame = pl.read_parquet(root / "data" / split / "*.parquet")
        licenses.add(_license_for(split))
        summary.append(
            {
                "split": split,
                "cycles": sorted(frame["cycle"].unique().to_list()),
                "pairs": frame.height,
                "relevant": int(frame["label"].sum() or 0),
                # Series.mean is annotated for every dtype; a Float64 column's mean is a float
                "mean_agreement": round(cast(float, frame["agreement"].mean()), 4) if frame.height else None,
                "models": sorted({m for ms in frame["models"].to_list() for m in (ms or [])}),
            }
        )
    license_ids = sorted({lic for lic, _ in licenses}) or ["other"]
    header = [
        "---",
        f"license: {license_ids[0] if len(license_ids) == 1 else 'other'}",
        "language:",
        "- en",
        "task_categories:",
        "- sentence-similarity",
        "- text-retrieval",
        "tags:",
        "- embeddings",
        "- llm-verified",
        "configs:",
    ]
    for split in splits:
        header += [f"- config_name: {split}", "  data_files:", "  - split: train", f"    path: data/{split}/*.parquet"]
    header.append("---")
    lines = [
        "# Embed Kombinat — LLM-verified (query, document) pairs",
        "",
        "Candidate pairs mined per domain split (BM25 + dense retrieval fused by RRF), judged by small language",
        'models on volunteers\' machines ("does this document answer this query?", P(yes) from next-token',
        "log-probabilities), and kept only where at least two independent contributors in good standing agree.",
        "Honeypots with human judgments screen every contributor; quarantined labels never count.",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("<this repo or folder>", "{splits[0] if splits else "<split>"}", split="train")',
        "```",
        "",
        "## Columns",
        "",
        "| column | meaning |",
        "|---|---|",
        "| query, document | the texts, Unicode-normalized |",
        "| label | the agreed verdict: true = the document answers the query |",
        "| p_relevant | mean P(relevant) over the agreeing labels |",
        "| n_labels | labels that counted |",
        "| agreement | share of those labels that agree with the verdict |",
        "| status | verification status (verified) |",
        "| pair_id | uuid5(namespace, query + doc_id + source dataset): stable across releases |",
        "| split, cycle | domain split and pipeline cycle (c000, c001, …) |",
        "| models | backend/model/quantization of the labels that counted |",
        "",
        "## Contents",
        "",
        "| split | cycles | pairs | relevant | mean agreement | labeling models |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['split']} | {', '.join(s['cycles'])} | {s['pairs']} | {s['relevant']} | {s['mean_agreement']} "
            f"| {', '.join(s['models'])} |"
        )
    lines += ["", "## Sources and licenses", ""] + [f"- {text}" for _, text in sorted(licenses)]
    lines += ["", "<!-- summary: " + json.dumps(summary) + " -->", ""]
    card = root / "README.md"
    card.write_text("\n".join([*header, "", *lines]), encoding="utf-8")
    return card


def push_to_hub(root: Path, repo_id: str, token: str, endpoint: str | None = None, private: bool = False) -> str:
    """Create the dataset repository if needed and upload the folder in one commit; returns the commit URL."""
    from embedkomb_pipeline.hub import folder_files, upload_files

    upload = upload_files(
        folder_files(root), repo_id, token, repo_type="dataset", message="Embed Kombinat verified export",
        endpoint=endpoint, private=private,
    )  # fmt: skip
    return upload.commit_url
