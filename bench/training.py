"""Training throughput and peak memory: exact softmax (coordinate ascent), our InfoNCE, and sentence-transformers'
own SentenceTransformerTrainer with MultipleNegativesRankingLoss, on the same model, data, batch and sequence length.

Data: the scifact_title_abstract sample split (real SciFact titles → abstracts), one BM25 (bm25s) hard negative
per title, standing in for a verified non-relevant candidate. Every method sees the same (title, abstract,
hard negative) rows in the same order: MNRL and our InfoNCE score each title against the batch's abstracts and
hard negatives; the exact softmax scores it against the whole corpus cache (--corpus documents).

Each method runs in its own fresh process, so peak memory is its own: peak RSS on CPU, and
torch.cuda.max_memory_allocated on a GPU. examples/s counts training titles per second over --steps optimizer
steps (the first included for every method). For the exact softmax the cache build (one no-grad pass of the frozen
tower over the corpus, once per phase) is reported apart and amortized over one epoch of the corpus.

    flock /tmp/embedkomb-bench.lock .venv/bin/python -m bench.training             # CPU here, GPU when present
    python -m bench.training --corpus 5183 --steps 20 --batch-size 64 --max-seq-length 128

Data parallel (--nproc 1,2): the exact softmax and our InfoNCE also run under torchrun with each listed number of
processes (gloo on CPU, NCCL with one GPU per process when CUDA is there), printed next to the one-process
baseline (the same trainer without torch.distributed) measured in the same run. batch is the global batch, split
across the processes. Per rank: examples/s of the whole job, peak memory, and the frozen cache it holds (the
exact softmax shards it: each rank encodes and keeps 1/N of the corpus).

    .venv/bin/python -m bench.training --methods exact,infonce --nproc 1,2
    python -m bench.training --methods exact,infonce --nproc 8 --corpus 5183 --steps 20   # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedkomb_pipeline.training.coordinate_ascent import TrainConfig
    from embedkomb_pipeline.training.data import TrainingSet

REPO = Path(__file__).resolve().parents[1]
NAMES = {"exact": "exact softmax (ours)", "infonce": "InfoNCE (ours)", "mnrl": "ST trainer + MNRL"}


def build_rows(data_dir: Path, corpus: int, work: Path) -> Path:
    """(query, positive, negative) rows: titles, their abstracts, and each title's best other BM25 hit."""
    import bm25s
    import polars as pl

    from embedkomb_pipeline.sources.pairs import iter_sample_split, write_source_pairs

    source = work / "source.parquet"
    write_source_pairs(iter_sample_split("scifact_title_abstract", data_dir), "scifact_title_abstract", source)
    frame = pl.read_parquet(source).head(corpus)
    queries, docs = frame["query"].to_list(), frame["document"].to_list()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    hits, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=2, show_progress=False)
    negatives = [int(h[1]) if int(h[0]) == i else int(h[0]) for i, h in enumerate(hits)]
    rows = work / "rows.json"
    rows.write_text(json.dumps({"query": queries, "positive": docs, "negative": negatives}))
    return rows


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_set(rows: dict) -> TrainingSet:
    """The rows as a TrainingSet: positive = own abstract, one hard negative, no masks (nothing unverified)."""
    from embedkomb_pipeline.training.data import TrainingSet

    n = len(rows["query"])
    return TrainingSet(
        query_ids=[str(i) for i in range(n)],
        queries=rows["query"],
        doc_ids=[str(i) for i in range(n)],
        documents=rows["positive"],
        positives=[[i] for i in range(n)],
        hard_negatives=[[j] for j in rows["negative"]],
        masked=[[] for _ in range(n)],
    )


def bench_config(args: argparse.Namespace, n: int) -> TrainConfig:
    """The measured recipe: one phase of --steps batches of --batch-size over n queries, the same in every mode."""
    from embedkomb_pipeline.training.coordinate_ascent import TrainConfig

    return TrainConfig(
        loss="exact" if args.worker == "exact" else "infonce",
        phases=1,
        epochs_per_phase=args.steps * args.batch_size / n,
        max_steps_per_phase=args.steps,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        chunk_size=args.chunk_size,
        hard_negatives_per_query=1,
    )


def distributed_worker(args: argparse.Namespace) -> dict | None:
    """One rank under torchrun: train, measure, hand rank 0 every rank's figures; rank 0 returns them."""
    import torch

    from embedkomb_pipeline.mining.embedding import default_base_model_path
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer
    from embedkomb_pipeline.training.distributed import all_gather_objects, init_from_env, shutdown

    topology = init_from_env("auto")
    rows = json.loads(Path(args.rows).read_text())
    n, bs = len(rows["query"]), args.batch_size
    config = bench_config(args, n)
    trainer = TowerTrainer(default_base_model_path(), training_set(rows), config, topology)
    device = trainer.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = trainer.train(log=lambda _: None, track_objective=False)
    total = time.perf_counter() - t0
    step_seconds = sum(s["seconds"] for s in res.steps)
    mine = {
        "rank": topology.rank,
        "seconds": step_seconds,
        "examples_per_second": res.examples / step_seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "threads": torch.get_num_threads(),
        "cache_rows": res.cache[0]["rows"] if res.cache else 0,
        "cache_mb": res.cache[0]["bytes"] / 2**20 if res.cache else 0.0,
        "cache_seconds": total - step_seconds,
    }
    ranks = all_gather_objects(mine, topology)
    shutdown(topology)
    if topology.rank:
        return None
    return {
        "method": args.worker,
        "processes": topology.world_size,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "corpus": n,
        "batch_size": bs,
        "steps": len(res.steps),
        # the ranks step together: the job's examples/s is what rank 0 measured over the whole global batch
        "examples_per_second": ranks[0]["examples_per_second"],
        "loss_first": res.steps[0]["loss"],
        "loss_last": res.steps[-1]["loss"],
        "ranks": ranks,
    }


def worker(args: argparse.Namespace) -> dict:
    import torch

    from embedkomb_pipeline.mining.embedding import default_base_model_path
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer

    rows = json.loads(Path(args.rows).read_text())
    n = len(rows["query"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = default_base_model_path()
    steps, bs = args.steps, args.batch_size
    result: dict = {"method": args.worker, "device": device, "corpus": n, "batch_size": bs, "steps": steps}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    else:
        result["threads"] = torch.get_num_threads()

    if args.worker == "mnrl":
        from datasets import Dataset
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
        from sentence_transformers.losses import MultipleNegativesRankingLoss

        model = SentenceTransformer(str(base), device=device, local_files_only=True)
        model.max_seq_length = args.max_seq_length
        order = list(range(n))[: steps * bs]
        dataset = Dataset.from_dict(
            {
                "anchor": [rows["query"][i] for i in order],
                "positive": [rows["positive"][i] for i in order],
                "negative": [rows["positive"][rows["negative"][i]] for i in order],
            }
        )
        with tempfile.TemporaryDirectory() as out:
            training_args = SentenceTransformerTrainingArguments(
                output_dir=out,
                per_device_train_batch_size=bs,
                max_steps=steps,
                learning_rate=1e-4,
                warmup_steps=0,
                save_strategy="no",
                logging_steps=10_000,
                report_to="none",
                bf16=device == "cuda",
                dataloader_drop_last=True,
                seed=0,
            )
            st_trainer = SentenceTransformerTrainer(
                model=model,
                args=training_args,
                train_dataset=dataset,
                loss=MultipleNegativesRankingLoss(model),
            )
            t0 = time.perf_counter()
            st_trainer.train()
            seconds = time.perf_counter() - t0
        result.update(seconds=seconds, examples_per_second=steps * bs / seconds)
    else:
        data = training_set(rows)
        config = bench_config(args, n)
        trainer = TowerTrainer(base, data, config)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        logs: list[str] = []
        t0 = time.perf_counter()
        res = trainer.train(log=logs.append, track_objective=False)
        total = time.perf_counter() - t0
        step_seconds = sum(s["seconds"] for s in res.steps)
        result.update(seconds=step_seconds, examples_per_second=res.examples / step_seconds)
        if args.worker == "exact":
            cache_seconds = total - step_seconds
            epoch_steps_seconds = n / result["examples_per_second"]
            result.update(
                cache_seconds=cache_seconds,
                cache_rows=n,
                epoch_examples_per_second=n / (epoch_steps_seconds + cache_seconds),
                loss_first=res.steps[0]["loss"],
                loss_last=res.steps[-1]["loss"],
                cache_mb=res.cache[0]["bytes"] / 2**20 if res.cache else 0.0,
            )
        else:
            result.update(loss_first=res.steps[0]["loss"], loss_last=res.steps[-1]["loss"])
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["peak_memory_kind"] = "cuda max_memory_allocated" if device == "cuda" else "process peak RSS"
    return result


def run_worker(args: argparse.Namespace, method: str, rows: Path, nproc: int | None = None) -> dict:
    """One method in a fresh process (its peak memory its own): plain, or under torchrun with nproc processes."""
    cmd = [sys.executable, "-m", "bench.training", "--worker", method, "--rows", str(rows)]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench.training", "--worker", method, "--distributed", "--rows", str(rows)]  # fmt: skip
    for flag in ("corpus", "steps", "batch_size", "max_seq_length", "chunk_size"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} failed" + (f" with {nproc} processes" if nproc else ""))
    return json.loads(line[len("RESULT ") :])


def data_parallel(args: argparse.Namespace, rows: Path) -> None:
    """The exact softmax and InfoNCE under torchrun with each --nproc count, next to the one-process baseline."""
    counts = [int(n) for n in args.nproc.split(",")]
    methods = [m for m in args.methods.split(",") if m in ("exact", "infonce")]
    if not methods:
        raise SystemExit("--nproc compares exact and infonce: name at least one of them in --methods")
    results = []
    for method in methods:
        results.append({**run_worker(args, method, rows), "processes": "baseline"})
        results += [run_worker(args, method, rows, n) for n in counts]
    print(f"corpus {args.corpus} SciFact titles → abstracts, global batch {args.batch_size} (split across the "
          f"processes), {args.steps} steps, max_seq_length {args.max_seq_length}, all-MiniLM-L6-v2")  # fmt: skip
    print("baseline: the trainer in one process without torch.distributed; N: torchrun with N processes "
          "(ex/s: the whole job's; memory and cache: per rank)")  # fmt: skip
    header = f"{'method':22} {'procs':>8} {'examples/s':>11} {'× base':>7} {'threads':>8} {'peak MB/rank':>13}"
    print(header + f" {'cache rows/rank':>16} {'cache MB/rank':>14}  loss first → last")
    for method in methods:
        base = next(r for r in results if r["method"] == method and r["processes"] == "baseline")
        for r in (r for r in results if r["method"] == method):
            ranks = r.get("ranks") or [
                {"peak_memory_mb": r["peak_memory_mb"], "threads": r.get("threads", "-"),
                 "cache_rows": r.get("cache_rows", 0), "cache_mb": r.get("cache_mb", 0.0)}]  # fmt: skip
            peak = "/".join(f"{x['peak_memory_mb']:.0f}" for x in ranks)
            threads = "/".join(str(x["threads"]) for x in ranks)
            cache_rows = "/".join(str(x["cache_rows"]) for x in ranks) if method == "exact" else "-"
            cache_mb = "/".join(f"{x['cache_mb']:.2f}" for x in ranks) if method == "exact" else "-"
            speedup = r["examples_per_second"] / base["examples_per_second"]
            print(f"{NAMES[method]:22} {r['processes']!s:>8} {r['examples_per_second']:11.1f} {speedup:7.2f} "
                  f"{threads:>8} {peak:>13} {cache_rows:>16} {cache_mb:>14}  "
                  f"{r['loss_first']:.3f} → {r['loss_last']:.3f}")  # fmt: skip
    print("peak memory: " + results[0]["peak_memory_kind"] + " of each process")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=int, default=2000, help="documents (and titles) from SciFact")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument(
        "--data-dir", default=os.environ.get("EMBEDKOMB_DATA_DIR", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--methods", default="exact,infonce,mnrl")
    parser.add_argument(
        "--nproc",
        help="comma-separated process counts (e.g. 1,2): run exact and infonce under torchrun with each, next to "
        "the one-process baseline",
    )
    parser.add_argument("--worker", choices=["exact", "infonce", "mnrl"], help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker and args.distributed:
        result = distributed_worker(args)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else f" ({os.cpu_count()} cores)")
    )
    with tempfile.TemporaryDirectory() as work:
        rows = build_rows(Path(args.data_dir) / "scifact", args.corpus, Path(work))
        if args.nproc:
            data_parallel(args, rows)
            return
        results = [run_worker(args, method, rows) for method in args.methods.split(",")]
    print(f"corpus {args.corpus} SciFact titles → abstracts, batch {args.batch_size}, {args.steps} steps, "
          f"max_seq_length {args.max_seq_length}, all-MiniLM-L6-v2, lr 1e-4")  # fmt: skip
    names = NAMES
    print(f"{'method':24} {'examples/s':>11} {'peak MB':>9}  notes")
    for r in results:
        notes = ""
        if r["method"] == "exact":
            notes = (
                f"cache of {r['cache_rows']} rows built in {r['cache_seconds']:.1f} s per phase; "
                f"{r['epoch_examples_per_second']:.1f} ex/s over an epoch incl. the cache; "
                f"loss {r['loss_first']:.3f} → {r['loss_last']:.3f}"
            )
        print(f"{names[r['method']]:24} {r['examples_per_second']:11.1f} {r['peak_memory_mb']:9.0f}  {notes}")
    print("peak memory: " + results[0]["peak_memory_kind"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
