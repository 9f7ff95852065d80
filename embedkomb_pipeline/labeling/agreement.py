"""Agreement of scores and verdicts with gold labels: AUC, Cohen's κ, and the κ-maximising decision threshold.

Shared by the model qualification (embedkomb_pipeline.evaluation.qualification) and bench/annotator.py, so that a model's
benchmark numbers and its admission decision are computed the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from embedkomb_pipeline.labeling.snapshots import cohens_kappa

__all__ = ["accuracy", "auc", "best_threshold", "cohens_kappa", "kappa_at"]


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Mann-Whitney AUC: the chance that a random positive scores above a random negative (ties count half)."""
    if not positives or not negatives:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def kappa_at(scores: Sequence[float], gold: Sequence[bool], threshold: float) -> float:
    """Cohen's κ of the verdicts score ≥ threshold against gold."""
    return cohens_kappa([s >= threshold for s in scores], list(gold))


def accuracy(scores: Sequence[float], gold: Sequence[bool], threshold: float) -> float:
    if not gold:
        raise ValueError("accuracy needs at least one labelled score")
    return sum((s >= threshold) == g for s, g in zip(scores, gold, strict=True)) / len(gold)


def best_threshold(scores: Sequence[float], gold: Sequence[bool]) -> tuple[float, float]:
    """(κ, threshold) maximising κ over every cut between distinct scores.

    Each candidate threshold is the midpoint between two neighbouring distinct scores (or just above/below the
    extremes), so a threshold found on one sample does not sit exactly on one of its scores.
    """
    if not scores:
        raise ValueError("best_threshold needs at least one score")
    distinct = sorted(set(scores))
    cuts = [distinct[0] - 1e-6] + [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
    cuts.append(distinct[-1] + 1e-6)
    best = (-math.inf, 0.5)
    for cut in cuts:
        k = kappa_at(scores, gold, cut)
        if k > best[0]:
            best = (k, cut)
    return best
