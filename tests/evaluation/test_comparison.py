"""The paired bootstrap over queries: differences, intervals and the one-sided p, macro over tasks."""

from __future__ import annotations

import numpy as np
import pytest

from embedkomb_pipeline.evaluation.comparison import paired_bootstrap


def scores(rng: np.random.Generator, n: int, shift: float, seeds: int = 3) -> tuple[dict, dict]:
    difficulty = rng.uniform(0.1, 0.9, n)  # shared by both models: pairing removes it
    a = {f"q{i}": list(difficulty[i] + shift + rng.normal(0, 0.01, seeds)) for i in range(n)}
    b = {f"q{i}": list(difficulty[i] + rng.normal(0, 0.01, seeds)) for i in range(n)}
    return a, b


def test_a_real_gain_is_found_and_no_gain_is_not() -> None:
    rng = np.random.default_rng(0)
    a1, b1 = scores(rng, 300, 0.02)
    a2, b2 = scores(rng, 40, 0.0)
    result = paired_bootstrap({"t1": a1, "t2": a2}, {"t1": b1, "t2": b2}, resamples=2000)
    # macro: the two tasks weigh the same whatever their number of queries
    assert result.difference == pytest.approx((0.02 + 0.0) / 2, abs=0.003)
    assert result.per_task["t1"] == pytest.approx(0.02, abs=0.003) and result.queries == {"t1": 300, "t2": 40}
    assert result.low < result.difference < result.high and result.p_not_better < 0.01
    null = paired_bootstrap({"t2": a2}, {"t2": b2}, resamples=2000)
    assert null.low < 0 < null.high and 0.05 < null.p_not_better < 0.95
    assert set(result.as_dict()) == {"difference", "ci95", "p_not_better", "per_task", "queries"}


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="share no task"):
        paired_bootstrap({"a": {"q": [1.0]}}, {"b": {"q": [1.0]}})
    with pytest.raises(ValueError, match="different queries"):
        paired_bootstrap({"a": {"q1": [1.0]}}, {"a": {"q2": [1.0]}})
