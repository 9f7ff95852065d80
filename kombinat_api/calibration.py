"""A labeling model's calibration: the one definition of how its raw score becomes a verdict.

The pipeline fits a calibration per model at qualification and writes it to the registry (``model.calibration``,
``ModelEntry.calibration``). kombinat applies it to every label of that model at submit time, server-side
(routes/work.py), so the verdict that counts never depends on the threshold an annotator happens to run with:

- ``platt``: p_cal = 1 / (1 + exp(-(a · logit(clip(p, 1e-6, 1 - 1e-6)) + b)))
- ``isotonic``: p_cal = piecewise-linear interpolation of the points (x, y), clamped to y[0] below x[0] and to
  y[-1] above x[-1]

and the label is relevant iff p_cal >= threshold. ``p`` is the annotator's ``p_relevant`` in [0, 1]. The
verdict is decided in double precision; ``label.p_calibrated`` stores p_cal rounded to single precision.

Nothing else in kombinat computes p_cal: the SQL statements store what ``apply`` returns.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

# logit(p) is finite only inside (0, 1): p is clipped to this distance from 0 and 1 first
P_CLIP = 1e-6
# |a · logit + b| beyond this changes nothing (sigmoid(±700) is 0 or 1 to double precision, exp(700) < 1e305):
# the clamp keeps exp() finite for any finite a and b
Z_CLAMP = 700.0
MAX_POINTS = 512

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Threshold = Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]


class PlattCalibration(BaseModel):
    """Logistic regression on the logit of the raw score (Platt scaling)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["platt"]
    a: float = Field(allow_inf_nan=False)
    b: float = Field(allow_inf_nan=False)
    threshold: Threshold

    def apply(self, p: float) -> float:
        """The calibrated probability of raw score ``p``."""
        q = min(max(p, P_CLIP), 1.0 - P_CLIP)
        z = self.a * math.log(q / (1.0 - q)) + self.b
        z = min(max(z, -Z_CLAMP), Z_CLAMP)
        return 1.0 / (1.0 + math.exp(-z))


class IsotonicCalibration(BaseModel):
    """A monotone piecewise-linear map through fitted points (isotonic regression's output, interpolated)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["isotonic"]
    x: list[Probability] = Field(min_length=2, max_length=MAX_POINTS)
    y: list[Probability] = Field(min_length=2, max_length=MAX_POINTS)
    threshold: Threshold

    @model_validator(mode="after")
    def _monotone(self) -> IsotonicCalibration:
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y must have the same length (x has {len(self.x)}, y has {len(self.y)})")
        for i in range(1, len(self.x)):
            if not self.x[i] > self.x[i - 1]:
                raise ValueError(f"x must be strictly increasing (x[{i}] = {self.x[i]} <= x[{i - 1}])")
            if not self.y[i] >= self.y[i - 1]:
                raise ValueError(f"y must be non-decreasing (y[{i}] = {self.y[i]} < y[{i - 1}])")
        return self

    def apply(self, p: float) -> float:
        """The calibrated probability of raw score ``p``."""
        x, y = self.x, self.y
        if p <= x[0]:
            return y[0]
        if p >= x[-1]:
            return y[-1]
        i = bisect_right(x, p) - 1  # x[i] <= p < x[i + 1]
        return y[i] + (y[i + 1] - y[i]) * (p - x[i]) / (x[i + 1] - x[i])


Calibration = Annotated[PlattCalibration | IsotonicCalibration, Field(discriminator="method")]
CALIBRATION: TypeAdapter[PlattCalibration | IsotonicCalibration] = TypeAdapter(Calibration)


def verdict(calibration: PlattCalibration | IsotonicCalibration, p: float) -> tuple[float, bool]:
    """(p_cal, relevant) of raw score ``p``: relevant iff p_cal >= the calibration's threshold."""
    p_cal = calibration.apply(p)
    return p_cal, p_cal >= calibration.threshold
