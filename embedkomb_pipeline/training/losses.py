"""Contrastive losses with verified positives and masked suspected false negatives.

Both losses compute, per anchor i (a query, or a document when the document tower trains),

    loss_i = logsumexp_{j ∉ M_i} S_ij  −  logsumexp_{p ∈ P_i} S_ip,      S_ij = a_i · c_j / τ

P_i are the anchor's positives (the source positive plus verified-relevant candidates); they stay in the
denominator. M_i are candidates that are likely relevant but not verified (mined, unlabeled); they are taken
out of the denominator so the model is not pushed away from probable false negatives. With one positive and
no mask this is plain cross-entropy / InfoNCE.

- `InfoNCELoss`: the baseline. The candidates are the batch's own documents (in-batch + verified hard
  negatives); P and M are boolean B × K matrices.
- `ExactSoftmaxLoss`: the candidates are the whole frozen cache (N rows). The denominator is computed by
  `_ChunkedLogSumExp`, which streams the cache in chunks with an online log-sum-exp in the forward pass and
  recomputes each chunk's softmax weights in a second sweep in the backward pass, so no B × N tensor ever
  exists: memory is O(B × chunk). P and M are index lists (B × P and B × M, padded with -1), which is how
  they come from data: a handful of indices per anchor, never a dense B × N mask.

Both take `matryoshka_dims`: the loss is then averaged over the listed prefix sizes of the embedding
(each prefix re-normalized), as Matryoshka representation learning trains it.

Data-parallel twins (torch.distributed, one process per device under torchrun):

- `ShardedExactSoftmaxLoss`: each rank holds only its 1/W of the cache. The anchors of all ranks are gathered,
  each rank computes the log-sum-exp pieces of every anchor over its shard, and collectives combine the running
  max and sum (forward) and the softmax-weighted rows (backward): equal to `ExactSoftmaxLoss` on the whole batch
  and cache, with no rank ever holding the whole cache.
- `ShardedInfoNCELoss`: the candidates of all ranks are gathered (with gradients), so each query sees the whole
  global batch's candidates as in one process.

Each returns the rank's part of the loss; the parts sum to the single-process loss (see distributed.py for how
gradients are summed across ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from embedkomb_pipeline.training.distributed import (
    all_gather_index_rows,
    all_gather_rows,
    all_reduce_,
    gather_ints,
    group_rank_and_size,
)

PAD = -1  # padding value in index lists


def _prefix(x: Tensor, dim: int | None, normalize: bool) -> Tensor:
    """The first `dim` coordinates, re-normalized: a Matryoshka prefix is only meaningful as a unit vector."""
    if dim is not None and dim < x.shape[-1]:
        x = x[..., :dim]
        return F.normalize(x, dim=-1) if normalize else x
    return x


def _masked_chunk_scores(
    anchors: Tensor, chunk: Tensor, start: int, mask_idx: Tensor | None, temperature: float
) -> Tensor:
    """S for one chunk of the cache (B × chunk), with masked entries set to -inf."""
    scores = anchors @ chunk.T / temperature
    if mask_idx is not None and mask_idx.numel():
        stop = start + chunk.shape[0]
        rows, cols = ((mask_idx >= start) & (mask_idx < stop)).nonzero(as_tuple=True)
        if rows.numel():
            scores[rows, mask_idx[rows, cols] - start] = float("-inf")
    return scores


def _lse_pieces(
    anchors: Tensor,
    cache: Tensor,
    row_offset: int,
    mask_idx: Tensor | None,
    temperature: float,
    chunk_size: int,
    dim: int | None,
) -> tuple[Tensor, Tensor]:
    """Online log-sum-exp over the cache's rows: per anchor the running max m_i and l_i = Σ exp(S_ij − m_i).

    The cache's row k is global row row_offset + k (a shard of a larger cache): mask indices are global.
    Rows whose every entry is masked (or an empty cache) end with m = -inf, l = 0.
    """
    b = anchors.shape[0]
    running_max = anchors.new_full((b,), float("-inf"))
    running_sum = anchors.new_zeros((b,))
    for start in range(0, cache.shape[0], chunk_size):
        chunk = _prefix(cache[start : start + chunk_size].to(anchors.dtype), dim, normalize=True)
        scores = _masked_chunk_scores(anchors, chunk, row_offset + start, mask_idx, temperature)
        chunk_max = scores.max(dim=1).values
        new_max = torch.maximum(running_max, chunk_max)
        # rows whose every entry so far is masked keep max -inf; exp(-inf - -inf) would be nan
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        running_sum = running_sum * torch.exp(running_max - safe_max) + torch.exp(scores - safe_max[:, None]).sum(dim=1)
        running_max = new_max
        del scores
    return running_max, running_sum


def _softmax_weighted_rows(
    anchors: Tensor,
    cache: Tensor,
    row_offset: int,
    mask_idx: Tensor | None,
    lse: Tensor,
    temperature: float,
    chunk_size: int,
    dim: int | None,
) -> Tensor:
    """Σ_j exp(S_ij − lse_i) c_j over the cache's rows (B × d): the softmax weights recomputed chunk by chunk."""
    weighted = torch.zeros_like(anchors)
    for start in range(0, cache.shape[0], chunk_size):
        chunk = _prefix(cache[start : start + chunk_size].to(anchors.dtype), dim, normalize=True)
        scores = _masked_chunk_scores(anchors, chunk, row_offset + start, mask_idx, temperature)
        weighted.addmm_(torch.exp(scores - lse[:, None]), chunk)
        del scores
    return weighted


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp_j over the unmasked cache rows of (a_i · c_j / τ), chunk by chunk; gradient to the anchors only.

    Forward keeps a running max m_i and a running sum l_i = Σ exp(S_ij − m_i), rescaling l when m grows.
    Backward: ∂lse_i/∂a_i = Σ_j softmax_ij c_j / τ; the softmax weights of a chunk are exp(S_ij − lse_i),
    recomputed from the chunk (cheaper in memory than storing them: that would be the B × N matrix).
    The cache is the frozen tower's output, so it gets no gradient (coordinate ascent trains one side at a time).

    With a process group the cache is split across its ranks, each holding one shard whose first row is global row
    `row_offset`, and every rank scores the same anchors (all ranks' anchors, gathered) against its shard. Forward:
    the shards' running maxima meet in an all-reduce MAX, the sums rescaled to that maximum in an all-reduce SUM, so
    every rank ends with the log-sum-exp over the whole cache. Backward: each shard's Σ_j softmax_ij c_j (weights
    from the global lse) summed by an all-reduce: the gradient over the whole cache, from shards alone. The gradient
    that arrives (grad_lse) is this rank's own; the all-reduce is over the shards' rows, not over ranks' gradients.
    Without a group (one process) the cache is whole and no collective runs.
    """

    # ctx is Any: the attributes forward hands to backward are ours, and FunctionCtx declares none of them
    @staticmethod
    def forward(
        ctx: Any,
        anchors: Tensor,
        cache: Tensor,
        row_offset: int,
        mask_idx: Tensor | None,
        temperature: float,
        chunk_size: int,
        dim: int | None,
        group: Any,
    ) -> Tensor:
        local_max, local_sum = _lse_pieces(anchors, cache, row_offset, mask_idx, temperature, chunk_size, dim)
        if group is None:
            lse = local_max + torch.log(local_sum)
        else:
            global_max = all_reduce_(local_max.clone(), group, dist.ReduceOp.MAX)
            # a row masked everywhere keeps -inf (as in one process); a shard with nothing for a row adds exp(-inf)
            safe_max = torch.where(torch.isinf(global_max), torch.zeros_like(global_max), global_max)
            total = all_reduce_(local_sum * torch.exp(local_max - safe_max), group)
            lse = global_max + torch.log(total)
        ctx.save_for_backward(anchors, cache, lse, *(() if mask_idx is None else (mask_idx,)))
        ctx.has_mask = mask_idx is not None
        ctx.row_offset = row_offset
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.dim = dim
        ctx.group = group
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        anchors, cache, lse = saved[:3]
        mask_idx = saved[3] if ctx.has_mask else None
        weighted = _softmax_weighted_rows(
            anchors, cache, ctx.row_offset, mask_idx, lse, ctx.temperature, ctx.chunk_size, ctx.dim
        )
        if ctx.group is not None:
            all_reduce_(weighted, ctx.group)
        weighted *= (grad_lse / ctx.temperature)[:, None]
        return weighted, None, None, None, None, None, None, None


def chunked_logsumexp(
    anchors: Tensor,
    cache: Tensor,
    mask_idx: Tensor | None = None,
    temperature: float = 0.05,
    chunk_size: int = 8192,
    dim: int | None = None,
) -> Tensor:
    """Per anchor, logsumexp over the cache rows not listed in its mask_idx row (see _ChunkedLogSumExp)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedLogSumExp.apply(anchors, cache.detach(), 0, mask_idx, temperature, chunk_size, dim, None)


def drop_positives_from_mask(pos_idx: Tensor, mask_idx: Tensor) -> Tensor:
    """Positives always stay in the denominator: a row listed both as positive and masked counts as positive."""
    if mask_idx.numel() == 0 or pos_idx.numel() == 0:
        return mask_idx
    clash = (mask_idx[:, :, None] == pos_idx[:, None, :]).any(dim=2) & (mask_idx != PAD)
    return mask_idx.masked_fill(clash, PAD)


def _check_dims(dims: Sequence[int] | None, full: int) -> list[int | None]:
    if not dims:
        return [None]
    bad = [d for d in dims if d < 1 or d > full]
    if bad:
        raise ValueError(f"matryoshka dims {bad} outside 1..{full}")
    return [None if d == full else int(d) for d in dims]


class ExactSoftmaxLoss(nn.Module):
    """Softmax over the entire frozen cache, never materializing B × N (coordinate ascent, Morris et al. 2022).

    forward(anchors, cache, pos_idx, mask_idx):
      anchors  B × d  trainable tower's embeddings (normalized; gradients flow here);
      cache    N × d  frozen tower's embeddings of the whole training corpus (normalized, any float dtype);
      pos_idx  B × P  cache rows that are positives of each anchor, padded with -1 (at least one per row);
      mask_idx B × M  cache rows masked out of the denominator, padded with -1 (or None).
    Returns the mean loss over the batch.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        chunk_size: int = 8192,
        matryoshka_dims: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims else None
        # the 2022 code smooths its cross-entropy by 0.01: ε of the target mass spread evenly over the unmasked rows
        self.label_smoothing = label_smoothing

    def _smoothing_term(self, a: Tensor, cache: Tensor, mask_idx: Tensor | None, dim: int | None) -> Tensor:
        """mean over unmasked j of S_ij = a_i · (Σ_all c_j − Σ_masked c_m) / (|unmasked| τ); mask indices distinct.

        A sum over the cache (N × d → d, chunk by chunk), never a B × N matrix.
        """
        total = torch.zeros(a.shape[1], dtype=a.dtype, device=a.device)
        for start in range(0, cache.shape[0], self.chunk_size):
            total += _prefix(cache[start : start + self.chunk_size].detach().to(a.dtype), dim, True).sum(dim=0)
        count = torch.full((a.shape[0],), float(cache.shape[0]), dtype=a.dtype, device=a.device)
        per_row = total.expand(a.shape[0], -1)
        if mask_idx is not None and mask_idx.numel():
            valid = mask_idx != PAD
            masked_rows = _prefix(cache.detach()[mask_idx.clamp(min=0)].to(a.dtype), dim, True)
            per_row = per_row - (masked_rows * valid[..., None]).sum(dim=1)
            count = count - valid.sum(dim=1)
        return (a * per_row).sum(dim=1) / count / self.temperature

    def per_anchor(
        self, anchors: Tensor, cache: Tensor, pos_idx: Tensor, mask_idx: Tensor | None = None, dim: int | None = None
    ) -> Tensor:
        """The loss of each anchor at one embedding size (None: full)."""
        if (pos_idx == PAD).all(dim=1).any():
            raise ValueError("every anchor needs at least one positive")
        if mask_idx is not None:
            mask_idx = drop_positives_from_mask(pos_idx, mask_idx)
        a = _prefix(anchors, dim, normalize=True)
        denominator = chunked_logsumexp(a, cache, mask_idx, self.temperature, self.chunk_size, dim)
        # the numerator needs only the few positive rows: gather them (B × P × d), ordinary autograd
        positives = _prefix(cache.detach()[pos_idx.clamp(min=0)].to(a.dtype), dim, normalize=True)
        pos_scores = torch.einsum("bd,bpd->bp", a, positives) / self.temperature
        numerator = torch.logsumexp(pos_scores.masked_fill(pos_idx == PAD, float("-inf")), dim=1)
        if self.label_smoothing:
            eps = self.label_smoothing
            mean_score = self._smoothing_term(a, cache, mask_idx, dim)
            return (1 - eps) * (denominator - numerator) + eps * (denominator - mean_score)
        return denominator - numerator

    def forward(self, anchors: Tensor, cache: Tensor, pos_idx: Tensor, mask_idx: Tensor | None = None) -> Tensor:
        dims = _check_dims(self.matryoshka_dims, anchors.shape[1])
        return torch.stack([self.per_anchor(anchors, cache, pos_idx, mask_idx, d).mean() for d in dims]).mean()


class InfoNCELoss(nn.Module):
    """The baseline: softmax over the batch's own candidates (in-batch positives of other anchors + hard negatives).

    forward(anchors, candidates, positive, masked):
      anchors    B × d, candidates K × d (both trainable: one tower or two);
      positive   B × K bool, true where candidate k is a positive of anchor i (several allowed, ≥ 1 per row);
      masked     B × K bool or None, true where candidate k is a known or suspected false negative of anchor i
                 (dropped from the denominator; ignored where positive is true).
    """

    def __init__(self, temperature: float = 0.05, matryoshka_dims: Sequence[int] | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims else None

    def per_anchor(
        self,
        anchors: Tensor,
        candidates: Tensor,
        positive: Tensor,
        masked: Tensor | None = None,
        dim: int | None = None,
    ) -> Tensor:
        if not positive.any(dim=1).all():
            raise ValueError("every anchor needs at least one positive")
        scores = _prefix(anchors, dim, True) @ _prefix(candidates, dim, True).T / self.temperature
        keep = ~masked | positive if masked is not None else torch.ones_like(positive)
        denominator = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=1)
        numerator = torch.logsumexp(scores.masked_fill(~positive, float("-inf")), dim=1)
        return denominator - numerator

    def forward(self, anchors: Tensor, candidates: Tensor, positive: Tensor, masked: Tensor | None = None) -> Tensor:
        dims = _check_dims(self.matryoshka_dims, anchors.shape[1])
        return torch.stack([self.per_anchor(anchors, candidates, positive, masked, d).mean() for d in dims]).mean()


@dataclass
class _GatheredBatch:
    """Every rank's anchors and index lists in rank order, and where this rank's anchors and cache rows sit."""

    anchors: Tensor  # A × d, A = Σ_r B_r; gradients return to the rank each row came from
    pos_idx: Tensor  # A × P, global cache rows
    mask_idx: Tensor | None  # A × M, global cache rows (None: no rank masks anything)
    own: slice  # this rank's rows of the above
    row_offset: int  # global index of this rank's first cache row
    cache_rows: int  # N: rows of the whole cache, all shards together


class ShardedExactSoftmaxLoss(ExactSoftmaxLoss):
    """ExactSoftmaxLoss over a frozen cache split across the ranks of `group`: no rank holds more than its shard.

    Every rank of the group calls forward at once with
      anchors      its own B_r × d anchors (any B_r, none included);
      cache_shard  its rows of the N × d cache: rank r holds rows [lo_r, hi_r), the shards in rank order make up
                   the cache (distributed.shard_range cuts them so);
      pos_idx, mask_idx  as for ExactSoftmaxLoss, in global cache rows, for its own anchors.
    It returns the rank's part of the batch loss, Σ_{i ∈ own anchors} loss_i / A with A = Σ_r B_r: the parts of
    all ranks add up to ExactSoftmaxLoss on the concatenated batch and the whole cache, and the gradient a rank's
    part sends to its anchors is that loss's gradient for them.

    How: the ranks all-gather the anchors (A × d, small) so that every rank scores every anchor against its own
    shard, and _ChunkedLogSumExp combines the shards' log-sum-exp pieces and gradients with all-reduces. The
    numerator needs the few positive rows of each anchor wherever they live: each rank fills the rows it holds into
    a zero A × P × d block and an all-reduce SUM completes it (the cache is frozen: no gradient goes there). The
    label-smoothing sums (over the cache, over each anchor's masked rows) are per-shard sums, all-reduced alike.
    """

    def __init__(
        self,
        group: Any,
        temperature: float = 0.05,
        chunk_size: int = 8192,
        matryoshka_dims: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(temperature, chunk_size, matryoshka_dims, label_smoothing)
        self.group = group

    def _gather(self, anchors: Tensor, cache_shard: Tensor, pos_idx: Tensor, mask_idx: Tensor | None) -> _GatheredBatch:
        rank, _ = group_rank_and_size(self.group)
        mask_width = -1 if mask_idx is None else mask_idx.shape[1]
        shapes = gather_ints(
            [anchors.shape[0], cache_shard.shape[0], pos_idx.shape[1], mask_width], self.group, anchors.device
        )
        rows = [s[0] for s in shapes]
        shard_rows = [s[1] for s in shapes]
        gathered, _ = all_gather_rows(anchors, self.group, rows)
        pos_all = all_gather_index_rows(pos_idx.to(anchors.device), rows, [s[2] for s in shapes], self.group, PAD)
        mask_all = None
        if any(s[3] >= 0 for s in shapes):  # some rank masks: a rank without a mask sends a column of PAD
            local = mask_idx if mask_idx is not None else torch.full((anchors.shape[0], 1), PAD, dtype=torch.long)
            widths = [max(s[3], 1) for s in shapes]
            mask_all = all_gather_index_rows(local.to(anchors.device), rows, widths, self.group, PAD)
        n = sum(shard_rows)
        # every rank raises the same errors, from the gathered lists: a rank that raised alone would leave the
        # others waiting in their next collective
        if (pos_all == PAD).all(dim=1).any():
            raise ValueError("every anchor needs at least one positive")
        if pos_all.numel() and int(pos_all.max()) >= n:
            raise ValueError(f"positive index {int(pos_all.max())} is outside the cache of {n} rows")
        lo = sum(rows[:rank])
        return _GatheredBatch(gathered, pos_all, mask_all, slice(lo, lo + rows[rank]), sum(shard_rows[:rank]), n)

    def _rows_from_shards(self, cache_shard: Tensor, batch: _GatheredBatch, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """The cache rows idx lists (A × K × d, zeros at PAD), collected from the shards that hold them."""
        lo, hi = batch.row_offset, batch.row_offset + cache_shard.shape[0]
        held = (idx >= lo) & (idx < hi)
        rows = torch.zeros((*idx.shape, cache_shard.shape[1]), dtype=dtype, device=cache_shard.device)
        rows[held] = cache_shard.detach()[idx[held] - lo].to(dtype)
        return all_reduce_(rows, self.group)

    def _sharded_smoothing_term(
        self, a: Tensor, cache_shard: Tensor, batch: _GatheredBatch, mask_all: Tensor | None, dim: int | None
    ) -> Tensor:
        """_smoothing_term for this rank's anchors: the sums over the cache and the masked rows come from shards."""
        width = a.shape[1]
        total = torch.zeros(width, dtype=a.dtype, device=a.device)
        for start in range(0, cache_shard.shape[0], self.chunk_size):
            chunk = cache_shard[start : start + self.chunk_size].detach().to(a.dtype)
            total += _prefix(chunk, dim, True).sum(dim=0)
        all_reduce_(total, self.group)
        count = torch.full((a.shape[0],), float(batch.cache_rows), dtype=a.dtype, device=a.device)
        per_row = total.expand(a.shape[0], -1)
        if mask_all is not None and mask_all.numel():
            lo, hi = batch.row_offset, batch.row_offset + cache_shard.shape[0]
            held = (mask_all >= lo) & (mask_all < hi)
            anchor_of, _ = held.nonzero(as_tuple=True)
            masked_sums = torch.zeros((mask_all.shape[0], width), dtype=a.dtype, device=a.device)
            rows = _prefix(cache_shard.detach()[mask_all[held] - lo].to(a.dtype), dim, True)
            masked_sums.index_add_(0, anchor_of, rows)
            all_reduce_(masked_sums, self.group)
            per_row = per_row - masked_sums[batch.own]
            count = count - (mask_all[batch.own] != PAD).sum(dim=1)
        return (a * per_row).sum(dim=1) / count / self.temperature

    def _own_losses(self, batch: _GatheredBatch, cache_shard: Tensor, positive_rows: Tensor, dim: int | None) -> Tensor:
        mask_all = drop_positives_from_mask(batch.pos_idx, batch.mask_idx) if batch.mask_idx is not None else None
        a_all = _prefix(batch.anchors, dim, normalize=True)
        lse = _ChunkedLogSumExp.apply(
            a_all, cache_shard.detach(), batch.row_offset, mask_all, self.temperature, self.chunk_size, dim,
            self.group,
        )  # fmt: skip
        a = a_all[batch.own]
        denominator = lse[batch.own]
        positives = _prefix(positive_rows[batch.own], dim, normalize=True)
        pos_scores = torch.einsum("bd,bpd->bp", a, positives) / self.temperature
        numerator = torch.logsumexp(pos_scores.masked_fill(batch.pos_idx[batch.own] == PAD, float("-inf")), dim=1)
        if self.label_smoothing:
            eps = self.label_smoothing
            mean_score = self._sharded_smoothing_term(a, cache_shard, batch, mask_all, dim)
            return (1 - eps) * (denominator - numerator) + eps * (denominator - mean_score)
        return denominator - numerator

    def per_anchor(
        self,
        anchors: Tensor,
        cache: Tensor,
        pos_idx: Tensor,
        mask_idx: Tensor | None = None,
        dim: int | None = None,
    ) -> Tensor:
        """The loss of each of this rank's anchors at one embedding size (None: full); `cache` is its shard."""
        batch = self._gather(anchors, cache, pos_idx, mask_idx)
        positive_rows = self._rows_from_shards(cache, batch, batch.pos_idx, anchors.dtype)
        return self._own_losses(batch, cache, positive_rows, dim)

    def forward(self, anchors: Tensor, cache: Tensor, pos_idx: Tensor, mask_idx: Tensor | None = None) -> Tensor:
        dims = _check_dims(self.matryoshka_dims, anchors.shape[1])
        batch = self._gather(anchors, cache, pos_idx, mask_idx)
        positive_rows = self._rows_from_shards(cache, batch, batch.pos_idx, anchors.dtype)
        total = batch.anchors.shape[0]
        parts = [self._own_losses(batch, cache, positive_rows, d).sum() / total for d in dims]
        return torch.stack(parts).mean()


class ShardedInfoNCELoss(InfoNCELoss):
    """InfoNCE whose candidates are the in-batch candidates of every rank of `group` (negatives across ranks).

    Every rank of the group calls forward at once with
      anchors        its own B_r × d queries;
      candidates     its own K_r × d candidate embeddings (trainable: gradients return to them from every rank);
      candidate_ids  the K_r document ids of those candidates; a document that several ranks picked counts once,
                     the first copy in rank order (the later copies get no gradient);
      positive_ids   B_r × P ids of each query's positives, masked_ids B_r × M ids of its masked candidates (or
                     None), padded with -1 (PAD).
    It returns the rank's part, Σ_{i ∈ own queries} loss_i / Σ_r B_r: the parts add up to InfoNCELoss over the
    concatenated batch and the union of all ranks' candidates, and so do their gradients.
    """

    def __init__(self, group: Any, temperature: float = 0.05, matryoshka_dims: Sequence[int] | None = None) -> None:
        super().__init__(temperature, matryoshka_dims)
        self.group = group

    def forward(  # type: ignore[override]  # a sharded batch carries ids, not the single-process boolean matrices
        self,
        anchors: Tensor,
        candidates: Tensor,
        candidate_ids: Tensor,
        positive_ids: Tensor,
        masked_ids: Tensor | None = None,
    ) -> Tensor:
        dims = _check_dims(self.matryoshka_dims, anchors.shape[1])
        device = anchors.device
        shapes = gather_ints([anchors.shape[0], candidates.shape[0]], self.group, device)
        counts = [s[1] for s in shapes]
        gathered, _ = all_gather_rows(candidates, self.group, counts)
        all_ids = all_gather_index_rows(candidate_ids.to(device)[:, None], counts, [1] * len(counts), self.group, PAD)
        first_copy: dict[int, int] = {}
        for k, doc in enumerate(all_ids[:, 0].tolist()):
            first_copy.setdefault(doc, k)
        keep = torch.tensor(sorted(first_copy.values()), dtype=torch.long, device=device)
        pool, pool_ids = gathered[keep], all_ids[keep, 0]
        positive = (pool_ids[None, :, None] == positive_ids.to(device)[:, None, :]).any(dim=2)
        masked = None
        if masked_ids is not None:
            masked = (pool_ids[None, :, None] == masked_ids.to(device)[:, None, :]).any(dim=2)
        # every rank raises together: one raising alone would leave the others waiting in their next collective
        ok = torch.tensor([int(bool(positive.any(dim=1).all()))], device=device)
        if not int(all_reduce_(ok, self.group, dist.ReduceOp.MIN)):
            raise ValueError("every anchor needs at least one positive among the gathered candidates")
        total = sum(s[0] for s in shapes)
        parts = [self.per_anchor(anchors, pool, positive, masked, d).sum() / total for d in dims]
        return torch.stack(parts).mean()
