"""Many fields through the same channel models: batched networks, overlapped stages.

``segment_fields`` is ``segment_field`` for a plate. Four stages run at once, joined by small
bounded queues so that memory stays flat however many fields there are:

1. a reader thread pulls fields from the caller's iterable (loading them if given as callables),
   normalises, resizes and pads them (``backbone.prepare_field``);
2. a network thread stacks up to ``batch_fields`` consecutive same-shape fields into one batch per
   channel model (``backbone.forward_fields``);
3. a mask thread crops and resizes the maps back, fuses them and reconstructs the masks
   (Cellpose's dynamics, on ``mask_device``);
4. the caller consumes the results in input order, one per field, and writes them while the
   next fields are in the network.

Each field gives one ``FieldOutcome``; a field that cannot be read or segmented carries its error
instead of stopping the plate. Results equal ``segment_field``'s up to float rounding (batched
convolutions may sum in another order). The iterable and its loaders run on the reader thread:
give them no database session or other object that is not thread-safe.

A long field reports where it is: ``on_wait`` (given to ``segment_fields``) is called in the
caller's thread every ``wait_interval`` seconds while no result is ready, with the stage of each
field in flight (``FieldStage``). An exception raised there (a job's cancel) stops the threads
after the network pass or mask task under way, not at the end of the field.

Typical use::

    for outcome in segment_fields(((name, load) for name, load in fields), models, precision="bf16"):
        if outcome.error is None:
            save(outcome.key, outcome.result.labels)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.science.backbone import (
    ChannelPlan,
    Normalization,
    PreparedField,
    finish_field,
    forward_fields,
    plan_channels,
    prepare_field,
)
from app.science.device import module_device
from app.science.segmentation import (
    ChannelModel,
    SegmentationInputError,
    SegmentationResult,
    _as_field,
    _check_options,
    _masks_from_channel_maps,
)

#: The task name used when ``segment_fields`` is given a plain list of channel models.
SINGLE_TASK = "labels"


@dataclass(frozen=True)
class SegmentTask:
    """One segmentation of every field: which field channels, through which models, fused how.

    ``channels``: indices into the field's channels, one per model (None: all, in order). The
    other fields mean what they mean for ``segment_field``.
    """

    channel_models: tuple[ChannelModel, ...]
    channels: tuple[int, ...] | None = None
    method: str = "flow_fusion"
    normalizations: Normalization | tuple[Normalization, ...] | None = None
    flow_threshold: float | None = None
    cellprob_threshold: float | None = None
    min_size: int = 15
    weights: tuple[float, ...] | None = None
    fusion_params: dict | None = None
    fusion: dict | None = None

    def __post_init__(self) -> None:
        _check_options(self.method, self.weights, self.fusion_params, self.fusion, self.channel_models)
        if not self.channel_models:
            raise SegmentationInputError("a segmentation task needs at least one channel model")
        if self.channels is not None and len(self.channels) != len(self.channel_models):
            raise SegmentationInputError(
                f"{len(self.channels)} channel indices for {len(self.channel_models)} channel models"
            )


@dataclass
class FieldOutcome:
    """One field's results (task name -> result), or the error that stopped it.

    ``image`` is the field as read (K, Y, X), for measurements and previews; ``timings`` holds
    seconds per stage for this field (its share of a batched network pass under ``maps``).
    """

    index: int
    key: Any
    image: np.ndarray | None = None
    results: dict[str, SegmentationResult] = field(default_factory=dict)
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def result(self) -> SegmentationResult:
        """The result when there is a single task (``segment_fields`` given a list of models)."""
        if self.error is not None:
            raise self.error
        if len(self.results) != 1:
            raise KeyError(f"this field has results for {sorted(self.results)}; pick one from .results")
        return next(iter(self.results.values()))


@dataclass
class _Entry:
    index: int
    key: Any
    image: np.ndarray | None = None
    prepared: dict[str, PreparedField] = field(default_factory=dict)
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def batch_key(self) -> tuple:
        return tuple((name, p.batch_key) for name, p in self.prepared.items())


@dataclass(frozen=True)
class FieldStage:
    """Where one field in flight is: ``stage`` is "reading", "network" or "masks"; ``fraction``
    (0-1) is how far the field is through the engine (network passes done, mask tasks done)."""

    index: int
    key: Any
    stage: str
    fraction: float


class _EngineStopped(BaseException):
    """Raised inside an engine thread when the caller has stopped: ends a pass or mask task early.
    A BaseException so that the per-field ``except Exception`` handlers do not keep it as a field error."""


class _Stages:
    """The stage of each field in flight, written by the engine threads, read by the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[int, FieldStage] = {}

    def set(self, index: int, key: Any, stage: str, fraction: float) -> None:
        with self._lock:
            self._stages[index] = FieldStage(index, key, stage, min(1.0, max(0.0, fraction)))

    def drop(self, index: int) -> None:
        with self._lock:
            self._stages.pop(index, None)

    def snapshot(self) -> list[FieldStage]:
        with self._lock:
            return sorted(self._stages.values(), key=lambda s: s.index)


def _n_passes(plans: dict[str, ChannelPlan]) -> int:
    """Network passes per batch: one per (rescale group, distinct net) per task (``forward_fields``)."""
    return sum(len({id(plan.nets[c]) for c in group}) for plan in plans.values() for group in plan.groups)


class _SourceFailed:
    """The caller's iterable itself raised: re-raised in the caller's thread."""

    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def default_batch_fields(models: Iterable[ChannelModel]) -> int:
    """Fields per network batch: several on a GPU (fills it), two on a CPU (little to gain there)."""
    for model in models:
        return 8 if module_device(model.net).type == "cuda" else 2
    return 2


def _tasks_from(
    tasks: Sequence[ChannelModel] | Mapping[str, SegmentTask], options: dict[str, Any]
) -> dict[str, SegmentTask]:
    if isinstance(tasks, Mapping):
        if options:
            raise SegmentationInputError(
                f"give {sorted(options)} on each SegmentTask when segment_fields gets a mapping of tasks"
            )
        if not tasks:
            raise SegmentationInputError("no segmentation task given")
        return dict(tasks)
    for key in ("normalizations", "weights"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    return {SINGLE_TASK: SegmentTask(tuple(tasks), **options)}


def segment_fields(
    fields: Iterable[tuple[Any, np.ndarray | Callable[[], np.ndarray]]],
    tasks: Sequence[ChannelModel] | Mapping[str, SegmentTask],
    *,
    precision: str = "fp32",
    mask_device=None,
    batch_fields: int | None = None,
    mask_workers: int = 1,
    prefetch: int | None = None,
    channels_last: bool | None = None,
    on_wait: Callable[[list[FieldStage]], None] | None = None,
    wait_interval: float = 0.5,
    **options: Any,
) -> Iterator[FieldOutcome]:
    """Segment every (key, field) of ``fields``; yields one ``FieldOutcome`` per field, in order.

    ``fields``: (key, (K, Y, X) array or a callable returning one). ``tasks``: a list of channel
    models (one per field channel; ``options`` are ``segment_field``'s: method, thresholds,
    weights, ...) or a mapping name -> ``SegmentTask`` for several segmentations of each field
    (e.g. nuclei and cells). ``batch_fields``: fields per network batch (default by device,
    ``default_batch_fields``). ``prefetch``: fields in flight between stages (default 2 batches).
    Closing the generator early (``break``, an exception in the caller) stops the threads.
    """
    task_map = _tasks_from(tasks, dict(options))
    first_models = next(iter(task_map.values())).channel_models
    batch_fields = batch_fields or default_batch_fields(first_models)
    if batch_fields < 1 or mask_workers < 1:
        raise SegmentationInputError("batch_fields and mask_workers must be at least 1")
    depth = prefetch or 2 * batch_fields
    plans: dict[str, ChannelPlan] = {
        name: plan_channels(
            [m.net for m in task.channel_models],
            len(task.channel_models),
            diameter=[m.diameter for m in task.channel_models],
            normalizations=task.normalizations,
        )
        for name, task in task_map.items()
    }
    # Checked above before any thread starts; the threads run when the caller first iterates.
    return _run_pipeline(
        fields,
        task_map,
        plans,
        precision=precision,
        mask_device=mask_device,
        batch_fields=batch_fields,
        mask_workers=mask_workers,
        depth=depth,
        channels_last=channels_last,
        on_wait=on_wait,
        wait_interval=wait_interval,
    )


def _run_pipeline(
    fields: Iterable,
    task_map: dict[str, SegmentTask],
    plans: dict[str, ChannelPlan],
    *,
    precision: str,
    mask_device,
    batch_fields: int,
    mask_workers: int,
    depth: int,
    channels_last: bool | None,
    on_wait: Callable[[list[FieldStage]], None] | None = None,
    wait_interval: float = 0.5,
) -> Iterator[FieldOutcome]:
    stop = threading.Event()
    stages = _Stages()
    n_passes = max(1, _n_passes(plans))

    def stopped() -> None:
        if stop.is_set():
            raise _EngineStopped()

    prepared_queue: queue.Queue = queue.Queue(maxsize=depth)
    out_queue: queue.Queue = queue.Queue(maxsize=depth)

    def put(target: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                target.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(source: queue.Queue) -> Any:
        while not stop.is_set():
            try:
                return source.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def read() -> None:
        try:
            for index, item in enumerate(fields):
                if stop.is_set():
                    return
                stages.set(index, item[0] if isinstance(item, tuple) and item else None, "reading", 0.0)
                entry = _prepare_entry(index, item, task_map, plans)
                if not put(prepared_queue, entry):
                    return
        except BaseException as error:  # noqa: BLE001 - the iterable failed: re-raised in the caller
            put(prepared_queue, _SourceFailed(error))
        finally:
            put(prepared_queue, _DONE)

    masks_pool = ThreadPoolExecutor(mask_workers, thread_name_prefix="cellfuse-masks")

    def finish(entry: _Entry) -> FieldOutcome:
        def mask_task_done(done: int) -> None:
            stopped()
            stages.set(entry.index, entry.key, "masks", 0.7 + 0.3 * done / len(task_map))

        mask_task_done(0)
        return _finish_entry(entry, task_map, plans, mask_device, on_task=mask_task_done)

    def network() -> None:
        try:
            batches()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller, which would wait forever
            put(out_queue, _SourceFailed(error))

    def batches() -> None:
        pending: list[_Entry] = []

        def flush() -> bool:
            if pending:
                passes = [0]

                def pass_done() -> None:
                    stopped()
                    passes[0] += 1
                    for waiting in pending:
                        stages.set(waiting.index, waiting.key, "network", 0.1 + 0.6 * min(1.0, passes[0] / n_passes))

                for waiting in pending:
                    stages.set(waiting.index, waiting.key, "network", 0.1)
                _run_networks(pending, plans, channels_last=channels_last, precision=precision, checkpoint=pass_done)
            for entry in pending:
                if not put(out_queue, masks_pool.submit(finish, entry)):
                    return False
            pending.clear()
            return True

        while True:
            entry = get(prepared_queue)
            if entry is _DONE or isinstance(entry, _SourceFailed):
                if flush():
                    put(out_queue, entry)
                return
            if entry.error is not None:
                if not (flush() and put(out_queue, masks_pool.submit(finish, entry))):
                    return
                continue
            if pending and pending[0].batch_key != entry.batch_key and not flush():
                return
            pending.append(entry)
            if len(pending) >= batch_fields and not flush():
                return

    threads = [
        threading.Thread(target=read, name="cellfuse-read", daemon=True),
        threading.Thread(target=network, name="cellfuse-network", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        while True:
            item = _DONE
            while not stop.is_set():
                try:
                    item = out_queue.get(timeout=wait_interval if on_wait is not None else 0.1)
                    break
                except queue.Empty:
                    if on_wait is not None:
                        on_wait(stages.snapshot())
            if item is _DONE:
                return
            if isinstance(item, _SourceFailed):
                raise item.error
            assert isinstance(item, Future)
            outcome = item.result()
            stages.drop(outcome.index)
            yield outcome
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        masks_pool.shutdown(wait=True, cancel_futures=True)


def _prepare_entry(index: int, item: Any, task_map: dict[str, SegmentTask], plans: dict[str, ChannelPlan]) -> _Entry:
    try:
        key, source = item
    except (TypeError, ValueError):
        return _Entry(index, None, error=SegmentationInputError("each field must be a (key, image) pair"))
    entry = _Entry(index, key)
    tic = time.perf_counter()
    try:
        image = source() if callable(source) else source
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[np.newaxis]
        entry.image = image
        for name, task in task_map.items():
            if task.channels is not None:
                if image.ndim != 3 or max(task.channels) >= image.shape[0]:
                    raise SegmentationInputError(
                        f"task {name!r} uses channels {list(task.channels)} of a field shaped {image.shape}"
                    )
                selected = image[list(task.channels)]
            else:
                selected = image
            selected = _as_field(selected, len(task.channel_models))
            entry.prepared[name] = prepare_field(selected, plans[name])
    except Exception as error:  # noqa: BLE001 - one unreadable field does not stop the plate
        entry.error = error
        entry.prepared.clear()
    entry.timings["prepare"] = time.perf_counter() - tic
    return entry


def _run_networks(
    entries: list[_Entry],
    plans: dict[str, ChannelPlan],
    *,
    channels_last: bool | None,
    precision: str,
    checkpoint: Callable[[], None] | None = None,
) -> None:
    """One batched pass per task; if the batch fails, each field alone, so only bad ones fail.
    ``checkpoint`` runs after each network pass (stage reports; raises to stop the engine)."""
    tic = time.perf_counter()
    try:
        for name, plan in plans.items():
            forward_fields(
                [e.prepared[name] for e in entries],
                plan,
                channels_last=channels_last,
                precision=precision,
                checkpoint=checkpoint,
            )
    except Exception as error:  # noqa: BLE001 - kept on the field that caused it
        if len(entries) == 1:
            entries[0].error = error
            return
        for entry in entries:
            _run_networks([entry], plans, channels_last=channels_last, precision=precision, checkpoint=checkpoint)
        return
    share = (time.perf_counter() - tic) / len(entries)
    for entry in entries:
        entry.timings["maps"] = share


def _finish_entry(
    entry: _Entry,
    task_map: dict[str, SegmentTask],
    plans: dict[str, ChannelPlan],
    mask_device,
    on_task: Callable[[int], None] | None = None,
) -> FieldOutcome:
    outcome = FieldOutcome(entry.index, entry.key, entry.image, error=entry.error, timings=dict(entry.timings))
    if entry.error is not None:
        return outcome
    try:
        for name, task in task_map.items():
            timings: dict[str, float] = {}
            tic = time.perf_counter()
            channel_maps = finish_field(entry.prepared[name], plans[name])
            timings["finish"] = time.perf_counter() - tic
            outcome.results[name] = _masks_from_channel_maps(
                channel_maps,
                task.channel_models,
                method=task.method,
                flow_threshold=task.flow_threshold,
                cellprob_threshold=task.cellprob_threshold,
                min_size=task.min_size,
                weights=task.weights,
                fusion_params=task.fusion_params,
                mask_device=mask_device,
                timings=timings,
                fusion=task.fusion,
            )
            for stage, seconds in timings.items():
                outcome.timings[stage] = outcome.timings.get(stage, 0.0) + seconds
            if on_task is not None:
                on_task(len(outcome.results))
    except Exception as error:  # noqa: BLE001 - one failed field does not stop the plate
        outcome.results.clear()
        outcome.error = error
    entry.prepared.clear()  # the padded inputs and raw outputs are no longer needed
    outcome.timings["total"] = sum(v for k, v in outcome.timings.items() if k != "total")
    return outcome
