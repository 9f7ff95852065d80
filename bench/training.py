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

REPO = Path(__file__).resolve().parents[1]


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


def worker(args: argparse.Namespace) -> dict:
    import torch

    from embedkomb_pipeline.mining.embedding import default_base_model_path
    from embedkomb_pipeline.training.coordinate_ascent import TowerTrainer, TrainConfig
    from embedkomb_pipeline.training.data import TrainingSet

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
            trainer = SentenceTransformerTrainer(
                model=model,
                args=training_args,
                train_dataset=dataset,
                loss=MultipleNegativesRankingLoss(model),
            )
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
        result.update(seconds=seconds, examples_per_second=steps * bs / seconds)
    else:
        # the same rows as a TrainingSet: positive = own abstract, one hard negative, no masks (nothing unverified)
        data = TrainingSet(
            query_ids=[str(i) for i in range(n)],
            queries=rows["query"],
            doc_ids=[str(i) for i in range(n)],
            documents=rows["positive"],
            positives=[[i] for i in range(n)],
            hard_negatives=[[j] for j in rows["negative"]],
            masked=[[] for _ in range(n)],
        )
        config = TrainConfig(
            loss="exact" if args.worker == "exact" else "infonce",
            phases=1,
            epochs_per_phase=steps * bs / n,
            max_steps_per_phase=steps,
            batch_size=bs,
            max_seq_length=args.max_seq_length,
            chunk_size=args.chunk_size,
            hard_negatives_per_query=1,
        )
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
            )
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["peak_memory_kind"] = "cuda max_memory_allocated" if device == "cuda" else "process peak RSS"
    return result


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
    parser.add_argument("--worker", choices=["exact", "infonce", "mnrl"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
        results = []
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "bench.training", "--worker", method, "--rows", str(rows)]
            for flag in ("corpus", "steps", "batch_size", "max_seq_length", "chunk_size"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=REPO)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            results.append(json.loads(line[len("RESULT ") :]))
    print(f"corpus {args.corpus} SciFact titles → abstracts, batch {args.batch_size}, {args.steps} steps, "
          f"max_seq_length {args.max_seq_length}, all-MiniLM-L6-v2, lr 1e-4")  # fmt: skip
    names = {"exact": "exact softmax (ours)", "infonce": "InfoNCE (ours)", "mnrl": "ST trainer + MNRL"}
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
