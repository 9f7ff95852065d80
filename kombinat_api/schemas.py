"""Request and response bodies of the HTTP API (docs/api.md)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kombinat_api.calibration import Calibration
from kombinat_api.validation import BIGINT_MAX, Bool, DoubleFloat, Int, JsonObject, RealFloat, Text

Backend = Literal["llama_cpp", "vllm", "mlx"]
# The prompt wording a model's labels are made with ("p1", "g1", "r1", ...): scores from different wordings are
# not comparable, so the registry names the one each model must use and claims must match it.
PROMPT_VERSION_PATTERN = r"^[a-z][a-z0-9._-]{0,31}$"
DEFAULT_PROMPT_VERSION = "p1"


class Strict(BaseModel):
    # Unknown fields are an error, so a typo in a client is reported instead of silently ignored.
    model_config = ConfigDict(extra="forbid")


class ModelInfo(Strict):
    backend: Backend
    model_id: Text = Field(min_length=1, max_length=300)
    quantization: Text = Field(min_length=1, max_length=100)
    annotator_version: Text = Field(default="", max_length=100)
    prompt_version: str = Field(default=DEFAULT_PROMPT_VERSION, pattern=PROMPT_VERSION_PATTERN)


class ClaimRequest(Strict):
    size: Int = Field(ge=1, le=100_000)
    model: ModelInfo


class PairOut(BaseModel):
    pair_id: uuid.UUID
    query: str
    document: str


class ClaimResponse(BaseModel):
    batch_id: uuid.UUID
    lease_expires_at: datetime
    pairs: list[PairOut]


class LabelIn(Strict):
    pair_id: uuid.UUID
    relevant: Bool
    p_relevant: RealFloat = Field(ge=0.0, le=1.0)
    grade: Int | None = Field(default=None, ge=0, le=3)
    truncated: Bool = False
    seconds: RealFloat = Field(default=0.0, ge=0.0, le=86_400.0)


class LabelChunk(Strict):
    model: ModelInfo
    labels: list[LabelIn] = Field(min_length=1, max_length=500)

    @field_validator("labels")
    @classmethod
    def _unique_pairs(cls, labels: list[LabelIn]) -> list[LabelIn]:
        seen: set[uuid.UUID] = set()
        for label in labels:
            if label.pair_id in seen:
                raise ValueError(f"pair_id {label.pair_id} appears more than once in this chunk")
            seen.add(label.pair_id)
        return labels


class SubmitResponse(BaseModel):
    accepted: int
    duplicates: int
    lease_expires_at: datetime | None


class ReleaseRequest(Strict):
    pair_ids: list[uuid.UUID] | None = Field(default=None, max_length=100_000)


class ReleaseResponse(BaseModel):
    released: int


class PairIn(Strict):
    pair_id: uuid.UUID
    query: Text = Field(min_length=1)
    document: Text = Field(min_length=1)
    split: Text = Field(min_length=1, max_length=200)
    cycle: Text = Field(min_length=1, max_length=50)
    priority: DoubleFloat = 0.0

    @field_validator("split")
    @classmethod
    def _not_reserved(cls, split: str) -> str:
        if split == "honeypot":
            raise ValueError("'honeypot' is reserved; load gold pairs through /api/v1/admin/honeypots")
        return split


class EnqueueRequest(Strict):
    pairs: list[PairIn]


class HoneypotIn(Strict):
    pair_id: uuid.UUID
    query: Text = Field(min_length=1)
    document: Text = Field(min_length=1)
    relevant: Bool
    grade: Int | None = Field(default=None, ge=0, le=3)
    source: Text = Field(default="", max_length=300)


class HoneypotRequest(Strict):
    honeypots: list[HoneypotIn]


class InsertResponse(BaseModel):
    inserted: int
    already_present: int


class ModelEntry(Strict):
    name: Text = Field(min_length=1, max_length=200)
    backend: Backend
    model_id: Text = Field(min_length=1, max_length=300)
    quantization: Text = Field(min_length=1, max_length=100)
    tier: Int = Field(default=0, ge=0, le=10)
    hub_repo: Text = Field(default="", max_length=300)
    hub_file: Text = Field(default="", max_length=300)
    sha256: Text = Field(default="", max_length=64)
    size_bytes: Int = Field(default=0, ge=0, le=BIGINT_MAX)
    min_memory_gb: DoubleFloat = Field(default=0.0, ge=0.0, le=1e6)
    admitted: Bool = False
    qualification: JsonObject | None = None
    prompt_version: str = Field(default=DEFAULT_PROMPT_VERSION, pattern=PROMPT_VERSION_PATTERN)
    # raw score -> calibrated probability and the verdict threshold (kombinat_api/calibration.py); None: the
    # annotator's own verdict counts
    calibration: Calibration | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]


class DeviceStartResponse(BaseModel):
    device_code: str
    user_code: str
    verification_uri: str
    interval: int
    expires_in: int


class DevicePollRequest(Strict):
    device_code: Text = Field(min_length=1, max_length=500)


class DevicePollResponse(BaseModel):
    token: str
    login: str
    contributor_id: int


class MeResponse(BaseModel):
    contributor_id: int
    login: str
    is_admin: bool
    reputation: float
    trusted: bool
    labels_submitted: int


class ErrorMessage(BaseModel):
    """Every error but a 422: one sentence that names the problem."""

    detail: str


_ERROR_MEANING = {
    400: "the request cannot be carried out as asked (e.g. a device-flow poll that is pending or expired)",
    401: "missing, malformed, invalid or revoked bearer token",
    403: "not allowed: admin endpoint without an admin token, a model not admitted, another contributor's batch, "
    "a banned account, or an admin token on a contributor endpoint",
    404: "unknown batch",
    409: "lease expired or released, or the model or prompt version does not match the batch or the registry",
    413: "request body over this server's limit",
    429: "over the per-token rate limit; Retry-After says when to come back",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an endpoint can answer (422 FastAPI documents itself)."""
    return {code: {"model": ErrorMessage, "description": _ERROR_MEANING[code]} for code in codes}
