"""MTEB retrieval evaluation (mteb 2.x, `mteb.evaluate`) of an embedding model folder.

Tasks come from two places:

- the real MTEB task by name (`mteb.get_task`), which reads its dataset from the Hub, when the Hub is reachable;
- a local BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/test.tsv), read by our own BEIR loader. A folder
  that holds a published MTEB task (scifact → SciFact, nfcorpus → NFCorpus, …) runs under that task's own
  metadata (same name, dataset revision, eval split "test", main score ndcg_at_10), so its scores land in the
  same place of mteb's results layout as a Hub run and compare directly with the leaderboard. Whether the local
  data really is that dataset is checked against mteb's own descriptive statistics of the task (document,
  query and judgment counts, total document text length); the verdict is reported as `comparable`.
  Any other BEIR folder becomes a task of its own name.

A capped corpus (for tests) is a different task: it is renamed `<name>-cap<N>` and never reported comparable.

Results are written by mteb's ResultCache in its results layout, `results/<model>/<revision>/<Task>.json` plus
`model_meta.json`, ready for a leaderboard submission. The revision is the content fingerprint of the model
folder, so an unchanged model (the base model of every cycle) is found there and never encoded again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedkomb_pipeline.formatting import number
from embedkomb_pipeline.mining.embedding import fingerprint_model_dir
from embedkomb_pipeline.sources.beir import load_beir

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models.model_meta import ModelMeta

logger = logging.getLogger(__name__)

# local BEIR folder name → the published MTEB task built from the same dataset
MTEB_TASK_OF_FOLDER = {
    "scifact": "SciFact",
    "nfcorpus": "NFCorpus",
    "arguana": "ArguAna",
    "scidocs": "SCIDOCS",
    "fiqa": "FiQA2018",
    "trec-covid": "TRECCOVID",
    "quora": "QuoraRetrieval",
    "webis-touche2020": "Touche2020",
}
FOLDER_OF_MTEB_TASK = {task.lower(): folder for folder, task in MTEB_TASK_OF_FOLDER.items()}
METRICS = ("ndcg_at_10", "recall_at_100", "mrr_at_10")
EVAL_SPLIT = "test"


class EvaluationError(ValueError):
    """A task or model cannot be evaluated; the message says which and why."""


@dataclass
class ResolvedTask:
    """One task ready for mteb.evaluate, with where its data comes from and whether its scores are comparable."""

    name: str
    task: AbsTaskRetrieval
    source: str  # "hub:<dataset path>@<revision>" or "local:<folder>"
    comparable: bool
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "comparable": self.comparable, "notes": self.notes}


@dataclass
class ModelScores:
    """The three headline metrics per task for one model, and where mteb wrote its full results."""

    model_name: str
    revision: str
    precision: str
    tasks: dict[str, dict[str, float]]
    result_paths: dict[str, str]
    from_cache: dict[str, bool]
    seconds: float
    # per task, mteb's saved top-ranked documents per query (only when evaluate_model was asked to keep them)
    prediction_paths: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "revision": self.revision,
            "precision": self.precision,
            "tasks": self.tasks,
            "result_paths": self.result_paths,
            "prediction_paths": self.prediction_paths,
            "from_cache": self.from_cache,
            "seconds": round(self.seconds, 1),
        }


# --- tasks ----------------------------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (and is not switched off by HF_HUB_OFFLINE)."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        response = httpx.head(f"{constants.ENDPOINT}/api/datasets/mteb/scifact", timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code < 500


def _local_task_class() -> type[AbsTaskRetrieval]:
    """Defined on first use so that importing this module does not import mteb (slow, and not needed by callers
    that only read stored scores)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    class LocalBeirRetrieval(AbsTaskRetrieval):
        """An MTEB retrieval task whose data is a local BEIR folder read by embedkomb's loader."""

        folder: Path
        max_corpus: int | None = None
        max_queries: int | None = None

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            corpus, queries, qrels = read_beir_split(self.folder, EVAL_SPLIT, self.max_corpus, self.max_queries)
            doc_ids = list(corpus)
            query_ids = list(queries)
            split_data = RetrievalSplitData(
                corpus=Dataset.from_dict(
                    {
                        "id": doc_ids,
                        "title": [corpus[d][0] for d in doc_ids],
                        "text": [corpus[d][1] for d in doc_ids],
                    }
                ),
                queries=Dataset.from_dict({"id": query_ids, "text": [queries[q] for q in query_ids]}),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {EVAL_SPLIT: split_data}}
            self.dataset_transform(num_proc=num_proc)
            self.data_loaded = True

    return LocalBeirRetrieval


def read_beir_split(
    folder: Path, split: str, max_corpus: int | None = None, max_queries: int | None = None
) -> tuple[dict[str, tuple[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus id → (title, text), judged query id → text, qrels) of one split, optionally capped.

    A cap keeps the first max_queries judged queries (in qrels order) and, of the corpus, every document judged
    for them plus the first documents in corpus order up to max_corpus, so each kept query can still be answered.
    """
    data = load_beir(folder)
    judged = data.judged(split)
    missing = [q for q in judged if q not in data.queries]
    if missing:
        raise EvaluationError(f"{folder}: qrels/{split}.tsv names {len(missing)} queries not in queries.jsonl")
    query_ids = [q for q in judged if any(grade > 0 for grade in judged[q].values())]
    if max_queries is not None:
        query_ids = query_ids[:max_queries]
    qrels = {q: dict(judged[q]) for q in query_ids}
    doc_ids = list(data.corpus)
    if max_corpus is not None:
        needed = {d for q in query_ids for d in qrels[q] if d in data.corpus}
        keep = set(needed)
        for d in doc_ids:
            if len(keep) >= max_corpus:
                break
            keep.add(d)
        doc_ids = [d for d in doc_ids if d in keep]
        kept = set(doc_ids)
        qrels = {q: {d: g for d, g in docs.items() if d in kept} for q, docs in qrels.items()}
    corpus = {d: (data.corpus[d].title, data.corpus[d].text) for d in doc_ids}
    return corpus, {q: data.queries[q] for q in query_ids}, qrels


def local_statistics(
    corpus: dict[str, tuple[str, str]], queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, int]:
    """The figures mteb's descriptive statistics also hold, computed the way mteb computes them."""
    return {
        "num_documents": len(corpus),
        "num_queries": len(queries),
        "num_relevant_docs": sum(sum(1 for g in docs.values() if g > 0) for docs in qrels.values()),
        # mteb reads a document as (title + " " + text).strip()
        "documents_total_text_length": sum(len((t + " " + x).strip()) for t, x in corpus.values()),
    }


def published_statistics(metadata: Any, split: str = EVAL_SPLIT) -> dict[str, int] | None:
    stats = (metadata.descriptive_stats or {}).get(split)
    if not stats:
        return None
    return {
        "num_documents": stats.get("num_documents"),
        "num_queries": stats.get("num_queries"),
        "num_relevant_docs": (stats.get("relevant_docs_statistics") or {}).get("num_relevant_docs"),
        "documents_total_text_length": (stats.get("documents_text_statistics") or {}).get("total_text_length"),
    }


def _custom_metadata(name: str, folder: Path) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name,
        dataset={"path": str(folder), "revision": fingerprint_beir_folder(folder)},
        description=f"Local BEIR-format retrieval data from {folder} (not a published MTEB task).",
        reference=None,
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[EVAL_SPLIT],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation="found",
        bibtex_citation="",
    )


def fingerprint_beir_folder(folder: Path) -> str:
    """A short content hash of the files of a BEIR folder: the dataset revision of a task built from it."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".jsonl", ".tsv", ".gz"}):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def local_task(
    folder: str | os.PathLike[str],
    mteb_name: str | None = None,
    max_corpus: int | None = None,
    max_queries: int | None = None,
) -> ResolvedTask:
    """An MTEB task over a local BEIR folder, under the published task's metadata when it is one."""
    import mteb

    folder = Path(folder)
    if not (folder / "qrels" / f"{EVAL_SPLIT}.tsv").exists():
        raise EvaluationError(f"{folder} is not a BEIR folder with a {EVAL_SPLIT} split (qrels/{EVAL_SPLIT}.tsv)")
    mteb_name = mteb_name or MTEB_TASK_OF_FOLDER.get(folder.name.lower())
    capped = max_corpus is not None or max_queries is not None
    notes: list[str] = []
    if mteb_name is not None:
        metadata = mteb.get_task(mteb_name).metadata
        if metadata.main_score != "ndcg_at_10" or EVAL_SPLIT not in metadata.eval_splits:
            raise EvaluationError(f"MTEB task {mteb_name} is not a retrieval task scored by ndcg_at_10 on test")
    else:
        metadata = _custom_metadata(folder.name, folder)
    published = published_statistics(metadata) if mteb_name else None
    corpus, queries, qrels = read_beir_split(folder, EVAL_SPLIT, max_corpus, max_queries)
    ours = local_statistics(corpus, queries, qrels)
    comparable = False
    if capped:
        cap = f"-cap{max_corpus or 'all'}" + (f"q{max_queries}" if max_queries is not None else "")
        metadata = metadata.model_copy(update={"name": f"{metadata.name}{cap}"})
        notes.append(f"capped to {ours['num_documents']} documents and {ours['num_queries']} queries")
    elif published is None:
        notes.append("no published MTEB statistics to compare with")
    else:
        mismatches = [f"{k}: local {ours[k]} vs MTEB {published[k]}" for k in ours if ours[k] != published[k]]
        comparable = not mismatches
        notes.extend(mismatches or [f"matches MTEB's statistics of {metadata.name} ({', '.join(map(str, ours))})"])
    cls = _local_task_class()
    task_class = type(f"Local{metadata.name.replace('-', '_')}", (cls,), {"metadata": metadata})
    task = task_class()
    task.folder, task.max_corpus, task.max_queries = folder, max_corpus, max_queries
    return ResolvedTask(name=metadata.name, task=task, source=f"local:{folder}", comparable=comparable, notes=notes)


def resolve_tasks(
    specs: Sequence[str],
    data_dir: str | os.PathLike[str] | None,
    source: str = "auto",
    max_corpus: int | None = None,
    max_queries: int | None = None,
) -> list[ResolvedTask]:
    """Tasks for specs that are MTEB task names (SciFact), folder names under data_dir (scifact) or BEIR paths.

    source "auto": the real MTEB task from the Hub when it is reachable and no cap is asked for, else the local
    folder; "hub": the Hub or an error; "local": the local folder or an error.
    """
    import mteb
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    if source not in {"auto", "hub", "local"}:
        raise EvaluationError(f"source must be 'auto', 'hub' or 'local', got {source!r}")
    capped = max_corpus is not None or max_queries is not None
    use_hub = source == "hub" or (source == "auto" and not capped and hub_reachable())
    if source == "hub" and capped:
        raise EvaluationError("a capped corpus only exists locally: use source 'local' or 'auto' with a cap")
    resolved: list[ResolvedTask] = []
    for spec in specs:
        path = Path(spec)
        folder: Path | None = None
        if path.is_dir():
            folder = path
        elif data_dir is not None and (Path(data_dir) / spec).is_dir():
            folder = Path(data_dir) / spec
        elif data_dir is not None and (Path(data_dir) / FOLDER_OF_MTEB_TASK.get(spec.lower(), spec)).is_dir():
            folder = Path(data_dir) / FOLDER_OF_MTEB_TASK[spec.lower()]
        mteb_name = MTEB_TASK_OF_FOLDER.get(folder.name.lower()) if folder is not None else None
        if mteb_name is None and spec.lower() in FOLDER_OF_MTEB_TASK:
            mteb_name = MTEB_TASK_OF_FOLDER[FOLDER_OF_MTEB_TASK[spec.lower()]]
        if use_hub and mteb_name is not None:
            task = mteb.get_task(mteb_name)
            if not isinstance(task, AbsTaskRetrieval):
                raise EvaluationError(f"MTEB task {mteb_name!r} is not a retrieval task")
            ds = task.metadata.dataset
            resolved.append(ResolvedTask(mteb_name, task, f"hub:{ds['path']}@{ds['revision']}", True))
        elif folder is not None and source != "hub":
            resolved.append(local_task(folder, mteb_name, max_corpus, max_queries))
        else:
            where = f" under {data_dir}" if data_dir else ""
            hub = "the Hub is not reachable" if not use_hub else "it is not a published MTEB task"
            raise EvaluationError(f"task {spec!r}: no local BEIR folder{where}, and {hub}")
    return resolved


# --- models ---------------------------------------------------------------------------------------------


def model_meta_for(model_name: str, revision: str, precision: str) -> ModelMeta:
    """What mteb files the results under: our name, the folder's content fingerprint, fp32 or a bf16 experiment."""
    from mteb.models.model_meta import ModelMeta

    return ModelMeta.create_empty(
        overwrites={
            "name": model_name,
            "revision": revision,
            "framework": ["Sentence Transformers", "PyTorch"],
            # bf16 embeddings differ slightly from fp32: filed as an mteb experiment beside the plain result
            "experiment_kwargs": {"precision": precision} if precision != "fp32" else None,
        }
    )


def scores_of(task_result: Any, split: str = EVAL_SPLIT) -> dict[str, float]:
    rows = task_result.scores.get(split) or []
    row = next((r for r in rows if r.get("hf_subset") == "default"), rows[0] if rows else None)
    if row is None:
        raise EvaluationError(f"mteb result of {task_result.task_name} has no {split} scores")
    return {m: float(row[m]) for m in (*METRICS, "main_score")}


def evaluate_model(
    model_dir: str | os.PathLike[str],
    tasks: Sequence[ResolvedTask],
    results_dir: str | os.PathLike[str],
    model_name: str,
    precision: str = "fp32",
    batch_size: int = 64,
    overwrite: bool = False,
    keep_predictions: bool = False,
    log: Callable[[str], None] = logger.info,
) -> ModelScores:
    """Score one sentence-transformers folder on the tasks; results found in results_dir are not recomputed.

    keep_predictions: also keep mteb's ranked documents per query (under results_dir/predictions/<model>/<revision>/,
    read by per_query_ndcg_at_10), which per-query statistics such as a paired bootstrap need; a task whose
    results are cached without predictions is then evaluated again.
    """
    import time

    import mteb
    from mteb.results import TaskResult

    start = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").exists():
        raise EvaluationError(f"{model_dir} is not a sentence-transformers model folder (no modules.json)")
    if precision not in {"fp32", "bf16"}:
        raise EvaluationError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    revision = fingerprint_model_dir(model_dir)
    meta = model_meta_for(model_name, revision, precision)
    cache = mteb.ResultCache(cache_path=Path(results_dir))
    paths = {t.name: cache.get_task_result_path(t.name, meta) for t in tasks}
    prediction_folder = Path(results_dir) / "predictions" / meta.model_name_as_path() / revision
    predictions = {t.name: prediction_folder / t.task.prediction_file_name for t in tasks} if keep_predictions else {}
    cached = {
        name: (not overwrite) and path.exists() and (name not in predictions or predictions[name].exists())
        for name, path in paths.items()
    }
    missing = [t for t in tasks if not cached[t.name]]
    results: dict[str, Any] = {name: TaskResult.from_disk(paths[name]) for name, hit in cached.items() if hit}
    if missing:
        log(f"{model_name}@{revision} ({precision}): evaluating {', '.join(t.name for t in missing)}")
        wrapper = _load_wrapper(model_dir, meta, precision)
        outcome = mteb.evaluate(
            wrapper,
            [t.task for t in missing],
            cache=cache,
            # only tasks without (complete) cached results are passed in, so each of them is computed anew
            overwrite_strategy="always",
            prediction_folder=prediction_folder if keep_predictions else None,
            encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
            show_progress_bar=False,
            co2_tracker=False,
        )
        if outcome.exceptions:
            raise EvaluationError(f"mteb failed on {model_name}: {outcome.exceptions}")
        for task in missing:
            # read back what mteb wrote (it rounds on save), so a cached run reports exactly the same numbers
            results[task.name] = TaskResult.from_disk(paths[task.name])
    else:
        log(f"{model_name}@{revision} ({precision}): every task already scored in {results_dir}, nothing encoded")
    return ModelScores(
        model_name=model_name,
        revision=revision,
        precision=precision,
        tasks={t.name: scores_of(results[t.name]) for t in tasks},
        result_paths={name: str(path) for name, path in paths.items()},
        from_cache=cached,
        seconds=time.perf_counter() - start,
        prediction_paths={name: str(path) for name, path in predictions.items()},
    )


def task_qrels(task: ResolvedTask) -> dict[str, dict[str, int]]:
    """The judgments a task is scored against (as mteb reads them: queries with no relevant document dropped)."""
    local = getattr(task.task, "folder", None)
    if local is not None:
        caps = getattr(task.task, "max_corpus", None), getattr(task.task, "max_queries", None)
        _corpus, _queries, qrels = read_beir_split(local, EVAL_SPLIT, *caps)
        return qrels
    task.task.load_data()
    relevant = task.task.dataset["default"][EVAL_SPLIT]["relevant_docs"]
    return {q: dict(docs) for q, docs in relevant.items() if any(g > 0 for g in docs.values())}


def per_query_ndcg_at_10(
    predictions_path: str | os.PathLike[str], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """nDCG@10 of every judged query from mteb's saved predictions, computed as mteb computes it (trec_eval's
    ndcg_cut.10 through pytrec_eval, graded gains), so their mean is the task's ndcg_at_10."""
    import json

    import pytrec_eval

    saved = json.loads(Path(predictions_path).read_text())
    runs = saved.get("default", {}).get(EVAL_SPLIT)
    if runs is None:
        raise EvaluationError(f"{predictions_path} holds no predictions for the {EVAL_SPLIT} split")
    judged = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    missing = [q for q in judged if q not in runs]
    if missing:
        raise EvaluationError(f"{predictions_path} lacks {len(missing)} judged queries (first: {missing[0]})")
    run = {q: {d: float(score) for d, score in runs[q].items()} for q in judged}
    evaluated = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10"}).evaluate(run)
    return {q: float(evaluated[q]["ndcg_cut_10"]) for q in judged}


def _load_wrapper(model_dir: Path, meta: ModelMeta, precision: str) -> Any:
    import torch
    from mteb.models import SentenceTransformerEncoderWrapper
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = SentenceTransformer(str(model_dir), device=None, local_files_only=True)
    if precision == "bf16":
        model.to(torch.bfloat16)
    wrapper = SentenceTransformerEncoderWrapper(model)
    # keep what mteb read from the model (dimension, window, similarity), but file it under our name and revision
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(
        update={"name": meta.name, "revision": meta.revision, "experiment_kwargs": meta.experiment_kwargs}
    )
    return wrapper


# --- scores per cycle: the trend and the regression check ---------------------------------------------


def cycle_scores_path(scores_dir: Path, cycle: str) -> Path:
    return scores_dir / f"{cycle}.json"


def save_cycle_scores(scores_dir: Path, cycle: str, payload: dict[str, Any]) -> Path:
    """One JSON per cycle ({cycle, checkpoint: ModelScores, base: ModelScores, tasks: [...]}), written atomically."""
    import json

    scores_dir.mkdir(parents=True, exist_ok=True)
    path = cycle_scores_path(scores_dir, cycle)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cycle": cycle, **payload}, indent=1))
    os.replace(tmp, path)
    return path


def load_trend(scores_dir: Path, up_to_cycle: str | None = None) -> list[dict[str, Any]]:
    """Every stored cycle's scores, in cycle order (cycle keys sort in order), up to and including up_to_cycle."""
    import json

    if not scores_dir.is_dir():
        return []
    files = sorted(p for p in scores_dir.glob("c*.json") if up_to_cycle is None or p.stem <= up_to_cycle)
    return [json.loads(p.read_text()) for p in files]


def trend_rows(trend: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cycle, task): the checkpoint's three metrics, the base model's nDCG@10 and the difference."""
    rows = []
    for entry in trend:
        for task, scores in entry["checkpoint"]["tasks"].items():
            base = entry["base"]["tasks"].get(task, {})
            rows.append(
                {
                    "cycle": entry["cycle"],
                    "task": task,
                    **{m: scores[m] for m in METRICS},
                    "base_ndcg_at_10": base.get("ndcg_at_10"),
                    "delta_ndcg_at_10": scores["ndcg_at_10"] - base["ndcg_at_10"] if base else None,
                }
            )
    return rows


def trend_markdown(trend: Sequence[dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return number(value, 2, scale=100)

    lines = [
        "| cycle | task | nDCG@10 | recall@100 | MRR@10 | base nDCG@10 | Δ vs base |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in trend_rows(trend):
        delta = number(r["delta_ndcg_at_10"], 2, scale=100, signed=True)
        lines.append(
            f"| {r['cycle']} | {r['task']} | {pct(r['ndcg_at_10'])} | {pct(r['recall_at_100'])} "
            f"| {pct(r['mrr_at_10'])} | {pct(r['base_ndcg_at_10'])} | {delta} |"
        )
    return "\n".join(lines)


def plot_trend(trend: Sequence[dict[str, Any]], path: Path) -> Path:
    """nDCG@10 per task across cycles: the checkpoints (solid) against the base model (dashed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = trend_rows(trend)
    cycles = [entry["cycle"] for entry in trend]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for i, task in enumerate(sorted({r["task"] for r in rows})):
        color = f"C{i}"
        mine = {r["cycle"]: r for r in rows if r["task"] == task}
        xs = [c for c in cycles if c in mine]
        ax.plot(xs, [100 * mine[c]["ndcg_at_10"] for c in xs], "o-", color=color, label=f"{task} checkpoint")
        base = [(c, mine[c]["base_ndcg_at_10"]) for c in xs if mine[c]["base_ndcg_at_10"] is not None]
        if base:
            ax.plot([c for c, _ in base], [100 * v for _, v in base], "--", color=color, lw=1, label=f"{task} base")
    ax.set_xlabel("cycle")
    ax.set_ylabel("nDCG@10 (%)")
    ax.set_title("MTEB retrieval across cycles")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def png_markdown(path: Path, alt: str) -> str:
    """The PNG inline (base64), so the Dagster UI shows it without serving files."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"


@dataclass
class RegressionVerdict:
    passed: bool
    previous_cycle: str | None
    tolerance: float
    drops: dict[str, float]  # task → previous nDCG@10 − current nDCG@10 (positive: worse now)
    note: str


def regression_check(
    current: dict[str, Any], previous: dict[str, Any] | None, tolerance: float, metric: str = "ndcg_at_10"
) -> RegressionVerdict:
    """Fails when the checkpoint's metric on any task shared with the previous cycle dropped by more than tolerance."""
    if previous is None:
        return RegressionVerdict(True, None, tolerance, {}, "first scored cycle: nothing to compare with")
    now, before = current["checkpoint"]["tasks"], previous["checkpoint"]["tasks"]
    shared = sorted(set(now) & set(before))
    if not shared:
        return RegressionVerdict(True, previous["cycle"], tolerance, {}, "no task in common with the previous cycle")
    drops = {task: before[task][metric] - now[task][metric] for task in shared}
    worst = max(drops, key=lambda t: drops[t])
    passed = drops[worst] <= tolerance
    note = (
        f"largest drop {100 * drops[worst]:+.2f} {metric} points on {worst} vs {previous['cycle']} "
        f"(tolerance {100 * tolerance:.2f})"
    )
    return RegressionVerdict(passed, previous["cycle"], tolerance, drops, note)
