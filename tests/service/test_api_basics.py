"""Health, readiness, keys and roles, and problem details on every kind of error."""

from tests.service.conftest import make_client

PROBLEM = "application/problem+json"


def test_health_needs_no_key(embedded_settings):
    client, _ = make_client(embedded_settings)
    del client.headers["X-API-Key"]
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_reports_missing_worker_as_503(embedded_settings):
    client, _ = make_client(embedded_settings)
    response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is True
    assert body["checks"]["workers"]["ok"] is False
    assert body["versions"]["cellfuse"]
    assert body["versions"]["torch"]


def test_missing_and_wrong_keys_are_401_problems(embedded_settings):
    client, _ = make_client(embedded_settings)
    del client.headers["X-API-Key"]
    response = client.get("/api/v1/jobs")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "X-API-Key" in response.json()["detail"]
    response = client.get("/api/v1/jobs", headers={"X-API-Key": "cf_not-a-key"})
    assert response.status_code == 401
    assert response.json()["type"].endswith("invalid-api-key")


def test_validation_errors_are_problem_details(embedded_settings):
    client, _ = make_client(embedded_settings)
    response = client.post("/api/v1/jobs/noop", json={"steps": -1, "bogus": 1})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == 422 and body["title"] and body["instance"] == "/api/v1/jobs/noop"
    locations = {e["location"] for e in body["errors"]}
    assert "body.steps" in locations and "body.bogus" in locations


def test_unknown_job_and_route_are_404_problems(embedded_settings):
    client, _ = make_client(embedded_settings)
    response = client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)


def test_instrument_sees_only_its_own_jobs(embedded_settings):
    admin, _ = make_client(embedded_settings, role="admin")
    instrument, _ = make_client(embedded_settings, role="instrument")
    job = admin.post("/api/v1/jobs/noop", json={}).json()
    assert instrument.get(f"/api/v1/jobs/{job['id']}").status_code == 404
    assert instrument.get("/api/v1/jobs").json()["total"] == 0
    own = instrument.post("/api/v1/jobs/noop", json={}).json()
    assert instrument.get(f"/api/v1/jobs/{own['id']}").status_code == 200
    assert admin.get("/api/v1/jobs").json()["total"] == 2


def test_idempotency_key_returns_the_same_job(embedded_settings):
    client, _ = make_client(embedded_settings)
    first = client.post("/api/v1/jobs/noop", json={"steps": 2}, headers={"Idempotency-Key": "abc"})
    again = client.post("/api/v1/jobs/noop", json={"steps": 2}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    clash = client.post("/api/v1/jobs/noop", json={"steps": 5}, headers={"Idempotency-Key": "abc"})
    assert clash.status_code == 409
    assert clash.json()["job_id"] == first.json()["id"]


def test_cancel_a_queued_job(embedded_settings):
    client, _ = make_client(embedded_settings)
    job = client.post("/api/v1/jobs/noop", json={}).json()
    response = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"


def test_job_list_filters_and_paginates(embedded_settings):
    client, _ = make_client(embedded_settings)
    ids = [client.post("/api/v1/jobs/noop", json={}).json()["id"] for _ in range(3)]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    page = client.get("/api/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    cancelled = client.get("/api/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/api/v1/jobs", params={"status": "bogus"}).status_code == 422
