"""Shared helpers for the route modules."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine

from kombinat_api.queue import BatchModelCache
from kombinat_api.settings import Settings

# Starlette's app.state is an untyped attribute bag; main.create_app fills it, and these accessors are the one
# place that says what each attribute holds.


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def engine_of(request: Request) -> Engine:
    """The general pool: everything but the hot path."""
    engine: Engine = request.app.state.engine
    return engine


def hot_pool_of(request: Request) -> AsyncConnectionPool:
    """The asyncio pool of the claim/submit/release hot path (prepared statements with generic plans)."""
    pool: AsyncConnectionPool = request.app.state.hot_pool
    return pool


def batch_models_of(request: Request) -> BatchModelCache:
    """This process's cache of the models batches were claimed with (immutable per batch)."""
    cache: BatchModelCache = request.app.state.batch_models
    return cache


def limit_error(loc: tuple[str, ...], value: Any, maximum: int, what: str) -> RequestValidationError:
    """A 422 in FastAPI's own error-list shape for limits that come from settings, not from the schema."""
    return RequestValidationError(
        [
            {
                "type": "less_than_equal",
                "loc": loc,
                "msg": f"{what} {value} exceeds this server's limit of {maximum}",
                "input": value,
                "ctx": {"le": maximum},
            }
        ]
    )


def invalid_value(loc: tuple[str, ...], value: Any, message: str) -> RequestValidationError:
    """A 422 in FastAPI's own error-list shape for a value the schema alone cannot judge (a cursor, say)."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": value}])
