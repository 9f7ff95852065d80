"""Data-parallel plumbing for training under torchrun: the process group, shards, and collectives with gradients.

`Topology` says which process this is (rank r of W) and carries the process group the losses use for their own
collectives. `init_from_env` builds it from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); `single_process()` is the topology of an ordinary run, where nothing is collective.

Shards are contiguous: rank r holds rows [lo, hi) of a list of n, the first n mod W ranks one row more, so the
concatenation of the shards in rank order is the list itself. That is what lets a sharded cache use global row
indices (positives and masks index the whole cache; rank r translates them by lo).

Collectives with gradients follow one rule: what a rank backpropagates is its own part of the objective, and the
objective is the sum of the parts over ranks. So `all_gather_rows`' backward sums the gradient every rank holds
for the gathered rows (each rank's part may depend on every rank's rows) and hands each rank the rows it gave.
DistributedDataParallel averages parameter gradients over ranks instead of summing them; the trainer multiplies
its part by W before backward to undo that (coordinate_ascent.TowerTrainer._backward).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# A collective that waits longer than this has lost a peer. Generous: the ranks wait at a barrier while rank 0
# writes a resume state (a `large` model with its Adam state is about 4 GB, on network storage). A rank that dies
# is noticed sooner anyway: torchrun stops the others when one exits.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of n that rank `rank` of `world_size` holds: contiguous, sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} ranks")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Topology:
    """Where this process stands in a data-parallel run (rank 0 of 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl"; None: no process group
    # the losses' collectives run in a group of their own, apart from DDP's gradient all-reduce in the default group
    loss_group: Any = None

    @property
    def distributed(self) -> bool:
        """True under torchrun (even with one process): losses then take the collective code path."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, the loss curve and the resume state."""
        return self.rank == 0

    @property
    def device(self) -> str:
        """cuda:LOCAL_RANK under NCCL (one GPU per process), else the CPU."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def shard(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def single_process() -> Topology:
    return Topology()


def resolve_backend(backend: str = "auto") -> str:
    """ "auto": NCCL when this machine has CUDA, gloo otherwise (CPU training, the tests)."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    return backend


def init_from_env(backend: str = "auto") -> Topology:
    """Join the process group torchrun set up (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"not started by torchrun: {', '.join(missing)} unset; launch with "
            "`python -m embedkomb_pipeline.training.launch run JOB.json --nproc N` or torchrun"
        )
    backend = resolve_backend(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before the group forms: NCCL binds each rank to its device
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        loss_group=dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT),
    )


def shutdown(topology: Topology) -> None:
    if topology.distributed and dist.is_initialized():
        dist.destroy_process_group()


def group_rank_and_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def gather_ints(values: Sequence[int], group: Any, device: torch.device | str) -> list[list[int]]:
    """Every rank's list of small integers (shapes, counts), in rank order; the lists have one length."""
    mine = torch.tensor(list(values), dtype=torch.long, device=device)
    _, world = group_rank_and_size(group)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def _gather_padded(x: Tensor, rows: Sequence[int], group: Any, fill: float | int = 0) -> Tensor:
    """Every rank's x (x.shape[0] == rows[rank], other dims equal), concatenated in rank order.

    all_gather needs one shape on every rank: each pads to the longest with `fill`, the padding is cut after.
    """
    longest = max(rows)
    padded = x.new_full((longest, *x.shape[1:]), fill)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, concatenated. Backward: sum of every rank's gradient, this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: list[int], group: Any) -> Tensor:
        rank, _ = group_rank_and_size(group)
        ctx.lo = sum(rows[:rank])
        ctx.n = rows[rank]
        ctx.group = group
        return _gather_padded(x, rows, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.lo : ctx.lo + ctx.n], None, None


def all_gather_rows(x: Tensor, group: Any, rows: Sequence[int] | None = None) -> tuple[Tensor, list[int]]:
    """Every rank's x (any number of rows each, even none), concatenated in rank order, with gradients.

    Returns the gathered tensor and the row counts per rank. The gradient that reaches x is the sum over ranks
    of the gradient each rank's backward holds for x's rows (see the module docstring).
    """
    if rows is None:
        rows = [r[0] for r in gather_ints([x.shape[0]], group, x.device)]
    return _GatherRows.apply(x, list(rows), group), list(rows)


def all_gather_index_rows(idx: Tensor, rows: Sequence[int], widths: Sequence[int], group: Any, pad: int) -> Tensor:
    """Every rank's index lists (rows[r] × widths[r], padded with `pad`) as one (Σ rows) × (max width) tensor."""
    wide = idx.new_full((idx.shape[0], max(widths)), pad)
    wide[:, : idx.shape[1]] = idx
    return _gather_padded(wide, rows, group, fill=pad)


def all_reduce_(tensor: Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """In place; returns the tensor for chaining."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_objects(obj: Any, topology: Topology) -> list[Any]:
    """Every rank's picklable object (small ones: RNG states, measurements), in rank order."""
    if not topology.distributed:
        return [obj]
    out: list[Any] = [None] * topology.world_size
    dist.all_gather_object(out, obj)
    return out


def freeze_parameters_without_gradient(module: nn.Module, probe: Callable[[], Tensor]) -> list[str]:
    """Stop requiring gradients for the parameters that `probe()`'s output does not depend on; their names.

    DistributedDataParallel waits in every backward for a gradient of each parameter that requires one. A BERT
    tower computes a pooler that no sentence embedding uses, so that wait would never end; DDP's own ways around
    it fail on sentence-transformers modules (find_unused_parameters=True raises "marked ready twice" on the first
    backward; static_graph=True runs but leaves the ranks' gradients unsynchronized). A parameter that gets no
    gradient is not trained either way, so freezing it changes nothing but that.
    """
    was_training = module.training
    module.eval()  # no dropout: the probe draws nothing from the RNG
    module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        probe().float().sum().backward()
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in module.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    return unused


def data_parallel_module(module: nn.Module, device: str) -> nn.Module:
    """module under DistributedDataParallel, which all-reduces (averages) its gradients during backward.

    Every parameter that requires a gradient must get one in every step (freeze_parameters_without_gradient).
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
        # the buffers (position ids) are constants: no broadcast before every forward
        forward_sync_buffers=False,
    )


def check_replicas_agree(module: nn.Module, topology: Topology, name: str = "model") -> None:
    """Raise unless every rank holds the same weights: DDP keeps replicas equal only while every gradient is
    all-reduced, and a replica that drifted would go unnoticed (rank 0 alone writes the checkpoint)."""
    if not topology.distributed:
        return
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    every = all_gather_objects(sums, topology)
    drifted = [r for r, other in enumerate(every) if not torch.allclose(other, every[0], rtol=1e-6, atol=1e-6)]
    if drifted:
        raise RuntimeError(f"the {name} replicas of ranks {drifted} differ from rank 0's after training: "
                           "gradients were not synchronized")  # fmt: skip
