"""How figures are shown in reports, tables and the demo's board: one formatter, so a missing value reads the
same everywhere."""

from __future__ import annotations

import math

MISSING = "—"


def number(value: float | None, digits: int = 3, *, scale: float = 1.0, signed: bool = False) -> str:
    """`value × scale` with `digits` decimals (a sign when `signed`); "—" for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value * scale:{'+' if signed else ''}.{digits}f}"
