"""The proof: do models trained on verified labels beat models trained on unfiltered or label-free filtered negatives?

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.quality                  # every variant, 3 seeds (hours)
    .venv/bin/python -m bench.quality --report-only                                  # the table from runs so far
    .venv/bin/python -m bench.quality --seeds 0 --steps 4 --max-corpus 300 --max-queries 20 --out /tmp/q  # a look

Training data: the sample splits (SciFact and NFCorpus titles → abstracts) with the candidates mined as the
pipeline mines them, and the offline labels of `bench.training_labels` (the best labeler, its prompt version and
calibration; bench/results/training_labels/labels.parquet). Every variant trains on the labeled queries only, over
the same candidates (those labeled), from all-MiniLM-L6-v2, with the same steps, batch and lr
(embedkomb_pipeline/training/variants.py says what each does):

  base, unfiltered, positive_aware (NV-Retriever's label-free 95% filter), infonce_labels, exact_labels,
  exact_masked (every candidate masked, no labels: is it the labels or the masking?), exact_labels_masked (labels,
  but a "relevant" verdict masks the candidate instead of making it a positive)

Evaluation through the project's mteb harness on local folders: SciFact test, NFCorpus test and the TREC DL19 judged
pool as a retrieval task (43 queries over 9,139 judged passages, graded qrels). Caveat: SciFact's and NFCorpus's
documents are in the training corpus (as a domain split's would be; never their test queries or judgments); DL19
shares nothing with training. Reported: nDCG@10 mean ± std over seeds per task and averaged over tasks, and a
paired bootstrap over queries (macro over tasks) of exact_labels against unfiltered and against positive_aware.

Each (variant, seed) run is appended to --out/runs.jsonl with its per-query scores as it finishes, so a stopped run
goes on where it was; a run made with other settings is never mixed in. Results: --out/results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from embedkomb_pipeline.evaluation.comparison import paired_bootstrap
from embedkomb_pipeline.labeling.offline_labels import OfflineLabelError, read_offline_labels, verified_rows
from embedkomb_pipeline.settings import default_data_dir
from embedkomb_pipeline.training.variants import VARIANTS, Hyperparameters, train_config, training_data

if TYPE_CHECKING:
    from embedkomb_pipeline.training.data import TrainingSet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = REPO / "bench" / "results" / "training_labels" / "labels.parquet"
DEFAULT_TASKS = ("scifact", "nfcorpus", "msmarco-dl19-judged")
COMPARISONS = (("exact_labels", "unfiltered"), ("exact_labels", "positive_aware"), ("infonce_labels", "unfiltered"),
               ("exact_labels", "exact_masked"), ("exact_labels", "base"), ("exact_labels_masked", "unfiltered"),
               ("exact_labels_masked", "positive_aware"), ("exact_labels_masked", "exact_masked"))  # fmt: skip


def settings_of(args: argparse.Namespace, labels: pl.DataFrame, hp: Hyperparameters) -> dict[str, Any]:
    """What a run's scores depend on: a stored run counts only under the very same settings."""
    return {
        "hyperparameters": asdict(hp),
        "labels": {
            "pairs": labels.height,
            "labeler": labels["labeler"][0],
            "prompt": labels["prompt_version"][0],
            "calibration": labels["calibration"][0],
        },
        "tasks": list(args.tasks),
        "max_corpus": args.max_corpus,
        "max_queries": args.max_queries,
        "eval_precision": args.eval_precision,
        "mine_top_k": args.mine_top_k,
    }


def read_runs(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    other = 0
    if path.exists():
        for line in path.read_text().splitlines():
            run = json.loads(line)
            if run["settings"] == settings:
                runs[(run["variant"], run["seed"])] = run
            else:
                other += 1
    if other:
        print(f"{path}: {other} run(s) made with other settings (labels, steps, tasks, ...) are left out", flush=True)
    return runs


def build_sets(args: argparse.Namespace, labels: pl.DataFrame, work: Path) -> tuple[TrainingSet, TrainingSet]:
    """(labeled, unlabeled) TrainingSets over the labeled queries and candidates."""
    from bench.training_labels import prepare_split
    from embedkomb_pipeline.training.data import build_training_set

    sources, candidate_files = [], []
    for split in sorted(labels["split"].unique()):
        source, candidates = prepare_split(split, Path(args.data), args.label_work, args.mine_top_k)
        sources.append(source)
        labeled = pl.read_parquet(candidates).filter(pl.col("pair_id").is_in(labels["pair_id"].implode()))
        path = work / f"candidates-labeled-{split}.parquet"
        labeled.write_parquet(path)
        candidate_files.append(path)
    verified = work / "verified.parquet"
    verified_rows(labels, sources).write_parquet(verified)
    queries = labels["query_id"].unique().to_list()
    with_labels = build_training_set(sources, [verified], candidate_files).restricted_to(queries)
    without = build_training_set(sources, [], candidate_files).restricted_to(queries)
    return with_labels, without


def base_encoder(base: Path) -> Callable[[list[str]], Any]:
    """Normalized embeddings of the base model, loaded on first use (only the positive-aware filter needs it)."""
    loaded: list[Any] = []

    def encode(texts: list[str]) -> Any:
        if not loaded:
            from sentence_transformers import SentenceTransformer

            loaded.append(SentenceTransformer(str(base), device=None, local_files_only=True))
        return loaded[0].encode(texts, normalize_embeddings=True, batch_size=64, show_progress_bar=False)

    return encode


def run_one(
    variant: str, seed: int, args: argparse.Namespace, hp: Hyperparameters, sets: tuple, tasks: list, work: Path
) -> dict[str, Any]:
    from embedkomb_pipeline.evaluation.harness import evaluate_model, per_query_ndcg_at_10, task_qrels
    from embedkomb_pipeline.mining.embedding import default_base_model_path
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer

    base = default_base_model_path()
    started = time.perf_counter()
    train_seconds, counts = 0.0, {}
    model_dir = base
    if variant != "base":
        data = training_data(variant, *sets, encode=base_encoder(base))
        counts = data.counts
        trainer = TowerTrainer(base, data, train_config(variant, hp, seed, len(data.queries)))
        trainer.train(log=lambda m: print(f"  {variant} s{seed}: {m}", flush=True), track_objective=False)
        model_dir = trainer.save(work / "models" / f"{variant}-s{seed}")["model"]
        train_seconds = time.perf_counter() - started
        del trainer
    scores = evaluate_model(
        model_dir, tasks, work / "mteb", f"embedkomb-quality/{variant}-s{seed}", precision=args.eval_precision,
        keep_predictions=True, log=lambda m: print(f"  {m}", flush=True),
        overwrite=True,  # mteb's cache knows the model's name, not its settings; runs.jsonl is what resumes
    )  # fmt: skip
    per_query = {t.name: per_query_ndcg_at_10(scores.prediction_paths[t.name], task_qrels(t)) for t in tasks}
    if variant != "base":
        shutil.rmtree(work / "models" / f"{variant}-s{seed}", ignore_errors=True)  # ~90 MB each; scores are kept
    return {
        "variant": variant,
        "seed": seed,
        "ndcg_at_10": {t: round(v["ndcg_at_10"], 5) for t, v in scores.tasks.items()},
        "per_query": {t: {q: round(v, 5) for q, v in pq.items()} for t, pq in per_query.items()},
        "training_set": counts,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def report(runs: dict[tuple[str, int], dict[str, Any]], variants: list[str], settings: dict, resamples: int) -> dict:
    tasks = settings["tasks_resolved"]
    table = []
    for variant in variants:
        seeds = sorted(s for v, s in runs if v == variant)
        if not seeds:
            continue
        row: dict[str, Any] = {"variant": variant, "seeds": seeds, "summary": VARIANTS[variant].summary}
        for task in [*tasks, "mean"]:
            values = [
                statistics.fmean(runs[(variant, s)]["ndcg_at_10"][t] for t in tasks) if task == "mean"
                else runs[(variant, s)]["ndcg_at_10"][task]
                for s in seeds
            ]  # fmt: skip
            row[task] = {"mean": round(statistics.fmean(values), 5),
                         "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0}  # fmt: skip
        row["train_seconds"] = round(statistics.fmean(runs[(variant, s)]["train_seconds"] for s in seeds), 1)
        table.append(row)
    comparisons = []
    for a, b in COMPARISONS:
        seeds_a = sorted(s for v, s in runs if v == a)
        seeds_b = sorted(s for v, s in runs if v == b)
        if not seeds_a or not seeds_b:
            continue

        def per_query(variant: str, seeds: list[int]) -> dict[str, dict[str, list[float]]]:
            return {t: {q: [runs[(variant, s)]["per_query"][t][q] for s in seeds]
                        for q in runs[(variant, seeds[0])]["per_query"][t]} for t in tasks}  # fmt: skip

        result = paired_bootstrap(per_query(a, seeds_a), per_query(b, seeds_b), resamples=resamples)
        comparisons.append({"a": a, "b": b, "seeds_a": seeds_a, "seeds_b": seeds_b, **result.as_dict()})
    return {"table": table, "comparisons": comparisons}


def markdown(results: dict) -> str:
    tasks = results["settings"]["tasks_resolved"]
    hp = results["settings"]["hyperparameters"]
    lines = [
        f"Training-data quality ({results['generated_at']}; `{results['command']}`)",
        "",
        f"all-MiniLM-L6-v2 fine-tuned on {results['training_queries']} labeled queries "
        f"({results['settings']['labels']['pairs']} labeled candidates, {results['settings']['labels']['labeler']}/"
        f"{results['settings']['labels']['prompt']}); {hp['steps']} steps, batch {hp['batch_size']}, lr {hp['lr']}, "
        f"max_seq_length {hp['max_seq_length']}. nDCG@10 × 100, mean ± std over seeds.",
        "",
        "| variant | seeds | " + " | ".join(tasks) + " | mean | train s |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    for row in results["table"]:
        cells = [f"{100 * row[t]['mean']:.2f} ± {100 * row[t]['std']:.2f}" for t in [*tasks, "mean"]]
        lines.append(
            f"| {row['variant']} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {row['train_seconds']} |"
        )
    if results["comparisons"]:
        lines += [
            "",
            "Paired bootstrap over queries (per-query nDCG@10 averaged over seeds, macro over tasks; "
            f"{results['settings']['resamples']} resamples):",
            "",
            "| A − B | difference × 100 | 95% CI | P(A not better) | " + " | ".join(tasks) + " |",
            "|---|---|---|---|" + "---|" * len(tasks),
        ]
        for c in results["comparisons"]:
            per_task = " | ".join(f"{100 * c['per_task'][t]:+.2f}" for t in tasks)
            lines.append(
                f"| {c['a']} − {c['b']} | {100 * c['difference']:+.2f} | "
                f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}] | {c['p_not_better']:.4f} | {per_task} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="bench.training_labels' label file")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Hyperparameters.steps, help="optimizer steps per trained variant")
    parser.add_argument("--batch-size", type=int, default=Hyperparameters.batch_size)
    parser.add_argument("--lr", type=float, default=Hyperparameters.lr)
    parser.add_argument("--max-seq-length", type=int, default=Hyperparameters.max_seq_length)
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS), help="BEIR folders under --data")
    parser.add_argument("--max-corpus", type=int, default=None, help="a quick look: cap every task's corpus")
    parser.add_argument("--max-queries", type=int, default=None, help="a quick look: cap every task's queries")
    parser.add_argument("--eval-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--mine-top-k", type=int, default=20, help="as bench.training_labels mined them")
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--label-work", type=Path, default=REPO / ".bench" / "training_labels",
                        help="bench.training_labels' work folder (source pairs, candidates)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "quality", help="models, mteb results")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the runs so far")
    args = parser.parse_args()

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.data is None:
        parser.error("no data folder: pass --data or set EMBEDKOMB_DATA_DIR")
    try:
        labels = read_offline_labels(args.labels)
    except OfflineLabelError as error:
        parser.error(f"{error} (run `python -m bench.training_labels` first)")
    if labels.is_empty():
        parser.error(f"{args.labels} holds no labels yet")
    hp = Hyperparameters(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_seq_length=args.max_seq_length)
    settings = settings_of(args, labels, hp)
    runs_file = args.out / "runs.jsonl"
    runs = read_runs(runs_file, settings)

    from embedkomb_pipeline.evaluation.harness import resolve_tasks

    tasks = resolve_tasks(args.tasks, args.data, source="local", max_corpus=args.max_corpus,
                          max_queries=args.max_queries)  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = None
    if not args.report_only:
        sets = build_sets(args, labels, args.work)
        print(f"training set with labels: {sets[0].counts}", flush=True)
        todo = [(v, s) for v in args.variants for s in ([0] if v == "base" else args.seeds) if (v, s) not in runs]
        print(f"{len(todo)} runs to do ({len(runs)} done with these settings)", flush=True)
        for variant, seed in todo:
            run = run_one(variant, seed, args, hp, sets, tasks, args.work)
            runs[(variant, seed)] = {**run, "settings": settings}
            with runs_file.open("a") as handle:
                handle.write(json.dumps(runs[(variant, seed)]) + "\n")
            print(f"{variant} s{seed}: {run['ndcg_at_10']} ({run['seconds']} s)", flush=True)
    settings["tasks_resolved"] = [t.name for t in tasks]
    settings["resamples"] = args.resamples
    results = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.quality " + " ".join(sys.argv[1:]),
        "settings": settings,
        "training_queries": labels["query_id"].n_unique(),
        **report(runs, list(VARIANTS), settings, args.resamples),  # every stored run: --variants picks what to train
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
