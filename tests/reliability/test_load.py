"""Smoke test of the load benchmark: 2 s at 10 requests/s against the local PostgreSQL + Redis
stack with a real worker; no errors, every submitted job done. (`cellfuse bench load` runs longer.)"""

from __future__ import annotations

import pytest

from app.benchmarks.load import POLL, SUBMIT, run_load_benchmark
from tests.service.conftest import require_service


@pytest.mark.slow
@pytest.mark.services
def test_load_benchmark_runs_without_errors():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    lines: list[str] = []
    report = run_load_benchmark(None, seconds=2.0, rate=10.0, echo=lines.append)
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] == 20 and report["requests_per_s"] > 5
    assert report["endpoints"][SUBMIT]["count"] == 10 and report["endpoints"][POLL]["count"] == 10
    assert 0 < report["endpoints"][SUBMIT]["p50_ms"] <= report["endpoints"][SUBMIT]["p99_ms"]
    assert report["jobs_succeeded"] == report["jobs_submitted"] == 10 and report["jobs_unfinished"] == 0
    assert any(line.startswith("errors: 0") for line in lines)
    with pytest.raises(ValueError):
        run_load_benchmark(None, seconds=0, rate=1)


@pytest.mark.slow
def test_load_benchmark_on_the_embedded_default():
    lines: list[str] = []
    report = run_load_benchmark(None, seconds=2.0, rate=10.0, echo=lines.append, embedded=True)
    assert report["errors"] == 0, report["first_errors"]
    assert "embedded" in report["url"] and any("embedded default" in line for line in lines)
    assert report["jobs_succeeded"] == report["jobs_submitted"] == 10 and report["jobs_unfinished"] == 0
