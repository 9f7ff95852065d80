"""The kombinat FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from kombinat_api import __version__
from kombinat_api.db import make_engine
from kombinat_api.limits import BodySizeLimit
from kombinat_api.routes import admin, auth, models, public, work
from kombinat_api.settings import Settings
from kombinat_api.upkeep import run_upkeep


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each worker process owns two pools (the hot path's and the general one); nothing else lives in process
        # memory that another replica would need (leases, rate limits, tokens are all rows in PostgreSQL).
        engine = make_engine(
            settings.database_url,
            settings.db_general_pool_size,
            settings.db_general_max_overflow,
            settings.db_prepare_threshold,
        )
        hot_engine = make_engine(
            settings.database_url,
            settings.db_pool_size,
            settings.db_max_overflow,
            generic_plans=settings.hot_path_generic_plans,
        )
        app.state.engine = engine
        app.state.hot_engine = hot_engine
        upkeep = (
            asyncio.create_task(run_upkeep(settings.database_url, settings.upkeep_interval_s))
            if settings.upkeep_interval_s > 0
            else None
        )
        try:
            yield
        finally:
            if upkeep is not None:
                upkeep.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upkeep
            hot_engine.dispose()
            engine.dispose()

    app = FastAPI(
        title="kombinat",
        version=__version__,
        description="Coordination server of Embed Kombinat: work queue, label intake, trust, statistics.",
        lifespan=lifespan,
    )
    app.state.settings = settings
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
