"""Schemathesis against the OpenAPI schema, in-process over ASGI, with an admin key: no operation
answers 500 to anything generated from its schema (bounded: 15 examples per operation)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.reliability.conftest import make_client, seed_minimal_zoo
from tests.service.conftest import make_embedded_settings

ADMIN_KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    settings = make_embedded_settings(tmp_path_factory.mktemp("schemathesis"))
    client, key = make_client(settings, run_reaper=False)
    # Some data, so that generated ids and names sometimes hit something that exists.
    seed_minimal_zoo(client, splits=("test",))
    assert client.post("/api/v1/jobs/noop", json={"steps": 1}).status_code == 202
    ADMIN_KEY["X-API-Key"] = key
    return schemathesis.openapi.from_asgi("/openapi.json", client.app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@pytest.mark.timeout(180)
@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
def test_no_operation_answers_500(case):
    if case.path == "/ready":  # 503 is its documented answer while no worker runs
        status = case.call(headers=dict(ADMIN_KEY)).status_code
        assert status < 500 or status == 503, status
        return
    case.call_and_validate(headers=dict(ADMIN_KEY), checks=[not_a_server_error])
