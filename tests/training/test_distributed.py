"""The sharded losses on two real gloo processes equal the one-process losses, in value and gradient.

Inputs are real: all-MiniLM-L6-v2 embeddings of SciFact titles (anchors) and abstracts (the cache), with the
training set's positives (several for some titles: verified relevant candidates) and masks (unverified mined
candidates), in float64 so that equality can be asked to 1e-10. Each rank holds half the cache and its part of
the anchors (or, in a second layout, rank 1 holds no anchor at all).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from embedkomb_pipeline.mining.embedding import default_base_model_path
from embedkomb_pipeline.training.distributed import shard_range
from embedkomb_pipeline.training.losses import PAD, ExactSoftmaxLoss, InfoNCELoss
from tests.training.conftest import SPLIT, build_lake
from tests.training.distributed_cases import EXACT_CASES, anchor_split, run_rank

WORLD = 2


def _pad(lists: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), PAD, dtype=torch.long)
    for i, x in enumerate(lists):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


@pytest.fixture(scope="module")
def problem(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from embedkomb_pipeline.training.data import build_training_set, export_files

    torch.set_num_threads(2)
    lake = build_lake(tmp_path_factory.mktemp("lake"), shared_data, n=96, max_chars=160)
    data = build_training_set([lake.source], export_files(lake.export_root, [SPLIT], "c000"), [lake.candidates])
    # 13 titles (an odd count: the ranks' parts differ), those with several positives first
    order = sorted(range(len(data.queries)), key=lambda q: (-len(data.positives[q]), q))
    chosen = sorted(order[:13])
    model = SentenceTransformer(str(default_base_model_path()), device="cpu", local_files_only=True)
    model.max_seq_length = 48

    def encode(texts: list[str]) -> torch.Tensor:
        return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).double().clone()

    anchors = encode([data.queries[q] for q in chosen])
    cache = encode(data.documents)
    positives = [data.positives[q] for q in chosen]
    masked = [data.masked[q] for q in chosen]
    assert sum(len(p) >= 2 for p in positives) >= 3, positives  # several positives per title, for some
    assert sum(map(len, masked)) >= 20, masked
    generator = torch.Generator().manual_seed(7)
    d = anchors.shape[1]
    noise = torch.randn(d, d, generator=generator, dtype=torch.float64)
    tower = {"weight": torch.eye(d, dtype=torch.float64) + 0.01 * noise, "bias": torch.zeros(d, dtype=torch.float64)}
    # InfoNCE: each rank's candidates are its titles' positives, two of their masked candidates and one document
    # both ranks picked (the first copy, rank 0's, counts)
    shared_doc = next(j for j in range(len(data.documents)) if all(j not in p for p in positives))
    candidate_ids = []
    for rank in range(WORLD):
        rows = anchor_split(len(chosen), rank, WORLD, empty_rank=False)
        ids = [j for p in positives[rows] for j in p] + [j for m in masked[rows] for j in m[:2]] + [shared_doc]
        candidate_ids.append(torch.tensor(list(dict.fromkeys(ids)), dtype=torch.long))
    return {
        "anchors": anchors,
        "raw": anchors.clone(),
        "cache": cache,
        "pos_idx": _pad(positives),
        "mask_idx": _pad(masked),
        "tower": tower,
        "candidate_ids": candidate_ids,
        "info_positive_ids": _pad(positives),
        "info_masked_ids": _pad(masked),
    }


@pytest.fixture(scope="module")
def ranks(problem: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("gloo")
    torch.save(problem, work / "problem.pt")
    mp.start_processes(run_rank, args=(WORLD, str(work)), nprocs=WORLD, start_method="spawn", join=True)
    yield [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_each_rank_holds_half_the_cache(problem: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    n = problem["cache"].shape[0]
    held = [r["cache_rows"] for r in ranks]
    assert sum(held) == n and max(held) - min(held) <= 1, held
    assert [shard_range(n, r, WORLD) for r in range(WORLD)] == [(0, held[0]), (held[0], n)]


@pytest.mark.parametrize("empty_rank", [False, True], ids=["split", "rank1-empty"])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_sharded_exact_softmax_equals_one_process(
    case: str, empty_rank: bool, problem: dict[str, Any], ranks: list[dict[str, Any]]
) -> None:
    anchors = problem["anchors"].clone().requires_grad_(True)
    want = ExactSoftmaxLoss(**EXACT_CASES[case])(anchors, problem["cache"], problem["pos_idx"], problem["mask_idx"])
    want.backward()
    assert anchors.grad is not None
    got = [r[f"exact/{case}/empty={empty_rank}"] for r in ranks]
    # the ranks' parts add up to the loss of the whole batch over the whole cache
    torch.testing.assert_close(sum(g["part"] for g in got), want.detach(), rtol=1e-10, atol=1e-12)
    # and each rank's anchors get exactly their one-process gradient
    for g in got:
        torch.testing.assert_close(g["grad"], anchors.grad[g["rows"]], rtol=1e-9, atol=1e-12)
    assert anchors.grad.abs().sum() > 0


@pytest.mark.parametrize("empty_rank", [False, True], ids=["split", "rank1-empty"])
def test_sharded_per_anchor_losses_equal_one_process(
    empty_rank: bool, problem: dict[str, Any], ranks: list[dict[str, Any]]
) -> None:
    want = ExactSoftmaxLoss(0.05, 7).per_anchor(
        problem["anchors"], problem["cache"], problem["pos_idx"], problem["mask_idx"]
    )
    got = torch.cat([r[f"per_anchor/empty={empty_rank}"]["per"] for r in ranks])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ddp_gradients_equal_one_process_gradients(problem: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    """No double counting: DDP's averaged parameter gradient equals one process's on the concatenated batch."""
    d = problem["anchors"].shape[1]
    tower = torch.nn.Linear(d, d, dtype=torch.float64)
    tower.load_state_dict(problem["tower"])
    loss = ExactSoftmaxLoss(**EXACT_CASES["smoothing_and_matryoshka"])
    want = loss(F.normalize(tower(problem["raw"]), dim=-1), problem["cache"], problem["pos_idx"], problem["mask_idx"])
    want.backward()
    torch.testing.assert_close(sum(r["ddp"]["part"] for r in ranks), want.detach(), rtol=1e-10, atol=1e-12)
    for r in ranks:
        torch.testing.assert_close(r["ddp"]["weight_grad"], tower.weight.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r["ddp"]["bias_grad"], tower.bias.grad, rtol=1e-9, atol=1e-12)


def test_sharded_infonce_gathers_negatives_across_ranks(problem: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    """Each title sees every rank's candidates (a document both ranks picked once), as one process on the union."""
    ids = list(dict.fromkeys(torch.cat(problem["candidate_ids"]).tolist()))
    q = problem["anchors"].clone().requires_grad_(True)
    c = problem["cache"][ids].clone().requires_grad_(True)
    pos, msk = problem["info_positive_ids"], problem["info_masked_ids"]
    id_tensor = torch.tensor(ids)
    positive = (id_tensor[None, :, None] == pos[:, None, :]).any(dim=2)
    masked = (id_tensor[None, :, None] == msk[:, None, :]).any(dim=2)
    want = InfoNCELoss(temperature=0.05, matryoshka_dims=(64, 384))(q, c, positive, masked)
    want.backward()
    assert q.grad is not None and c.grad is not None
    torch.testing.assert_close(sum(r["infonce"]["part"] for r in ranks), want.detach(), rtol=1e-10, atol=1e-12)
    query_grads = torch.cat([r["infonce"]["query_grad"] for r in ranks])
    torch.testing.assert_close(query_grads, q.grad, rtol=1e-9, atol=1e-12)
    seen: set[int] = set()
    for rank, r in enumerate(ranks):
        for k, doc in enumerate(problem["candidate_ids"][rank].tolist()):
            got = r["infonce"]["candidate_grad"][k]
            if doc in seen:  # a later copy of a document: left out of the loss
                assert got.abs().sum() == 0
            else:
                torch.testing.assert_close(got, c.grad[ids.index(doc)], rtol=1e-9, atol=1e-12)
            seen.add(doc)
    assert len(ids) < sum(len(x) for x in problem["candidate_ids"])  # the shared document really repeated
