"""A PostgreSQL restart in the middle of a running fine-tune: the job rides it out in place (every
database step of a running job goes through the retry wrapper) instead of starting again from
epoch 0 or spending an attempt."""

from __future__ import annotations

import time

import pytest

from app.migrations import upgrade
from app.settings import Settings
from tests.reliability.conftest import FAST_JOB_TIMINGS, make_client
from tests.reliability.test_worker_faults import _submit_finetune, _wait_for_training
from tests.service.conftest import wait_for_job


@pytest.mark.slow
def test_postgresql_restart_mid_finetune_does_not_restart_training(tmp_path, own_postgres, worker_factory):
    # The heartbeat may lapse for longer than the outage before the reaper takes the job away.
    settings = Settings(
        data_dir=tmp_path / "data", database_url=own_postgres.url, **{**FAST_JOB_TIMINGS, "job_stale_after_s": 40.0}
    )
    upgrade(settings.resolved_database_url)
    settings.resolved_data_dir.mkdir(parents=True)  # the embedded broker's file lives there
    worker = worker_factory(settings)
    client, _ = make_client(settings, run_reaper=False)
    job_id = _submit_finetune(client)
    _wait_for_training(client, job_id, epoch=2)
    own_postgres.stop("immediate")  # a crash: connections are cut, nothing is shut down cleanly
    time.sleep(8)
    own_postgres.start()
    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], worker.log()[-6000:])
    assert job["attempts"] == 1, job  # ridden out in place, no attempt spent
    epochs = [p["epoch"] for p in job["summary"]["training_curve"]]
    assert epochs == list(range(len(epochs))), epochs  # one run from epoch 0 (the baseline), never restarted
    assert "database unreachable" in worker.log()  # the outage did hit the job


@pytest.mark.slow
def test_finetune_rerun_after_a_lost_worker_resumes_from_its_checkpoint(tmp_path, worker_factory):
    from tests.service.conftest import make_embedded_settings

    settings = make_embedded_settings(tmp_path, job_max_attempts=2, checkpoint_interval_s=0.0)
    worker = worker_factory(settings)
    client, _ = make_client(settings)
    job_id = _submit_finetune(client)
    _wait_for_training(client, job_id, epoch=4)
    worker.kill()  # SIGKILL: the process dies mid-training, its last checkpoint is on disk
    checkpoint = settings.resolved_data_dir / "checkpoints" / job_id / "finetune.pt"
    assert checkpoint.is_file()
    worker_factory(settings)  # its reaper re-queues the job; the new attempt resumes
    job = wait_for_job(client, job_id, timeout=240)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    resumed_after = job["summary"]["resumed_after_epoch"]
    assert resumed_after >= 3  # not from scratch
    epochs = [p["epoch"] for p in job["summary"]["training_curve"]]
    assert epochs == list(range(len(epochs))), epochs  # one curve: saved epochs, then the rest
    assert not checkpoint.parent.exists()  # removed once the job ended


@pytest.mark.slow
def test_postgresql_restart_mid_segmentation_does_not_restart_it(tmp_path, own_postgres, worker_factory):
    """Defect 5's other half: a 5 s PostgreSQL crash restarted a segmentation and spent an attempt."""
    from tests.service.workflow import ready_segmentation_job, small_plate

    settings = Settings(
        data_dir=tmp_path / "data", database_url=own_postgres.url, **{**FAST_JOB_TIMINGS, "job_stale_after_s": 40.0}
    )
    upgrade(settings.resolved_database_url)
    settings.resolved_data_dir.mkdir(parents=True)  # the embedded broker's file lives there
    client, _, job_id, names = ready_segmentation_job(settings, small_plate(24, size=192, n_channels=1))
    worker = worker_factory(settings)  # started after the job is queued: the outage lands mid-plate
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if job["stage"].startswith("field ") and int(job["stage"].split()[1]) >= 3:
            break
        time.sleep(0.1)
    own_postgres.stop("immediate")
    time.sleep(5)
    own_postgres.start()
    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], worker.log()[-6000:])
    assert job["attempts"] == 1, job  # ridden out in place: no attempt spent, no field redone
    assert "database unreachable" in worker.log()  # the outage did hit the job
    assert {r["name"].split("/")[0] for r in job["results"] if "/" in r["name"]} >= set(names)
