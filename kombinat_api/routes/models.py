"""The model registry: which backend/model/quantization combinations may label, and how to get them."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request

from kombinat_api.auth import Principal, require_admin
from kombinat_api.routes.deps import engine_of
from kombinat_api.schemas import ModelEntry, ModelList, error_responses
from kombinat_api.validation import StrictJsonRoute

router = APIRouter(prefix="/api/v1", tags=["models"], route_class=StrictJsonRoute, responses=error_responses(429))

COLUMNS = (
    "name, backend, model_id, quantization, tier, hub_repo, hub_file, sha256, size_bytes, min_memory_gb, "
    "admitted, qualification, prompt_version, calibration"
)


@router.get("/models", response_model=ModelList)
def list_models(request: Request) -> ModelList:
    with engine_of(request).connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT {COLUMNS} FROM model ORDER BY tier DESC, name").mappings().all()
    return ModelList(models=[ModelEntry(**row) for row in rows])


UPSERT_SQL = f"""
INSERT INTO model ({COLUMNS}, updated_at)
VALUES (%(name)s, %(backend)s, %(model_id)s, %(quantization)s, %(tier)s, %(hub_repo)s, %(hub_file)s,
        %(sha256)s, %(size_bytes)s, %(min_memory_gb)s, %(admitted)s, %(qualification)s::jsonb,
        %(prompt_version)s, %(calibration)s::jsonb, now())
ON CONFLICT (name) DO UPDATE SET
    backend = excluded.backend, model_id = excluded.model_id, quantization = excluded.quantization,
    tier = excluded.tier, hub_repo = excluded.hub_repo, hub_file = excluded.hub_file,
    sha256 = excluded.sha256, size_bytes = excluded.size_bytes, min_memory_gb = excluded.min_memory_gb,
    admitted = excluded.admitted, qualification = excluded.qualification,
    prompt_version = excluded.prompt_version, calibration = excluded.calibration, updated_at = now()
"""


@router.put("/admin/models", response_model=ModelList)
def upsert_models(body: ModelList, request: Request, _admin: Principal = Depends(require_admin)) -> ModelList:
    with engine_of(request).begin() as conn:
        for entry in body.models:
            params = entry.model_dump()
            params["qualification"] = None if entry.qualification is None else json.dumps(entry.qualification)
            # a batch claimed from now on keeps this calibration (and prompt version) for all its labels
            params["calibration"] = None if entry.calibration is None else entry.calibration.model_dump_json()
            conn.exec_driver_sql(UPSERT_SQL, params)
    return list_models(request)
