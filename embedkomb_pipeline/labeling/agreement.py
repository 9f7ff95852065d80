"""Agreement of raters, and of scores with gold labels: Cohen's κ, AUC, and the κ-maximising decision threshold.

Pure math, no I/O. Shared by the label snapshots (agreement between contributors), the model qualification
(embedkomb_pipeline.evaluation.qualification) and bench/annotator.py, so that a model's benchmark numbers and its
admission decision are computed the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["accuracy", "auc", "best_threshold", "cohens_kappa", "kappa_at"]


def cohens_kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's κ of two binary raters; 1.0 when both agree perfectly even on a single class."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError("cohens_kappa needs two equally long, non-empty label lists")
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected >= 1.0:
        return 1.0 if observed == 1.0 else 0.0
    return (observed - expected) / (1 - expected)


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
