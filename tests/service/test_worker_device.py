"""The worker's device: chosen in each pool process after the fork, never in the prefork parent;
one worker process per GPU with `cellfuse worker --gpus` (CPU devices stand in here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import session_factory
from app.models import WorkerHeartbeat
from app.worker_presence import _gpu_info, nvidia_gpu_names
from tests.service.conftest import REPO_ROOT, settings_env

# Runs a real Celery prefork worker in this process after wrapping torch.cuda's entry points so
# that every call is logged with the calling pid.
PROBED_WORKER = r"""
import json, os, sys
log_path = os.environ["CUDA_PROBE_LOG"]
import torch

def probe(name, original):
    def wrapped(*args, **kwargs):
        with open(log_path, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "call": name}) + "\n")
        return original(*args, **kwargs)
    return wrapped

for name in ("is_available", "device_count", "get_device_name", "get_device_properties", "init", "_lazy_init",
             "current_device", "is_bf16_supported", "set_device", "synchronize", "mem_get_info"):
    setattr(torch.cuda, name, probe(name, getattr(torch.cuda, name)))
with open(log_path, "a") as log:
    log.write(json.dumps({"parent": os.getpid()}) + "\n")
from celery.__main__ import main
sys.argv = ["celery", "-A", "workers.celery_app:celery_app", "worker", "-Q", "gpu,cpu", "--concurrency", "2",
            "--pool", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-n", "probe@%h"]
main()
"""


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.mark.slow
def test_prefork_parent_never_touches_cuda_and_pool_processes_resolve_the_device(embedded_settings, tmp_path):
    probe_log = tmp_path / "cuda-calls.jsonl"
    env = {**settings_env(embedded_settings), "CUDA_PROBE_LOG": str(probe_log), "CELLFUSE_DEVICE": "auto"}
    out = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBED_WORKER],
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    factory = session_factory(embedded_settings.resolved_database_url)
    try:
        deadline = time.monotonic() + 120
        presence = None
        children: set[int] = set()
        while time.monotonic() < deadline and (presence is None or len(children) < 2):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            with factory() as session:
                presence = session.scalars(select(WorkerHeartbeat)).first()
            records = _records(probe_log)
            parent = next(r["parent"] for r in records if "parent" in r) if records else None
            children = {r["pid"] for r in records if "pid" in r and r["pid"] != parent}
            time.sleep(0.5)
        records = _records(probe_log)
        parent = next(r["parent"] for r in records if "parent" in r)
        # The parent set up everything (presence with its GPU info, reaper, pool) without one CUDA call...
        assert presence is not None and presence.info["device"] == "auto"
        assert "gpu" in presence.info and "gpu_name" in presence.info
        assert [r for r in records if r.get("pid") == parent] == []
        # ...while each of the two pool processes resolved CELLFUSE_DEVICE=auto itself, after the fork.
        assert len(children) == 2, records
        assert all(r["call"] == "is_available" for r in records if "call" in r)
    finally:
        _stop(proc)


@pytest.mark.slow
def test_one_worker_process_per_gpu_each_with_its_own_device(embedded_settings, tmp_path):
    env = {**settings_env(embedded_settings), "CELLFUSE_WORKER_CONCURRENCY": "1"}
    out = (tmp_path / "group.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--gpus", "cpu,cpu"],
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    factory = session_factory(embedded_settings.resolved_database_url)
    try:
        rows: list[WorkerHeartbeat] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(rows) < 2:
            assert proc.poll() is None, (tmp_path / "group.log").read_text()[-3000:]
            with factory() as session:
                rows = list(session.scalars(select(WorkerHeartbeat)))
            time.sleep(0.5)
        assert len(rows) == 2, (tmp_path / "group.log").read_text()[-3000:]
        assert len({row.name for row in rows}) == 2  # two worker processes (host:pid each)
        assert [row.info["device"] for row in rows] == ["cpu", "cpu"]
        log = (tmp_path / "group.log").read_text()
        assert "worker 0 (pid" in log and "worker 1 (pid" in log and "on cpu" in log
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the supervisor forwards it to both workers
        try:
            proc.wait(timeout=60)
        finally:
            _stop(proc)
    with factory() as session:  # both workers shut down cleanly and removed their presence rows
        assert list(session.scalars(select(WorkerHeartbeat))) == []


def test_gpu_names_come_from_the_driver_files_not_from_cuda(tmp_path, monkeypatch):
    for i, model in enumerate(["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]):
        folder = tmp_path / f"0000:0{i}:00.0"
        folder.mkdir()
        (folder / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\n")
    assert nvidia_gpu_names(tmp_path) == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert nvidia_gpu_names(tmp_path / "missing") == []
    monkeypatch.setattr("app.worker_presence.nvidia_gpu_names", lambda: ["NVIDIA H200", "NVIDIA A100"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _gpu_info("cuda:1") == {"gpu": True, "gpu_name": "NVIDIA A100", "device": "cuda:1"}
    assert _gpu_info("auto")["gpu_name"] == "NVIDIA H200"
    assert _gpu_info("cpu") == {"gpu": False, "gpu_name": None, "device": "cpu"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert _gpu_info("cuda:0")["gpu_name"] == "NVIDIA A100"


def test_stored_weights_load_once_per_process_and_device(tmp_path):
    from types import SimpleNamespace

    from app.science.weights import ModelCard, find_card
    from app.settings import Settings
    from app.storage import BlobStore
    from workers import compute
    from workers.pipelines.common import load_weights

    weights_path = REPO_ROOT / "models_zoo" / "weights" / "cellfuse-base-w16-v3.safetensors"
    card = ModelCard.from_json(find_card(weights_path).read_text()).to_dict()
    settings = Settings(data_dir=tmp_path / "data", device="cpu", precision="fp32", model_cache_bytes=64 << 20)
    blobs = BlobStore(settings.blob_dir)
    sha = blobs.put_bytes(weights_path.read_bytes()).sha256
    ctx = SimpleNamespace(blobs=blobs, settings=settings)
    compute._by_pid.clear()  # this test's settings, not another test's
    try:
        first = load_weights(ctx, sha, card, "zoo")
        assert load_weights(ctx, sha, card, "zoo") is first  # the second field's request: no reload
        mine = compute.worker_compute()
        assert str(mine.device) == "cpu" and mine.precision == "fp32"
        assert mine.cache.stats()["hits"] == 1 and mine.cache.keys() == [(sha, "cpu")]
        assert next(first.parameters()).device.type == "cpu"
    finally:
        compute._by_pid.clear()
