"""Why the demo's checkpoint scored below its base, and which short recipe does not: SciFact nDCG@10 of each recipe.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.demo_training          # ~10 min a recipe here
    .venv/bin/python -m bench.demo_training --recipes demo demo_warmup --seeds 0 1

The demo trains all-MiniLM-L6-v2 on its split (SciFact titles → abstracts, 5,181 queries over 5,183 abstracts) with the
exact softmax, every mined top-20 candidate masked (the tiny demo labeler's verdicts are near chance, so almost none
verify), 2 coordinate-ascent phases of 8 steps, batch 32, lr 1e-4, and scores it on SciFact test. This bench builds
that same training set from the split's real source pairs and mined candidates (mined as bench.training_labels does,
work folder shared with it) and trains each recipe from the same base; the baseline is the base model scored in
the same run. Recipes differ in one knob at a time from the demo's:

  demo          the demo's recipe as it was (constant lr from the first step);
  demo_warmup   the same with the learning rate warmed up linearly over the first 10% of steps, then decayed
                linearly to zero (sentence-transformers' default schedule);
  demo_low_lr   lr 2e-5, constant;
  query_only    one phase (the query side) of 16 steps;

Results: --out/results.{json,md}, one line per recipe and seed, appended to --out/runs.jsonl as they finish.

Measured (2026-12-06, seed 0, bench/results/demo_training): base 64.51, demo 61.96, demo_warmup 63.91, demo_low_lr
65.61; the demo now trains at lr 2e-5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from embedkomb_pipeline.settings import default_data_dir
from embedkomb_pipeline.training.coordinate_ascent import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SPLIT = "scifact_title_abstract"

# the demo's checkpoint config (embedkomb_pipeline/demo/runner.py DEMO_TRAINING) on the checkpoint asset's defaults
DEMO_RECIPE = TrainConfig(loss="exact", phases=2, max_steps_per_phase=8, batch_size=32, lr=1e-4, max_seq_length=128)
RECIPES: dict[str, TrainConfig] = {
    "demo": DEMO_RECIPE,
    "demo_warmup": replace(DEMO_RECIPE, warmup_ratio=0.1, lr_decay="linear"),
    "demo_low_lr": replace(DEMO_RECIPE, lr=2e-5),
    "query_only": replace(DEMO_RECIPE, phases=1, max_steps_per_phase=16),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--label-work", type=Path, default=REPO / ".bench" / "training_labels",
                        help="bench.training_labels' work folder (source pairs, mined candidates)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "demo_training")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo_training")
    args = parser.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    if args.data is None:
        parser.error("no data folder: pass --data or set EMBEDKOMB_DATA_DIR")

    from bench.training_labels import prepare_split
    from embedkomb_pipeline.evaluation.harness import evaluate_model, resolve_tasks
    from embedkomb_pipeline.mining.embedding import default_base_model_path
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer
    from embedkomb_pipeline.training.data import build_training_set

    base = default_base_model_path()
    source, candidates = prepare_split(SPLIT, args.data, args.label_work, 20)
    data = build_training_set([source], [], [candidates])
    print(f"training set: {data.counts}", flush=True)
    tasks = resolve_tasks(["scifact"], args.data, source="local")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out / "runs.jsonl"
    lines = runs_file.read_text().splitlines() if runs_file.exists() else []
    done = {(r["recipe"], r["seed"]) for r in map(json.loads, lines)}

    def score(model_dir: Path, name: str) -> float:
        scores = evaluate_model(model_dir, tasks, args.work / "mteb", f"embedkomb-demo-training/{name}",
                                log=lambda m: print(f"  {m}", flush=True), overwrite=True)  # fmt: skip
        return round(scores.tasks[tasks[0].name]["ndcg_at_10"], 5)

    todo = [("base", 0)] + [(r, s) for r in args.recipes for s in args.seeds]
    for recipe, seed in todo:
        if (recipe, seed) in done:
            continue
        started = time.perf_counter()
        if recipe == "base":
            ndcg, config = score(base, "base"), None
        else:
            config = replace(RECIPES[recipe], seed=seed)
            trainer = TowerTrainer(base, data, config)
            tag = f"{recipe} s{seed}"
            trainer.train(log=lambda m, tag=tag: print(f"  {tag}: {m}", flush=True), track_objective=False)
            model_dir = trainer.save(args.work / "models" / f"{recipe}-s{seed}")["model"]
            del trainer
            ndcg = score(model_dir, f"{recipe}-s{seed}")
            shutil.rmtree(model_dir.parent, ignore_errors=True)
        run = {"recipe": recipe, "seed": seed, "scifact_ndcg_at_10": ndcg, "config": asdict(config) if config else None,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        with runs_file.open("a") as handle:
            handle.write(json.dumps(run) + "\n")
        print(f"{recipe} s{seed}: SciFact nDCG@10 {ndcg} ({run['seconds']} s)", flush=True)

    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    base_score = next(r["scifact_ndcg_at_10"] for r in runs if r["recipe"] == "base")
    table = []
    for recipe in ["base", *RECIPES]:
        values = [r["scifact_ndcg_at_10"] for r in runs if r["recipe"] == recipe]
        if values:
            mean = statistics.fmean(values)
            table.append({"recipe": recipe, "seeds": len(values), "mean": round(mean, 5),
                          "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
                          "vs_base": round(mean - base_score, 5)})  # fmt: skip
    results = {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": "python -m bench.demo_training " + " ".join(sys.argv[1:]), "training_set": data.counts,
               "table": table}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"SciFact test nDCG@10 × 100 of short recipes on the demo's training set ({results['generated_at']}; "
             f"`{results['command']}`)", "", "| recipe | seeds | nDCG@10 | vs base |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {row['recipe']} | {row['seeds']} | {100 * row['mean']:.2f} ± {100 * row['std']:.2f} | "
              f"{100 * row['vs_base']:+.2f} |" for row in table]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
