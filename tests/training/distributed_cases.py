"""What each of two gloo ranks computes in tests/training/test_distributed.py (spawned processes import this module).

The parent saves one problem (real MiniLM embeddings of SciFact titles and abstracts, with the training set's
positives and masks) to problem.pt; every rank takes its part of the anchors and its shard of the cache, runs the
sharded losses, and saves what it got (its part of the loss, the gradients of its own rows) to rank<r>.pt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedkomb_pipeline.training.distributed import data_parallel_module, shard_range
from embedkomb_pipeline.training.losses import ShardedExactSoftmaxLoss, ShardedInfoNCELoss

# the exact-loss settings compared; each one is run by both ranks and by one process
EXACT_CASES: dict[str, dict[str, Any]] = {
    "plain": {"temperature": 0.05, "chunk_size": 7},
    "smoothing_and_matryoshka": {
        "temperature": 0.07,
        "chunk_size": 5,
        "label_smoothing": 0.1,
        "matryoshka_dims": (64, 384),
    },
    "one_chunk_per_shard": {"temperature": 0.05, "chunk_size": 10_000},
}


def anchor_split(n: int, rank: int, world: int, empty_rank: bool) -> slice:
    """Rank's rows of the anchors: contiguous shards, or (empty_rank) all on rank 0 and none on the others."""
    if empty_rank:
        return slice(0, n) if rank == 0 else slice(n, n)
    lo, hi = shard_range(n, rank, world)
    return slice(lo, hi)


def run_rank(rank: int, world: int, folder: str) -> None:
    work = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{work / 'store'}", rank=rank, world_size=world)
    group = dist.new_group()  # the losses' own group, apart from DDP's default one, as in the trainer
    problem = torch.load(work / "problem.pt", weights_only=True)
    anchors, cache = problem["anchors"], problem["cache"]
    pos_idx, mask_idx = problem["pos_idx"], problem["mask_idx"]
    lo, hi = shard_range(cache.shape[0], rank, world)
    shard = cache[lo:hi]
    out: dict[str, Any] = {"cache_rows": shard.shape[0]}

    for empty_rank in (False, True):
        rows = anchor_split(anchors.shape[0], rank, world, empty_rank)
        for name, kwargs in EXACT_CASES.items():
            a = anchors[rows].clone().requires_grad_(True)
            part = ShardedExactSoftmaxLoss(group, **kwargs)(a, shard, pos_idx[rows], mask_idx[rows])
            part.backward()
            grad = a.grad if a.grad is not None else torch.zeros_like(a)
            out[f"exact/{name}/empty={empty_rank}"] = {"part": part.detach(), "grad": grad, "rows": rows}
        with torch.no_grad():  # what the full-corpus objective uses: per-anchor losses of this rank's anchors
            per = ShardedExactSoftmaxLoss(group, 0.05, 7).per_anchor(anchors[rows], shard, pos_idx[rows],
                                                                      mask_idx[rows])  # fmt: skip
        out[f"per_anchor/empty={empty_rank}"] = {"per": per, "rows": rows}

    # DDP: a linear "tower" over raw embeddings; DDP averages over ranks, the trainer's backward runs on part × W
    torch.manual_seed(0)
    tower = torch.nn.Linear(anchors.shape[1], anchors.shape[1], dtype=anchors.dtype)
    tower.load_state_dict(problem["tower"])
    ddp = data_parallel_module(tower, "cpu")
    rows = anchor_split(anchors.shape[0], rank, world, False)
    loss = ShardedExactSoftmaxLoss(group, **EXACT_CASES["smoothing_and_matryoshka"])
    part = loss(F.normalize(ddp(problem["raw"][rows]), dim=-1), shard, pos_idx[rows], mask_idx[rows])
    (part * world).backward()
    out["ddp"] = {"part": part.detach(), "weight_grad": tower.weight.grad, "bias_grad": tower.bias.grad}

    # InfoNCE: each rank's queries and candidates; candidate ids repeat across ranks (the first copy counts)
    q_rows = anchor_split(anchors.shape[0], rank, world, False)
    ids = problem["candidate_ids"][rank]
    q = anchors[q_rows].clone().requires_grad_(True)
    c = cache[ids].clone().requires_grad_(True)
    info = ShardedInfoNCELoss(group, temperature=0.05, matryoshka_dims=(64, 384))
    part = info(q, c, ids, problem["info_positive_ids"][q_rows], problem["info_masked_ids"][q_rows])
    part.backward()
    out["infonce"] = {"part": part.detach(), "query_grad": q.grad, "candidate_grad": c.grad}

    torch.save(out, work / f"rank{rank}.pt")
    dist.destroy_process_group()
