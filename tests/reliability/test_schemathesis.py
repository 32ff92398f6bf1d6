"""Schemathesis against the OpenAPI schema, in-process over ASGI, on PostgreSQL (the stricter
database: NUL, unpaired surrogates and NaN reach it as errors, not as stored rows).

With an admin key: no operation answers 500 to anything generated from its schema, every answer
carries the security headers, names no server path, and errors are problem details. Without a key:
every /api/ operation is a 401 problem before its body is read (bounded examples per operation)."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import create_engine, text

from app.migrations import upgrade
from app.settings import Settings
from tests.reliability.conftest import make_client, seed_minimal_zoo
from tests.service.conftest import FAST_JOB_TIMINGS, PG_ADMIN_URL, require_service

ADMIN_KEY: dict[str, str] = {}
DATA_DIR: list[str] = []
HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.filter_too_much,
    HealthCheck.data_too_large,
    HealthCheck.function_scoped_fixture,
]


@pytest.fixture(scope="module")
def pg_module_url():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"cellfuse_st_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from app.db import engine_for

        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, pg_module_url):
    cfg = Settings(
        data_dir=tmp_path_factory.mktemp("schemathesis") / "data", database_url=pg_module_url, **FAST_JOB_TIMINGS
    )
    upgrade(cfg.resolved_database_url)
    cfg.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    client, key = make_client(cfg, run_reaper=False)
    # Some data, so that generated ids and names sometimes hit something that exists.
    seed_minimal_zoo(client, splits=("test",))
    assert client.post("/api/v1/jobs/noop", json={"steps": 1}).status_code == 202
    ADMIN_KEY["X-API-Key"] = key
    DATA_DIR[:] = [str(cfg.resolved_data_dir)]
    return schemathesis.openapi.from_asgi("/openapi.json", client.app)


schema = schemathesis.pytest.from_fixture("api_schema")


def _header(response, name: str) -> str:
    value = {k.lower(): v for k, v in response.headers.items()}.get(name, "")
    return value[0] if isinstance(value, list) else value


def hardened_answer(ctx, response, case) -> None:
    """Security headers on every answer, no server path in any, problem details for every error."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    for name in ("x-content-type-options", "x-frame-options", "referrer-policy", "content-security-policy"):
        assert name in headers, f"{name} missing on {case.method} {case.path}"
    body = response.content.decode("utf-8", "replace")
    assert not any(path in body for path in DATA_DIR), f"a server path in the answer to {case.method} {case.path}"
    if response.status_code >= 400:
        content_type = _header(response, "content-type")
        assert content_type.startswith("application/problem+json"), (response.status_code, content_type)


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(300)
@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=HEALTH)
def test_no_operation_answers_500(case):
    if case.path == "/ready":  # 503 is its documented answer while no worker runs
        status = case.call(headers=dict(ADMIN_KEY)).status_code
        assert status < 500 or status == 503, status
        return
    case.call_and_validate(headers=dict(ADMIN_KEY), checks=[not_a_server_error, hardened_answer])


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(300)
@schema.parametrize()
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=HEALTH)
def test_every_api_operation_refuses_a_missing_key_first(case):
    if not case.path.startswith("/api/"):
        return
    response = case.call(headers={"X-API-Key": ""})
    assert response.status_code == 401, (case.method, case.path, response.status_code)
    assert _header(response, "content-type").startswith("application/problem+json")
    assert _header(response, "www-authenticate") == "APIKey"
