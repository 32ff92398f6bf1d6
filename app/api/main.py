"""The FastAPI application factory. Tests and tools build the app with ``create_app()``."""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app import __version__
from app.api.deps import check_text_params
from app.api.errors import install_error_handlers
from app.api.gate import RequestGate
from app.api.headers import SecurityHeaders
from app.api.routes import (
    datasets,
    illumination,
    jobs,
    keys,
    metrics,
    ome_zarr,
    results,
    system,
    web,
    webhooks,
    submit,
    zoo,
)
from app.metrics import HttpMetrics, build_registry
from app.reaper import reaper_loop
from app.settings import Settings, get_settings
from app.webhooks import webhook_loop

log = logging.getLogger(__name__)


def _bootstrap(settings: Settings) -> None:
    """Create the data folders and register the bootstrap admin key, if one is configured."""
    from app.db import session_factory
    from app.security import ensure_key
    from app.storage import BlobStore
    from app.zoo import register_base_models

    settings.blob_dir.mkdir(parents=True, exist_ok=True)
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    BlobStore(settings.blob_dir).clean_tmp(settings.tmp_max_age_s)  # leftovers of a killed process
    with session_factory(settings.resolved_database_url)() as session:
        if settings.bootstrap_admin_key is not None:
            ensure_key(session, "bootstrap-admin", "admin", settings.bootstrap_admin_key.get_secret_value())
        register_base_models(session, BlobStore(settings.blob_dir))


def create_app(settings: Settings | None = None, *, run_reaper: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(_bootstrap, settings)
        stop = threading.Event()
        if run_reaper:  # the same sweep the workers run, in a thread of the API process
            threading.Thread(target=reaper_loop, args=(stop, settings), daemon=True, name="job-reaper").start()
            threading.Thread(target=webhook_loop, args=(stop, settings), daemon=True, name="webhooks").start()
        try:
            yield
        finally:
            stop.set()

    app = FastAPI(
        title="CellFuse",
        version=__version__,
        description="Cell segmentation without structural reporters: a Cellpose model zoo per "
        "(cell line, reporter, object) and Flow Fusion across channels.",
        lifespan=lifespan,
        dependencies=[Depends(check_text_params)],
        docs_url=None,  # served by routes/web.py from the package, not from a CDN
    )
    app.state.settings = settings
    install_error_handlers(app)
    # Outermost: keys, upload admission and body size are checked before any body byte is read.
    app.state.metrics_registry, http_requests, http_latency = build_registry(settings)
    app.add_middleware(HttpMetrics, requests=http_requests, latency=http_latency)
    app.add_middleware(RequestGate, settings=settings)
    app.add_middleware(SecurityHeaders)  # outermost: refusals by the gate get the headers too
    for module in (system, jobs, zoo, datasets, illumination, submit, results, ome_zarr, keys, webhooks, metrics, web):
        app.include_router(module.router)
    return app
