"""The chunked exact softmax against a naive full-matrix computation, in value and gradient; its memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from embedkomb_pipeline.training.losses import PAD, ExactSoftmaxLoss, InfoNCELoss, chunked_logsumexp


def naive_loss(
    anchors: torch.Tensor, cache: torch.Tensor, pos_idx: torch.Tensor, mask_idx: torch.Tensor | None, tau: float
) -> torch.Tensor:
    """The definition, written out on the full B × N matrix with dense masks."""
    b, n = anchors.shape[0], cache.shape[0]
    scores = anchors @ cache.T / tau
    positive = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        for p in pos_idx[i].tolist():
            if p != PAD:
                positive[i, p] = True
    masked = torch.zeros(b, n, dtype=torch.bool)
    if mask_idx is not None:
        for i in range(b):
            for m in mask_idx[i].tolist():
                if m != PAD and not positive[i, m]:
                    masked[i, m] = True
    denominator = torch.logsumexp(scores.masked_fill(masked, float("-inf")), dim=1)
    numerator = torch.logsumexp(scores.masked_fill(~positive, float("-inf")), dim=1)
    return (denominator - numerator).mean()


def random_problem(
    b: int, n: int, d: int, n_pos: int, n_mask: int, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    cache = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    # distinct positives per row, padded with -1 to a ragged count (1..n_pos)
    pos_idx = torch.full((b, n_pos), PAD, dtype=torch.long)
    mask_idx = torch.full((b, max(n_mask, 1)), PAD, dtype=torch.long) if n_mask else None
    for i in range(b):
        perm = torch.randperm(n, generator=g)
        k = int(torch.randint(1, n_pos + 1, (1,), generator=g))
        pos_idx[i, :k] = perm[:k]
        if mask_idx is not None:
            m = int(torch.randint(0, n_mask + 1, (1,), generator=g))
            mask_idx[i, :m] = perm[k : k + m]
            if i % 3 == 0:  # a row listed as both positive and masked: positive wins
                mask_idx[i, 0] = perm[0]
    return anchors, cache, pos_idx, mask_idx


@pytest.mark.parametrize(
    ("b", "n", "d", "n_pos", "n_mask", "chunk"),
    [
        (4, 37, 8, 1, 0, 5),  # no mask, single positive, chunk does not divide N
        (6, 50, 16, 3, 7, 7),  # multiple positives and masks, chunk does not divide N
        (5, 23, 4, 2, 10, 23),  # chunk == N
        (3, 40, 8, 4, 12, 1),  # chunk of one row
        (8, 64, 8, 2, 5, 1000),  # chunk > N
    ],
)
def test_exact_softmax_matches_naive_value_and_gradient(
    b: int, n: int, d: int, n_pos: int, n_mask: int, chunk: int
) -> None:
    anchors, cache, pos_idx, mask_idx = random_problem(b, n, d, n_pos, n_mask, seed=b * 1000 + n)
    tau = 0.07
    a1 = anchors.clone().requires_grad_(True)
    a2 = anchors.clone().requires_grad_(True)
    got = ExactSoftmaxLoss(temperature=tau, chunk_size=chunk)(a1, cache, pos_idx, mask_idx)
    want = naive_loss(a2, cache, pos_idx, mask_idx, tau)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-9, atol=1e-10)
    assert a1.grad is not None and a1.grad.abs().sum() > 0


def test_gradient_flows_through_normalization_to_raw_embeddings() -> None:
    """The tower emits raw vectors; normalization sits between them and the loss, and autograd must cross it."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(5, 12, generator=g, dtype=torch.float64)
    cache = F.normalize(torch.randn(31, 12, generator=g, dtype=torch.float64), dim=1)
    pos_idx = torch.tensor([[0, 1], [2, PAD], [3, 4], [5, PAD], [6, 7]])
    mask_idx = torch.tensor([[8, 9], [10, PAD], [PAD, PAD], [11, 12], [1, 13]])
    loss = ExactSoftmaxLoss(temperature=0.1, chunk_size=4)

    def f(x: torch.Tensor) -> torch.Tensor:
        return loss(F.normalize(x, dim=1), cache, pos_idx, mask_idx)

    assert torch.autograd.gradcheck(f, (raw.requires_grad_(True),))


@pytest.mark.parametrize("dims", [None, [4, 8]])
def test_label_smoothing_matches_naive(dims: list[int] | None) -> None:
    """(1 − ε)·CE + ε·(lse − mean of the unmasked scores): the 2022 recipe's smoothing, masked rows excluded."""
    anchors, cache, pos_idx, mask_idx = random_problem(5, 29, 8, 2, 6, seed=21)
    eps, tau = 0.1, 0.05

    def naive(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scores = a @ c.T / tau
        out = []
        for i in range(a.shape[0]):
            pos = {p for p in pos_idx[i].tolist() if p != PAD}
            masked = {m for m in mask_idx[i].tolist() if m != PAD} - pos
            keep = [j for j in range(c.shape[0]) if j not in masked]
            lse = scores[i, keep].logsumexp(0)
            ce = lse - scores[i, sorted(pos)].logsumexp(0)
            out.append((1 - eps) * ce + eps * (lse - scores[i, keep].mean()))
        return torch.stack(out).mean()

    a1 = anchors.clone().requires_grad_(True)
    a2 = anchors.clone().requires_grad_(True)
    got = ExactSoftmaxLoss(tau, chunk_size=6, matryoshka_dims=dims, label_smoothing=eps)(a1, cache, pos_idx, mask_idx)
    if dims is None:
        want = naive(a2, cache)
    else:
        # the full size (8) is used as given: the inputs are unit vectors already
        want = torch.stack([naive(F.normalize(a2[:, :4], dim=1), F.normalize(cache[:, :4], dim=1)), naive(a2, cache)])
        want = want.mean()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a1.grad, a2.grad)
    assert (
        abs(got.item() - ExactSoftmaxLoss(tau, matryoshka_dims=dims)(anchors, cache, pos_idx, mask_idx).item()) > 1e-4
    )


def test_matryoshka_is_the_mean_over_renormalized_prefixes() -> None:
    anchors, cache, pos_idx, mask_idx = random_problem(4, 30, 16, 2, 4, seed=9)
    a1 = anchors.clone().requires_grad_(True)
    a2 = anchors.clone().requires_grad_(True)
    got = ExactSoftmaxLoss(temperature=0.05, chunk_size=7, matryoshka_dims=[4, 8, 16])(a1, cache, pos_idx, mask_idx)
    want = torch.stack(
        [
            naive_loss(F.normalize(a2[:, :k], dim=1), F.normalize(cache[:, :k], dim=1), pos_idx, mask_idx, 0.05)
            for k in (4, 8)
        ]
        + [naive_loss(a2, cache, pos_idx, mask_idx, 0.05)]  # the full size: inputs are unit vectors already
    ).mean()
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a1.grad, a2.grad)
    # and it is not the full-dimension loss alone
    full = ExactSoftmaxLoss(temperature=0.05)(anchors, cache, pos_idx, mask_idx)
    assert abs(full.item() - got.item()) > 1e-3


def test_infonce_matches_exact_softmax_when_the_cache_is_the_batch() -> None:
    """InfoNCE over K candidates is the exact softmax over a K-row cache: same P, same M, same number."""
    anchors, cache, pos_idx, mask_idx = random_problem(6, 20, 8, 3, 5, seed=11)
    assert mask_idx is not None
    positive = torch.zeros(6, 20, dtype=torch.bool)
    masked = torch.zeros(6, 20, dtype=torch.bool)
    for i in range(6):
        positive[i, pos_idx[i][pos_idx[i] != PAD]] = True
        masked[i, mask_idx[i][mask_idx[i] != PAD]] = True
    a1 = anchors.clone().requires_grad_(True)
    c1 = cache.clone().requires_grad_(True)
    info = InfoNCELoss(temperature=0.05)(a1, c1, positive, masked)
    exact = ExactSoftmaxLoss(temperature=0.05, chunk_size=3)(anchors, cache, pos_idx, mask_idx)
    torch.testing.assert_close(info, exact)
    info.backward()
    assert c1.grad is not None and c1.grad.abs().sum() > 0  # InfoNCE trains both sides at once
    # masking changes the value: without it the masked candidates are counted as negatives
    assert float(InfoNCELoss(temperature=0.05)(anchors, cache, positive)) > info.item() + 1e-6


def test_fully_masked_chunks_and_rows_without_positive() -> None:
    anchors, cache, _, _ = random_problem(2, 10, 4, 1, 0, seed=5)
    pos_idx = torch.tensor([[9], [0]])
    mask_idx = torch.tensor([[0, 1, 2, 3], [PAD, PAD, PAD, PAD]])  # row 0: its whole first chunk is masked
    got = ExactSoftmaxLoss(temperature=0.1, chunk_size=4)(anchors, cache, pos_idx, mask_idx)
    torch.testing.assert_close(got, naive_loss(anchors, cache, pos_idx, mask_idx, 0.1))
    with pytest.raises(ValueError, match="at least one positive"):
        ExactSoftmaxLoss()(anchors, cache, torch.tensor([[PAD], [0]]))


class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns, forward and backward alike."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_cache_tensor_is_ever_allocated() -> None:
    """O(B × chunk) memory: with B = 64, N = 20,000, chunk = 512, no op (forward or backward) makes a B × N tensor."""
    b, n, d, chunk = 64, 20_000, 32, 512
    anchors, cache, pos_idx, mask_idx = random_problem(b, n, d, 3, 20, seed=1, dtype=torch.float32)
    a = anchors.clone().requires_grad_(True)
    with LargestTensor() as probe:
        ExactSoftmaxLoss(temperature=0.05, chunk_size=chunk)(a, cache, pos_idx, mask_idx).backward()
    # the largest tensors are views of the cache itself (an input, N × d with d < B) and B × chunk score blocks
    assert probe.largest <= max(b * chunk, n * d)
    assert probe.largest <= b * n // 2
    # the probe can see a B × N matrix: the naive computation makes one
    with LargestTensor() as naive_probe:
        (a @ cache.T).logsumexp(dim=1).sum().backward()
    assert naive_probe.largest >= b * n


def test_cache_in_bfloat16_and_chunked_lse_alone() -> None:
    anchors, cache, _, mask_idx = random_problem(4, 33, 8, 1, 3, seed=2, dtype=torch.float32)
    got = chunked_logsumexp(anchors, cache.to(torch.bfloat16), mask_idx, 0.05, 8)
    cache_rounded = cache.to(torch.bfloat16).float()
    scores = anchors @ cache_rounded.T / 0.05
    for i in range(4):
        for m in mask_idx[i].tolist():
            if m != PAD:
                scores[i, m] = float("-inf")
    torch.testing.assert_close(got, scores.logsumexp(dim=1))
