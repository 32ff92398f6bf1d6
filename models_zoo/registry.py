"""The registry of base models: shipped cards, the local Cellpose model folder, admin uploads.

Nothing here downloads. Weights are resolved to a file on disk and verified by sha256 before a
job uses them; a missing file is a clear error, never a trigger for Cellpose's downloader (which
also turns off TLS verification for the whole process). This module does not import torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.science.hashing import file_sha256

ZOO_DIR = Path(__file__).resolve().parent
CARDS_DIR = ZOO_DIR / "cards"
WEIGHTS_DIR = ZOO_DIR / "weights"

#: Names of Cellpose 3's built-in CPnet models and the diameter their objects were rescaled to.
CELLPOSE_BUILTINS = {
    "cyto3": 30.0,
    "cyto2": 30.0,
    "cyto": 30.0,
    "nuclei": 17.0,
    "tissuenet_cp3": 30.0,
    "livecell_cp3": 30.0,
    "yeast_PhC_cp3": 30.0,
    "yeast_BF_cp3": 30.0,
    "bact_phase_cp3": 30.0,
    "bact_fluor_cp3": 30.0,
    "deepbacs_cp3": 30.0,
    "cyto2_cp3": 30.0,
}
_CELLPOSE_FILE_SUFFIX = {"cyto": "torch_0", "cyto2": "torch_0", "nuclei": "torch_0"}


class BaseModelMissing(FileNotFoundError):
    pass


class BaseModelIntegrityError(ValueError):
    pass


@dataclass(frozen=True)
class BaseModelEntry:
    name: str
    source: str  # shipped | cellpose | upload
    weights_path: Path
    weights_sha256: str
    card: dict[str, Any]


sha256_of = file_sha256


def shipped_base_models() -> list[BaseModelEntry]:
    """Base models shipped in this package (cards/*.json with weights/<stem>.safetensors)."""
    entries: list[BaseModelEntry] = []
    for card_path in sorted(CARDS_DIR.glob("*.json")):
        card = json.loads(card_path.read_text())
        weights = WEIGHTS_DIR / f"{card_path.stem}.safetensors"
        if not weights.is_file() or not card.get("weights_sha256"):
            continue
        entries.append(
            BaseModelEntry(
                name=f"{card['name']}:{card['version']}",
                source="shipped",
                weights_path=weights,
                weights_sha256=card["weights_sha256"],
                card=card,
            )
        )
    return entries


def cellpose_models_dir() -> Path:
    """Where Cellpose keeps its weights: CELLPOSE_LOCAL_MODELS_PATH, else ~/.cellpose/models."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def cellpose_local_models() -> list[BaseModelEntry]:
    """Cellpose CPnet weights already on this machine (e.g. cyto3 placed there by the user)."""
    folder = cellpose_models_dir()
    entries: list[BaseModelEntry] = []
    if not folder.is_dir():
        return entries
    for name, diam_mean in CELLPOSE_BUILTINS.items():
        path = folder / f"{name}{_CELLPOSE_FILE_SUFFIX.get(name, '')}"
        if not path.is_file():
            continue
        card = {
            "name": f"cellpose-{name}",
            "version": "local",
            "diam_mean": diam_mean,
            "diameter": diam_mean,
            "format": "cellpose-state-dict",
            "architecture": {"type": "cellpose-cpnet", "widths": [32, 64, 128, 256], "nchan": 2, "nout": 3},
            "source": str(path),
        }
        entries.append(
            BaseModelEntry(
                name=f"cellpose:{name}", source="cellpose", weights_path=path, weights_sha256=sha256_of(path), card=card
            )
        )
    return entries


def verify(path: Path, expected_sha256: str) -> Path:
    if not path.is_file():
        raise BaseModelMissing(f"the weights file {path.name} is not on this machine")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise BaseModelIntegrityError(
            f"the weights file {path.name} does not match its recorded sha256 "
            f"({actual[:12]}… instead of {expected_sha256[:12]}…); it may be corrupt or replaced"
        )
    return path


def safetensors_header(data: bytes) -> dict[str, Any]:
    """Parse a safetensors header without torch (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("the file is too short to be a safetensors file")
    length = int.from_bytes(data[:8], "little")
    if length <= 1 or length > min(len(data) - 8, 100_000_000):
        raise ValueError("the file is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("the file is not a safetensors file (unreadable header)") from exc
    if not isinstance(header, dict):
        raise ValueError("the file is not a safetensors file (header is not an object)")
    return header


def check_cpnet_safetensors(data: bytes) -> dict[str, Any]:
    """Light check that uploaded bytes hold a CPnet state dict; exact keys are checked at load."""
    header = safetensors_header(data)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise ValueError("the safetensors file holds no tensors")
    for prefix in ("downsample.", "upsample.", "output."):
        if not any(k.startswith(prefix) for k in tensors):
            raise ValueError(f"the weights are not a Cellpose CPnet: no '{prefix}*' tensors")
    for name, info in tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in ("F32", "F16", "BF16", "I64"):
            raise ValueError(f"tensor {name!r} has an unsupported dtype")
    return header
