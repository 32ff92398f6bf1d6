"""Plate benchmark: a K-channel plate through the real API, against a direct loop and the naive route.

One run measures, on the same fields and the same K full-width channel models (one per reporter;
full width so that Cellpose's own ``eval`` can run them):

1. **API, today's route**: ``cellfuse serve`` (API + one prefork worker) with
   ``CELLFUSE_SEGMENT_ROUTE=per_field`` and ``CELLFUSE_PRECISION=fp32`` (one field after the other,
   as before the plate engine), from the upload to the finished job;
2. **API, plate route**: the same server with the defaults (``segment_fields``: batched networks,
   reading, mask reconstruction and result writing overlapped; precision ``auto``);
3. **direct loop**: ``segment_field`` over the same fields in this process at the worker's precision
   (no upload, no files written): the floor the API's overhead is measured against;
4. **naive route**: per field, Cellpose's ``CellposeModel.eval(compute_masks=False)`` per channel,
   the maps averaged and one ``dynamics.resize_and_compute_masks`` (as ``bench fused``).

Set-up is untimed: the fields (synthetic plate fields; ``unique`` of them generated, the rest their
rotations and flips, so that a 96-field plate does not take minutes to draw), one net trained a few
steps on the first field so that masks hold real objects (``fused.quick_trained_state``), K copies
saved as model versions (distinct files: their ``diam_labels`` differ, which inference ignores), a
one-field warm-up job per server. The masks of the two API routes are compared (F1 at IoU 0.5 per
field). On a shared machine compare the ratios printed, which come from one run, not the seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

CELL_LINE = "bench-plate"
OBJECT = "nuclei"


def plate_fields(
    n_fields: int, size: int = 512, n_channels: int = 4, *, unique: int = 8, seed: int = 0
) -> tuple[list[np.ndarray], float, np.ndarray]:
    """``n_fields`` (K, size, size) uint16 fields (as instruments write them), the cell diameter and
    the first field's nuclei.

    ``unique`` fields are drawn (``synthetic.make_plate``); field i is field i % unique turned by one
    of the 8 rotations/flips, then shifted, so every field differs from the others.
    """
    from app.science.synthetic import make_plate

    drawn = make_plate(min(unique, n_fields), size=size, seed=seed)
    diameter = float(drawn[0].extra.get("cell_diameter", 0.0)) or 30.0
    fields = []
    for i in range(n_fields):
        base = drawn[i % len(drawn)].image
        image = np.stack([base[k % base.shape[0]] for k in range(n_channels)])
        image = np.clip(image, 0, 65535).astype(np.uint16)
        turn = (i // len(drawn)) % 8
        image = np.rot90(image, turn % 4, axes=(1, 2))
        if turn >= 4:
            image = image[:, :, ::-1]
        image = np.roll(image, shift=(i // (8 * len(drawn))) * 37, axis=2)
        fields.append(np.ascontiguousarray(image))
    return fields, diameter, drawn[0].nuclei


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _save_channel_models(state: dict, diameter: float, reporters: list[str], folder: Path) -> list:
    import torch

    from app.science import backbone, weights

    saved = []
    for k, reporter in enumerate(reporters):
        net = backbone.build_network(backbone.FULL_WIDTHS)
        net.load_state_dict(state)
        net.diam_labels.data = torch.tensor([diameter + 1e-3 * k])  # distinct files, same inference
        card = weights.ModelCard(
            name=f"{CELL_LINE}-{reporter}",
            version="1",
            architecture=weights.architecture_of(net),
            diameter=diameter,
            reporter=reporter,
            object=OBJECT,
        )
        saved.append(weights.save_model(net, card, folder, f"{reporter}-v1"))
    return saved


def _seed_zoo(settings, saved: list, reporters: list[str], diameter: float, cell_line: str) -> str:
    """Register the cell line, reporters and one ready model version each; returns an admin key."""
    from app.db import session_factory
    from app.migrations import upgrade
    from app.models import CellLine, ModelVersion, Reporter
    from app.security import create_key
    from app.storage import BlobStore

    upgrade(settings.resolved_database_url)
    blobs = BlobStore(settings.blob_dir)
    with session_factory(settings.resolved_database_url)() as session:
        line = CellLine(name=cell_line)
        session.add(line)
        rows = [Reporter(name=name) for name in reporters]
        session.add_all(rows)
        session.commit()
        for row, model in zip(rows, saved, strict=True):
            sha = blobs.put_bytes(model.weights_path.read_bytes()).sha256
            session.add(
                ModelVersion(
                    cell_line_id=line.id,
                    reporter_id=row.id,
                    object=OBJECT,
                    version=1,
                    status="ready",
                    weights_sha256=sha,
                    card=model.card.to_dict(),
                    diameter=diameter,
                )
            )
        session.commit()
        _row, key = create_key(session, "bench-plate", "admin")
    return key


class _Server:
    """``cellfuse serve`` (API + embedded worker) in a process group of its own."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s")

    def stop(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGTERM)  # serve stops its worker itself
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


def _api_route(
    env: dict[str, str],
    key: str,
    request: dict,
    tiffs: list[tuple[str, bytes]],
    log_path: Path,
    echo: Callable[[str], None],
    what: str,
) -> tuple[dict, float, float, object]:
    """(finished job, upload seconds, upload-to-done seconds, client) for the whole plate."""
    from app.client import CellFuseClient

    server = _Server(env, _free_port(), log_path)
    try:
        server.wait_ready()
        api = CellFuseClient.connect(server.url, key, timeout=600)
        warm = api.wait(api.submit_segment(request, tiffs[:1])["id"], timeout=900, poll=0.2)
        if warm["status"] != "succeeded":
            raise RuntimeError(f"{what}: the warm-up job {warm['status']}: {warm.get('error')}")
        started = time.perf_counter()
        job = api.submit_segment(request, tiffs)
        uploaded = time.perf_counter() - started
        job = api.wait(job["id"], timeout=24 * 3600, poll=0.2)
        total = time.perf_counter() - started
        if job["status"] != "succeeded" or job["summary"].get("fields_failed"):
            raise RuntimeError(f"{what}: job {job['id']} {job['status']}: {job.get('error')} {job['summary']}")
        masks = {r["name"]: api.download(r["url"]) for r in job["results"] if r["name"].endswith(f"/{OBJECT}.tif")}
        echo(
            f"{what}: {len(tiffs)} fields in {total:.1f} s (upload {uploaded:.1f} s), "
            f"{len(tiffs) / total:.3f} fields/s, precision {job['summary'].get('precision', 'fp32')}"
        )
        return job, uploaded, total, masks
    finally:
        server.stop()


def _naive_route(fields, saved, diameter: float, echo, device) -> float:
    from cellpose import dynamics, models

    from app.science import backbone
    from app.science.flow_fusion import FUSED_FLOW_THRESHOLD

    folder = saved[0].weights_path.parent
    cellpose_models = []
    for k, model in enumerate(saved):
        from app.science.weights import export_cellpose, load_model

        net, _ = load_model(model.weights_path)
        path = export_cellpose(net, folder / f"cellpose-{k}.pth")
        cellpose_models.append(
            models.CellposeModel(pretrained_model=str(path), gpu=device.type == "cuda", device=device)
        )
    niter = backbone.default_niter(diameter, backbone.DEFAULT_DIAM_MEAN)
    cellpose_models[0].eval(fields[0][0][:64, :64], channels=[0, 0], diameter=diameter)  # numba warm-up
    started = time.perf_counter()
    for field in fields:
        flows, probs = [], []
        for k, model in enumerate(cellpose_models):
            _, out, _ = model.eval(field[k], channels=[0, 0], diameter=diameter, compute_masks=False)
            flows.append(out[1])
            probs.append(out[2])
        dynamics.resize_and_compute_masks(
            np.mean(flows, axis=0),
            np.mean(probs, axis=0),
            niter=niter,
            cellprob_threshold=0.0,
            flow_threshold=FUSED_FLOW_THRESHOLD,
            min_size=15,
            resize=None,
            device=device,
        )
    seconds = time.perf_counter() - started
    echo(
        f"naive route (Cellpose eval per channel per field): {len(fields)} fields in {seconds:.1f} s, "
        f"{len(fields) / seconds:.3f} fields/s"
    )
    return seconds


def _direct_loops(fields, saved, diameter: float, precision: str, echo, device) -> tuple[float, float]:
    """Seconds of a ``segment_field`` loop and of ``segment_fields`` (the engine alone) over the plate."""
    from app.science.device import cuda_synchronized
    from app.science.plate import segment_fields
    from app.science.segmentation import ChannelModel, segment_field
    from app.science.weights import load_model

    models = []
    for model in saved:
        net, card = load_model(model.weights_path, device=device)
        models.append(ChannelModel(net, diameter, card.diam_mean, card.name))
    segment_field(fields[0][:, :64, :64], models, precision=precision, mask_device=device)  # warm-up
    started = time.perf_counter()
    with cuda_synchronized(device):
        for field in fields:
            segment_field(field, models, precision=precision, mask_device=device)
    loop_s = time.perf_counter() - started
    echo(
        f"direct segment_field loop ({precision}): {len(fields)} fields in {loop_s:.1f} s, "
        f"{len(fields) / loop_s:.3f} fields/s"
    )
    started = time.perf_counter()
    with cuda_synchronized(device):
        for outcome in segment_fields(enumerate(fields), models, precision=precision, mask_device=device):
            if outcome.error is not None:
                raise outcome.error
    engine_s = time.perf_counter() - started
    echo(
        f"direct segment_fields (the plate engine, no API): {len(fields)} fields in {engine_s:.1f} s, "
        f"{len(fields) / engine_s:.3f} fields/s"
    )
    return loop_s, engine_s


def run_plate_benchmark(
    n_fields: int = 96,
    size: int = 512,
    n_channels: int = 4,
    *,
    database_url: str | None = None,
    broker_url: str | None = None,
    naive: bool = True,
    train_steps: int = 25,
    device: str = "cpu",
    naive_fields: int | None = None,
    unique: int = 8,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the plate benchmark; print and return its numbers (see the module notes).

    ``naive_fields``: time the naive route on the first N fields only and scale its time to the
    plate (it is ~5x slower than the rest on a CPU); ``unique``: fields drawn, the rest turned copies.
    """
    if n_fields < 1 or n_channels < 1 or size < 64:
        raise ValueError("need at least one field, one channel and fields of at least 64 x 64 pixels")
    from app.benchmarks.fused import quick_trained_state
    from app.science.device import device_name, resolve_device, resolve_precision
    from app.science.image_files import image_to_tiff_bytes, read_labels
    from app.science.metrics import match
    from app.settings import Settings

    # Names of this run's own: a PostgreSQL database given with --postgres may hold earlier runs.
    run = uuid.uuid4().hex[:6]
    cell_line = f"{CELL_LINE}-{run}"
    reporters = [f"ch{k}-{run}" for k in range(n_channels)]
    torch_device = resolve_device(device)
    precision = resolve_precision(os.environ.get("CELLFUSE_PRECISION", "auto"), torch_device)
    with tempfile.TemporaryDirectory(prefix="cellfuse-bench-plate-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", str(tmp / "cellpose-models"))
        tic = time.perf_counter()
        fields, diameter, nuclei = plate_fields(n_fields, size, n_channels, unique=unique)
        state = quick_trained_state(fields[0][0].astype(np.float32), nuclei, diameter, train_steps)
        saved = _save_channel_models(state, diameter, reporters, tmp / "models")
        tiffs = [(f"F{i + 1:03d}.tif", image_to_tiff_bytes(f, reporters)) for i, f in enumerate(fields)]
        settings = Settings(data_dir=tmp / "data", database_url=database_url, broker_url=broker_url)
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        key = _seed_zoo(settings, saved, reporters, diameter, cell_line)
        echo(
            f"plate: {n_fields} fields x {n_channels} channels x {size} x {size} (synthetic), full-width CPnets, "
            f"diameter {diameter:.1f} px; device {device_name(torch_device)}; database {settings.resolved_database_url.split('@')[-1].split('?')[0]}, "
            f"broker {settings.resolved_broker_url.split('@')[-1]}; set-up {time.perf_counter() - tic:.0f} s "
            "(untimed)"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFUSE_")}
        env.update(
            {
                "CELLFUSE_DATA_DIR": str(settings.resolved_data_dir),
                "CELLFUSE_DATABASE_URL": settings.resolved_database_url,
                "CELLFUSE_BROKER_URL": settings.resolved_broker_url,
                "PYTHONUNBUFFERED": "1",
                "CELLFUSE_DEVICE": str(torch_device),
            }
        )
        request = {
            "cell_line": cell_line,
            "channels": reporters,
            "use_channels": reporters,
            "objects": [OBJECT],
            "method": "flow_fusion",
            # The direct loop uses the models' training diameter: the API must do the same work.
            "params": {"estimate_diameter": "off"},
        }

        today_env = {**env, "CELLFUSE_SEGMENT_ROUTE": "per_field", "CELLFUSE_PRECISION": "fp32"}
        _, _, today_s, today_masks = _api_route(
            today_env, key, request, tiffs, tmp / "serve-today.log", echo, "API, today's route (per field, fp32)"
        )
        plate_env = {**env, "CELLFUSE_PRECISION": precision, "CELLFUSE_SEGMENT_ROUTE": "plate"}
        _, upload_s, plate_s, plate_masks = _api_route(
            plate_env, key, request, tiffs, tmp / "serve-plate.log", echo, f"API, plate route ({precision})"
        )
        direct_s, engine_s = _direct_loops(fields, saved, diameter, precision, echo, torch_device)
        naive_s = None
        if naive:
            subset = fields[: naive_fields or n_fields]
            naive_s = _naive_route(subset, saved, diameter, echo, torch_device) * n_fields / len(subset)
            if len(subset) < n_fields:
                echo(f"naive route scaled from {len(subset)} to {n_fields} fields: {naive_s:.1f} s")

        f1 = []
        for name, data in today_masks.items():
            a, b = read_labels(data), read_labels(plate_masks[name])
            f1.append(1.0 if a.max() == b.max() == 0 else match(a, b).f1)
        objects = sum(int(read_labels(d).max()) for d in plate_masks.values())

    result = {
        "n_fields": n_fields,
        "size": size,
        "n_channels": n_channels,
        "precision": precision,
        "api_today_s": round(today_s, 4),
        "api_plate_s": round(plate_s, 4),
        "upload_s": round(upload_s, 4),
        "direct_s": round(direct_s, 4),
        "engine_s": round(engine_s, 4),
        "device": str(torch_device),
        "engine_fields_per_s": round(n_fields / engine_s, 4),
        "naive_s": None if naive_s is None else round(naive_s, 4),
        "fields_per_s": round(n_fields / plate_s, 4),
        "api_over_direct": round(plate_s / direct_s, 3),
        "gain_over_today": round(today_s / plate_s, 3),
        "naive_over_api": None if naive_s is None else round(naive_s / plate_s, 3),
        "mask_f1_vs_today_mean": round(float(np.mean(f1)), 4),
        "mask_f1_vs_today_min": round(float(np.min(f1)), 4),
        "objects": objects,
    }
    echo(
        f"masks, plate route vs today's route: F1@0.5 mean {result['mask_f1_vs_today_mean']:.4f}, "
        f"min {result['mask_f1_vs_today_min']:.4f} over {len(f1)} fields ({objects} objects)"
    )
    echo(
        f"fields/s through the API: {result['fields_per_s']:.3f} (the engine alone: "
        f"{result['engine_fields_per_s']:.3f})"
    )
    echo(f"gain over today's route (today / plate): {result['gain_over_today']:.2f}")
    echo(f"API time / direct segment_field loop: {result['api_over_direct']:.2f}")
    if naive_s is not None:
        echo(f"naive route / API: {result['naive_over_api']:.2f}")
    return result
