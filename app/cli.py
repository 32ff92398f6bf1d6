"""The ``cellfuse`` command: serve, worker, migrate, keys, demo, bench, pretrain, version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app import __version__

cli = typer.Typer(
    help="CellFuse: segmentation without structural reporters.", no_args_is_help=True, add_completion=False
)
keys_cli = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
bench_cli = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
cli.add_typer(bench_cli, name="bench")

ADMIN_KEY_FILE = "admin-key.txt"


def _settings():
    from app.settings import get_settings

    return get_settings()


@cli.command()
def version() -> None:
    """Print the versions of CellFuse and of the libraries that shape its results."""
    from importlib import metadata

    typer.echo(f"cellfuse {__version__}")
    for dist in ("cellpose", "torch", "numpy"):
        try:
            typer.echo(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            typer.echo(f"{dist} not installed")


@cli.command()
def migrate(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Bring the configured database to the newest schema (or to REVISION)."""
    from app.migrations import upgrade

    settings = _settings()
    upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}: {settings.resolved_database_url.split('@')[-1]}")


def ensure_admin_key(settings) -> str | None:
    """On first start, create an admin key and keep it in a 0600 file in the data directory.

    -> the new key on the start that created it; None on later starts (the key is never shown twice).
    """
    from sqlalchemy import func, select

    from app.db import session_factory
    from app.models import ApiKey
    from app.security import create_key

    with session_factory(settings.resolved_database_url)() as session:
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return None
        _row, key = create_key(session, "first-admin", "admin")
    path = settings.resolved_data_dir / ADMIN_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM when `cellfuse serve` dies, however it dies.

    Runs in the child between fork and exec; without it a killed server would leave its worker
    (in a session of its own) running.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_command(queues: list[str], concurrency: int, loglevel: str = "INFO", name: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app:celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        name or f"cellfuse-{os.getpid()}@%h",
    ]


def gpu_devices(spec: str) -> list[str]:
    """CELLFUSE_DEVICE values for ``--gpus``: "0,1" -> ["cuda:0", "cuda:1"]; "cpu" entries stand in
    for GPUs (tests, a machine without one).

    >>> gpu_devices("0, 1"), gpu_devices("cpu,cpu"), gpu_devices("cuda:2")
    (['cuda:0', 'cuda:1'], ['cpu', 'cpu'], ['cuda:2'])
    """
    import re

    devices = []
    for item in (part.strip().lower() for part in spec.split(",")):
        if re.fullmatch(r"\d+", item):
            devices.append(f"cuda:{int(item)}")
        elif re.fullmatch(r"cpu|cuda:\d+", item):
            devices.append(item)
        else:
            raise typer.BadParameter(f"--gpus takes GPU indices like 0,1 (or cpu), got {item!r}", param_hint="--gpus")
    if not devices:
        raise typer.BadParameter("--gpus needs at least one GPU index", param_hint="--gpus")
    return devices


def run_worker_group(devices: list[str], queues: list[str], concurrency: int, loglevel: str = "INFO") -> int:
    """One worker process per device, each with CELLFUSE_DEVICE set to it; returns when one ends.

    SIGTERM/SIGINT reach every worker (each finishes or re-queues its running job, as Celery does);
    when one worker exits on its own the others are stopped too, so that a supervisor (compose,
    systemd) restarts the group as a whole.
    """
    import time

    procs: list[subprocess.Popen] = []
    for index, device in enumerate(devices):
        env = {**os.environ, "CELLFUSE_DEVICE": device}
        name = f"cellfuse-{device.replace(':', '')}-{index}-{os.getpid()}@%h"
        procs.append(
            subprocess.Popen(
                worker_command(queues, concurrency, loglevel, name),
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )  # noqa: PLW1509 - no threads here
        typer.echo(f"worker {index} (pid {procs[-1].pid}) on {device}")

    def stop(signum=signal.SIGTERM, _frame=None) -> None:
        # To each worker's main process only: it stops its own pool. A signal to the whole group
        # can kill a pool process holding billiard's queue lock and hang the shutdown.
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
    finally:
        stop()
        deadline = time.monotonic() + 60
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return max((proc.returncode or 0) for proc in procs)


@cli.command()
def worker(
    queue: Annotated[list[str] | None, typer.Option("--queue", "-q", help="queues to consume")] = None,
    concurrency: Annotated[int, typer.Option(help="parallel jobs (per GPU with --gpus)")] = 0,
    gpus: Annotated[
        str, typer.Option(help="one worker process per GPU, e.g. 0,1 (each with CELLFUSE_DEVICE=cuda:N)")
    ] = "",
) -> None:
    """Start a worker against the configured broker (e.g. `cellfuse worker --queue gpu --gpus 0,1`)."""
    settings = _settings()
    queues = queue or settings.worker_queues
    if gpus:
        raise typer.Exit(run_worker_group(gpu_devices(gpus), queues, concurrency or settings.worker_concurrency))
    cmd = worker_command(queues, concurrency or settings.worker_concurrency)
    os.execv(cmd[0], cmd)


@cli.command("worker-health")
def worker_health(
    max_age: Annotated[float, typer.Option(help="seconds since a worker here last reported")] = 60.0,
) -> None:
    """Exit 0 if a worker on this host reported within --max-age seconds (the worker container's healthcheck)."""
    import socket

    from app.worker_presence import live_workers_on_host

    names = live_workers_on_host(_settings(), max_age)
    if not names:
        typer.echo(f"no worker on {socket.gethostname()} reported in the last {max_age:g} s", err=True)
        raise typer.Exit(1)
    typer.echo(" ".join(names))


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    embedded_worker: Annotated[bool, typer.Option(help="start one worker beside the API")] = True,
) -> None:
    """Migrate the database, then run the API (and one worker) on the configured set-up."""
    import uvicorn

    from app.api.main import create_app
    from app.migrations import upgrade

    settings = _settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    # With a bootstrap key configured (compose), the API registers that one; else make a first key.
    key = None if settings.bootstrap_admin_key else ensure_admin_key(settings)
    worker_proc = None
    if embedded_worker:
        worker_proc = subprocess.Popen(
            worker_command(settings.worker_queues, settings.worker_concurrency, "WARNING"),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    typer.echo(f"CellFuse {__version__} on http://{host}:{port}/  (API docs: /docs)")
    typer.echo(f"data directory: {settings.resolved_data_dir}")
    if key:
        key_file = settings.resolved_data_dir / ADMIN_KEY_FILE
        # Shown once, and only to a person at a terminal: output redirected to a file (a log) gets
        # the file's location instead of the key.
        if sys.stdout.isatty():
            typer.echo(f"admin API key, shown this once (also in {key_file}, mode 0600): {key}")
        else:
            typer.echo(f"an admin API key was created; it is in {key_file} (mode 0600)")
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
    finally:
        if worker_proc is not None:
            try:
                os.killpg(worker_proc.pid, signal.SIGTERM)
                worker_proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(worker_proc.pid, signal.SIGKILL)


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what uses the key")],
    role: Annotated[str, typer.Option(help="instrument | scientist | admin")] = "instrument",
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from app.db import session_factory
    from app.migrations import upgrade
    from app.security import create_key

    settings = _settings()
    upgrade(settings.resolved_database_url)
    with session_factory(settings.resolved_database_url)() as session:
        try:
            row, key = create_key(session, name, role)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"key {row.id} ({role}) for {name}: {key}")


@keys_cli.command("list")
def keys_list() -> None:
    """List keys (prefixes only; keys themselves are never stored)."""
    from sqlalchemy import select

    from app.db import session_factory
    from app.models import ApiKey

    settings = _settings()
    with session_factory(settings.resolved_database_url)() as session:
        for row in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = "revoked" if row.revoked_at else "active"
            typer.echo(f"{row.id}\t{row.prefix}…\t{row.role}\t{state}\t{row.name}")


@keys_cli.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="key id or prefix")]) -> None:
    """Revoke a key by id or prefix; it stops working at once."""
    from app.db import session_factory
    from app.security import revoke_key

    settings = _settings()
    with session_factory(settings.resolved_database_url)() as session:
        n = revoke_key(session, key)
    if n == 0:
        typer.echo(f"no active key matches {key!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {n} key(s)")


@keys_cli.command("generate")
def keys_generate() -> None:
    """Print a fresh random key (e.g. for CELLFUSE_BOOTSTRAP_ADMIN_KEY) without storing it."""
    from app.security import generate_key

    typer.echo(generate_key())


@bench_cli.command("fused")
def bench_fused(
    size: int = 512,
    channels: int = 4,
    repeats: int = 1,
    tile: Annotated[bool, typer.Option(help="fused route tiled like Cellpose (else one pass)")] = False,
) -> None:
    """Fused segmentation of a multi-channel field against Cellpose's eval per channel."""
    from app.benchmarks.fused import run_fused_benchmark

    run_fused_benchmark(size=size, n_channels=channels, repeats=repeats, tile=tile, echo=typer.echo)


@bench_cli.command("training")
def bench_training(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "cpu",
    precision: Annotated[
        str, typer.Option(help="reduced precision to compare: auto | bf16 | fp16 | fp32 (none)")
    ] = "auto",
    epochs: int = 2,
    n_train: int = 16,
    memory: Annotated[bool, typer.Option(help="also measure peak memory (CPU)")] = True,
) -> None:
    """Training throughput of CellFuse's loop against Cellpose's train_seg on one device; peak memory."""
    from app.benchmarks.training import run_training_benchmark

    run_training_benchmark(
        echo=typer.echo, device=device, precision=precision, epochs=epochs, n_train=n_train, memory=memory
    )


@bench_cli.command("plate")
def bench_plate(
    fields: Annotated[int, typer.Option(help="fields on the plate")] = 96,
    size: int = 512,
    channels: int = 4,
    postgres: Annotated[str, typer.Option(help="PostgreSQL URL instead of the embedded SQLite")] = "",
    redis: Annotated[str, typer.Option(help="Redis URL instead of the embedded broker")] = "",
    naive: Annotated[bool, typer.Option(help="also time Cellpose's eval per channel per field")] = True,
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N (the worker's and the loops')")] = "cpu",
    naive_fields: Annotated[int, typer.Option(help="time the naive route on N fields, scaled (0: all)")] = 0,
    unique: Annotated[int, typer.Option(help="fields drawn; the others are turned copies")] = 8,
) -> None:
    """A plate through the real API: today's route, the plate route, a direct loop and the naive route."""
    from app.benchmarks.plate import run_plate_benchmark

    run_plate_benchmark(
        n_fields=fields,
        size=size,
        n_channels=channels,
        database_url=postgres or None,
        broker_url=redis or None,
        naive=naive,
        device=device,
        naive_fields=naive_fields or None,
        unique=unique,
        echo=typer.echo,
    )


@bench_cli.command("precision")
def bench_precision(
    images: int = 16,
    device: str = "cpu",
    precision: Annotated[str, typer.Option(help="bf16 | fp16")] = "bf16",
    data: Annotated[Path, typer.Option(help="DSB2018-style folder with images/*.tif")] = Path(
        "/work/shared/data/dsb2018_fluo"
    ),
) -> None:
    """A reduced precision against fp32 on real fields: mask agreement (F1) and speed."""
    from app.benchmarks.precision import run_precision_benchmark

    run_precision_benchmark(images, device=device, precision=precision, data=data, echo=typer.echo)


@bench_cli.command("ablation")
def bench_ablation(max_epochs: int = 30) -> None:
    """Fine-tune with and without microscopy augmentations; score on a differently acquired plate."""
    from app.benchmarks.ablation import run_ablation_benchmark

    run_ablation_benchmark(max_epochs=max_epochs, echo=typer.echo)


@bench_cli.command("few-shot")
def bench_few_shot(
    small: Annotated[bool, typer.Option("--small", help="a smoke-test size")] = False,
    dataset: Annotated[list[str] | None, typer.Option(help="synthetic and/or dsb2018")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="a seed (repeat for several); default 0 and 1")] = None,
    n_test: Annotated[int | None, typer.Option(help="held-out test fields / crops (default 4)")] = None,
    n_pretext: Annotated[int | None, typer.Option(help="unannotated ISL pretext images (default 12)")] = None,
) -> None:
    """F1 / mAP against the number of annotated images: random, shipped base, ISL init, self-trained."""
    import dataclasses

    from app.benchmarks.few_shot import FewShotBudget, run_few_shot_benchmark

    # Options so that a table in the README can be reproduced by the command alone (the DSB2018 one
    # used 10 test crops and 10 pretext images).
    budget = FewShotBudget.small() if small else FewShotBudget()
    changes: dict = {"seeds": tuple(seed)} if seed else {}
    changes.update({k: v for k, v in (("n_test", n_test), ("n_pretext", n_pretext)) if v is not None})
    run_few_shot_benchmark(
        datasets=tuple(dataset or ("synthetic", "dsb2018")),
        budget=dataclasses.replace(budget, **changes),
        echo=typer.echo,
    )


@bench_cli.command("quality")
def bench_quality(
    small: Annotated[bool, typer.Option("--small", help="a smoke test: tiny plates, 1 epoch")] = False,
    regime: Annotated[list[str] | None, typer.Option("--regime", help="regimes to run (default: all)")] = None,
    obj: Annotated[str, typer.Option("--object", help="nuclei or cells")] = "cells",
    seed: int = 7,
    json_out: Annotated[str, typer.Option("--json", help="also write the results here")] = "",
    zero_shot_images: Annotated[
        int, typer.Option(help="held-out DSB2018 images for the zero-shot rows (0: none; default 16, 2 --small)")
    ] = -1,
) -> None:
    """Learned Flow Fusion vs each channel, equal weights, label fusion and a joint K-channel model;
    then the shipped base zero-shot on rescaled held-out DSB2018 nuclei."""
    import json

    from app.benchmarks.quality import run_quality_benchmark

    result = run_quality_benchmark(
        small=small,
        regimes=regime or None,
        obj=obj,
        seed=seed,
        zero_shot_images=None if zero_shot_images < 0 else zero_shot_images,
        echo=typer.echo,
    )
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2, default=float))


@bench_cli.command("preprocessing")
def bench_preprocessing(
    n_train: Annotated[int, typer.Option("--train", help="training fields of the training plate")] = 12,
    n_val: Annotated[int, typer.Option("--val", help="validation fields of the training plate")] = 4,
    n_test: Annotated[int, typer.Option("--test", help="fields of each test plate")] = 12,
    size: Annotated[int, typer.Option(help="field size in pixels (square)")] = 192,
    max_epochs: Annotated[int, typer.Option(help="epochs per fine-tuned model (at most)")] = 40,
    seed: Annotated[int, typer.Option(help="synthetic plates and training seed (0: the README's plates)")] = 0,
    n_boot: Annotated[int, typer.Option("--boot", help="bootstrap resamples of the F1 interval")] = 1000,
    json_out: Annotated[str, typer.Option("--json", help="also write the rows to this JSON file")] = "",
    small: Annotated[bool, typer.Option(help="a quick smoke run (overrides the set-up)")] = False,
) -> None:
    """Flow Fusion F1 with and without per-plate illumination correction and plate-level percentiles:
    every recipe × plate gain with a bootstrap interval, and the seconds per field of each step."""
    import json

    from app.benchmarks.preprocessing import run_preprocessing_benchmark

    if small:
        n_train, n_val, n_test, size, max_epochs, n_boot = 3, 2, 3, 96, 2, 50
    result = run_preprocessing_benchmark(
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        size=size,
        max_epochs=max_epochs,
        seed=seed,
        n_boot=n_boot,
        echo=typer.echo,
    )
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2, default=float))


@bench_cli.command("zero-shot")
def bench_zero_shot(
    model: Annotated[str, typer.Option(help="shipped base (name:version); default the newest")] = "",
    rescales: Annotated[str, typer.Option(help="image rescale factors")] = "0.5,0.75,1,1.5,2",
    modes: Annotated[str, typer.Option(help="diameters: estimated, default, true")] = "estimated,default,true",
    limit: Annotated[int, typer.Option(help="use only the first N held-out images (0: all)")] = 0,
    data_dir: Annotated[list[Path] | None, typer.Option(help="DSB2018 folder(s)")] = None,
    json_out: Annotated[Path | None, typer.Option(help="also write the rows as JSON")] = None,
    recentre_passes: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=10,
            help="recentring passes of the size model's style estimate (0: Cellpose's single pass;"
            " default the service's, 0)",
        ),
    ] = None,
) -> None:
    """A shipped base on its held-out DSB2018 images rescaled 0.5x-2x: pooled F1@0.5 with estimated,
    default and true diameters, each with a bootstrap interval over images."""
    import json

    from app.benchmarks.zero_shot import run_zero_shot_benchmark

    try:
        factors = [float(v) for v in rescales.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter("give comma-separated numbers, e.g. 0.5,1,2", param_hint="--rescales") from exc
    rows = run_zero_shot_benchmark(
        model=model,
        data_dirs=data_dir or None,
        rescales=factors,
        modes=[m.strip() for m in modes.split(",") if m.strip()],
        limit=limit or None,
        recentre_iterations=recentre_passes,
        echo=typer.echo,
    )
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=1))


@bench_cli.command("load")
def bench_load(
    url: Annotated[str, typer.Option(help="API base URL (loopback)")] = "",
    seconds: float = 20.0,
    rate: float = 20.0,
    stack: Annotated[str, typer.Option(help="without --url: services | embedded | both")] = "both",
) -> None:
    """Steady job submissions and status polls against an API; prints req/s, p50/p99, errors.

    Without --url it starts local stacks: PostgreSQL + Redis, and the embedded default (SQLite).
    """
    from app.benchmarks.load import run_load_benchmark

    if url:
        run_load_benchmark(url=url, seconds=seconds, rate=rate, echo=typer.echo)
        return
    if stack not in ("services", "embedded", "both"):
        raise typer.BadParameter("--stack is services, embedded or both")
    for embedded in {"services": (False,), "embedded": (True,), "both": (False, True)}[stack]:
        typer.echo(f"== {'embedded default' if embedded else 'PostgreSQL + Redis'} ==")
        run_load_benchmark(url=None, seconds=seconds, rate=rate, echo=typer.echo, embedded=embedded)


@cli.command()
def pretrain(
    out_dir: Annotated[Path, typer.Option(help="where to write weights and card")] = Path("models_zoo"),
    minutes: Annotated[float, typer.Option(help="training time budget")] = 30.0,
    data_dir: Annotated[Path | None, typer.Option(help="DSB2018 folder (images/, labels/)")] = None,
    synthetic_fields: Annotated[int, typer.Option(help="synthetic multi-reporter fields to add")] = 48,
    init_weights: Annotated[Path | None, typer.Option(help="continue from these weights")] = None,
    version: Annotated[str, typer.Option(help="version label of the new base")] = "v1",
    bsize: Annotated[int, typer.Option(help="training crop size")] = 224,
) -> None:
    """Train a generalist base model of our own (CC0 DSB2018 nuclei + synthetic reporter fields)."""
    from app.science.pretrain import pretrain_base

    kwargs: dict[str, Any] = {
        "minutes": minutes,
        "synthetic_fields": synthetic_fields,
        "init_weights": init_weights,
        "version": version,
        "bsize": bsize,
        "synthetic_size": 192,
    }
    if data_dir is not None:
        kwargs["dsb_dir"] = data_dir
    pretrain_base(out_dir, **kwargs)


@cli.command()
def segment(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="TIFF/OME-TIFF fields")],
    cell_line: Annotated[str, typer.Option(help="cell line registered in the zoo")],
    channels: Annotated[str, typer.Option(help="reporter per channel, comma-separated")],
    method: Annotated[
        str, typer.Option(help="flow_fusion | staple | simple | voting | majority_voting")
    ] = "flow_fusion",
    objects: Annotated[str, typer.Option(help="nuclei, cells or both")] = "nuclei,cells",
    use_channels: Annotated[str, typer.Option(help="channels to fuse (default: the zoo's chosen set)")] = "",
    model: Annotated[
        str,
        typer.Option(
            help="zoo (fine-tuned, default) | base (the shipped base, zero-shot) | base:<name> | version:<id>"
        ),
    ] = "zoo",
    diameter: Annotated[float, typer.Option(help="object diameter in pixels (default: estimated)", min=0)] = 0.0,
    estimate_diameter: Annotated[
        str, typer.Option(help="without --diameter: per-plate | per-field | off")
    ] = "per-plate",
    url: Annotated[str, typer.Option(help="CellFuse server")] = "http://127.0.0.1:8000",
    api_key: Annotated[str, typer.Option(envvar="CELLFUSE_API_KEY", help="API key")] = "",
    out: Annotated[Path, typer.Option(help="folder for the downloaded results")] = Path("cellfuse-results"),
) -> None:
    """Segment local fields on a CellFuse server and download masks, tables, ROIs and previews."""
    from rich.progress import Progress

    from app.client import ApiError, CellFuseClient, segment_files

    key = api_key or _local_admin_key()
    if not key:
        raise typer.BadParameter("give --api-key (or CELLFUSE_API_KEY)", param_hint="--api-key")
    request = {
        "cell_line": cell_line,
        "channels": [c.strip() for c in channels.split(",") if c.strip()],
        "objects": [o.strip() for o in objects.split(",") if o.strip()],
        "method": method,
        "model": model,
        "params": {"estimate_diameter": estimate_diameter, **({"diameter": diameter} if diameter > 0 else {})},
    }
    if use_channels:
        request["use_channels"] = [c.strip() for c in use_channels.split(",") if c.strip()]
    api = CellFuseClient.connect(url, key)
    with Progress() as progress:
        task = progress.add_task(f"segmenting {len(files)} field(s)", total=1.0)
        try:
            job, written = segment_files(
                api, files, request, out, on_progress=lambda j: progress.update(task, completed=j["progress"])
            )
        except ApiError as exc:
            typer.echo(f"refused: {exc.problem.get('detail', exc)}", err=True)
            raise typer.Exit(1)
        except RuntimeError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1)
    failed = job["summary"].get("failed_fields", [])
    typer.echo(f"job {job['id']}: {job['summary'].get('fields_done', 0)} field(s) done, {len(failed)} failed")
    for item in failed:
        typer.echo(f"  {item['field']}: {item['error']}")
    typer.echo(f"{len(written)} file(s) written under {out / job['id']}")


def _local_admin_key() -> str | None:
    path = _settings().resolved_data_dir / ADMIN_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


@cli.command()
def demo(
    small: Annotated[bool, typer.Option("--small", help="reduced size for CI")] = False,
    url: Annotated[str, typer.Option(help="use a running server instead of starting one")] = "",
    api_key: Annotated[str, typer.Option(envvar="CELLFUSE_API_KEY", help="key for --url")] = "",
    keep_running: Annotated[bool, typer.Option(help="leave the server up at the end")] = False,
) -> None:
    """The main job end to end on the embedded default: plate → fine-tune → select → segment → table."""
    from app.demo import run_demo

    code = run_demo(small=small, url=url or None, api_key=api_key or None, keep_running=keep_running)
    raise typer.Exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
