"""GitHub device-flow sign-in (proxied), the caller's identity, and token revocation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from kombinat_api.auth import Principal, current_principal, issue_token, rate_limit_key
from kombinat_api.github import GitHubClient, GitHubError
from kombinat_api.routes.deps import engine_of, settings_of
from kombinat_api.schemas import DevicePollRequest, DevicePollResponse, DeviceStartResponse, MeResponse, error_responses
from kombinat_api.validation import StrictJsonRoute

router = APIRouter(prefix="/api/v1", tags=["auth"], route_class=StrictJsonRoute, responses=error_responses(400, 429))


def _github(request: Request) -> GitHubClient:
    settings = settings_of(request)
    if not settings.github_client_id:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="GitHub sign-in is not configured on this server (KOMBINAT_GITHUB_CLIENT_ID is empty).",
        )
    # Sign-in calls carry no token, so they are limited per client address (state in PostgreSQL).
    client = request.client.host if request.client else "unknown"
    with engine_of(request).begin() as conn:
        rate_limit_key(conn, f"device:{client}", settings.device_rate_limit_per_minute)
    return GitHubClient(
        settings.github_client_id,
        settings.github_oauth_url,
        settings.github_api_url,
        settings.github_scope,
        settings.github_timeout_s,
    )


@router.post("/auth/device/start", response_model=DeviceStartResponse)
def device_start(request: Request) -> DeviceStartResponse:
    github = _github(request)
    try:
        return DeviceStartResponse(**github.start_device_flow())
    except GitHubError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc)) from exc


UPSERT_CONTRIBUTOR_SQL = """
INSERT INTO contributor (github_id, login) VALUES (%(gid)s, %(login)s)
ON CONFLICT (github_id) DO UPDATE SET login = excluded.login
RETURNING id, banned
"""


@router.post("/auth/device/poll", response_model=DevicePollResponse)
def device_poll(body: DevicePollRequest, request: Request) -> DevicePollResponse:
    github = _github(request)
    try:
        access_token, error = github.poll(body.device_code)
        if access_token is None:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=error)
        user = github.user(access_token)
    except GitHubError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, detail=str(exc)) from exc
    with engine_of(request).begin() as conn:
        cid, banned = conn.exec_driver_sql(UPSERT_CONTRIBUTOR_SQL, {"gid": user.id, "login": user.login}).one()
        if banned:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="This contributor account is banned.")
        token = issue_token(conn, cid, False, f"github:{user.login}")
    return DevicePollResponse(token=token, login=user.login, contributor_id=cid)


@router.get("/me", response_model=MeResponse)
def me(request: Request, principal: Principal = Depends(current_principal)) -> MeResponse:
    with engine_of(request).connect() as conn:
        row = conn.exec_driver_sql(
            """SELECT c.reputation, c.trusted,
                      (SELECT coalesce(sum(n_labeled), 0) FROM batch b WHERE b.contributor_id = c.id)
               FROM contributor c WHERE c.id = %(c)s""",
            {"c": principal.contributor_id},
        ).one()
    return MeResponse(
        contributor_id=principal.contributor_id,
        login=principal.login,
        is_admin=principal.is_admin,
        reputation=row[0],
        trusted=row[1],
        labels_submitted=row[2],
    )


@router.delete("/auth/token", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(request: Request, principal: Principal = Depends(current_principal)) -> Response:
    with engine_of(request).begin() as conn:
        conn.exec_driver_sql(
            "UPDATE api_token SET revoked_at = now() WHERE token_hash = %(h)s AND revoked_at IS NULL",
            {"h": principal.token_hash},
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
