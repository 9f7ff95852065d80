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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp_j over the unmasked cache rows of (a_i · c_j / τ), chunk by chunk; gradient to the anchors only.

    Forward keeps a running max m_i and a running sum l_i = Σ exp(S_ij − m_i), rescaling l when m grows.
    Backward: ∂lse_i/∂a_i = Σ_j softmax_ij c_j / τ; the softmax weights of a chunk are exp(S_ij − lse_i),
    recomputed from the chunk (cheaper in memory than storing them: that would be the B × N matrix).
    The cache is the frozen tower's output, so it gets no gradient (coordinate ascent trains one side at a time).
    """

    # ctx is Any: the attributes forward hands to backward are ours, and FunctionCtx declares none of them
    @staticmethod
    def forward(
        ctx: Any,
        anchors: Tensor,
        cache: Tensor,
        mask_idx: Tensor | None,
        temperature: float,
        chunk_size: int,
        dim: int | None,
    ) -> Tensor:
        b = anchors.shape[0]
        running_max = anchors.new_full((b,), float("-inf"))
        running_sum = anchors.new_zeros((b,))
        for start in range(0, cache.shape[0], chunk_size):
            chunk = _prefix(cache[start : start + chunk_size].to(anchors.dtype), dim, normalize=True)
            scores = _masked_chunk_scores(anchors, chunk, start, mask_idx, temperature)
            chunk_max = scores.max(dim=1).values
            new_max = torch.maximum(running_max, chunk_max)
            # rows whose every entry so far is masked keep max -inf; exp(-inf - -inf) would be nan
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            running_sum = running_sum * torch.exp(running_max - safe_max) + torch.exp(scores - safe_max[:, None]).sum(
                dim=1
            )
            running_max = new_max
            del scores
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(anchors, cache, lse, *(() if mask_idx is None else (mask_idx,)))
        ctx.has_mask = mask_idx is not None
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.dim = dim
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        anchors, cache, lse = saved[:3]
        mask_idx = saved[3] if ctx.has_mask else None
        grad_anchors = torch.zeros_like(anchors)
        for start in range(0, cache.shape[0], ctx.chunk_size):
            chunk = _prefix(cache[start : start + ctx.chunk_size].to(anchors.dtype), ctx.dim, normalize=True)
            weights = torch.exp(_masked_chunk_scores(anchors, chunk, start, mask_idx, ctx.temperature) - lse[:, None])
            grad_anchors.addmm_(weights, chunk)
            del weights
        grad_anchors *= (grad_lse / ctx.temperature)[:, None]
        return grad_anchors, None, None, None, None, None


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
    return _ChunkedLogSumExp.apply(anchors, cache.detach(), mask_idx, temperature, chunk_size, dim)


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
