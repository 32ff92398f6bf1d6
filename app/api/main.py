"""The FastAPI application factory. Tests and tools build the app with ``create_app()``."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.limits import BodySizeLimit
from app.api.routes import jobs, system
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _bootstrap(settings: Settings) -> None:
    """Create the data folders and register the bootstrap admin key, if one is configured."""
    from app.db import session_factory
    from app.security import ensure_key
    from app.storage import BlobStore
    from app.zoo import register_base_models

    settings.blob_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    with session_factory(settings.resolved_database_url)() as session:
        if settings.bootstrap_admin_key is not None:
            ensure_key(session, "bootstrap-admin", "admin", settings.bootstrap_admin_key.get_secret_value())
        register_base_models(session, BlobStore(settings.blob_dir))


def create_app(settings: Settings | None = None, *, run_reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(_bootstrap, settings)
        tasks = []
        if run_reaper:
            tasks.append(asyncio.create_task(_reaper(settings)))
            tasks.append(asyncio.create_task(_webhook_dispatcher(settings)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(
        title="CellFuse",
        version=__version__,
        description="Cell segmentation without structural reporters: a Cellpose model zoo per "
                    "(cell line, reporter, object) and Flow Fusion across channels.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    from app.metrics import HttpMetrics, build_registry

    app.state.metrics_registry, http_requests, http_latency = build_registry(settings)
    app.add_middleware(HttpMetrics, requests=http_requests, latency=http_latency)
    app.include_router(system.router)
    app.include_router(jobs.router)
    for name in ("zoo", "datasets", "work", "keys", "webhooks", "metrics", "web"):
        try:
            module = __import__(f"app.api.routes.{name}", fromlist=["router"])
        except ModuleNotFoundError as exc:
            if exc.name != f"app.api.routes.{name}":
                raise
            continue
        app.include_router(module.router)
    return app


async def _reaper(settings: Settings) -> None:
    from app.reaper import reap_once

    while True:
        await asyncio.sleep(settings.reaper_interval_s)
        try:
            await asyncio.to_thread(reap_once, settings)
        except Exception:
            log.warning("job reaper sweep failed", exc_info=True)


def _deliver_webhooks(settings: Settings) -> int:
    from app.db import session_factory
    from app.webhooks import deliver_due

    with session_factory(settings.resolved_database_url)() as session:
        return deliver_due(session, settings)


async def _webhook_dispatcher(settings: Settings) -> None:
    """Posts due webhook deliveries (workers only queue them: the API process does the sending)."""
    while True:
        try:
            await asyncio.to_thread(_deliver_webhooks, settings)
        except Exception:
            log.warning("webhook dispatch failed", exc_info=True)
        await asyncio.sleep(settings.webhook_poll_s)
