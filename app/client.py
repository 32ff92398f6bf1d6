"""A small Python client for the CellFuse API (used by the demo, the tests and lab scripts).

It wraps any ``httpx.Client`` (including FastAPI's TestClient), so the same calls run against an
in-process app or a server on the network. Errors raise :class:`ApiError` with the problem detail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response):
        try:
            self.problem = response.json()
        except ValueError:
            self.problem = {"detail": response.text}
        self.status = response.status_code
        super().__init__(f"{response.status_code}: {self.problem.get('detail', self.problem)}")


class CellFuseClient:
    def __init__(self, http: httpx.Client, api_key: str | None = None):
        self.http = http
        if api_key:
            self.http.headers["X-API-Key"] = api_key

    @classmethod
    def connect(cls, base_url: str, api_key: str, timeout: float = 120.0) -> CellFuseClient:
        return cls(httpx.Client(base_url=base_url, timeout=timeout), api_key)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json() if response.content else None

    def get(self, path: str, **params) -> Any:
        return self._check(self.http.get(path, params=params or None))

    def post(self, path: str, body: dict | None = None, *, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._check(self.http.post(path, json=body or {}, headers=headers))

    def put(self, path: str, body: dict) -> Any:
        return self._check(self.http.put(path, json=body))

    def download(self, url: str) -> bytes:
        response = self.http.get(url)
        if response.status_code >= 400:
            raise ApiError(response)
        return response.content

    # --- zoo -------------------------------------------------------------------------------
    def ensure_cell_line(self, name: str, **fields) -> dict:
        existing = {c["name"]: c for c in self.get("/api/v1/cell-lines")}
        return existing.get(name) or self.post("/api/v1/cell-lines", {"name": name, **fields})

    def ensure_reporter(self, name: str, **fields) -> dict:
        existing = {r["name"]: r for r in self.get("/api/v1/reporters")}
        return existing.get(name) or self.post("/api/v1/reporters", {"name": name, **fields})

    def create_dataset(self, name: str, cell_line: str, channels: list[str], **fields) -> dict:
        return self.post("/api/v1/datasets", {"name": name, "cell_line": cell_line, "channels": channels, **fields})

    def add_image(
        self,
        dataset_id: int,
        image_tiff: bytes,
        *,
        nuclei_tiff: bytes | None = None,
        cells_tiff: bytes | None = None,
        **form: Any,
    ) -> dict:
        files: list[tuple[str, tuple[str, bytes, str]]] = [("image", ("field.ome.tif", image_tiff, "image/tiff"))]
        if nuclei_tiff is not None:
            files.append(("nuclei", ("nuclei.tif", nuclei_tiff, "image/tiff")))
        if cells_tiff is not None:
            files.append(("cells", ("cells.tif", cells_tiff, "image/tiff")))
        data = {k: str(v) for k, v in form.items() if v is not None}
        return self._check(self.http.post(f"/api/v1/datasets/{dataset_id}/images", files=files, data=data))

    # --- jobs ------------------------------------------------------------------------------
    def submit(self, kind: str, body: dict, *, idempotency_key: str | None = None) -> dict:
        return self.post(f"/api/v1/jobs/{kind}", body, idempotency_key=idempotency_key)

    def submit_segment(
        self, request: dict, fields: list[tuple[str, bytes]], *, idempotency_key: str | None = None
    ) -> dict:
        files = [("files", (name, data, "image/tiff")) for name, data in fields]
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._check(
            self.http.post("/api/v1/jobs/segment", files=files, data={"request": json.dumps(request)}, headers=headers)
        )

    def job(self, job_id: str) -> dict:
        return self.get(f"/api/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 900.0,
        poll: float = 0.5,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s ({job['stage']})")
            time.sleep(poll)

    def run(self, kind: str, body: dict, **wait_kwargs) -> dict:
        job = self.wait(self.submit(kind, body)["id"], **wait_kwargs)
        if job["status"] != "succeeded":
            raise RuntimeError(f"{kind} job {job['id']} {job['status']}: {job['error']}")
        return job


def download_results(api: CellFuseClient, job: dict, out_dir: Path) -> list[Path]:
    """Every result of a finished job, written under ``out_dir/<job id>/`` (names checked first)."""
    from app.storage import check_result_name

    target = Path(out_dir) / job["id"]
    written = []
    for result in job["results"]:
        name = check_result_name(result["name"])  # never trust a path from the other side
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(api.download(result["url"]))
        written.append(path)
    return written


def segment_files(
    api: CellFuseClient,
    files: list[Path],
    request: dict,
    out_dir: Path,
    *,
    on_progress: Callable[[dict], None] | None = None,
    timeout: float = 3600.0,
) -> tuple[dict, list[Path]]:
    """Submit local TIFFs as one plate, wait, and download the results. -> (job, written files)"""
    job = api.submit_segment(request, [(Path(f).name, Path(f).read_bytes()) for f in files])
    job = api.wait(job["id"], timeout=timeout, on_progress=on_progress)
    if job["status"] != "succeeded":
        raise RuntimeError(f"segmentation job {job['id']} {job['status']}: {job['error']}")
    return job, download_results(api, job, out_dir)
