"""`cellfuse demo`: the main job end to end on the embedded default, against a real server.

Start the service (or use one given by URL), make a synthetic multi-reporter plate on real nucleus
masks, register the cell line and reporters, fine-tune one model per channel and object from the
shipped base, rank channel subsets, segment with Flow Fusion and the label-fusion baselines, and
print a table a biologist can read.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.client import CellFuseClient

METHODS = ("flow_fusion", "staple", "simple", "voting", "majority_voting")
OBJECTS = ("nuclei", "cells")
CELL_LINE = "HeLa-demo"
CHOSEN_SET_ROW = "flow_fusion, chosen set"


@dataclass(frozen=True)
class DemoSize:
    n_channels: int
    n_fields: int
    field_size: int
    splits: tuple[int, int, int]  # train, val, test
    training: dict


# Sized to finish well under 10 minutes on 2 CPU cores: 4 reporters x 2 objects = 8 fine-tunes.
FULL = DemoSize(
    n_channels=4,
    n_fields=24,
    field_size=192,
    splits=(14, 5, 5),
    training={"max_epochs": 25, "min_epochs": 8, "patience": 6, "batch_size": 8, "bsize": 128},
)
SMALL = DemoSize(
    n_channels=2,
    n_fields=8,
    field_size=128,
    splits=(4, 2, 2),
    training={"max_epochs": 3, "min_epochs": 0, "patience": 3, "batch_size": 4, "bsize": 96},
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`cellfuse serve` in a child process on the embedded default, with its own data folder."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFUSE_")}
        env["CELLFUSE_DATA_DIR"] = str(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        key_file = self.data_dir / "admin-key.txt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.data_dir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200 and key_file.is_file():
                    return key_file.read_text().strip()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become ready in {timeout:.0f} s; see {self.data_dir / 'server.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)  # the server stops its worker first (up to 10 s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<42}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        transient=False,
    )


def _run_job(api: CellFuseClient, progress: Progress, label: str, kind: str, body: dict) -> dict:
    task = progress.add_task(label, total=1.0, stage="queued")
    job = api.submit(kind, body)

    def update(j: dict) -> None:
        progress.update(task, completed=j["progress"], stage=j["stage"][:40])

    job = api.wait(job["id"], timeout=1800, poll=0.5, on_progress=update)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{label}: job {job['id']} {job['status']}: {job['error']}")
    progress.update(task, completed=1.0, stage="done")
    return job


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def run_demo(
    *,
    small: bool = False,
    url: str | None = None,
    api_key: str | None = None,
    keep_running: bool = False,
    data_dir: Path | None = None,
    console: Console | None = None,
) -> int:
    from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes
    from app.science.synthetic import DEFAULT_REPORTERS, make_plate

    console = console or Console()
    size = SMALL if small else FULL
    started = time.perf_counter()
    server = None
    if url is None:
        data_dir = (data_dir or Path(os.environ.get("CELLFUSE_DEMO_DIR", "cellfuse-demo"))).resolve()
        if (data_dir / "cellfuse.sqlite").exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            data_dir = data_dir.with_name(f"{data_dir.name}-{stamp}")
        console.print(f"[bold]CellFuse demo[/bold] — starting the service on the embedded default in {data_dir}")
        server = LocalServer(data_dir)
        api_key = server.start()
        url = server.url
    elif not api_key:
        console.print("[red]--url needs an API key (--api-key or CELLFUSE_API_KEY)[/red]")
        return 2
    api = CellFuseClient.connect(url, api_key)
    try:
        return _demo_steps(
            api,
            url,
            size,
            small,
            console,
            started,
            data_dir,
            image_to_tiff_bytes,
            labels_to_tiff_bytes,
            DEFAULT_REPORTERS,
            make_plate,
        )
    finally:
        if server is not None and not keep_running:
            server.stop()


def _demo_steps(
    api,
    url,
    size,
    small,
    console,
    started,
    data_dir,
    image_to_tiff_bytes,
    labels_to_tiff_bytes,
    reporters_catalogue,
    make_plate,
) -> int:
    reporters = list(reporters_catalogue[: size.n_channels])
    with console.status("making a synthetic plate on real DSB2018 nucleus masks"):
        fields = make_plate(size.n_fields, size=size.field_size, seed=2026, reporters=reporters)
    channels = fields[0].channel_names
    n_train, n_val, _n_test = size.splits
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(fields) - n_train - n_val)
    console.print(
        f"plate: {len(fields)} fields of {size.field_size}×{size.field_size}, reporters "
        f"{', '.join(channels)}; splits {n_train} train / {n_val} val / {len(fields) - n_train - n_val} test"
    )

    api.ensure_cell_line(CELL_LINE, species="human", tissue="cervix", notes="synthetic demo line")
    for spec in reporters:
        api.ensure_reporter(spec.name, localisation=spec.localisation)
    dataset = api.create_dataset(
        f"demo-plate-{int(time.time())}", CELL_LINE, channels, acquisition={"source": "synthetic", "seed": 2026}
    )
    with _progress() as progress:
        task = progress.add_task("uploading fields and masks", total=len(fields), stage="")
        for field, split in zip(fields, splits):
            api.add_image(
                dataset["id"],
                image_to_tiff_bytes(field.image.astype(np.uint16), channels),
                nuclei_tiff=labels_to_tiff_bytes(field.nuclei),
                cells_tiff=labels_to_tiff_bytes(field.cells),
                plate="demo",
                well=field.well,
                field=field.field,
                split=split,
            )
            progress.advance(task)

        versions: dict[tuple[str, str], dict] = {}
        for obj in OBJECTS:
            for reporter in channels:
                job = _run_job(
                    api,
                    progress,
                    f"fine-tune {reporter} → {obj}",
                    "finetune",
                    {"dataset_id": dataset["id"], "reporter": reporter, "object": obj, "params": size.training},
                )
                versions[(reporter, obj)] = api.get(f"/api/v1/models/{job['summary']['model_version_id']}")
        for (reporter, obj), version in versions.items():
            api.put(f"/api/v1/aliases/{CELL_LINE}/{reporter}/{obj}/production", {"version_id": version["id"]})

        rankings = {}
        for obj in OBJECTS:
            job = _run_job(
                api,
                progress,
                f"channel-set selection ({obj})",
                "select-channels",
                {"dataset_id": dataset["id"], "object": obj, "split": "val"},
            )
            rankings[obj] = job["summary"]

        method_jobs = {}
        for method in METHODS:
            job = _run_job(
                api,
                progress,
                f"segment test fields: {method}",
                "segment-dataset",
                {"dataset_id": dataset["id"], "split": "test", "method": method, "use_channels": channels},
            )
            method_jobs[method] = job
        # The production path: Flow Fusion over the channel set the zoo chose per object.
        method_jobs[CHOSEN_SET_ROW] = _run_job(
            api,
            progress,
            "segment test fields: FF, chosen sets",
            "segment-dataset",
            {"dataset_id": dataset["id"], "split": "test"},
        )

    _print_tables(console, channels, versions, rankings, method_jobs)
    ff = method_jobs["flow_fusion"]
    console.print()
    if data_dir is not None:
        console.print(f"masks, per-cell tables, ROI sets and overlays (Flow Fusion): {data_dir / 'jobs' / ff['id']}")
    console.print(f"the same over HTTP: {url}/api/v1/jobs/{ff['id']}")
    console.print(f"web page: {url}/   (API docs: {url}/docs)")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def _print_tables(console, channels, versions, rankings, method_jobs) -> None:
    for obj in OBJECTS:
        caption = "; ".join(
            f"{method}: {' + '.join(job['summary']['fused_channels'][obj])}"
            for method, job in method_jobs.items()
            if method in (METHODS[0], CHOSEN_SET_ROW)
        )
        table = Table(
            title=f"{obj.capitalize()}: held-out test fields by method (match at IoU ≥ 0.5)",
            caption=f"channels fused — {caption}",
        )
        table.add_column("method", no_wrap=True)
        for metric in ("F1", "precision", "recall", "Jaccard", "mAP .5:.95"):
            table.add_column(metric, justify="right", no_wrap=True)
        for method, job in method_jobs.items():
            m = job["summary"]["metrics"][obj]
            table.add_row(
                method, _fmt(m["f1"]), _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["jaccard"]), _fmt(m["map_50_95"])
            )
        console.print(table)

    for obj in OBJECTS:
        ranking = rankings[obj]
        sub = Table(
            title=f"Flow Fusion by channel subset, {obj} (validation fields), best first",
            caption="interval: bootstrap 95 % over fields; the chosen set is the smallest within noise of the best",
        )
        for col in ("channels", "F1", "F1 95% interval", "precision", "recall", "Jaccard", "mAP .5:.95"):
            sub.add_column(col, justify="left" if col == "channels" else "right")
        for r in ranking["ranking"]:
            low_high = r.get("f1_interval")
            sub.add_row(
                " + ".join(r["channels"]),
                _fmt(r["f1"]),
                f"{_fmt(low_high[0])}–{_fmt(low_high[1])}" if low_high else "–",
                _fmt(r["precision"]),
                _fmt(r["recall"]),
                _fmt(r["jaccard"]),
                _fmt(r["map_50_95"]),
            )
        console.print(sub)
        console.print(f"chosen channel set for {obj}: {' + '.join(ranking['chosen'])}")
        fitted = ranking.get("fusion_parameters")
        if fitted:
            weights = ", ".join(f"{c} {w:.2f}" for c, w in zip(fitted["channels"], fitted["weights"]))
            cv = (
                f"; CV F1 {_fmt(fitted['cv_f1'])} ({_fmt(fitted['cv_interval'][0])}–{_fmt(fitted['cv_interval'][1])})"
                if fitted.get("cv_interval")
                else ""
            )
            console.print(
                f"fitted Flow Fusion for it: {fitted['method']}, weights {weights}, flow threshold "
                f"{fitted['flow_threshold']}, cell-probability threshold {fitted['cellprob_threshold']}{cv}"
            )

    single = Table(title="Single-channel models (test split of their fine-tune)")
    for col in ("reporter", "object", "version", "epoch", "F1", "precision", "recall", "Jaccard"):
        single.add_column(col, justify="left" if col in ("reporter", "object") else "right")
    for (reporter, obj), v in versions.items():
        m = v["test_metrics"]
        single.add_row(
            reporter,
            obj,
            str(v["version"]),
            str(v["card"].get("training", {}).get("best_epoch", "")),
            _fmt(m.get("f1", 0)),
            _fmt(m.get("precision", 0)),
            _fmt(m.get("recall", 0)),
            _fmt(m.get("jaccard", 0)),
        )
    console.print(single)
