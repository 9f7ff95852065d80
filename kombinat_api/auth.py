"""Tokens and the FastAPI dependencies that say who is calling.

kombinat's tokens are random strings shown once; only their SHA-256 is stored, so a database leak does not
leak credentials. Resolving a token and counting it against its per-minute rate limit is one UPDATE on the
token row: the counter lives in PostgreSQL, so the limit holds across any number of API replicas.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request, status
from psycopg import AsyncCursor, Cursor
from sqlalchemy import Connection

from kombinat_api.db import transaction
from kombinat_api.routes.deps import engine_of, settings_of

TOKEN_PREFIX = "kmb_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    contributor_id: int
    login: str
    is_admin: bool
    trusted: bool
    good_standing: bool
    token_hash: str


RESOLVE_SQL = """
UPDATE api_token t SET
    rl_count = CASE WHEN t.rl_window = w.w THEN t.rl_count + 1 ELSE 1 END,
    rl_window = w.w,
    last_used_at = now()
FROM contributor c, (SELECT floor(extract(epoch FROM now()) / 60)::bigint AS w) w,
     -- a lost counter increment after a crash is harmless, so this commit need not wait for the WAL flush
     (SELECT set_config('synchronous_commit', 'off', true)) s{plan_mode}
WHERE t.token_hash = %(h)s AND t.revoked_at IS NULL AND c.id = t.contributor_id
RETURNING c.id, c.login, t.is_admin, c.trusted, c.good_standing, c.banned, t.rl_count,
          60 - floor(extract(epoch FROM now()))::bigint %% 60 AS retry_after
"""
# The hot path's variant also puts the rest of its transaction on generic plans (db.py: hot_connection_kwargs
# says why), and keeps those plans on indexes: a generic plan lives as long as its connection (until a VACUUM
# or ANALYZE of its tables), and one made while label or batch were still small would otherwise scan them
# whole for every later call, however large they grew. Every hot-path statement reaches its rows through keys.
# No JIT: the claim's estimated cost grows with the queue (about 52k at 150k queued pairs) and past
# jit_above_cost (100k by default, so from roughly 300k queued pairs) every claim would compile its plan
# again, ~80 ms on top of ~6 ms of work (measured with jit_above_cost lowered); nothing here runs long enough
# to win it back. Transaction-local, like SET LOCAL, so it holds behind PgBouncer's transaction pooling,
# where a connection option would not; the statement that follows (claim, submit, release) is bound after
# this one has run.
HOT_RESOLVE_SQL = RESOLVE_SQL.format(
    plan_mode=",\n     (SELECT set_config('plan_cache_mode', 'force_generic_plan', true)"
    " || set_config('enable_seqscan', 'off', true) || set_config('jit', 'off', true)) g"
)
RESOLVE_SQL = RESOLVE_SQL.format(plan_mode="")

BUCKET_SQL = """
INSERT INTO rate_bucket AS r (key, "window", count)
VALUES (%(key)s, floor(extract(epoch FROM now()) / 60)::bigint, 1)
ON CONFLICT (key) DO UPDATE SET
    count = CASE WHEN r."window" = excluded."window" THEN r.count + 1 ELSE 1 END,
    "window" = excluded."window"
RETURNING count, 60 - floor(extract(epoch FROM now()))::bigint %% 60
"""


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def too_many_requests(limit: str, retry_after: float) -> HTTPException:
    """A 429 for a fixed one-minute window: ``limit`` says what was exceeded, ``retry_after`` (seconds) is when
    the window turns over."""
    seconds = int(retry_after)
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=f"Rate limit exceeded: {limit}; retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized(
            "Missing credentials: send 'Authorization: Bearer <token>' (contributors get a token by "
            "signing in with GitHub through /api/v1/auth/device/start)."
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Malformed Authorization header: expected 'Bearer <token>'.")
    return token.strip()


async def token_of(request: Request) -> str:
    """Dependency: the bearer token, checked for presence only (no I/O, so it runs on the event loop)."""
    return bearer_token(request)


async def principal_in(cur: AsyncCursor[Any], request: Request, token: str) -> Principal:
    """Resolve the caller inside the hot path's own transaction (one pool checkout, one commit); what follows
    in that transaction runs on generic plans when ``hot_path_generic_plans`` is on."""
    settings = settings_of(request)
    return await resolve_async(
        cur,
        token,
        settings.rate_limit_per_minute,
        settings.admin_rate_limit_per_minute,
        generic_plans=settings.hot_path_generic_plans,
    )


async def resolve_async(
    cur: AsyncCursor[Any], token: str, contributor_limit: int, admin_limit: int, generic_plans: bool = False
) -> Principal:
    """``resolve`` on an asyncio connection (the hot path's)."""
    await cur.execute(HOT_RESOLVE_SQL if generic_plans else RESOLVE_SQL, {"h": hash_token(token)})
    return _principal(await cur.fetchone(), token, contributor_limit, admin_limit)


def resolve(
    cur: Cursor[Any], token: str, contributor_limit: int, admin_limit: int, generic_plans: bool = False
) -> Principal:
    sql = HOT_RESOLVE_SQL if generic_plans else RESOLVE_SQL
    return _principal(cur.execute(sql, {"h": hash_token(token)}).fetchone(), token, contributor_limit, admin_limit)


def _principal(row: tuple[Any, ...] | None, token: str, contributor_limit: int, admin_limit: int) -> Principal:
    """The caller from RESOLVE_SQL's row, or the 401/403/429 that row calls for."""
    if row is None:
        raise unauthorized("Invalid or revoked token: sign in again to get a new one.")
    cid, login, is_admin, trusted, good, banned, count, retry_after = row
    if banned:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="This contributor account is banned.")
    limit = admin_limit if is_admin else contributor_limit
    if count > limit:
        raise too_many_requests(f"at most {limit} requests per minute per token", retry_after)
    return Principal(cid, login, bool(is_admin), bool(trusted), bool(good), hash_token(token))


def rate_limit_key(conn: Connection, key: str, limit: int) -> None:
    count, retry_after = conn.exec_driver_sql(BUCKET_SQL, {"key": key}).one()
    if count > limit:
        raise too_many_requests(f"at most {limit} sign-in requests per minute from one address", retry_after)


def current_principal(request: Request) -> Principal:
    settings = settings_of(request)
    token = bearer_token(request)
    with transaction(engine_of(request)) as cur:
        return resolve(cur, token, settings.rate_limit_per_minute, settings.admin_rate_limit_per_minute)


def require_admin(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="This endpoint needs an admin token.")
    return principal


def issue_token(conn: Connection, contributor_id: int, is_admin: bool, name: str) -> str:
    token = new_token()
    conn.exec_driver_sql(
        "INSERT INTO api_token (token_hash, contributor_id, is_admin, name) VALUES (%(h)s, %(c)s, %(a)s, %(n)s)",
        {"h": hash_token(token), "c": contributor_id, "a": is_admin, "n": name},
    )
    return token


# Admins and local contributors are contributor rows without a GitHub account, found by their login (which
# has a ':' no GitHub login can have); the first token for a login makes its row.
FIND_WITHOUT_GITHUB_SQL = """
SELECT id, banned FROM contributor WHERE login = %(l)s AND github_id IS NULL AND is_admin = %(a)s
"""
CREATE_WITHOUT_GITHUB_SQL = "INSERT INTO contributor (login, is_admin) VALUES (%(l)s, %(a)s) RETURNING id, banned"


def _contributor_without_github(conn: Connection, login: str, is_admin: bool) -> tuple[int, bool]:
    """(id, banned) of the contributor row of ``login``, made on first use."""
    params = {"l": login, "a": is_admin}
    row = conn.exec_driver_sql(FIND_WITHOUT_GITHUB_SQL, params).first()
    if row is None:
        row = conn.exec_driver_sql(CREATE_WITHOUT_GITHUB_SQL, params).one()
    return int(row[0]), bool(row[1])


def create_admin_token(conn: Connection, name: str) -> str:
    """An admin principal is a contributor row without a GitHub account; its token carries the admin bit."""
    contributor_id, _banned = _contributor_without_github(conn, f"admin:{name}", is_admin=True)
    return issue_token(conn, contributor_id, True, name)


# A local contributor has no GitHub account: login "local:<name>" (GitHub logins cannot contain ':', so no real
# account can collide with one). For demos, offline labs and machines that cannot reach GitHub. Minting its
# token needs the database itself, like an admin token: there is no HTTP endpoint for it, so a deployment's
# sign-in stays GitHub-only.
LOCAL_LOGIN_PREFIX = "local:"
LOCAL_CONTRIBUTOR_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}$")


def check_local_contributor_name(name: str) -> None:
    """Raise ValueError unless ``name`` may follow ``local:`` in a login (checkable before any database work)."""
    if not LOCAL_CONTRIBUTOR_NAME.match(name):
        raise ValueError(
            f"invalid local contributor name {name!r}: use 1-39 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )


def create_local_contributor_token(conn: Connection, name: str) -> tuple[int, str]:
    """The contributor row ``local:<name>`` (made on first use, never an admin) and a new token for it.

    Raises ValueError for an invalid name or a banned contributor. Called again for the same name, it adds a
    token to the same contributor, never a second person."""
    check_local_contributor_name(name)
    login = LOCAL_LOGIN_PREFIX + name
    contributor_id, banned = _contributor_without_github(conn, login, is_admin=False)
    if banned:
        raise ValueError(f"contributor {login} is banned")
    return contributor_id, issue_token(conn, contributor_id, False, login)


REVOKE_SQL = """
UPDATE api_token SET revoked_at = now() WHERE token_hash = ANY(%(hashes)s::text[]) AND revoked_at IS NULL
"""


def revoke_tokens(conn: Connection, tokens: Iterable[str]) -> int:
    """Revoke the given tokens (the tokens themselves, not their hashes); returns how many were live until now.
    Unknown and already revoked tokens are passed over, so revoking twice is harmless."""
    hashes = [hash_token(token) for token in tokens]
    if not hashes:
        return 0
    return conn.exec_driver_sql(REVOKE_SQL, {"hashes": hashes}).rowcount
