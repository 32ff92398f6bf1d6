"""Access control: every operation needs a key except liveness, readiness, the docs and the web
page; roles are enforced per action; a revoked key stops working with the next request; admins
manage keys over the API and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.api.main import create_app
from app.settings import get_settings
from tests.reliability.conftest import make_client

PUBLIC_API = {("/health", "get"), ("/ready", "get")}
DOCS = ("/docs", "/openapi.json", "/redoc")
STATIC_CONTENT = ("text/html", "text/css", "text/javascript", "application/javascript", "image/")
PROBLEM = "application/problem+json"


def _concrete(path: str) -> str:
    """A request path for a templated one: ids that do not exist, names that are valid."""
    values = {"job_id": "00000000-0000-0000-0000-000000000000", "object": "nuclei", "name": "x.json"}
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "1"), path)


def _operations(app) -> list[tuple[str, str]]:
    return [
        (path, method)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_every_operation_needs_a_key_except_health_ready_docs_and_pages(embedded_settings):
    client, admin_key = make_client(embedded_settings)
    del client.headers["X-API-Key"]
    operations = _operations(client.app)
    assert len(operations) > 20 and ("/api/v1/keys", "post") in operations
    open_ops = []
    for path, method in operations:
        if (path, method) in PUBLIC_API:
            continue
        url = _concrete(path)
        for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "cf_wrong"}, {"x-api-key": admin_key + "x"}):
            response = client.request(method.upper(), url, headers=headers)
            if not path.startswith("/api/"):
                # A web page may be public, but it serves the static UI, never data.
                if response.status_code < 400:
                    assert method == "get", (method, path)
                    assert response.headers["content-type"].startswith(STATIC_CONTENT), (path, response.headers)
                continue
            if response.status_code != 401:
                open_ops.append((method, path, headers, response.status_code))
            else:
                assert response.headers["content-type"].startswith(PROBLEM)
                assert response.headers["www-authenticate"] == "APIKey"
    assert open_ops == []
    for path, _method in PUBLIC_API:
        assert client.get(path).status_code in (200, 503)
    for path in DOCS:
        assert client.get(path).status_code == 200
    # The web page (hidden from the schema) is public but serves only its static files.
    web_dir = Path(__file__).resolve().parents[2] / "app" / "api" / "web"
    pages = (
        ["/", "/favicon.ico"]
        + [
            f"/static/{p.relative_to(web_dir).as_posix()}"
            for p in web_dir.rglob("*")
            if p.is_file() and p.suffix in (".js", ".css", ".svg")
        ]
        if web_dir.is_dir()
        else []
    )
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["content-type"].startswith(STATIC_CONTENT), (page, response.headers)
        assert admin_key not in response.text
    for trick in (
        "/static/..%2Fmain.py",
        "/static/%2E%2E%2F%2E%2E%2Fsettings.py",
        "/static/.hidden.js",
        "/static/..%5Cmain.py",
        "/static/app.js%00.py",
    ):
        assert client.get(trick).status_code in (404, 422), trick
    # Nothing outside the schema answers with data either (a hidden route would show up here).
    for probe in ("/api", "/api/v1", "/api/v1/", "/api/v1/admin", "/api/v1/keys/1", "/admin"):
        assert client.get(probe).status_code in (401, 404, 405), probe


def test_the_key_header_only_counts_as_a_key(embedded_settings):
    """A key in the query string, a cookie or a bearer header is not accepted (it would leak into logs)."""
    client, key = make_client(embedded_settings)
    del client.headers["X-API-Key"]
    assert client.get("/api/v1/jobs", params={"api_key": key}).status_code == 401
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert client.get("/api/v1/jobs", cookies={"X-API-Key": key}).status_code == 401
    assert client.get("/api/v1/jobs", headers={"X-API-Key": key}).status_code == 200


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        ("instrument", "POST", "/api/v1/datasets", {"name": "d", "cell_line": "x", "channels": ["a"]}),
        ("instrument", "POST", "/api/v1/jobs/finetune", {"dataset_id": 1, "reporter": "a", "object": "nuclei"}),
        ("instrument", "PUT", "/api/v1/aliases/L/R/nuclei/production", {"version_id": 1}),
        ("instrument", "POST", "/api/v1/cell-lines", {"name": "x"}),
        ("instrument", "POST", "/api/v1/jobs/evaluate", {"dataset_id": 1}),
        ("instrument", "GET", "/api/v1/datasets", None),
        ("instrument", "GET", "/api/v1/keys", None),
        ("scientist", "PUT", "/api/v1/aliases/L/R/nuclei/production", {"version_id": 1}),
        ("scientist", "POST", "/api/v1/base-models", None),
        ("scientist", "PUT", "/api/v1/channel-sets/L/nuclei", {"channels": ["a"]}),
        ("scientist", "POST", "/api/v1/models/1/archive", None),
        ("scientist", "GET", "/api/v1/keys", None),
        ("scientist", "POST", "/api/v1/keys", {"name": "mine", "role": "admin"}),
        ("scientist", "POST", "/api/v1/keys/1/revoke", None),
    ],
)
def test_roles_are_enforced(embedded_settings, role, method, path, body):
    client, _ = make_client(embedded_settings, role=role)
    kwargs = {"json": body} if body is not None else {}
    if path == "/api/v1/base-models":
        kwargs = {"data": {"name": "evil"}, "files": {"weights": ("w.safetensors", b"x" * 100)}}
    response = client.request(method, path, **kwargs)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert f"your key has '{role}'" in response.json()["detail"]


def test_instrument_can_do_its_job(embedded_settings):
    client, _ = make_client(embedded_settings, role="instrument")
    assert client.get("/api/v1/cell-lines").status_code == 200
    assert client.post("/api/v1/jobs/noop", json={"steps": 1}).status_code == 202


def test_admin_manages_keys_and_a_revoked_key_stops_at_once(embedded_settings):
    admin, admin_key = make_client(embedded_settings)
    created = admin.post("/api/v1/keys", json={"name": "plate-reader-3", "role": "instrument"})
    assert created.status_code == 201
    body = created.json()
    key = body["key"]
    assert key.startswith("cf_") and len(key) > 40 and body["prefix"] == key[:10] and body["revoked_at"] is None
    # The key itself is shown once: never in a listing, never stored in clear.
    listing = admin.get("/api/v1/keys")
    assert listing.status_code == 200 and key not in listing.text
    assert {k["name"] for k in listing.json()} >= {"plate-reader-3", "test-admin"}
    assert all("key" not in k for k in listing.json())

    instrument = create_app(embedded_settings)
    from fastapi.testclient import TestClient

    with TestClient(instrument, raise_server_exceptions=False) as other:
        other.headers["X-API-Key"] = key
        assert other.get("/api/v1/jobs").status_code == 200
        revoked = admin.post(f"/api/v1/keys/{body['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        # The very next request with the revoked key is refused (no cache anywhere).
        response = other.get("/api/v1/jobs")
        assert response.status_code == 401 and response.json()["type"].endswith("invalid-api-key")
        assert other.post("/api/v1/jobs/noop", json={}).status_code == 401

    assert admin.post("/api/v1/keys", json={"name": "x", "role": "root"}).status_code == 422
    assert admin.post("/api/v1/keys/999999/revoke").status_code == 404
    # The last admin key cannot be revoked (nobody could manage keys any more).
    [me] = [k for k in admin.get("/api/v1/keys").json() if k["role"] == "admin"]
    refused = admin.post(f"/api/v1/keys/{me['id']}/revoke")
    assert refused.status_code == 409 and admin.get("/api/v1/keys").status_code == 200


def test_cli_keys_create_list_revoke(tmp_path, monkeypatch):
    from app.cli import cli

    monkeypatch.setenv("CELLFUSE_DATA_DIR", str(tmp_path / "data"))
    for name in ("CELLFUSE_DATABASE_URL", "CELLFUSE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        created = runner.invoke(cli, ["keys", "create", "microscope-1", "--role", "scientist"])
        assert created.exit_code == 0, created.output
        match = re.search(r"key (\d+) \(scientist\) for microscope-1: (cf_\S+)", created.output)
        assert match, created.output
        key_id, key = match.groups()
        listed = runner.invoke(cli, ["keys", "list"])
        assert listed.exit_code == 0 and "microscope-1" in listed.output and "active" in listed.output
        assert key not in listed.output and key[:10] in listed.output

        settings = get_settings()
        from fastapi.testclient import TestClient

        with TestClient(create_app(settings, run_reaper=False), raise_server_exceptions=False) as client:
            client.headers["X-API-Key"] = key
            assert client.get("/api/v1/datasets").status_code == 200
            revoked = runner.invoke(cli, ["keys", "revoke", key_id])
            assert revoked.exit_code == 0 and "revoked 1 key" in revoked.output
            assert client.get("/api/v1/datasets").status_code == 401
        listed = runner.invoke(cli, ["keys", "list"])
        assert "revoked" in listed.output
        assert runner.invoke(cli, ["keys", "revoke", key_id]).exit_code == 1  # nothing left to revoke
        bad = runner.invoke(cli, ["keys", "create", "x", "--role", "superuser"])
        assert bad.exit_code != 0 and "unknown role" in bad.output
    finally:
        get_settings.cache_clear()
