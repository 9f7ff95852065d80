"""The training variants the quality experiment compares: what each does with the same mined candidates.

Every variant starts from the same base model and trains on the same queries for the same number of optimizer
steps, batch size and learning rate; they differ only in how the mined candidates of those queries enter the loss:

  base            the base model as shipped (no training);
  unfiltered      InfoNCE, every mined candidate a hard negative (hard-negative mining without labels);
  positive_aware  InfoNCE, candidates above 95% of the positive's similarity masked (NV-Retriever, label-free);
  infonce_labels  InfoNCE, verified relevant → positives, verified non-relevant → hard negatives, unverified masked;
  exact_labels    exact softmax over the whole corpus with the same labels (coordinate ascent, two phases);
  exact_labels_masked  the same, but verified relevant candidates masked instead of trained toward as positives
                  (a weak labeler's "relevant" then costs one negative, never a wrong positive);
  exact_masked    exact softmax with every mined candidate masked and no labels: is it the labels, or the masking?
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedkomb_pipeline.training.coordinate_ascent import TrainConfig
from embedkomb_pipeline.training.data import TrainingSet, positive_aware_filter


@dataclass(frozen=True)
class Variant:
    name: str
    loss: str  # "none", "infonce" or "exact"
    uses_labels: bool
    summary: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("base", "none", False, "the base model as shipped"),
        Variant("unfiltered", "infonce", False, "InfoNCE, every mined candidate a hard negative"),
        Variant("positive_aware", "infonce", False, "InfoNCE, candidates ≥ 95% of the positive's similarity masked"),
        Variant("infonce_labels", "infonce", True, "InfoNCE, verified labels (relevant → positive, else negative)"),
        Variant("exact_labels", "exact", True, "exact softmax over the corpus, verified labels"),
        Variant("exact_masked", "exact", False, "exact softmax, every mined candidate masked, no labels"),
        Variant("exact_labels_masked", "exact", True, "exact softmax, labels; relevant masked, not positives"),
    )
}


@dataclass(frozen=True)
class Hyperparameters:
    """What every trained variant shares."""

    steps: int = 60
    batch_size: int = 32
    # bench.demo_training: from this base, 16 steps at 1e-4 cost 2.6 points of SciFact nDCG@10 and 2e-5 gained 1.1;
    # a model already trained contrastively on 1B pairs wants a small step (sentence-transformers' default too)
    lr: float = 2e-5
    max_seq_length: int = 128  # a training window (2x faster than 256 on CPU); saved models keep the base's
    temperature: float = 0.05
    hard_negatives_per_query: int = 1
    cache_precision: str = "fp32"


def training_data(
    name: str,
    labeled: TrainingSet,
    unlabeled: TrainingSet,
    encode: Callable[[list[str]], np.ndarray],
    margin: float = 0.95,
) -> TrainingSet:
    """The variant's view of the data. ``labeled``: the candidates with their verdicts (build_training_set with the
    labels); ``unlabeled``: the same candidates without them (every one masked); ``encode``: the base model's
    normalized embeddings, for the positive-aware filter."""
    if name not in VARIANTS or name == "base":
        raise ValueError(f"no training data for variant {name!r}; trained variants: {', '.join(list(VARIANTS)[1:])}")
    if name == "unfiltered":
        return labeled.unfiltered()
    if name == "positive_aware":
        return positive_aware_filter(labeled.unfiltered(), encode, margin)
    if name in ("infonce_labels", "exact_labels"):
        return labeled
    if name == "exact_labels_masked":
        return labeled.relevant_masked()
    return unlabeled


def train_config(name: str, hp: Hyperparameters, seed: int, n_queries: int) -> TrainConfig:
    """The same steps, batch and lr for every variant: InfoNCE in one pass of ``steps`` optimizer steps, the exact
    softmax in two coordinate-ascent phases (query side, then document side) of ``steps // 2`` each."""
    variant = VARIANTS[name]
    common = {
        "batch_size": hp.batch_size,
        "lr": hp.lr,
        "max_seq_length": hp.max_seq_length,
        "temperature": hp.temperature,
        "cache_precision": hp.cache_precision,
        "seed": seed,
        # enough passes over the queries for the step cap to decide, whatever their number
        "epochs_per_phase": max(1.0, hp.steps * hp.batch_size / max(1, n_queries)),
    }
    if variant.loss == "infonce":
        return TrainConfig(
            loss="infonce",
            phases=1,
            max_steps_per_phase=hp.steps,
            hard_negatives_per_query=hp.hard_negatives_per_query,
            **common,  # type: ignore[arg-type]
        )
    if variant.loss == "exact":
        return TrainConfig(loss="exact", phases=2, max_steps_per_phase=hp.steps // 2, **common)  # type: ignore[arg-type]
    raise ValueError(f"variant {name!r} is not trained")
