"""Training benchmark: CellFuse's fine-tuning loop against Cellpose's ``train.train_seg``.

Both train a fresh copy of the same randomly initialised CPnet on the same synthetic reporter
images (nuclei masks), with the same batch size, crop size, optimiser and epochs, in one process.
Throughput counts training samples per second of wall time, set-up included (flow targets,
normalisation), so one-off costs count against whoever pays them. Our loop also computes a
validation loss every epoch and applies the photometric augmentations; Cellpose's only does
geometry and validates every 10 epochs.

Peak memory of a fine-tune (batch 8, 224 x 224, CPU) is measured in a child process so that the
benchmark's own allocations do not count: the child's peak RSS (``VmHWM``; ``ru_maxrss`` where
/proc is missing) before training (imports + data) and at the end, and tracemalloc's peak of Python/numpy allocations during training.

What bounds the ratio on a CPU (measured here, 1 thread, half width, batch 8 at 224²): a training
step (the CPnet forward and backward, identical in both loops) takes 1.8 s of CPU in fp32 and 0.92 s
under bf16 autocast, against 0.04 s to augment a batch (made on a prefetch thread) and 0.05 s per
image once for its flow targets. In fp32 both loops are bound by the same network, so ~1.1x is the
ceiling there; bf16 (``precision="auto"`` on a CPU with native bf16) is what takes it past 1.5x.

``cellfuse bench training`` prints the numbers; ``run_training_benchmark`` returns them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def benchmark_data(n_images: int, *, size: int = 256, seed: int = 7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Single-channel synthetic reporter images with their nuclei masks (shipped generator)."""
    from app.science.synthetic import make_plate

    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    n_fields = 0
    while len(images) < n_images:
        n_fields += 4
        images, masks = [], []
        for field in make_plate(n_fields, size=size, seed=seed):
            for channel in field.image:
                images.append(np.asarray(channel, np.float32))
                masks.append(np.asarray(field.nuclei, np.int32))
    return images[:n_images], masks[:n_images]


_PEAK_MEMORY_CHILD = r"""
import json, resource, sys, time, tracemalloc
import torch


def peak_kib():
    # VmHWM is this process's own high-water mark; ru_maxrss survives exec and can report the
    # parent's peak (Linux keeps it in the signal struct across fork + exec).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


torch.set_num_threads(int(sys.argv[1]))
from app.benchmarks.training import benchmark_data
from app.science.backbone import build_network, FULL_WIDTHS, HALF_WIDTHS
from app.science.training import TrainingConfig, finetune
widths = tuple(json.loads(sys.argv[2]))
images, masks = benchmark_data(int(sys.argv[3]) + 2)
net = build_network(widths)
before = peak_kib()
tracemalloc.start()
started = time.perf_counter()
config = TrainingConfig(max_epochs=int(sys.argv[4]), batch_size=8, bsize=224, min_train_masks=1)
finetune(net, images[2:], masks[2:], images[:2], masks[:2], config)
wall = time.perf_counter() - started
_, traced_peak = tracemalloc.get_traced_memory()
after = peak_kib()
print(json.dumps({"rss_before_kib": before, "rss_peak_kib": after, "tracemalloc_peak_bytes": traced_peak,
                  "wall_s": wall}))
"""


def measure_peak_memory(*, widths: tuple[int, ...], n_train: int = 8, epochs: int = 1, threads: int = 1) -> dict:
    """Peak memory of a CPU fine-tune at batch 8, 224 x 224, measured in a child process."""
    repo_root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_CHILD, str(threads), json.dumps(list(widths)), str(n_train), str(epochs)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=1800,
        env={**__import__("os").environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": str(threads)},
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_training_benchmark(
    echo: Callable[[str], None] = print,
    *,
    widths: tuple[int, ...] | None = None,
    n_train: int = 16,
    n_val: int = 2,
    epochs: int = 2,
    batch_size: int = 8,
    bsize: int = 224,
    threads: int | None = None,
    memory: bool = True,
    device: str = "cpu",
    precision: str = "auto",
) -> dict:
    """Samples/s of our loop and of ``cellpose.train.train_seg`` on identical data and settings.

    Both train on ``device``. Ours runs twice: in fp32 and, when ``precision`` resolves to a
    reduced precision there (``auto``: bf16 on a CPU with native bf16, bf16/fp16 on CUDA), under
    autocast in it; the best validation losses of the two are printed to show they agree.
    """
    import torch

    from app.science.device import cuda_synchronized, device_name, resolve_device, resolve_precision

    from app.science.backbone import HALF_WIDTHS, build_network
    from app.science.training import TrainingConfig, finetune, run_cellpose_train_seg

    widths = HALF_WIDTHS if widths is None else tuple(widths)
    torch_device = resolve_device(device)
    low_precision = resolve_precision(precision, torch_device, "training")
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    images, masks = benchmark_data(n_train + n_val)
    train_images, train_masks = images[n_val:], masks[n_val:]
    val_images, val_masks = images[:n_val], masks[:n_val]
    torch.manual_seed(0)
    net = build_network(widths)
    samples = n_train * epochs
    echo(
        f"training benchmark: CPnet widths {list(widths)}, {n_train} train + {n_val} val images "
        f"{images[0].shape[0]}x{images[0].shape[1]}, batch {batch_size}, crops {bsize}, {epochs} epochs, "
        f"{threads} torch thread(s), device {device_name(torch_device)}"
    )

    # Warm-up outside the timings: numba compiles Cellpose's flow code on first use, torch its kernels.
    from app.science.training import flow_targets

    flow_targets(masks[0])
    with torch.no_grad():
        build_network(widths)(torch.zeros(1, 2, 64, 64))
    torch.optim.AdamW(build_network(widths).parameters())  # first optimiser imports torch._dynamo (~3 s)

    config = TrainingConfig(
        batch_size=batch_size, bsize=bsize, max_epochs=epochs, min_train_masks=1, warmup_epochs=10, seed=0
    )

    def train_ours(run_precision: str):
        started, cpu_started = time.perf_counter(), time.process_time()
        with cuda_synchronized(torch_device):
            trained = finetune(
                net,
                train_images,
                train_masks,
                val_images,
                val_masks,
                config,
                device=torch_device,
                precision=run_precision,
            )
        return trained, time.perf_counter() - started, time.process_time() - cpu_started

    ours, ours_s, ours_cpu = train_ours("fp32")
    # Steady state: epochs after the first exclude the one-off flow computation.
    steady = None
    if len(ours.history) > 1:
        per_epoch = np.diff([r.elapsed_s for r in ours.history])
        steady = n_train / float(np.mean(per_epoch))
    low = None
    if low_precision != "fp32":
        low, low_s, low_cpu = train_ours(low_precision)

    with tempfile.TemporaryDirectory() as save_dir:
        cpu_started = time.process_time()
        cellpose_s, _ = run_cellpose_train_seg(
            net,
            train_images,
            train_masks,
            val_images,
            val_masks,
            save_dir=save_dir,
            n_epochs=epochs,
            batch_size=batch_size,
            bsize=bsize,
            device=torch_device,
        )
        cellpose_cpu = time.process_time() - cpu_started

    result = {
        "widths": list(widths),
        "threads": threads,
        "n_train": n_train,
        "epochs": epochs,
        "batch_size": batch_size,
        "bsize": bsize,
        "ours_wall_s": round(ours_s, 2),
        "ours_samples_per_s": round(samples / ours_s, 3),
        "ours_steady_samples_per_s": None if steady is None else round(steady, 3),
        "cellpose_wall_s": round(cellpose_s, 2),
        "cellpose_samples_per_s": round(samples / cellpose_s, 3),
        "speedup": round(cellpose_s / ours_s, 3),
        # CPU seconds of this process: robust to other load on a shared machine.
        "ours_cpu_s": round(ours_cpu, 2),
        "cellpose_cpu_s": round(cellpose_cpu, 2),
        "cpu_speedup": round(cellpose_cpu / ours_cpu, 3),
        "device": str(torch_device),
        "ours_best_val_loss": round(float(ours.best_val_loss), 4),
    }
    if low is not None:
        result.update(
            {
                "precision": low_precision,
                f"ours_{low_precision}_wall_s": round(low_s, 2),
                f"ours_{low_precision}_cpu_s": round(low_cpu, 2),
                f"ours_{low_precision}_samples_per_s": round(samples / low_s, 3),
                f"ours_{low_precision}_best_val_loss": round(float(low.best_val_loss), 4),
                f"speedup_{low_precision}": round(cellpose_s / low_s, 3),
            }
        )
    echo(
        f"ours:     {result['ours_samples_per_s']:.3f} samples/s ({ours_s:.1f} s wall, {ours_cpu:.1f} s CPU; "
        "validation every epoch)"
    )
    echo(
        f"cellpose: {result['cellpose_samples_per_s']:.3f} samples/s ({cellpose_s:.1f} s wall, {cellpose_cpu:.1f} s CPU; "
        "train.train_seg)"
    )
    echo(f"CPU-time ratio (cellpose / ours): {result['cpu_speedup']:.2f}")
    if low is not None:
        echo(
            f"ours {low_precision}: {result[f'ours_{low_precision}_samples_per_s']:.3f} samples/s ({low_s:.1f} s wall, "
            f"{low_cpu:.1f} s CPU); best validation loss {result[f'ours_{low_precision}_best_val_loss']:.4f} vs fp32 "
            f"{result['ours_best_val_loss']:.4f}"
        )
        echo(
            f"speed-up ratio {low_precision} (cellpose / ours {low_precision}): {result[f'speedup_{low_precision}']:.2f}"
        )
    echo(f"speed-up ratio: {result['speedup']:.2f}")

    if memory:
        peak = measure_peak_memory(widths=widths, threads=threads)
        result["peak_rss_mib"] = round(peak["rss_peak_kib"] / 1024, 1)
        result["rss_before_training_mib"] = round(peak["rss_before_kib"] / 1024, 1)
        result["training_rss_increase_mib"] = round((peak["rss_peak_kib"] - peak["rss_before_kib"]) / 1024, 1)
        result["tracemalloc_peak_mib"] = round(peak["tracemalloc_peak_bytes"] / 2**20, 1)
        echo(
            f"peak memory, fine-tune batch 8 at 224x224 on CPU: {result['peak_rss_mib']} MiB RSS "
            f"(+{result['training_rss_increase_mib']} MiB over imports and data; "
            f"Python/numpy tracemalloc peak {result['tracemalloc_peak_mib']} MiB)"
        )
    return result
