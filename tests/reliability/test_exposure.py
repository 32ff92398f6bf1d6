"""Headers and exposure: CSP, frame protection, nosniff and Referrer-Policy on the page and the
API; /ready tells the public its status only; listings are paged; job durations are bounded per role."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.reliability.conftest import make_client

WEB_DIR = Path(__file__).resolve().parents[2] / "app" / "api" / "web"


def _assert_common(response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_page_has_a_csp_that_allows_only_its_own_files(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    client.headers.pop("X-API-Key")
    for path in (
        "/",
        "/docs",
        "/static/js/main.js",
        "/static/style.css",
        "/static/vendor/openseadragon/openseadragon.min.js",
    ):
        response = client.get(path)
        assert response.status_code == 200
        _assert_common(response)
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp and "style-src 'self';" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
    # The page needs nothing the policy forbids: no inline script or style, no foreign origin.
    for page in ("index.html", "docs.html"):
        html = (WEB_DIR / page).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) and "<style" not in html
        assert not re.search(r"\son[a-z]+=", html) and not re.search(r"\sstyle=", html)
        assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_api_answers_and_refusals_carry_the_headers(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    for response in (
        client.get("/api/v1/jobs"),
        client.get("/api/v1/jobs", headers={"X-API-Key": "cf_x"}),
        client.get("/health"),
        client.get("/ready"),
        client.get("/api/v1/nothing-here"),
    ):
        _assert_common(response)
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
    docs = client.get("/redoc")  # ReDoc's inline bootstrap: framed never, but no CSP to break it
    _assert_common(docs)


def test_ready_is_minimal_in_public_and_detailed_for_admins(embedded_settings):
    admin, _ = make_client(embedded_settings, run_reaper=False)
    scientist, _ = make_client(embedded_settings, role="scientist", run_reaper=False)
    public = admin.get("/ready", headers={"X-API-Key": ""})
    assert public.json() == {"status": "not ready"}  # no worker runs here
    assert scientist.get("/ready").json() == {"status": "not ready"}
    assert admin.get("/ready", headers={"X-API-Key": "cf_wrong"}).json() == {"status": "not ready"}
    detailed = admin.get("/ready").json()
    assert set(detailed["checks"]) >= {"database", "broker", "disk", "workers"} and detailed["versions"]["cellfuse"]


def test_listings_are_paged_with_a_total(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    for i in range(7):
        assert client.post("/api/v1/cell-lines", json={"name": f"L{i}"}).status_code == 201
        assert client.post("/api/v1/reporters", json={"name": f"R{i}"}).status_code == 201
    for i in range(3):
        assert (
            client.post("/api/v1/datasets", json={"name": f"d{i}", "cell_line": "L0", "channels": ["R0"]}).status_code
            == 201
        )
    for path, total in (("/api/v1/cell-lines", 7), ("/api/v1/reporters", 7), ("/api/v1/datasets", 3)):
        first = client.get(path, params={"limit": 2})
        assert first.status_code == 200 and len(first.json()) == 2 and first.headers["x-total-count"] == str(total)
        rest = client.get(path, params={"limit": 500, "offset": 2}).json()
        assert len(rest) == total - 2
        names = [r["name"] for r in first.json() + rest]
        assert len(set(names)) == total
        assert client.get(path, params={"limit": 501}).status_code == 422
        assert client.get(path, params={"offset": -1}).status_code == 422
    for path in ("/api/v1/models", "/api/v1/aliases", "/api/v1/channel-sets", "/api/v1/base-models"):
        response = client.get(path, params={"limit": 1, "offset": 0})
        assert response.status_code == 200 and "x-total-count" in response.headers
    schema = client.get("/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/api/v1/datasets"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 500 and "X-Total-Count" in params["limit"]["description"]


@pytest.mark.parametrize(
    "role,steps,seconds,ok",
    [
        ("instrument", 1000, 60, False),  # 16.7 hours
        ("instrument", 10, 31, False),
        ("instrument", 10, 30, True),
        ("scientist", 100, 36, True),
        ("scientist", 100, 37, False),
    ],
)
def test_noop_duration_is_bounded_per_role(embedded_settings, role, steps, seconds, ok):
    client, _ = make_client(embedded_settings, role=role, run_reaper=False)
    response = client.post("/api/v1/jobs/noop", json={"steps": steps, "step_seconds": seconds})
    if ok:
        assert response.status_code == 202, response.text
    else:
        assert response.status_code == 422 and response.json()["type"].endswith("job-too-long"), response.text
        assert role in response.json()["detail"]


def test_finetune_epochs_are_bounded_per_role(embedded_settings):
    scientist, _ = make_client(embedded_settings, role="scientist", run_reaper=False)
    body = {"dataset_id": 1, "reporter": "R", "object": "nuclei", "params": {"max_epochs": 1001}}
    response = scientist.post("/api/v1/jobs/finetune", json=body)
    assert response.status_code == 422 and response.json()["limit_epochs"] == 1000, response.text
    admin, _ = make_client(embedded_settings, role="admin", run_reaper=False)
    assert admin.post("/api/v1/jobs/finetune", json=body).status_code == 404  # past the bound: no dataset 1
