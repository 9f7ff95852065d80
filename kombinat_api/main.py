"""The kombinat FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from kombinat_api import __version__, queue
from kombinat_api.db import make_engine, make_hot_pool
from kombinat_api.limits import BodySizeLimit
from kombinat_api.routes import admin, auth, models, public, work
from kombinat_api.settings import Settings
from kombinat_api.upkeep import run_upkeep
from kombinat_api.validation import validation_error_handler


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each worker process owns two pools (the hot path's and the general one); nothing else lives in process
        # memory that another replica would need (leases, rate limits, tokens are all rows in PostgreSQL; the
        # cache of batch models holds copies of rows that never change).
        engine = make_engine(
            settings.database_url,
            settings.db_general_pool_size,
            settings.db_general_max_overflow,
            settings.db_prepare_threshold,
        )
        hot_pool = make_hot_pool(
            settings.database_url,
            settings.db_pool_size,
            settings.db_max_overflow,
            generic_plans=settings.hot_path_generic_plans,
        )
        await hot_pool.open()
        # the claim retires honeypots with the cap of its moment; a changed KOMBINAT_HONEYPOT_MAX_EXPOSURE applies
        # to the whole pool from here on
        with engine.begin() as conn:
            queue.reconcile_honeypot_cap(conn, settings.honeypot_max_exposure)
        app.state.engine = engine
        app.state.hot_pool = hot_pool
        upkeep = (
            asyncio.create_task(run_upkeep(settings.database_url, settings.upkeep_interval_s))
            if settings.upkeep_interval_s > 0
            else None
        )
        # Everything made so far (modules, the app, its pydantic schemas: ~130k objects) lives as long as the
        # worker. Frozen, it is skipped by the cyclic GC: each full collection otherwise walked all of it with
        # the GIL held, 80-240 ms every ~10 s under load, and stalled every request of the worker at once
        # (the slowest claims of bench/queue.py). Garbage is still freed by reference counting as before.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            if upkeep is not None:
                upkeep.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upkeep
            await hot_pool.close()
            engine.dispose()

    app = FastAPI(
        title="kombinat",
        version=__version__,
        description="Coordination server of Embed Kombinat: work queue, label intake, trust, statistics.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # 422 bodies that are always JSON, whatever the offending input was (validation.py)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    # Immutable per batch, so safe to keep per process: a replica that has not seen a batch reads it once.
    app.state.batch_models = queue.BatchModelCache()
    app.add_middleware(BodySizeLimit, default_limit=settings.max_body_bytes, admin_limit=settings.max_admin_body_bytes)
    for module in (auth, models, work, admin, public):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        # FastAPI's document, plus the schemas of bodies the work routes validate themselves
        if app.openapi_schema is None:
            schemas = FastAPI.openapi(app).setdefault("components", {}).setdefault("schemas", {})
            for name, schema in work.OPENAPI_SCHEMAS.items():
                schemas.setdefault(name, schema)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
