"""Labels made by one qualified labeler over the hardest mined candidates of a split, kept as a small artifact.

kombinat and the volunteers label pairs one batch at a time; a training experiment needs thousands of labels
now, made the same way every time. This module runs the annotator's own llama.cpp backend — the model, prompt
version and calibration that kombinat's registry would name — over the top-ranked mined candidates of chosen
queries, and keeps the result as a Parquet file of ids and scores (no texts: the ids are text hashes of the
split's source pairs). The training benchmark and the pipeline read that file instead of relabeling.

The file is also the resume point: it is rewritten (atomically) every ``save_every`` pairs, and a run skips the
pairs it already holds, so a labeling run of hours can stop at any moment and go on in a later session.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from embedkomb_pipeline.evaluation.label_quality import PlattCalibration

LABEL_SCHEMA: dict[str, pl.DataType] = {
    "pair_id": pl.String(),
    "split": pl.String(),
    "query_id": pl.String(),
    "doc_id": pl.String(),
    "rank": pl.Int32(),
    "p_raw": pl.Float64(),
    "p_calibrated": pl.Float64(),
    "label": pl.Boolean(),
    "labeler": pl.String(),
    "model_sha256": pl.String(),
    "prompt_version": pl.String(),
    "calibration": pl.String(),  # the registry form, JSON
    "max_document_tokens": pl.Int32(),
    "truncated": pl.Boolean(),
    "seconds": pl.Float64(),
}
# What must be the same for labels in one file to be comparable: one labeler, one wording, one calibration.
IDENTITY_COLUMNS = ("labeler", "model_sha256", "prompt_version", "calibration", "max_document_tokens")


class OfflineLabelError(ValueError):
    """The labeler description or a label file is unusable; the message says which and why."""


@dataclass(frozen=True)
class OfflineLabeler:
    """One (model file, prompt version, calibration): what a label's verdict depends on."""

    name: str  # the registry name, e.g. qwen2.5-coder-1.5b-q4_k_m
    path: Path
    sha256: str
    prompt_version: str
    calibration: PlattCalibration

    def identity(self, max_document_tokens: int) -> dict[str, object]:
        return {
            "labeler": self.name,
            "model_sha256": self.sha256,
            "prompt_version": self.prompt_version,
            "calibration": json.dumps(self.calibration.registry_form(), sort_keys=True),
            "max_document_tokens": max_document_tokens,
        }


def labeler_from_results(results_file: Path, name: str, path: Path, sha256: str) -> OfflineLabeler:
    """The prompt version and DL19 calibration that ``bench.labeling`` chose for a model (its results.json)."""
    try:
        results = json.loads(results_file.read_text())
    except FileNotFoundError:
        raise OfflineLabelError(f"{results_file} does not exist: run `python -m bench.labeling` first") from None
    except json.JSONDecodeError as error:
        raise OfflineLabelError(f"{results_file} is not JSON: {error}") from None
    best = results.get("best_prompt", {}).get(name)
    if best is None:
        known = ", ".join(results.get("best_prompt", {})) or "none"
        raise OfflineLabelError(f"{results_file} has no best prompt for {name!r} (it has: {known})")
    prompt_version = best.rsplit("/", 1)[-1]
    for report in results.get("labelers", []):
        if report.get("labeler") == best and report.get("dataset") == "dl19":
            c = report["calibration"]
            if c.get("method") != "platt":
                raise OfflineLabelError(f"{best}: calibration method {c.get('method')!r} is not supported here")
            return OfflineLabeler(name, path, sha256, prompt_version, PlattCalibration(c["a"], c["b"], c["threshold"]))
    raise OfflineLabelError(f"{results_file} has no DL19 report (with its calibration) for {best}")


def hardest_candidates(
    candidates: Path, per_query: int, queries: int | None, seed: int = 0, exclude_doc_ids: Iterable[str] = ()
) -> pl.DataFrame:
    """The top ``per_query`` mined candidates of ``queries`` queries drawn at random (all when None), in the
    drawn order of queries (column ``query_order``), by rank within a query.

    ``exclude_doc_ids``: documents a candidate must not be (e.g. the query's own source document, which mining
    already leaves out, or the evaluation documents of a benchmark).
    """
    if per_query < 1:
        raise OfflineLabelError(f"per_query must be at least 1, got {per_query}")
    frame = pl.read_parquet(candidates, columns=["pair_id", "split", "query_id", "doc_id", "rank"])
    excluded = set(exclude_doc_ids)
    frame = frame.filter((pl.col("rank") <= per_query) & ~pl.col("doc_id").is_in(list(excluded)))
    all_queries = frame["query_id"].unique().sort()
    if queries is not None and queries < all_queries.len():
        chosen = all_queries.sample(queries, seed=seed, shuffle=True)
    else:
        chosen = all_queries.sample(fraction=1.0, seed=seed, shuffle=True)
    order = pl.DataFrame({"query_id": chosen, "query_order": range(chosen.len())})
    return frame.join(order, on="query_id").sort(["query_order", "rank"]).with_columns(pl.col("rank").cast(pl.Int32))


def read_offline_labels(path: Path) -> pl.DataFrame:
    """A label file, checked: every column of LABEL_SCHEMA, one labeler identity, no pair twice."""
    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise OfflineLabelError(f"{path} does not exist") from None
    except Exception as error:  # polars raises several kinds for a damaged file
        raise OfflineLabelError(f"{path} is not a readable Parquet file: {error}") from None
    missing = [c for c in LABEL_SCHEMA if c not in frame.columns]
    if missing:
        raise OfflineLabelError(f"{path} lacks the column(s) {', '.join(missing)}: not an offline label file")
    frame = frame.select(list(LABEL_SCHEMA)).cast(LABEL_SCHEMA)  # type: ignore[arg-type]
    if frame.height and frame.select(IDENTITY_COLUMNS).unique().height > 1:
        raise OfflineLabelError(f"{path} mixes labels of several labelers, prompt versions or calibrations")
    if frame["pair_id"].is_duplicated().any():
        raise OfflineLabelError(f"{path} holds a pair more than once")
    return frame


def _write_atomically(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def label_candidates(
    labeler: OfflineLabeler,
    candidates: pl.DataFrame,
    texts: Callable[[str, str], tuple[str, str]],
    out: Path,
    *,
    max_document_tokens: int = 384,
    threads: int | None = None,
    n_ctx: int = 2048,
    save_every: int = 25,
    log: Callable[[str], None] = print,
) -> pl.DataFrame:
    """Label the candidates (hardest_candidates' frame) in their order, appending to ``out``; returns all labels.

    ``texts(query_id, doc_id)`` gives the query and document text of a pair. A file made by another labeler,
    prompt version, calibration or document cap is refused rather than mixed into.
    """
    from annotator.backends.base import Pair, order_pairs
    from annotator.backends.llama_cpp import LlamaCppBackend

    identity = labeler.identity(max_document_tokens)
    done = read_offline_labels(out) if out.exists() else pl.DataFrame(schema=LABEL_SCHEMA)
    if done.height:
        theirs = done.row(0, named=True)
        differing = [k for k in IDENTITY_COLUMNS if theirs[k] != identity[k]]
        if differing:
            raise OfflineLabelError(
                f"{out} holds labels with another {', '.join(differing)} "
                f"({', '.join(f'{k}={theirs[k]!r}' for k in differing)}): write to another file"
            )
    todo = candidates.filter(~pl.col("pair_id").is_in(done["pair_id"].implode()))
    if todo.is_empty():
        log(f"{out}: all {candidates.height} pairs already labeled")
        return done
    already = candidates.height - todo.height
    log(f"{labeler.name}/{labeler.prompt_version}: labeling {todo.height} pairs ({already} done)")
    rows = {r["pair_id"]: r for r in todo.iter_rows(named=True)}
    pairs = [Pair(r["pair_id"], *texts(r["query_id"], r["doc_id"])) for r in rows.values()]
    fresh: list[dict[str, object]] = []

    def save() -> pl.DataFrame:
        merged = pl.concat([done, pl.DataFrame(fresh, schema=LABEL_SCHEMA)]) if fresh else done
        _write_atomically(merged, out)
        return merged

    backend = LlamaCppBackend(
        labeler.path, n_ctx=n_ctx, n_threads=threads, prompt_version=labeler.prompt_version,
        max_document_tokens=max_document_tokens,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        for score in backend.score_pairs(order_pairs(pairs)):
            row = rows[score.pair_id]
            calibrated = float(labeler.calibration.apply([score.p_relevant])[0])
            fresh.append(
                {
                    **{k: row[k] for k in ("pair_id", "split", "query_id", "doc_id", "rank")},
                    "p_raw": score.p_relevant,
                    "p_calibrated": calibrated,
                    "label": calibrated >= labeler.calibration.threshold,
                    **identity,
                    "truncated": score.truncated,
                    "seconds": score.seconds,
                }
            )
            if len(fresh) % save_every == 0:
                save()
                rate = len(fresh) / (time.perf_counter() - started)
                left = (len(pairs) - len(fresh)) / rate
                log(f"  {len(fresh)}/{len(pairs)} pairs, {rate:.2f} pairs/s, about {left / 60:.0f} min left")
    finally:
        backend.close()
        merged = save()
    return merged


def verified_rows(labels: pl.DataFrame, source_pairs: Sequence[Path]) -> pl.DataFrame:
    """Offline labels in the verified export's columns (query, document, label, status, split), the form
    ``embedkomb_pipeline.training.data.build_training_set`` reads; texts come from the splits' source pairs."""
    texts = pl.concat([pl.read_parquet(p, columns=["query_id", "doc_id", "query", "document"]) for p in source_pairs])
    queries = texts.select("query_id", "query").unique("query_id")
    documents = texts.select("doc_id", "document").unique("doc_id")
    joined = labels.join(queries, on="query_id", how="left").join(documents, on="doc_id", how="left")
    lost = joined.filter(pl.col("query").is_null() | pl.col("document").is_null())
    if lost.height:
        raise OfflineLabelError(
            f"{lost.height} labeled pair(s) have no text in the given source pairs (first: {lost['pair_id'][0]}): "
            "labels and sources come from different splits or versions"
        )
    return joined.select(
        "query", "document", "label", pl.lit("verified").alias("status"), "split", "p_calibrated", "labeler"
    )
