"""Claim a batch, submit label chunks, release pairs."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request, Response, status
from pydantic import TypeAdapter

from kombinat_api import queue, trust
from kombinat_api.auth import hash_token, principal_from_row, principal_in, token_of
from kombinat_api.db import transaction
from kombinat_api.routes.deps import engine_of, limit_error, pool_of, settings_of
from kombinat_api.schemas import (
    ClaimRequest,
    ClaimResponse,
    LabelChunk,
    LabelIn,
    ReleaseRequest,
    ReleaseResponse,
    SubmitResponse,
)

router = APIRouter(prefix="/api/v1/batches", tags=["work"])
_LABELS = TypeAdapter(list[LabelIn])


# The hot endpoints are coroutines: each is one statement on an autocommit connection of the async pool that
# checks the token, counts it against the rate limit and does the work (queue.CLAIM_SQL, queue.SUBMIT_SQL).
# No thread hop, one round trip, one commit. The responses are written as JSON directly (the claim's by
# PostgreSQL); ``response_model`` stays in the decorators for the OpenAPI schema.


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@router.post("/claim", response_model=ClaimResponse)
async def claim_batch(body: ClaimRequest, request: Request, token: str = Depends(token_of)) -> Response:
    settings = settings_of(request)
    size_ok = body.size <= settings.max_batch_size
    params = queue.claim_params(
        body.size,
        body.model.model_dump(),
        settings.lease_seconds,
        settings.honeypot_fraction,
        settings.honeypot_fraction_untrusted,
        size_ok=size_ok,
        token_hash=hash_token(token),
        rate_limit=settings.rate_limit_per_minute,
        admin_rate_limit=settings.admin_rate_limit_per_minute,
    )
    async with pool_of(request).connection() as conn:
        result = await queue.claim_async(conn, params)
    # The statement claimed nothing unless all of these hold; they are reported in this order.
    principal_from_row(result.principal, token, settings.rate_limit_per_minute, settings.admin_rate_limit_per_minute)
    if not size_ok:
        raise limit_error(("body", "size"), body.size, settings.max_batch_size, "batch size")
    if not result.admitted or result.body is None:
        m = body.model
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"Model {m.backend}/{m.model_id}/{m.quantization} is not admitted; "
            "GET /api/v1/models lists the admitted ones.",
        )
    return Response(result.body, media_type="application/json")


@router.post("/{batch_id}/labels", response_model=SubmitResponse)
async def submit_labels(
    batch_id: uuid.UUID,
    body: LabelChunk,
    request: Request,
    background: BackgroundTasks,
    token: str = Depends(token_of),
) -> Response:
    settings = settings_of(request)
    size_ok = len(body.labels) <= settings.max_labels_per_chunk
    params = queue.submit_params(
        batch_id,
        _LABELS.dump_json(body.labels).decode(),
        body.model.model_dump(),
        settings.lease_seconds,
        settings.verify_min_agreement,
        settings.max_labels_per_tier,
        settings.max_tier,
        size_ok=size_ok,
        token_hash=hash_token(token),
        rate_limit=settings.rate_limit_per_minute,
        admin_rate_limit=settings.admin_rate_limit_per_minute,
        honeypot_min_accuracy=settings.honeypot_min_accuracy,
    )
    pool = pool_of(request)
    result = queue.SubmitResult("foreign")
    # A refusal can be a stale snapshot: a retry of this very chunk that waited on the batch lock while the
    # first attempt committed. One fresh attempt tells a real refusal from that race (it counts as a second
    # request against the rate limit, which only this rare race pays).
    for _attempt in range(2):
        async with pool.connection() as conn:
            result = await queue.submit_async(conn, params)
        # The statement wrote nothing unless all of these hold; they are reported in this order.
        principal = principal_from_row(
            result.principal, token, settings.rate_limit_per_minute, settings.admin_rate_limit_per_minute
        )
        if not size_ok:
            raise limit_error(("body", "labels"), len(body.labels), settings.max_labels_per_chunk, "chunk of labels")
        if result.outcome != "foreign":
            break
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
    # Follow-up work only where there is some: a failed honeypot verdict (quarantine), a completed batch
    # (final honeypot check, reputation refresh) or escalated pairs.
    if result.honeypots_failed or result.batch_complete or result.escalated:
        background.add_task(
            trust.after_submit,
            engine_of(request),
            batch_id,
            principal.contributor_id,
            result.honeypots_failed,
            result.batch_complete,
            result.escalated,
            settings,
        )
    answer = {"accepted": result.accepted, "duplicates": result.duplicates, "lease_expires_at": _iso(result.expires_at)}
    return Response(json.dumps(answer), media_type="application/json")


@router.post("/{batch_id}/release", response_model=ReleaseResponse)
def release_batch(
    batch_id: uuid.UUID,
    request: Request,
    body: ReleaseRequest | None = None,
    token: str = Depends(token_of),
) -> ReleaseResponse:
    pair_ids = body.pair_ids if body is not None else None
    with transaction(engine_of(request)) as cur:
        principal = principal_in(cur, request, token)
        outcome, released = queue.release(cur, principal.contributor_id, batch_id, pair_ids)
    if outcome == "not_found":
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"Batch {batch_id} does not exist.")
    if outcome == "forbidden":
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"Batch {batch_id} belongs to another contributor.")
    return ReleaseResponse(released=released)
