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

import bisect
import functools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from embedkomb_pipeline.training.data import Side, SideView, TrainingSet
from embedkomb_pipeline.training.distributed import (
    Topology,
    all_reduce_,
    check_replicas_agree,
    data_parallel_module,
    freeze_parameters_without_gradient,
    single_process,
)
from embedkomb_pipeline.training.losses import (
    PAD,
    ExactSoftmaxLoss,
    InfoNCELoss,
    ShardedExactSoftmaxLoss,
    ShardedInfoNCELoss,
)
from embedkomb_pipeline.training.presets import load_sentence_transformer
from embedkomb_pipeline.training.resume import Checkpointing, PhaseProgress

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
    # The learning-rate schedule over each optimizer's steps: warmed up linearly over the first warmup_ratio of them,
    # then constant or decayed linearly to zero (sentence-transformers' default: 0.1, "linear"). A fine-tuned model
    # hit at full lr by Adam's first, sign-like steps loses more than a short run wins back (bench.demo_training).
    warmup_ratio: float = 0.0
    lr_decay: Literal["constant", "linear"] = "constant"
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

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_decay not in ("constant", "linear"):
            raise ValueError(f"lr_decay must be 'constant' or 'linear', got {self.lr_decay!r}")

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def lr_factor(step: int, total: int, warmup_ratio: float, decay: str) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``: linear warm-up over the first
    ``warmup_ratio`` of the steps, then 1 (constant) or a linear decay that reaches 0 after the last step."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return 1.0


@dataclass
class TrainResult:
    config: TrainConfig
    steps: list[dict] = field(default_factory=list)  # one row per optimizer step: phase, side, loss, seconds
    phase_objectives: list[dict] = field(default_factory=list)  # full-corpus loss before and after each phase
    seconds: float = 0.0
    examples: int = 0
    device: str = "cpu"
    world_size: int = 1  # processes that trained together (torchrun); examples count all of them
    cache: list[dict] = field(default_factory=list)  # per exact phase: rank 0's cache rows, of how many, bytes
    resumed_from_step: int | None = None  # the steps a resumed run found done

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
            "world_size": self.world_size,
            "cache_per_rank": self.cache,
            "resumed_from_step": self.resumed_from_step,
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

    def __init__(
        self, base_model: str | Path, data: TrainingSet, config: TrainConfig, topology: Topology | None = None
    ) -> None:
        """base_model: a local folder or a Hub id (presets.load_sentence_transformer). topology: this process's
        place in a torchrun job (distributed.init_from_env); None trains in this process alone."""
        self.config = config
        self.data = data
        self.topology = topology or single_process()
        # under torchrun each process drives its own device: cuda:LOCAL_RANK with NCCL, the CPU with gloo
        self.device = self.topology.device if self.topology.distributed else config.resolved_device()
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)  # the batch order: the same stream on every rank

        def load() -> SentenceTransformer:
            model = load_sentence_transformer(base_model, self.device)
            self.base_max_seq_length = model.max_seq_length
            model.max_seq_length = min(config.max_seq_length, model.max_seq_length or config.max_seq_length)
            return model

        self.query_tower = load()
        self.document_tower = self.query_tower if config.towers == "shared" else load()
        towers = [self.query_tower] if config.towers == "shared" else [self.query_tower, self.document_tower]
        # the trainable towers under DistributedDataParallel (by id of the tower); the frozen cache is encoded by the
        # bare tower, outside DDP, without gradients
        self.data_parallel: dict[int, nn.Module] = {}
        if self.topology.distributed:
            # each rank its own dropout stream, a function of seed and rank (and restored on resume)
            torch.manual_seed(config.seed + self.topology.rank)
            for tower in towers:
                frozen = freeze_parameters_without_gradient(tower, functools.partial(self._forward, tower, ["probe"]))
                if frozen and self.topology.is_main:
                    print(f"not trained (no gradient reaches them): {', '.join(frozen)}", flush=True)
            self.data_parallel = {id(t): data_parallel_module(t, self.device) for t in towers}
        # one optimizer per tower: in coordinate ascent a tower's Adam state survives the phases it sits out
        self.optimizers = {
            id(t): torch.optim.AdamW(t.parameters(), lr=config.lr, weight_decay=config.weight_decay) for t in towers
        }
        self.schedules: dict[int, torch.optim.lr_scheduler.LambdaLR] = {}  # by id(optimizer); set by train()
        group = self.topology.loss_group
        self.exact: ExactSoftmaxLoss
        self.objective_loss: ExactSoftmaxLoss
        if self.topology.distributed:
            # each rank holds 1/W of the cache; the losses combine the shards with collectives
            self.exact = ShardedExactSoftmaxLoss(
                group, config.temperature, config.chunk_size, config.matryoshka_dims, config.label_smoothing
            )
            self.objective_loss = ShardedExactSoftmaxLoss(group, config.temperature, config.chunk_size)
            self.sharded_infonce = ShardedInfoNCELoss(group, config.temperature, config.matryoshka_dims)
        else:
            self.exact = ExactSoftmaxLoss(
                config.temperature, config.chunk_size, config.matryoshka_dims, config.label_smoothing
            )
            # the reported objective is the plain definition (full size, no smoothing), whatever training adds
            self.objective_loss = ExactSoftmaxLoss(config.temperature, config.chunk_size)
        self.infonce = InfoNCELoss(config.temperature, config.matryoshka_dims)
        self.checkpointing: Checkpointing | None = None  # set by train()
        self.before_step: Callable[[int], None] | None = None  # set by train()

    def tower(self, side: Side) -> SentenceTransformer:
        return self.query_tower if side == "query" else self.document_tower

    def _autocast(self) -> torch.autocast:
        # bf16 on GPUs; on CPU fp32 (bf16 training there is emulated on most machines and loses precision)
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda"))

    def _forward(self, model: SentenceTransformer, texts: Sequence[str], module: nn.Module | None = None) -> Tensor:
        """model's raw sentence embeddings of texts, with gradients; through `module` (its DDP wrapper) if given."""
        from sentence_transformers.util import batch_to_device

        # preprocess (sentence-transformers 6; `tokenize` is its deprecated name) returns tensors and metadata
        features = batch_to_device(model.preprocess(list(texts)), torch.device(self.device))
        with self._autocast():
            return (module or model)(features)["sentence_embedding"]

    def embed(self, side: Side, texts: Sequence[str]) -> Tensor:
        """The side's tower on texts, with gradients: normalized float32 embeddings."""
        model = self.tower(side)
        out = self._forward(model, texts, self.data_parallel.get(id(model)))  # DDP all-reduces gradients in backward
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode(self, side: Side, texts: Sequence[str]) -> Tensor:
        """The whole list without gradients, in eval mode (no dropout): the frozen cache."""
        model = self.tower(side)
        if not texts:  # a rank whose shard is empty (fewer rows than ranks)
            width = model.get_embedding_dimension() or 0
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            return torch.zeros((0, width), dtype=dtype, device=self.device)
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

    @torch.no_grad()
    def _sharded_side_objective(
        self, view: SideView, anchors: Tensor, first: int, cache: Tensor, anchor_batch: int = 256
    ) -> float:
        """side_objective across ranks: this rank's anchors are view rows first.. of the view, cache its shard."""
        group = self.topology.loss_group
        rounds = torch.tensor([math.ceil(anchors.shape[0] / anchor_batch)], device=self.device)
        all_reduce_(rounds, group, dist.ReduceOp.MAX)  # every rank joins every round's collectives
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, anchors
        for start in range(0, int(rounds.item()) * anchor_batch, anchor_batch):
            stop = min(start + anchor_batch, anchors.shape[0])
            start = min(start, stop)
            per = self.objective_loss.per_anchor(
                anchors[start:stop].float(), cache, _pad(view.positives[first + start : first + stop], self.device),
                _pad(view.masked[first + start : first + stop], self.device),
            )  # fmt: skip
            total += torch.stack([per.sum().double(), torch.tensor(float(stop - start), device=self.device)])
        all_reduce_(total, group)
        return float(total[0] / total[1].clamp(min=1))

    def _sharded_objectives(self) -> tuple[float, float]:
        """Both sides' objectives with every rank encoding only its shard of the queries and of the documents."""
        q_lo, q_hi = self.topology.shard(len(self.data.queries))
        d_lo, d_hi = self.topology.shard(len(self.data.documents))
        queries = self.encode("query", self.data.queries[q_lo:q_hi])
        documents = self.encode("document", self.data.documents[d_lo:d_hi])
        q = self._sharded_side_objective(self.data.view("query"), queries, q_lo, documents)
        # the document view's anchors are the documents with a positive, in index order: this rank's are a run
        anchor_rows = sorted({d for docs in self.data.positives for d in docs})
        k_lo, k_hi = bisect.bisect_left(anchor_rows, d_lo), bisect.bisect_left(anchor_rows, d_hi)
        mine = documents[[r - d_lo for r in anchor_rows[k_lo:k_hi]]]
        d = self._sharded_side_objective(self.data.view("document"), mine, k_lo, queries)
        return q, d

    def objectives(self) -> dict[str, float]:
        """Query-side, document-side and mean exact loss over the whole corpus, towers in eval mode, fresh encodings.

        The mean is what coordinate ascent descends on: each phase lowers one side's term with the other fixed.
        """
        if self.topology.distributed:
            q, d = self._sharded_objectives()
            return {"query": q, "document": d, "mean": (q + d) / 2}
        queries = self.encode("query", self.data.queries)
        documents = self.encode("document", self.data.documents)
        q = self.side_objective("query", queries, documents)
        d = self.side_objective("document", queries, documents)
        return {"query": q, "document": d, "mean": (q + d) / 2}

    def full_objective(self) -> float:
        return self.objectives()["mean"]

    def _batch_spans(self, drawn: int, cap: int | None) -> list[tuple[int, int]]:
        """The [start, stop) spans of the batches cut from `drawn` anchors in order. Under torchrun batch_size is the
        global batch, split across ranks, and a last batch too small to give every rank an anchor is dropped (every
        rank must take part in every step's collectives). The one home of that rule for _batches and _phase_steps."""
        bs = self.config.batch_size
        spans = [(i, min(i + bs, drawn)) for i in range(0, drawn, bs)]
        if self.topology.world_size > 1:
            spans = [(a, b) for a, b in spans if b - a >= self.topology.world_size]
        return spans[:cap] if cap is not None else spans

    def _batches(self, n: int, epochs: float, cap: int | None) -> list[list[int]]:
        order: list[int] = []
        while len(order) < math.ceil(n * epochs):
            perm = list(range(n))
            self.rng.shuffle(perm)
            order += perm
        order = order[: math.ceil(n * epochs)]
        return [order[a:b] for a, b in self._batch_spans(len(order), cap)]

    def _my_part(self, batch: list[int]) -> list[int]:
        """This rank's share of a global batch (all of it in one process)."""
        lo, hi = self.topology.shard(len(batch))
        return batch[lo:hi]

    def _backward(self, loss: Tensor) -> None:
        """Under DDP each rank's loss is its part of the batch loss (the parts sum to it) and DDP averages the
        gradients over the W ranks; × W turns that average into the sum, the one-process gradient."""
        (loss * self.topology.world_size if self.topology.distributed else loss).backward()

    def _batch_loss(self, loss: Tensor) -> float:
        """The whole batch's loss for the record: the sum of the ranks' parts."""
        if not self.topology.distributed:
            return loss.item()
        return float(all_reduce_(loss.detach().clone(), self.topology.loss_group).item())

    def _begin_step(self, result: TrainResult) -> None:
        if self.before_step is not None:
            self.before_step(len(result.steps))

    def _end_step(self, progress: PhaseProgress, step: int, result: TrainResult) -> None:
        progress.done = step + 1
        if self.checkpointing is not None:
            self.checkpointing.after_step(progress, result)

    def _phase_steps(self, n_anchors: int) -> int:
        """How many optimizer steps _batches makes of n anchors (without drawing its random order)."""
        drawn = math.ceil(n_anchors * self.config.epochs_per_phase)
        return len(self._batch_spans(drawn, self.config.max_steps_per_phase))

    def _schedule(self, sides: tuple[Side, Side]) -> None:
        """One LambdaLR per optimizer over the steps that optimizer will take in this run (shared towers: all)."""
        planned: dict[int, int] = dict.fromkeys(self.optimizers, 0)
        for phase in range(self.config.phases):
            if self.config.loss == "exact":
                side = sides[phase % 2]
                planned[id(self.tower(side))] += self._phase_steps(len(self.data.view(side).anchor_texts))
            else:
                for key in planned:
                    planned[key] += self._phase_steps(len(self.data.queries))
        for key, optimizer in self.optimizers.items():
            factor = functools.partial(
                lr_factor, total=planned[key], warmup_ratio=self.config.warmup_ratio, decay=self.config.lr_decay
            )
            self.schedules[id(optimizer)] = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _advance(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        schedule = self.schedules.get(id(optimizer))
        if schedule is not None:
            schedule.step()

    def _step(self, side: Side, loss: Tensor) -> None:
        optimizer = self.optimizers[id(self.tower(side))]
        optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        self._advance(optimizer)

    def _phase_cache(self, other: Side, texts: Sequence[str], resuming: bool) -> Tensor:
        """The frozen tower's encodings of this rank's rows of the cache (all of them in one process).

        A shared tower is the model the phase trains: its cache is a snapshot of the phase's start, which a resumed
        phase re-encodes from the weights kept for it (resume.Checkpointing.phase_start_weights).
        """
        shared = self.document_tower is self.query_tower
        if resuming and shared and self.checkpointing is not None:
            with self.checkpointing.phase_start_weights(self.tower(other)):
                return self.encode(other, texts)
        if shared and self.checkpointing is not None:
            self.checkpointing.save_phase_start(self.tower(other))
        return self.encode(other, texts)

    def train_exact_phase(
        self,
        phase: int,
        side: Side,
        result: TrainResult,
        log: Callable[[str], None],
        progress: PhaseProgress | None = None,
    ) -> None:
        """One coordinate-ascent phase; progress: where a resumed phase stands (None: from its start)."""
        view: SideView = self.data.view(side)
        other: Side = "document" if side == "query" else "query"
        started = time.perf_counter()
        lo, hi = self.topology.shard(len(view.cache_texts))
        # the frozen tower, no gradients: the whole corpus in one process, this rank's 1/W of it under torchrun
        cache = self._phase_cache(other, view.cache_texts[lo:hi], resuming=progress is not None and progress.done > 0)
        cache_seconds = time.perf_counter() - started
        shape = {"phase": phase, "rows": int(cache.shape[0]), "total_rows": len(view.cache_texts),
                 "bytes": cache.numel() * cache.element_size()}  # fmt: skip
        result.cache = [c for c in result.cache if c["phase"] != phase] + [shape]
        self.tower(side).train()
        if progress is None:
            n = len(view.anchor_texts)
            progress = PhaseProgress(self._batches(n, self.config.epochs_per_phase, self.config.max_steps_per_phase))
        for step in range(progress.done, len(progress.batches)):
            batch = progress.batches[step]
            self._begin_step(result)
            t0 = time.perf_counter()
            mine = self._my_part(batch)
            anchors = self.embed(side, [view.anchor_texts[i] for i in mine])
            loss = self.exact(
                anchors, cache, _pad([view.positives[i] for i in mine], self.device),
                _pad([view.masked[i] for i in mine], self.device),
            )  # fmt: skip
            self._step(side, loss)
            result.steps.append(
                {
                    "phase": phase,
                    "side": side,
                    "loss": self._batch_loss(loss),
                    "batch": len(batch),
                    "seconds": time.perf_counter() - t0,
                }
            )
            result.examples += len(batch)
            self._end_step(progress, step, result)
        where = f"{shape['rows']} of {shape['total_rows']} rows on this rank" if self.topology.distributed else (
            f"{shape['total_rows']} rows")  # fmt: skip
        log(f"phase {phase} ({side} tower, cache {where} in {cache_seconds:.1f}s): "
            f"{sum(1 for s in result.steps if s['phase'] == phase)} steps")  # fmt: skip

    def _sharded_infonce_loss(self, batch: list[int], drawn: list[int], negatives: list[list[int]]) -> Tensor:
        """This rank's part of the InfoNCE loss: its queries, its candidates, every rank's candidates as negatives."""
        data = self.data
        lo, hi = self.topology.shard(len(batch))
        mine = batch[lo:hi]
        candidates = list(dict.fromkeys(drawn[lo:hi] + [d for negs in negatives[lo:hi] for d in negs]))
        anchors = self.embed("query", [data.queries[q] for q in mine])
        docs = self.embed("document", [data.documents[d] for d in candidates])
        return self.sharded_infonce(
            anchors, docs, torch.tensor(candidates, dtype=torch.long, device=self.device),
            _pad([data.positives[q] for q in mine], self.device), _pad([data.masked[q] for q in mine], self.device),
        )  # fmt: skip

    def train_infonce_epoch(
        self, epoch: int, result: TrainResult, log: Callable[[str], None], progress: PhaseProgress | None = None
    ) -> None:
        data = self.data
        self.query_tower.train()
        self.document_tower.train()
        if progress is None:
            n = len(data.queries)
            progress = PhaseProgress(self._batches(n, self.config.epochs_per_phase, self.config.max_steps_per_phase))
        batches = progress.batches
        for step in range(progress.done, len(batches)):
            batch = batches[step]
            self._begin_step(result)
            t0 = time.perf_counter()
            # each query's sampled positive, then its sampled verified hard negatives; a document once. Every rank
            # draws for the whole global batch (one RNG stream), then takes its part
            drawn = [self.rng.choice(data.positives[q]) for q in batch]
            negatives = [
                self.rng.sample(data.hard_negatives[q], min(len(data.hard_negatives[q]),
                                                            self.config.hard_negatives_per_query))
                for q in batch
            ]  # fmt: skip
            if self.topology.distributed:
                loss = self._sharded_infonce_loss(batch, drawn, negatives)
                self._infonce_step(loss)
                self._record_infonce(epoch, batch, loss, t0, result)
                self._end_step(progress, step, result)
                continue
            picked = drawn + [d for negs in negatives for d in negs]
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
            self._infonce_step(loss)
            self._record_infonce(epoch, batch, loss, t0, result)
            self._end_step(progress, step, result)
        log(f"infonce epoch {epoch}: {len(batches)} steps")

    def _infonce_step(self, loss: Tensor) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        for optimizer in self.optimizers.values():
            self._advance(optimizer)

    def _record_infonce(self, epoch: int, batch: list[int], loss: Tensor, t0: float, result: TrainResult) -> None:
        result.steps.append(
            {
                "phase": epoch,
                "side": "both",
                "loss": self._batch_loss(loss),
                "batch": len(batch),
                "seconds": time.perf_counter() - t0,
            }
        )
        result.examples += len(batch)

    def train(
        self,
        log: Callable[[str], None] = print,
        track_objective: bool = True,
        resume_dir: Path | None = None,
        save_every_steps: int | None = None,
        before_step: Callable[[int], None] | None = None,
    ) -> TrainResult:
        """All phases. resume_dir: keep a resume state there (rank 0 writes it at each phase's end and every
        save_every_steps steps) and go on from the one found there. before_step(steps done) runs before each step.
        """
        result = TrainResult(self.config, device=self.device, world_size=self.topology.world_size)
        sides: tuple[Side, Side] = ("query", "document") if self.config.first_side == "query" else ("document", "query")
        if self.config.warmup_ratio or self.config.lr_decay != "constant":
            self._schedule(sides)
        self.before_step = before_step
        self.checkpointing = Checkpointing(self, resume_dir, save_every_steps) if resume_dir is not None else None
        resumed = self.checkpointing.restore(result, log) if self.checkpointing is not None else None
        if resumed is not None:
            first_phase, progress, before = resumed.phase, resumed.progress, resumed.before
            log(f"resumed from {resume_dir}: {resumed.step} steps done, phase {first_phase} "
                f"at step {progress.done if progress else 0}")  # fmt: skip
        else:
            first_phase, progress = 0, None
            before = self.objectives() if track_objective else None
        for phase in range(first_phase, self.config.phases):
            if self.checkpointing is not None:
                self.checkpointing.begin_phase(phase, before)
            t0 = time.perf_counter()
            if self.config.loss == "exact":
                self.train_exact_phase(phase, sides[phase % 2], result, log, progress)
            else:
                self.train_infonce_epoch(phase, result, log, progress)
            progress = None
            result.seconds += time.perf_counter() - t0  # training time only: the objective probes are not counted
            after = self.objectives() if track_objective else None
            result.phase_objectives.append({"phase": phase, "before": before, "after": after})
            if before and after:
                log(f"phase {phase}: full-corpus objective {before['mean']:.4f} -> {after['mean']:.4f}")
            before = after
            if self.checkpointing is not None:
                self.checkpointing.end_phase(result, phase + 1, before)
        for side in ("query", "document") if self.document_tower is not self.query_tower else ("query",):
            check_replicas_agree(self.tower(side), self.topology, f"{side} tower")
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
