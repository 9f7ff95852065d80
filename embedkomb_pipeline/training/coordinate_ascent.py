"""Training a sentence-transformers model on a TrainingSet: exact softmax with coordinate ascent, or InfoNCE.

Coordinate ascent (Morris et al. 2022): two towers, query and document (one shared model allowed). A phase
freezes one tower, embeds the whole training corpus of the other side with it (no gradients) into an N × d
cache, and trains the other tower's anchors against all N rows with ExactSoftmaxLoss. The next phase swaps
sides and re-encodes the cache with the tower just trained (the fresher of the two options the 2022 code has).

The InfoNCE baseline trains both towers at once on in-batch candidates: each query's sampled positive, the
other queries' positives, and verified hard negatives; candidates the query has as positive count as positives,
masked (unverified mined) ones leave the denominator.

CPU by default here; CUDA when present (bf16 autocast and a bf16 cache there).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from embedkomb_pipeline.training.data import Side, SideView, TrainingSet
from embedkomb_pipeline.training.losses import PAD, ExactSoftmaxLoss, InfoNCELoss

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass
class TrainConfig:
    """Every knob of one training run; saved next to the checkpoint as training_config.json."""

    loss: Literal["exact", "infonce"] = "exact"
    towers: Literal["shared", "separate"] = "shared"
    phases: int = 2  # exact: coordinate-ascent phases (sides alternate); infonce: epochs over the queries
    epochs_per_phase: float = 1.0
    max_steps_per_phase: int | None = None  # cap on optimizer steps per phase (tests, benchmarks)
    first_side: Side = "query"
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    temperature: float = 0.05  # MultipleNegativesRankingLoss' scale 20
    chunk_size: int = 8192
    matryoshka_dims: tuple[int, ...] | None = None
    label_smoothing: float = 0.0  # exact only; the 2022 code uses 0.01
    hard_negatives_per_query: int = 1  # infonce only: verified non-relevant documents sampled into each batch
    max_seq_length: int = 256
    encode_batch_size: int = 128
    # the frozen cache's forward passes (no gradients): "bf16" runs them under CPU autocast, several times faster
    # on CPUs with AVX512-BF16 (the demo uses it); on a GPU the cache is always computed and kept in bf16
    cache_precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainResult:
    config: TrainConfig
    steps: list[dict] = field(default_factory=list)  # one row per optimizer step: phase, side, loss, seconds
    phase_objectives: list[dict] = field(default_factory=list)  # full-corpus loss before and after each phase
    seconds: float = 0.0
    examples: int = 0
    device: str = "cpu"

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

    def metrics(self) -> dict:
        first, last = (self.phase_objectives[0], self.phase_objectives[-1]) if self.phase_objectives else ({}, {})
        return {
            "loss": self.config.loss,
            "device": self.device,
            "steps": len(self.steps),
            "examples": self.examples,
            "seconds": round(self.seconds, 2),
            "examples_per_second": round(self.examples_per_second, 2),
            "objective_before": (first.get("before") or {}).get("mean"),
            "objective_after": (last.get("after") or {}).get("mean"),
            "phases": self.phase_objectives,
        }


def _pad(lists: Sequence[Sequence[int]], device: str) -> Tensor:
    width = max(1, max((len(x) for x in lists), default=1))
    out = torch.full((len(lists), width), PAD, dtype=torch.long)
    for i, x in enumerate(lists):
        if x:
            out[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
    return out.to(device)


class TowerTrainer:
    """Holds the query and document towers (the same object when shared) and trains them on one TrainingSet."""

    def __init__(self, base_model: str | Path, data: TrainingSet, config: TrainConfig) -> None:
        from sentence_transformers import SentenceTransformer

        self.config = config
        self.data = data
        self.device = config.resolved_device()
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)

        def load() -> SentenceTransformer:
            model = SentenceTransformer(str(base_model), device=self.device, local_files_only=True)
            self.base_max_seq_length = model.max_seq_length
            model.max_seq_length = min(config.max_seq_length, model.max_seq_length or config.max_seq_length)
            return model

        self.query_tower = load()
        self.document_tower = self.query_tower if config.towers == "shared" else load()
        towers = [self.query_tower] if config.towers == "shared" else [self.query_tower, self.document_tower]
        # one optimizer per tower: in coordinate ascent a tower's Adam state survives the phases it sits out
        self.optimizers = {
            id(t): torch.optim.AdamW(t.parameters(), lr=config.lr, weight_decay=config.weight_decay) for t in towers
        }
        self.exact = ExactSoftmaxLoss(
            config.temperature, config.chunk_size, config.matryoshka_dims, config.label_smoothing
        )
        # the reported objective is the plain definition (full size, no smoothing), whatever the training loss adds
        self.objective_loss = ExactSoftmaxLoss(config.temperature, config.chunk_size)
        self.infonce = InfoNCELoss(config.temperature, config.matryoshka_dims)

    def tower(self, side: Side) -> SentenceTransformer:
        return self.query_tower if side == "query" else self.document_tower

    def _autocast(self) -> torch.autocast:
        # bf16 on GPUs; on CPU fp32 (bf16 training there is emulated on most machines and loses precision)
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda"))

    def embed(self, side: Side, texts: Sequence[str]) -> Tensor:
        """The side's tower on texts, with gradients: normalized float32 embeddings."""
        model = self.tower(side)
        from sentence_transformers.util import batch_to_device

        # preprocess (sentence-transformers 6; `tokenize` is its deprecated name) returns tensors and metadata
        features = batch_to_device(model.preprocess(list(texts)), torch.device(self.device))
        with self._autocast():
            out = model(features)["sentence_embedding"]
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode(self, side: Side, texts: Sequence[str]) -> Tensor:
        """The whole list without gradients, in eval mode (no dropout): the frozen cache."""
        model = self.tower(side)
        was_training = model.training
        model.eval()
        cpu_bf16 = self.config.cache_precision == "bf16" and self.device == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
            out = model.encode(
                list(texts),
                batch_size=self.config.encode_batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).float()
        out = out.clone()  # encode runs under inference_mode; a clone is an ordinary tensor autograd can save
        model.train(was_training)
        # bf16 halves the cache on a GPU (DESIGN: N·d·2 bytes); the loss upcasts chunk by chunk
        return out.to(torch.bfloat16) if self.device.startswith("cuda") else out

    @torch.no_grad()
    def side_objective(self, side: Side, queries: Tensor, documents: Tensor, anchor_batch: int = 256) -> float:
        """The mean exact-softmax loss of one side's anchors over the whole other side, from given embeddings."""
        view = self.data.view(side)
        if side == "query":
            anchors, cache = queries, documents
        else:
            # the document view's anchors are the documents some query is positive for, in index order
            anchor_rows = sorted({d for docs in self.data.positives for d in docs})
            anchors, cache = documents[anchor_rows], queries
        total = 0.0
        for start in range(0, anchors.shape[0], anchor_batch):
            stop = start + anchor_batch
            per = self.objective_loss.per_anchor(
                anchors[start:stop].float(), cache, _pad(view.positives[start:stop], self.device),
                _pad(view.masked[start:stop], self.device),
            )  # fmt: skip
            total += float(per.sum())
        return total / max(1, anchors.shape[0])

    def objectives(self) -> dict[str, float]:
        """Query-side, document-side and mean exact loss over the whole corpus, towers in eval mode, fresh encodings.

        The mean is what coordinate ascent descends on: each phase lowers one side's term with the other fixed.
        """
        queries = self.encode("query", self.data.queries)
        documents = self.encode("document", self.data.documents)
        q = self.side_objective("query", queries, documents)
        d = self.side_objective("document", queries, documents)
        return {"query": q, "document": d, "mean": (q + d) / 2}

    def full_objective(self) -> float:
        return self.objectives()["mean"]

    def _batches(self, n: int, epochs: float, cap: int | None) -> list[list[int]]:
        order: list[int] = []
        while len(order) < math.ceil(n * epochs):
            perm = list(range(n))
            self.rng.shuffle(perm)
            order += perm
        order = order[: math.ceil(n * epochs)]
        bs = self.config.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        return batches[:cap] if cap is not None else batches

    def _step(self, side: Side, loss: Tensor) -> None:
        optimizer = self.optimizers[id(self.tower(side))]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def train_exact_phase(self, phase: int, side: Side, result: TrainResult, log: Callable[[str], None]) -> None:
        view: SideView = self.data.view(side)
        other: Side = "document" if side == "query" else "query"
        started = time.perf_counter()
        cache = self.encode(other, view.cache_texts)  # the frozen tower, the whole corpus, no gradients
        cache_seconds = time.perf_counter() - started
        self.tower(side).train()
        for batch in self._batches(
            len(view.anchor_texts), self.config.epochs_per_phase, self.config.max_steps_per_phase
        ):
            t0 = time.perf_counter()
            anchors = self.embed(side, [view.anchor_texts[i] for i in batch])
            loss = self.exact(
                anchors, cache, _pad([view.positives[i] for i in batch], self.device),
                _pad([view.masked[i] for i in batch], self.device),
            )  # fmt: skip
            self._step(side, loss)
            result.steps.append(
                {
                    "phase": phase,
                    "side": side,
                    "loss": loss.item(),
                    "batch": len(batch),
                    "seconds": time.perf_counter() - t0,
                }
            )
            result.examples += len(batch)
        log(f"phase {phase} ({side} tower, cache {len(view.cache_texts)} rows in {cache_seconds:.1f}s): "
            f"{sum(1 for s in result.steps if s['phase'] == phase)} steps")  # fmt: skip

    def train_infonce_epoch(self, epoch: int, result: TrainResult, log: Callable[[str], None]) -> None:
        data = self.data
        self.query_tower.train()
        self.document_tower.train()
        batches = self._batches(len(data.queries), self.config.epochs_per_phase, self.config.max_steps_per_phase)
        for batch in batches:
            t0 = time.perf_counter()
            # each query's sampled positive, then its sampled verified hard negatives; a document once
            picked = [self.rng.choice(data.positives[q]) for q in batch]
            for q in batch:
                negatives = data.hard_negatives[q]
                picked += self.rng.sample(negatives, min(len(negatives), self.config.hard_negatives_per_query))
            candidates = list(dict.fromkeys(picked))
            seen = {d: k for k, d in enumerate(candidates)}
            positive = torch.zeros(len(batch), len(candidates), dtype=torch.bool)
            masked = torch.zeros_like(positive)
            for i, q in enumerate(batch):
                for d in data.positives[q]:
                    if d in seen:
                        positive[i, seen[d]] = True
                for d in data.masked[q]:
                    if d in seen:
                        masked[i, seen[d]] = True
            anchors = self.embed("query", [data.queries[q] for q in batch])
            docs = self.embed("document", [data.documents[d] for d in candidates])
            loss = self.infonce(anchors, docs, positive.to(self.device), masked.to(self.device))
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in self.optimizers.values():
                optimizer.step()
            result.steps.append(
                {
                    "phase": epoch,
                    "side": "both",
                    "loss": loss.item(),
                    "batch": len(batch),
                    "seconds": time.perf_counter() - t0,
                }
            )
            result.examples += len(batch)
        log(f"infonce epoch {epoch}: {len(batches)} steps")

    def train(self, log: Callable[[str], None] = print, track_objective: bool = True) -> TrainResult:
        result = TrainResult(self.config, device=self.device)
        sides: tuple[Side, Side] = ("query", "document") if self.config.first_side == "query" else ("document", "query")
        before = self.objectives() if track_objective else None
        for phase in range(self.config.phases):
            t0 = time.perf_counter()
            if self.config.loss == "exact":
                self.train_exact_phase(phase, sides[phase % 2], result, log)
            else:
                self.train_infonce_epoch(phase, result, log)
            result.seconds += time.perf_counter() - t0  # training time only: the objective probes are not counted
            after = self.objectives() if track_objective else None
            result.phase_objectives.append({"phase": phase, "before": before, "after": after})
            if before and after:
                log(f"phase {phase}: full-corpus objective {before['mean']:.4f} -> {after['mean']:.4f}")
            before = after
        return result

    def save(self, out_dir: Path) -> dict[str, Path]:
        """sentence-transformers folders: model/ (shared, or the document tower) and query_model/ when separate.

        Mining loads model/ for queries and documents alike, so shared towers are what the cycle uses.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"model": out_dir / "model"}
        towers = [("model", self.document_tower)]
        if self.document_tower is not self.query_tower:
            paths["query_model"] = out_dir / "query_model"
            towers.append(("query_model", self.query_tower))
        for name, tower in towers:
            # the training window is a speed knob; the saved model keeps the base model's window for encoding
            trained_window = tower.max_seq_length
            tower.max_seq_length = self.base_max_seq_length
            try:
                tower.save(str(paths[name]))
            finally:
                tower.max_seq_length = trained_window
        return paths


def plot_loss_curve(result: TrainResult, path: Path, title: str = "training loss") -> Path:
    """Loss per optimizer step (and its running mean), phases shaded, full-corpus objective marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    losses = [s["loss"] for s in result.steps]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.plot(losses, color="#9ab", lw=0.8, label="step loss")
    ax.plot(smooth, color="#135", lw=1.6, label=f"running mean ({window})")
    start = 0
    for phase in sorted({s["phase"] for s in result.steps}):
        n = sum(1 for s in result.steps if s["phase"] == phase)
        side = next(s["side"] for s in result.steps if s["phase"] == phase)
        if phase % 2:
            ax.axvspan(start - 0.5, start + n - 0.5, color="#eee")
        ax.text(start, ax.get_ylim()[1], f" {side}", va="top", fontsize=8)
        start += n
    # the full-corpus objective (both sides, fresh encodings) before training and after each phase
    tracked = [p for p in result.phase_objectives if p.get("after")]
    if tracked:
        ends = [sum(1 for s in result.steps if s["phase"] <= p["phase"]) - 0.5 for p in tracked]
        ax.plot(
            [-0.5, *ends],
            [tracked[0]["before"]["mean"], *(p["after"]["mean"] for p in tracked)],
            "o--",
            color="#c50",
            lw=1.2,
            label="full-corpus objective",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_checkpoint(
    trainer: TowerTrainer, result: TrainResult, out_dir: Path, extra: dict | None = None
) -> dict[str, Path]:
    """The models plus training_config.json, metrics.json and loss_curve.png, side by side."""
    paths = trainer.save(out_dir)
    config = {**asdict(result.config), **(extra or {})}
    (out_dir / "training_config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    metrics = {**result.metrics(), "data": trainer.data.counts}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (out_dir / "loss_steps.json").write_text(json.dumps(result.steps), encoding="utf-8")
    paths["loss_curve"] = plot_loss_curve(result, out_dir / "loss_curve.png", f"{result.config.loss} loss per step")
    paths["metrics"] = out_dir / "metrics.json"
    paths["config"] = out_dir / "training_config.json"
    return paths
