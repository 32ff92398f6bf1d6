"""A real CellFuse server (uvicorn in a thread, a real Celery worker, the embedded database and
broker) with a tiny trained zoo, and Debian's Chromium driven by Playwright.

Browser tests skip with a reason when /usr/bin/chromium is missing, unless
CELLFUSE_TEST_BROWSER=required (CI), where a missing browser is a failure. Playwright's own browser
downloads are never used: the tests launch the system Chromium by path.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.client import CellFuseClient
from app.db import session_factory
from app.security import create_key
from app.settings import Settings
from tests.service.conftest import REPO_ROOT, WorkerProcess, make_embedded_settings, start_worker
from tests.service.workflow import CELL_LINE, small_plate, upload_dataset

CHROMIUM = Path(os.environ.get("CELLFUSE_TEST_CHROMIUM", "/usr/bin/chromium"))
BROWSER_REQUIRED = os.environ.get("CELLFUSE_TEST_BROWSER", "").lower() == "required"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"

#: As small as a model gets while still being a real fine-tune through the API.
TINY_TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}
SHIPPED_BASE = "cellfuse-base-w16:v3"
#: 3 training images, one validation and one test image: the least a fine-tune accepts.
SPLITS = ["train", "train", "train", "val", "test"]


def require_chromium() -> None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if BROWSER_REQUIRED:
        pytest.fail(message + " (CELLFUSE_TEST_BROWSER=required)")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    key: str
    settings: Settings
    worker: WorkerProcess

    def client(self) -> CellFuseClient:
        return CellFuseClient.connect(self.base_url, self.key, timeout=60.0)


@contextmanager
def serve(folder: Path, role: str = "admin") -> Iterator[LiveServer]:
    """A real server (uvicorn in a thread) and a real worker on an empty embedded service in ``folder``."""
    import uvicorn

    from app.api.main import create_app

    settings = make_embedded_settings(folder)
    with session_factory(settings.resolved_database_url)() as session:
        _row, key = create_key(session, "browser-test", role)
    # The worker imports torch and Cellpose; start it first so that it warms up while the API starts.
    worker = start_worker(settings, folder / "worker.log")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200 and server.started:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            worker.kill()
            raise RuntimeError("the API server did not start in 30 s")
        time.sleep(0.1)
    try:
        yield LiveServer(base_url, key, settings, worker)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        worker.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    """One server for the browser tests that share the tiny zoo (started once: a worker costs ~15 s)."""
    require_chromium()
    with serve(tmp_path_factory.mktemp("web")) as server:
        yield server


def make_key(server: LiveServer, role: str, name: str = "browser-role") -> str:
    with session_factory(server.settings.resolved_database_url)() as session:
        _row, key = create_key(session, name, role)
    return key


def register_base(api: CellFuseClient, name: str = "random-full-width") -> str:
    """Upload a randomly initialised full-width CPnet as a base model.

    Full width because the fine-tune pipeline currently assumes full widths for uploaded bases whose
    card does not name its widths (tests.service.workflow's tiny base fails to load there).
    """
    import torch
    from safetensors.torch import save

    from app.science.backbone import FULL_WIDTHS, build_network

    torch.manual_seed(0)
    weights = save({k: v.contiguous() for k, v in build_network(FULL_WIDTHS).state_dict().items()})
    response = api.http.post(
        "/api/v1/base-models",
        data={"name": name, "diam_mean": "30"},
        files={"weights": ("base.safetensors", weights, "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    return name


@dataclass(frozen=True)
class ZooJobs:
    channels: list[str]
    dataset_id: int
    job_ids: list[str]


@dataclass(frozen=True)
class TinyZoo:
    channels: list[str]
    dataset_id: int
    version_ids: list[int]


@pytest.fixture(scope="session")
def zoo_jobs(live_server) -> ZooJobs:
    """Fine-tunes of a 2-reporter zoo for one cell line (nuclei and cells per reporter), submitted
    through the API and not waited for: browser tests watch them run."""
    api = live_server.client()
    # The shipped pretrained base (half width): a 2-epoch fine-tune of it already finds nuclei, so the
    # viewer, the measurements and the plate map have objects to show.
    base = SHIPPED_BASE
    fields = small_plate(len(SPLITS), size=128, n_channels=2)
    channels = list(fields[0].channel_names)
    ds = upload_dataset(api, fields, splits=SPLITS)
    # Submitted together: the worker runs them one after the other without a round trip between.
    jobs = [
        api.submit(
            "finetune", {"dataset_id": ds["id"], "reporter": r, "object": o, "base": base, "params": TINY_TRAINING}
        )
        for r in channels
        for o in ("nuclei", "cells")
    ]
    return ZooJobs(channels, ds["id"], [job["id"] for job in jobs])


@pytest.fixture(scope="session")
def tiny_zoo(live_server, zoo_jobs) -> TinyZoo:
    """The zoo once every fine-tune has finished."""
    api = live_server.client()
    version_ids = []
    for job_id in zoo_jobs.job_ids:
        done = api.wait(job_id, timeout=240, poll=0.3)
        assert done["status"] == "succeeded", f"fine-tune failed: {done['error']}\n{live_server.worker.log()[-2000:]}"
        version_ids.append(done["summary"]["model_version_id"])
    return TinyZoo(zoo_jobs.channels, zoo_jobs.dataset_id, version_ids)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    require_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class ConsoleErrors(list):
    """Uncaught exceptions and console errors of a page. A test that provokes an error on purpose
    (a refused request logs "Failed to load resource") calls ``expect(...)`` for those words."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: list[str] = []

    def expect(self, *fragments: str) -> None:
        self.expected.extend(fragments)

    def unexpected(self) -> list[str]:
        return [e for e in self if not any(f in e for f in self.expected)]


def open_page(browser, live_server, width: int = 1280, height: int = 900):
    context = browser.new_context(
        base_url=live_server.base_url, viewport={"width": width, "height": height}, accept_downloads=True
    )
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors = ConsoleErrors()
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.console_errors = errors
    return context, page


@pytest.fixture
def page(browser, live_server):
    """A fresh page (own storage) on the live server; page errors and console errors fail the test."""
    context, page = open_page(browser, live_server)
    try:
        yield page
    finally:
        context.close()
    assert not page.console_errors.unexpected(), f"errors on the page: {page.console_errors.unexpected()}"


def enter_key(page, key: str) -> None:
    page.goto("/")
    page.fill("#api-key", key)
    page.click("#key-save")
    page.wait_for_selector("#conn-state:has-text('connected')")


class Overflow(int):
    """How many CSS pixels the page is wider than its viewport; ``culprits`` name the elements past it."""

    culprits: list[str]


def no_horizontal_overflow(page) -> Overflow:
    """How many CSS pixels the page is wider than its viewport (0 = nothing to scroll sideways)."""
    found = page.evaluate("""() => {
      const width = document.documentElement.clientWidth;
      const past = [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > width + 1
        && e.getClientRects().length && !e.closest('.table-scroll'));
      return [document.documentElement.scrollWidth - width,
              past.slice(0, 8).map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`)];
    }""")
    result = Overflow(found[0])
    result.culprits = found[1]
    return result


__all__ = [
    "ARTIFACTS",
    "CELL_LINE",
    "SHIPPED_BASE",
    "LiveServer",
    "TinyZoo",
    "ZooJobs",
    "enter_key",
    "make_key",
    "no_horizontal_overflow",
    "open_page",
    "serve",
]
