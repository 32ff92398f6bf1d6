"""Model files: safetensors weights with a JSON model card, exact loading, Cellpose interchange.

* ``save_model`` writes ``<stem>.safetensors`` (float32, bit-exact) and ``<stem>.json`` (the card,
  carrying the weights' sha256).
* ``load_model`` verifies the sha256, builds a CPnet of the card's widths and insists that the file's
  tensor names and shapes match the network *exactly* (Cellpose loads with ``strict=False``, which
  silently leaves missing layers random).
* ``export_cellpose`` writes a state-dict file that Cellpose 3's ``CellposeModel`` loads (full-width
  nets only); ``import_cellpose_file`` reads a user's Cellpose 3 file (``cyto3``, ``nuclei``, a
  fine-tuned model) with ``torch.load(weights_only=True)`` and infers its widths.

>>> import tempfile
>>> from app.science.backbone import build_network
>>> net = build_network((8, 16, 32, 64))
>>> card = ModelCard(name="demo", version="v1", architecture=architecture_of(net))
>>> with tempfile.TemporaryDirectory() as folder:
...     saved = save_model(net, card, folder, "demo-v1")
...     loaded, loaded_card = load_model(saved.weights_path)
>>> loaded_card.weights_sha256 == saved.sha256, loaded_card.architecture["widths"]
(True, [8, 16, 32, 64])
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.science.backbone import DEFAULT_DIAM_MEAN, FULL_WIDTHS, INPUT_CHANNELS, build_network, network_widths
from app.science.hashing import file_sha256

CARD_FORMAT = 1
ARCHITECTURE_TYPE = "cellpose-cpnet"


class WeightsError(ValueError):
    """A weights file or model card cannot be used."""


class WeightsIntegrityError(WeightsError):
    """The file's sha256 differs from the one recorded: corrupted, truncated or replaced."""


class WeightsMismatchError(WeightsError):
    """The tensors in the file do not match the network the card describes."""


class CellposeCompatibilityError(WeightsError):
    """Cellpose's own classes cannot load a network of this shape."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelCard:
    """Everything needed to rebuild, trust and use a model (stored as JSON beside the weights)."""

    name: str
    version: str
    architecture: dict[str, Any]  # {"type": "cellpose-cpnet", "widths": [...], "nchan": 2, "nout": 3}
    diam_mean: float = DEFAULT_DIAM_MEAN  # objects are rescaled to this many pixels for the network
    diameter: float = DEFAULT_DIAM_MEAN  # the diameter to give at inference (the training one)
    channels: list[str] = field(default_factory=lambda: ["reporter", "zeros"])
    reporter: str | None = None
    cell_line: str | None = None
    object: str = "cyto"  # "nuclei" or "cyto"
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=dict)
    weights_sha256: str | None = None
    parent: str | None = None  # "name:version" (or sha256) of the model fine-tuned from
    size_model: dict[str, Any] | None = None
    #: Mask thresholds tuned for this model's own maps (StarDist stores them beside its weights):
    #: {"flow_threshold": ..., "cellprob_threshold": ..., "chosen_on": "..."}; None: Cellpose's 0.4 / 0.
    thresholds: dict[str, Any] | None = None
    license: str | None = None
    attribution: str | None = None
    created_at: str = field(default_factory=_now)
    card_format: int = CARD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.architecture.get("widths", ()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False, default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict):
            raise WeightsError("a model card must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"name", "version", "architecture"} - set(data)
        if missing:
            raise WeightsError(f"model card lacks required field(s) {sorted(missing)}")
        # Fields written by a newer CellFuse are kept, not dropped.
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in known}}
        card = cls(**{k: v for k, v in data.items() if k in known and k != "extra"}, extra=extra)
        _check_architecture(card.architecture)
        return card

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise WeightsError(f"model card is not valid JSON: {error}") from error
        return cls.from_dict(data)


def _json_default(value: Any) -> Any:
    # numpy scalars and tuples from configs; anything else is a bug worth seeing.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a model card")


def _check_architecture(architecture: dict[str, Any]) -> None:
    if architecture.get("type") != ARCHITECTURE_TYPE:
        raise WeightsError(
            f"unsupported architecture type {architecture.get('type')!r}; expected {ARCHITECTURE_TYPE!r}"
        )
    widths = architecture.get("widths")
    if not isinstance(widths, (list, tuple)) or len(widths) < 2 or not all(int(w) > 0 for w in widths):
        raise WeightsError(f"architecture widths must be a list of positive integers, got {widths!r}")
    if int(architecture.get("nchan", INPUT_CHANNELS)) != INPUT_CHANNELS or int(architecture.get("nout", 3)) != 3:
        raise WeightsError("only CPnets with 2 input channels and 3 outputs are supported")


def architecture_of(net: torch.nn.Module) -> dict[str, Any]:
    """The card's architecture entry for a CPnet."""
    return {"type": ARCHITECTURE_TYPE, "widths": list(network_widths(net)), "nchan": INPUT_CHANNELS, "nout": 3}


def library_versions() -> dict[str, str]:
    """Versions that produced a model (recorded on its card)."""
    import numpy
    import safetensors
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__, "numpy": numpy.__version__, "safetensors": safetensors.__version__}
    for package in ("cellpose", "cellfuse"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


@dataclass(frozen=True)
class SavedModel:
    weights_path: Path
    card_path: Path
    sha256: str
    card: ModelCard | None = None


def save_model(
    net: torch.nn.Module,
    card: ModelCard,
    directory: str | Path,
    stem: str,
    *,
    card_directory: str | Path | None = None,
) -> SavedModel:
    """Write ``<directory>/<stem>.safetensors`` and the card as ``<card_directory or directory>/<stem>.json``.

    The card is completed with the net's architecture, diam_mean and the file's sha256 (the
    caller's card object is not modified; the saved one is returned in ``SavedModel.card``).
    """
    if not stem or any(sep in stem for sep in ("/", "\\")) or stem.startswith("."):
        raise WeightsError(f"model file stem must be a plain file name, got {stem!r}")
    directory = Path(directory)
    card_dir = Path(card_directory) if card_directory is not None else directory
    directory.mkdir(parents=True, exist_ok=True)
    card_dir.mkdir(parents=True, exist_ok=True)
    architecture = architecture_of(net)
    if card.architecture and card.widths != network_widths(net):
        raise WeightsMismatchError(f"card says widths {list(card.widths)} but the network has {architecture['widths']}")

    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in net.state_dict().items()}
    weights_path = directory / f"{stem}.safetensors"
    temporary = weights_path.with_name(f".{stem}.safetensors.tmp")
    save_file(state, str(temporary), metadata={"format": "pt", "architecture": json.dumps(architecture)})
    _readable_by_all(temporary)
    os.replace(temporary, weights_path)
    sha256 = file_sha256(weights_path)

    saved_card = dataclasses.replace(
        card,
        architecture={**card.architecture, **architecture},
        diam_mean=float(net.diam_mean.item()),
        weights_sha256=sha256,
    )
    card_path = card_dir / f"{stem}.json"
    temporary_card = card_path.with_name(f".{stem}.json.tmp")
    temporary_card.write_text(saved_card.to_json() + "\n")
    os.replace(temporary_card, card_path)
    return SavedModel(weights_path, card_path, sha256, saved_card)


def _readable_by_all(path: Path) -> None:
    """safetensors writes 0600 files; model files are shared artefacts (umask still applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def find_card(weights_path: str | Path) -> Path | None:
    """The card for a weights file: ``<stem>.json`` beside it, or in a sibling ``cards/`` folder."""
    weights_path = Path(weights_path)
    for candidate in (
        weights_path.with_suffix(".json"),
        weights_path.parent.parent / "cards" / f"{weights_path.stem}.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def infer_widths(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """CPnet widths from the shapes of its 1x1 projection convolutions."""
    widths = []
    level = 0
    while f"downsample.down.res_down_{level}.proj.1.weight" in state:
        widths.append(int(state[f"downsample.down.res_down_{level}.proj.1.weight"].shape[0]))
        level += 1
    if not widths:
        raise WeightsMismatchError(
            "the file holds no CPnet encoder tensors (downsample.down.res_down_*): not a Cellpose 3 network"
        )
    return tuple(widths)


def check_keys_exactly(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ``WeightsMismatchError`` naming missing, unexpected and misshapen tensors."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{name} {tuple(state[name].shape)} != {tuple(expected[name].shape)}"
        for name in set(expected) & set(state)
        if tuple(state[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or misshapen:

        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {show(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
        if misshapen:
            problems.append(f"{len(misshapen)} with the wrong shape: {show(misshapen)}")
        raise WeightsMismatchError(
            f"weights do not fit a CPnet with widths {list(network_widths(net))}: " + "; ".join(problems)
        )


def _network_from_state(
    state: dict[str, torch.Tensor], widths: tuple[int, ...] | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    inferred = infer_widths(state)
    if widths is not None and tuple(widths) != inferred:
        raise WeightsMismatchError(f"the card says widths {list(widths)} but the file holds widths {list(inferred)}")
    diam_mean = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else DEFAULT_DIAM_MEAN
    net = build_network(inferred, diam_mean=diam_mean, device=device)
    check_keys_exactly(net, state)
    net.load_state_dict(state, strict=True)
    net.eval()
    return net


def load_model(
    weights_path: str | Path,
    *,
    card: ModelCard | None = None,
    expected_sha256: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, ModelCard]:
    """Load a safetensors CPnet, verifying its sha256 (``expected_sha256`` or the card's) and keys.

    The tensors are read straight onto ``device`` (default the CPU) and the net is built there.

    Without ``card`` the card file beside the weights (or in ``../cards/``) is read; a file with
    no card gets a minimal one inferred from its tensors (name = file stem, version "unknown").
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(f"weights file {weights_path} does not exist")
    if card is None:
        card_path = find_card(weights_path)
        if card_path is not None:
            card = ModelCard.from_json(card_path.read_text())
    sha256 = file_sha256(weights_path)
    for expected, source in (
        (expected_sha256, "the expected sha256"),
        (card.weights_sha256 if card else None, "its card"),
    ):
        if expected is not None and expected.lower() != sha256:
            raise WeightsIntegrityError(
                f"{weights_path.name} has sha256 {sha256} but {source} says {expected}: the file is corrupted "
                "or was replaced; restore it from the model zoo or re-register the model"
            )
    try:
        state = load_file(str(weights_path), device=str(torch.device(device or "cpu")))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{weights_path.name} is not a readable safetensors file: {error}") from error
    net = _network_from_state(state, card.widths if card is not None else None, device)
    if card is None:
        card = ModelCard(
            name=weights_path.stem,
            version="unknown",
            architecture=architecture_of(net),
            diam_mean=float(net.diam_mean.item()),
            diameter=float(net.diam_labels.item()),
            weights_sha256=sha256,
        )
    elif abs(float(net.diam_mean.item()) - float(card.diam_mean)) > 1e-4:
        raise WeightsMismatchError(
            f"card diam_mean {card.diam_mean} differs from the weights' {float(net.diam_mean.item())}"
        )
    return net, card


def export_cellpose(net: torch.nn.Module, path: str | Path) -> Path:
    """Write a Cellpose 3 model file (``torch.save`` of the state dict) that ``CellposeModel`` loads.

    Only full-width CPnets (32, 64, 128, 256) fit Cellpose's classes, which hard-code those widths.
    """
    widths = network_widths(net)
    if widths != FULL_WIDTHS:
        raise CellposeCompatibilityError(
            f"Cellpose 3 can only load full-width CPnets {list(FULL_WIDTHS)}; this network has widths {list(widths)}. "
            "Use CellFuse's safetensors file for it, or fine-tune a full-width base for a Cellpose export."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in net.state_dict().items()}
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(state, temporary)
    _readable_by_all(temporary)
    os.replace(temporary, path)
    return path


def import_cellpose_file(path: str | Path, *, device: torch.device | str | None = None) -> torch.nn.Module:
    """A CPnet from a Cellpose 3 model file (e.g. ``cyto3``), widths inferred from its tensors, on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Cellpose model file {path} does not exist")
    try:
        state = torch.load(path, map_location=torch.device(device or "cpu"), weights_only=True)
    except Exception as error:  # torch raises many types for foreign or unsafe files
        raise WeightsError(
            f"{path.name} is not a Cellpose 3 weights file loadable without pickled code: {error}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name} does not hold a state dict of tensors")
    if "W2" in state:
        raise CellposeCompatibilityError(
            f"{path.name} is a Cellpose 4 (Cellpose-SAM) model; CellFuse uses Cellpose 3 CPnets"
        )
    return _network_from_state(state, device=device)
