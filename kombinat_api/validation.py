"""Input validation at the edge: whatever a client sends, the answer is a 4xx that names the problem, never a 500.

What PostgreSQL or JSON cannot hold is refused (or, for subnormal floats, rounded) before it reaches a query:

- text: U+0000 (PostgreSQL text cannot store it) and lone surrogates (not encodable as UTF-8) → 422 naming the
  field. Bodies that are not valid UTF-8, or hold a lone surrogate escape or a NaN/Infinity literal, are not JSON
  (RFC 8259) → 422 ``json_invalid``;
- floats: NaN and ±Infinity (and 1e400, which parses as infinity) → 422; a magnitude below the smallest normal
  number of the column's type (``real``: 1.18e-38) is *rounded to 0* — it is a probability or a duration that is
  zero for every purpose, and refusing it would only make a correct client fail on a value it computed honestly;
- integers: within PostgreSQL's bigint (query parameters such as ``offset``), or the field's own range;
- types are strict where a wrong type is a client bug: ``true`` is not a grade and ``"yes"`` is not a boolean.

Error bodies never echo a value JSON cannot hold (NaN, bytes, surrogates): the 422 handler makes them safe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import pydantic_core
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, StrictBool, StrictInt

BIGINT_MAX = 2**63 - 1
# Below these magnitudes a value is subnormal in the column's type (PostgreSQL refuses it as "out of range").
REAL_MIN_NORMAL = 1.1754943508222875e-38
DOUBLE_MIN_NORMAL = 2.2250738585072014e-308


def _clean_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain the character U+0000 (NUL)")
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ValueError("must not contain a lone surrogate (U+D800–U+DFFF): it is not valid Unicode text")
    return value


def _finite_rounded(min_normal: float) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number (JSON has no NaN or Infinity; 1e400 is out of range)")
        return 0.0 if abs(value) < min_normal else value

    return check


def _clean_json(value: Any, path: str = "") -> Any:
    """A JSON object to be stored as jsonb: finite numbers and clean text all the way down."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path or 'value'}: {value} is not a finite number (JSON has no NaN or Infinity)")
    if isinstance(value, str):
        try:
            _clean_text(value)
        except ValueError as error:
            raise ValueError(f"{path or 'value'}: {error}") from None
    if isinstance(value, dict):
        for key, item in value.items():
            _clean_json(key, f"{path}.{key}" if path else str(key))
            _clean_json(item, f"{path}.{key}" if path else str(key))
    if isinstance(value, list):
        for i, item in enumerate(value):
            _clean_json(item, f"{path}[{i}]")
    return value


# Validators only, no Field() here: a field's own Field(ge=..., le=...) must stay in force where these are used.
Text = Annotated[str, AfterValidator(_clean_text)]
# A float stored as PostgreSQL real (4 bytes), or as double precision.
RealFloat = Annotated[float, AfterValidator(_finite_rounded(REAL_MIN_NORMAL))]
DoubleFloat = Annotated[float, AfterValidator(_finite_rounded(DOUBLE_MIN_NORMAL))]
JsonObject = Annotated[dict[str, Any], AfterValidator(_clean_json)]
# Integers and booleans of JSON bodies: no coercion (true is not a grade, "yes" is not a boolean). Ranges are the
# fields' own (every integer column is bigint or narrower: give each field its bounds).
Int = StrictInt
Bool = StrictBool


# --- bodies FastAPI parses: strict JSON ---------------------------------------------------------------------------


class StrictJsonRequest(Request):
    """Parses JSON bodies as RFC 8259 says: UTF-8, no NaN/Infinity literals, no lone surrogate escapes (pydantic-core's
    parser, which also refuses what Python's json module lets through). A failure is a JSONDecodeError, which
    FastAPI answers with its usual 422 ``json_invalid`` instead of a 400 or a 500 further down."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=False)
            except ValueError as error:
                text = body.decode("utf-8", errors="replace")
                raise json.JSONDecodeError(f"not valid JSON: {error}", text, 0) from None
        return self._json


class StrictJsonRoute(APIRoute):
    """The route class of every kombinat router: its endpoints read their JSON bodies through StrictJsonRequest."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler


# --- error bodies that are always JSON ----------------------------------------------------------------------------

_MAX_ECHO = 200  # characters of an offending input echoed back


def json_safe(value: Any) -> Any:
    """The value as JSON can carry it: non-finite floats and bytes as text, surrogates escaped, long text cut."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        safe = value.encode("utf-8", errors="backslashreplace").decode("utf-8")
        return safe if len(safe) <= _MAX_ECHO else safe[:_MAX_ECHO] + "…"
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return json_safe(str(value))


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (``{"detail": [{type, loc, msg, input, ctx}]}``), made JSON-safe."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: json_safe(v) for k, v in e.items() if k != "url"} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})
