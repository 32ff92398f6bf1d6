"""/metrics: Prometheus text that a Prometheus parser reads, guarded, and moving as jobs run."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import jobs
from app.db import session_factory
from tests.service.conftest import make_client, make_embedded_settings, wait_for_job


def _scrape(client, **headers) -> dict[str, dict[tuple, float]]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _value(metrics, name, **labels) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_need_admin_or_token(tmp_path):
    settings = make_embedded_settings(tmp_path, metrics_token="scrape-token-0123456789")
    client, _ = make_client(settings, role="scientist")
    assert client.get("/metrics").status_code == 403
    del client.headers["X-API-Key"]
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    metrics = _scrape(client, Authorization="Bearer scrape-token-0123456789")
    assert "cellfuse_workers_total" in metrics


def test_job_metrics_follow_the_state_machine(embedded_settings):
    client, _ = make_client(embedded_settings)
    before = _scrape(client)
    assert _value(before, "cellfuse_jobs", state="queued", kind="noop") == 0
    with session_factory(embedded_settings.resolved_database_url)() as session:
        job, _ = jobs.create_job(session, "noop", {"steps": 1})
        session.commit()
        mid = _scrape(client)
        assert _value(mid, "cellfuse_jobs", state="queued", kind="noop") == 1
        jobs.claim(session, job.id, "w1")
        jobs.record_stage_timing(session, job.id, "work", 1.5)
        jobs.finish(session, job.id, jobs.JobStatus.SUCCEEDED, summary={"fields_done": 3})
    after = _scrape(client)
    assert _value(after, "cellfuse_jobs", state="queued", kind="noop") == 0
    assert _value(after, "cellfuse_jobs", state="succeeded", kind="noop") == 1
    assert _value(after, "cellfuse_job_duration_seconds_count", kind="noop", status="succeeded") == 1
    assert _value(after, "cellfuse_job_stage_seconds_total", kind="noop", stage="work") == 1.5
    assert _value(after, "cellfuse_fields_segmented_total", kind="noop") == 3
    assert _value(after, "cellfuse_fields_per_second") == pytest.approx(3 / 300)
    # HTTP metrics carry the route template, not the raw path.
    assert _value(after, "cellfuse_http_requests_total", method="GET", route="/metrics", status="200") >= 2


@pytest.mark.slow
def test_queue_depth_and_workers_change_as_jobs_run(tmp_path, worker_factory):
    settings = make_embedded_settings(tmp_path)
    client, _ = make_client(settings)
    job = client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0.05}).json()
    waiting = _scrape(client)
    assert (
        _value(waiting, "cellfuse_queue_depth", queue="cpu") + _value(waiting, "cellfuse_queue_depth", queue="gpu") == 1
    )
    assert _value(waiting, "cellfuse_workers_total") == 0
    worker_factory(settings)
    assert wait_for_job(client, job["id"], timeout=90)["status"] == "succeeded"
    done = _scrape(client)
    assert _value(done, "cellfuse_queue_depth", queue="cpu") + _value(done, "cellfuse_queue_depth", queue="gpu") == 0
    assert _value(done, "cellfuse_workers_total") == 1
    assert _value(done, "cellfuse_jobs", state="succeeded", kind="noop") == 1


@pytest.mark.services
def test_queue_depth_reads_redis_lists(tmp_path, redis_url):
    import redis

    from app.metrics import queue_depths
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", broker_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    client.lpush("gpu", b"{}", b"{}")
    try:
        assert queue_depths(settings) == {"gpu": 2, "cpu": 0}
    finally:
        client.delete("gpu")
        client.close()
