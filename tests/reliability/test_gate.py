"""The request gate: keys are checked before any body byte is read, uploads are admitted within a
budget of slots and bytes, and an anonymous 400 MB upload to a real server costs it neither memory
nor temporary space."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.api.main import create_app
from tests.reliability.conftest import free_port, make_client, wait_port
from tests.service.conftest import REPO_ROOT, make_embedded_settings, settings_env

PROBLEM = "application/problem+json"
BIG = 400 * 1024 * 1024


def call_asgi(
    app, method: str, path: str, headers: dict[str, str], body_chunks: int = 400, chunk: bytes = b"x" * (1 << 20)
) -> tuple[int, dict[str, str], bytes, int]:
    """One request straight into the ASGI app; -> (status, headers, body, body bytes the app pulled)."""
    pulled = 0
    sent_chunks = 0
    out: dict = {"status": None, "headers": {}, "body": b""}

    async def receive():
        nonlocal pulled, sent_chunks
        if sent_chunks >= body_chunks:
            await asyncio.sleep(3600)
        sent_chunks += 1
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent_chunks < body_chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }

    async def main():
        await asyncio.wait_for(app(scope, receive, send), timeout=60)

    # On a thread of its own: a session-wide Playwright (browser tests) keeps an event loop running
    # in the main thread, where asyncio.run() refuses to start.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()
    return out["status"], out["headers"], out["body"], pulled


@pytest.mark.parametrize(
    "path,content_type",
    [
        ("/api/v1/datasets/1/images", "multipart/form-data; boundary=abc"),
        ("/api/v1/base-models", "multipart/form-data; boundary=abc"),
        ("/api/v1/jobs/segment", "multipart/form-data; boundary=abc"),
        ("/api/v1/datasets", "application/json"),
    ],
)
@pytest.mark.parametrize("key", [None, "cf_not-a-key", "\x7fbad"])
def test_unauthenticated_body_is_refused_before_a_byte_is_read(embedded_settings, path, content_type, key):
    app = create_app(embedded_settings, run_reaper=False)
    headers = {"content-type": content_type, "content-length": str(BIG)}
    if key is not None:
        headers["x-api-key"] = key
    status, response_headers, body, pulled = call_asgi(app, "POST", path, headers)
    assert status == 401 and response_headers["content-type"].startswith(PROBLEM), body
    assert response_headers["www-authenticate"] == "APIKey"
    assert pulled == 0  # not one body byte was received
    # Chunked (no length): the same.
    del headers["content-length"]
    status, _, _, pulled = call_asgi(app, "POST", path, headers)
    assert status == 401 and pulled == 0


def test_upload_slots_and_bytes_in_flight(tmp_path):
    settings = make_embedded_settings(
        tmp_path, max_concurrent_uploads=2, max_uploads_per_key=1, max_upload_bytes_in_flight=3 * 1024 * 1024
    )
    client, key = make_client(settings, run_reaper=False)
    _, key2 = make_client(settings, run_reaper=False)
    app = client.app
    gate = app.middleware_stack  # built lazily by the first request
    assert client.get("/health").status_code == 200
    gate = app.middleware_stack
    while not hasattr(gate, "budget"):
        gate = gate.app
    budget = gate.budget
    multipart = {"content-type": "multipart/form-data; boundary=abc"}
    # One upload of key 1 in progress: key 1's second is a 429, key 2's is admitted.
    assert budget.admit(1, 10) is None
    status, headers, body, pulled = call_asgi(
        app, "POST", "/api/v1/datasets/1/images", {**multipart, "content-length": "1000", "x-api-key": key}
    )
    assert status == 429 and headers["retry-after"] and pulled == 0, body
    # Bytes in flight: 2 MB declared on top of 2 MB held is past the 3 MB budget -> 503.
    budget.bytes = 2 * 1024 * 1024
    status, headers, body, pulled = call_asgi(
        app,
        "POST",
        "/api/v1/datasets/1/images",
        {**multipart, "content-length": str(2 * 1024 * 1024), "x-api-key": key2},
    )
    assert status == 503 and headers["retry-after"] and pulled == 0, body
    assert b"retry shortly" in body
    budget.bytes = 10
    # Both slots taken: 503 for anyone.
    assert budget.admit(99, 0) is None
    status, headers, _, pulled = call_asgi(
        app, "POST", "/api/v1/datasets/1/images", {**multipart, "content-length": "1000", "x-api-key": key2}
    )
    assert status == 503 and pulled == 0
    budget.release(1, 10)
    budget.release(99, 0)
    assert (budget.uploads, budget.bytes, budget.per_key) == (0, 0, {})
    # A chunked body is charged as it arrives and cut off past the budget.
    status, headers, _, pulled = call_asgi(
        app, "POST", "/api/v1/datasets", {"content-type": "application/json", "x-api-key": key2}, body_chunks=10
    )
    assert status == 503 and pulled <= 4 * 1024 * 1024
    assert (budget.uploads, budget.bytes) == (0, 0)  # released after the request
    # Small JSON bodies are not uploads and pass.
    assert client.post("/api/v1/jobs/noop", json={"steps": 1}).status_code == 202


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_anonymous_400mb_upload_to_a_real_server_costs_no_memory_or_temp_space(tmp_path):
    settings = make_embedded_settings(tmp_path)
    env = settings_env(settings)
    spool = tmp_path / "tmp"
    spool.mkdir()
    env["TMPDIR"] = str(spool)  # where multipart parsing would spool the body
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.api.main:create_app",
            "--factory",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, 60)
        rss_before = _rss_kb(api.pid)
        results = []
        for path, content_type in (
            ("/api/v1/datasets/1/images", "multipart/form-data; boundary=abc"),
            ("/api/v1/datasets", "application/json"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    (
                        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {BIG}\r\n\r\n"
                    ).encode()
                )
                sock.setblocking(False)
                sent, chunk, reply = 0, b"x" * (1 << 20), b""
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and b"\r\n\r\n" not in reply:
                    try:
                        sent += sock.send(chunk) if sent < BIG else 0
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        time.sleep(0.01)
                    try:
                        reply += sock.recv(65536)
                    except BlockingIOError:
                        pass
                results.append((reply.split(b"\r\n", 1)[0], sent))
        rss_after = _rss_kb(api.pid)
        spooled = _du(spool) + _du(settings.blob_dir / "tmp") if (settings.blob_dir / "tmp").exists() else _du(spool)
    finally:
        api.terminate()
        api.wait(timeout=20)
    print(f"\nanonymous 400 MB uploads: {results}; API RSS {rss_before} -> {rss_after} kB; spooled {spooled} B")
    for status_line, sent in results:
        assert b" 401 " in status_line
        assert sent < 64 * 1024 * 1024  # the server stopped reading: the client could not push 400 MB
    assert spooled == 0
    assert rss_after - rss_before < 50 * 1024


def test_gate_leaves_public_routes_alone(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    client.headers.pop("X-API-Key")
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/").status_code == 200
    response = client.get("/api/v1/jobs")
    assert response.status_code == 401 and response.json()["type"].endswith("missing-api-key")


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_keyed_many_field_upload_holds_one_field_in_memory_at_a_time(tmp_path):
    """Defect 1's last case: a 4-field segmentation whose last field is wrong is refused with a 422
    while the API holds about one field's pixels; before, every earlier field's bytes stayed in
    memory (a 4 x 118 MB request raised memory by 696 MB)."""
    import httpx
    import numpy as np

    from app.client import CellFuseClient
    from app.science.image_files import image_to_tiff_bytes
    from tests.service.workflow import register_tiny_base

    settings = make_embedded_settings(tmp_path)
    client, key = make_client(settings, run_reaper=False)
    register_tiny_base(CellFuseClient(client), name="tiny")
    assert client.post("/api/v1/cell-lines", json={"name": "L"}).status_code == 201
    rng = np.random.default_rng(0)
    side = 4096  # 32 MiB of uint16 noise per field (noise does not compress)
    good = image_to_tiff_bytes(rng.integers(0, 65535, (1, side, side), dtype=np.uint16))
    bad = image_to_tiff_bytes(rng.integers(0, 65535, (2, 64, 64), dtype=np.uint16))  # 2 channels, 1 mapped
    field_kb = len(good) // 1024
    request = '{"cell_line": "L", "channels": ["R"], "objects": ["nuclei"], "model": "base:tiny"}'
    env = settings_env(settings)
    spool = tmp_path / "tmp"
    spool.mkdir()
    env["TMPDIR"] = str(spool)
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_port(port, 60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=120) as http:

            def submit(files: list[bytes]) -> httpx.Response:
                return http.post(
                    "/api/v1/jobs/segment",
                    data={"request": request},
                    files=[("files", (f"f{i}.tif", f, "image/tiff")) for i, f in enumerate(files)],
                )

            warm = submit([bad])  # imports and first-request allocations out of the measurement
            assert warm.status_code == 422 and "channel" in warm.json()["detail"], warm.text
            blobs_before = sorted(p for p in settings.blob_dir.rglob("*") if p.is_file())
            peaks = {}
            for n_good in (1, 3):
                # Reset the peak (VmHWM) to the current resident size: what follows is this request's.
                Path(f"/proc/{api.pid}/clear_refs").write_text("5")
                rss_before = _rss_kb(api.pid)
                response = submit([good] * n_good + [bad])
                peaks[n_good] = _peak_rss_kb(api.pid) - rss_before
                assert response.status_code == 422 and f"f{n_good}.tif" in response.json()["detail"], response.text
        leftover = _du(spool)
    finally:
        api.terminate()
        api.wait(timeout=20)
    print(f"\nkeyed upload of 1 / 3 fields ({field_kb} kB each) then a bad one: API peak +{peaks} kB")
    assert leftover == 0  # the spooled files went with the requests
    # Reading a field costs a few of its sizes (bytes, pixels) once; more fields must not add to that.
    assert peaks[1] < 4 * field_kb
    assert peaks[3] - peaks[1] < field_kb // 2
    assert sorted(p for p in settings.blob_dir.rglob("*") if p.is_file()) == blobs_before  # nothing stored
