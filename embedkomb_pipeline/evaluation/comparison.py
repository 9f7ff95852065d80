"""Is model A better than model B? Paired statistics over queries, macro-averaged over tasks.

Two retrieval models scored on the same queries differ mostly by query difficulty, which pairing removes: the
bootstrap resamples queries (within each task, with replacement) and recomputes the mean difference of per-query
nDCG@10, averaged over tasks with equal weight — the "averaged over the held-out tasks" figure. With several
training seeds per variant, a query's score is first averaged over the seeds, so seed noise shrinks the
difference rather than inflating the interval's confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# per task: per query id, the score of every seed
PerQuery = Mapping[str, Mapping[str, Sequence[float]]]


@dataclass(frozen=True)
class PairedDifference:
    """A − B in nDCG@10 points × 100 would be ``difference * 100``; interval and one-sided p from the bootstrap."""

    difference: float  # macro mean over tasks of the mean per-query difference
    low: float  # 2.5th percentile of the resampled differences
    high: float  # 97.5th percentile
    p_not_better: float  # share of resamples where A is not better than B (one-sided)
    per_task: dict[str, float]
    queries: dict[str, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "difference": round(self.difference, 5),
            "ci95": [round(self.low, 5), round(self.high, 5)],
            "p_not_better": round(self.p_not_better, 4),
            "per_task": {k: round(v, 5) for k, v in self.per_task.items()},
            "queries": self.queries,
        }


def paired_bootstrap(a: PerQuery, b: PerQuery, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """A − B over the tasks both were scored on; every query of a task must be scored for both."""
    tasks = [t for t in a if t in b]
    if not tasks:
        raise ValueError("the two models share no task")
    rng = np.random.default_rng(seed)
    per_task: dict[str, float] = {}
    queries: dict[str, int] = {}
    resampled = np.zeros((resamples, len(tasks)))
    for k, task in enumerate(tasks):
        ids = sorted(a[task])
        if sorted(b[task]) != ids:
            raise ValueError(f"{task}: the two models were scored on different queries")
        diff = np.array([np.mean(a[task][q]) - np.mean(b[task][q]) for q in ids], dtype=np.float64)
        per_task[task], queries[task] = float(diff.mean()), len(ids)
        picks = rng.integers(0, len(ids), size=(resamples, len(ids)))
        resampled[:, k] = diff[picks].mean(axis=1)
    macro = resampled.mean(axis=1)
    return PairedDifference(
        difference=float(np.mean(list(per_task.values()))),
        low=float(np.percentile(macro, 2.5)),
        high=float(np.percentile(macro, 97.5)),
        p_not_better=float(np.mean(macro <= 0)),
        per_task=per_task,
        queries=queries,
    )
