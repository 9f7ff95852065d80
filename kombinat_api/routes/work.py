"""Claim a batch, submit label chunks, release pairs."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from kombinat_api import queue, trust
from kombinat_api.auth import Principal, principal_in, token_of
from kombinat_api.db import async_transaction
from kombinat_api.routes.deps import batch_models_of, engine_of, hot_pool_of, limit_error, settings_of
from kombinat_api.schemas import (
    ClaimRequest,
    ClaimResponse,
    LabelChunk,
    LabelIn,
    ReleaseRequest,
    ReleaseResponse,
    Strict,
    SubmitResponse,
    error_responses,
)
from kombinat_api.validation import StrictJsonRoute

router = APIRouter(
    prefix="/api/v1/batches",
    tags=["work"],
    route_class=StrictJsonRoute,
    responses=error_responses(401, 403, 404, 409, 413, 429),
)
_LABELS = TypeAdapter(list[LabelIn])
_ANY_JSON: TypeAdapter[Any] = TypeAdapter(Any)


# The hot endpoints resolve the caller inside their own transaction: token check, rate-limit count and the
# operation share one pooled connection and one commit, all on the event loop (no thread hop; db.make_hot_pool).


def _contributors_only(principal: Principal) -> None:
    """Labels come from contributors: an admin token (the pipeline's) neither claims nor labels, so no label can
    bypass honeypots and reputation by riding on an operator's credentials."""
    if principal.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="Admin tokens cannot claim or label batches: label with a contributor token (GitHub sign-in, "
            "or `kombinat create-local-contributor` for your own machines).",
        )


@router.post("/claim", response_model=ClaimResponse)
async def claim_batch(body: ClaimRequest, request: Request, token: str = Depends(token_of)) -> Response:
    settings = settings_of(request)
    async with async_transaction(hot_pool_of(request)) as cur:
        principal = await principal_in(cur, request, token)
        _contributors_only(principal)
        if body.size > settings.max_batch_size:
            raise limit_error(("body", "size"), body.size, settings.max_batch_size, "batch size")
        # New and low-reputation contributors get honeypot-heavy batches until they have earned trust.
        fraction = settings.honeypot_fraction if principal.trusted else settings.honeypot_fraction_untrusted
        result = await queue.claim(
            cur,
            principal.contributor_id,
            body.size,
            body.model.model_dump(),
            settings.lease_seconds,
            fraction,
            settings.honeypot_max_exposure,
        )
    if not result.admitted:
        m = body.model
        wanted = result.registry_prompt_version
        if wanted is not None and wanted != m.prompt_version:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"Model {m.backend}/{m.model_id}/{m.quantization} labels with prompt version {wanted}, but this "
                f"claim says prompt version {m.prompt_version}: labels made with another wording are not comparable "
                "(nor calibrated). Update the annotator (pip install -U embedkomb) and claim again.",
            )
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"Model {m.backend}/{m.model_id}/{m.quantization} is not admitted; "
            "GET /api/v1/models lists the admitted ones.",
        )
    # Rendered here in one pass of pydantic-core, in ClaimResponse's shape (response_model documents it), instead
    # of validating 250 pairs into models and serializing them again through FastAPI.
    return Response(
        _ANY_JSON.dump_json(
            {"batch_id": result.batch_id, "lease_expires_at": result.expires_at, "pairs": result.pairs}
        ),
        media_type="application/json",
    )


def _json_body(model: type[Strict], raw: bytes) -> Any:
    """Parse and validate a JSON body in one pass of pydantic-core. FastAPI's own path decodes it with the json
    module first and validates the Python objects after; for chunks of labels that was ~20 % of a worker's
    Python time (py-spy under bench/queue.py). Errors come out as FastAPI reports them: a 422 whose locations
    start with 'body'."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=raw) from None


# Schemas the OpenAPI document must carry for bodies FastAPI does not parse itself (main.py adds them).
OPENAPI_SCHEMAS: dict[str, Any] = {}


def _body_schema(model: type[Strict]) -> dict[str, Any]:
    """The OpenAPI request body of an endpoint that reads its body itself (see _json_body)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    OPENAPI_SCHEMAS.update(schema.pop("$defs", {}))
    OPENAPI_SCHEMAS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


@router.post("/{batch_id}/labels", response_model=SubmitResponse, openapi_extra=_body_schema(LabelChunk))
async def submit_labels(
    batch_id: uuid.UUID,
    request: Request,
    background: BackgroundTasks,
    token: str = Depends(token_of),
) -> SubmitResponse:
    body: LabelChunk = _json_body(LabelChunk, await request.body())
    settings = settings_of(request)
    model = body.model.model_dump()
    hot_pool = hot_pool_of(request)
    # The batch's model as claimed (with the calibration of that moment) never changes, so a replica reads it
    # once per batch, in the first chunk's transaction.
    batch_models = batch_models_of(request)
    batch = batch_models.get(batch_id)
    labels_json: str | None = None
    result = queue.SubmitResult("foreign")
    principal: Principal | None = None
    # A refusal can be a stale snapshot: a retry of this very chunk that waited on the batch lock while the
    # first attempt committed. One fresh attempt tells a real refusal from that race.
    for _attempt in range(2):
        async with async_transaction(hot_pool) as cur:
            if principal is None:
                principal = await principal_in(cur, request, token)
                _contributors_only(principal)
                if len(body.labels) > settings.max_labels_per_chunk:
                    raise limit_error(
                        ("body", "labels"), len(body.labels), settings.max_labels_per_chunk, "chunk of labels"
                    )
            if batch is None:
                batch = await queue.batch_model(cur, batch_id)
                if batch is not None:
                    batch_models.put(batch_id, batch)
            if labels_json is None:
                # (another contributor's batch, or none: the submit refuses it below)
                if batch is not None and batch.contributor_id == principal.contributor_id:
                    mismatch = batch.mismatch(model)
                    if mismatch is not None:
                        raise HTTPException(status.HTTP_409_CONFLICT, detail=mismatch)
                # With a calibration, kombinat decides the verdict (kombinat_api/calibration.py), not the annotator.
                if batch is None or batch.calibration is None:
                    labels_json = _LABELS.dump_json(body.labels).decode()
                else:
                    labels_json = queue.render_calibrated(body.labels, batch.calibration)
            result = await queue.submit(
                cur,
                principal.contributor_id,
                batch_id,
                labels_json,
                model,
                settings.lease_seconds,
                settings.verify_min_agreement,
                settings.max_labels_per_tier,
                settings.max_tier,
                settings.quorum_distinct_models,
            )
        if result.outcome != "foreign":
            break
    assert principal is not None  # the first attempt resolved the caller, or raised
    if result.outcome == "not_found":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"Batch {batch_id} does not exist.")
    if result.outcome == "forbidden":
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"Batch {batch_id} belongs to another contributor.")
    if result.outcome == "expired":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"The lease of batch {batch_id} expired or was released; claim a new batch.",
        )
    if result.outcome == "foreign":
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="Some labels are for pairs outside this batch's live lease; the chunk was rejected whole.",
        )
    if result.needs_honeypot_check or result.batch_complete or result.escalated:
        background.add_task(
            trust.after_submit,
            engine_of(request),
            batch_id,
            principal.contributor_id,
            result.needs_honeypot_check,
            result.batch_complete,
            result.escalated,
            settings,
        )
    return SubmitResponse(accepted=result.accepted, duplicates=result.duplicates, lease_expires_at=result.expires_at)


@router.post("/{batch_id}/release", response_model=ReleaseResponse)
async def release_batch(
    batch_id: uuid.UUID,
    request: Request,
    body: ReleaseRequest | None = None,
    token: str = Depends(token_of),
) -> ReleaseResponse:
    pair_ids = body.pair_ids if body is not None else None
    async with async_transaction(hot_pool_of(request)) as cur:
        principal = await principal_in(cur, request, token)
        outcome, released = await queue.release(cur, principal.contributor_id, batch_id, pair_ids)
    if outcome == "not_found":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"Batch {batch_id} does not exist.")
    if outcome == "forbidden":
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"Batch {batch_id} belongs to another contributor.")
    return ReleaseResponse(released=released)
