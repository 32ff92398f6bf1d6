"""Unpacking an uploaded, zipped OME-Zarr plate safely (API validation and the worker share it).

Refused: members with absolute paths, '..', drive letters or links; more than ``max_members`` files;
more than ``max_bytes`` once unpacked (checked while writing, not from the zip's own headers).
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20


class ZipPlateError(ValueError):
    pass


def unpack(zip_path: Path, target: Path, *, max_bytes: int, max_members: int = 200_000) -> None:
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise ZipPlateError("the plate upload is not a zip file") from exc
    with archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise ZipPlateError(f"the zip holds {len(members)} entries, more than {max_members}")
        written = 0
        target.mkdir(parents=True, exist_ok=True)
        for info in members:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise ZipPlateError(f"zip entry {info.filename!r} points outside the plate")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ZipPlateError(f"zip entry {info.filename!r} is a link; links are not accepted")
            out = target.joinpath(*name.parts)
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, out.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ZipPlateError(f"the plate is larger than {max_bytes} bytes once unpacked")
                    dst.write(chunk)


def find_plate_root(folder: Path) -> Path:
    """The shallowest folder whose group metadata holds 'plate' (zarr v2 .zattrs or v3 zarr.json)."""
    import json

    candidates = sorted(
        [p.parent for p in folder.rglob(".zattrs")] + [p.parent for p in folder.rglob("zarr.json")],
        key=lambda p: len(p.parts),
    )
    for candidate in candidates:
        for meta in (candidate / ".zattrs", candidate / "zarr.json"):
            if not meta.is_file():
                continue
            try:
                attrs = json.loads(meta.read_text())
            except (ValueError, OSError):
                continue
            attrs = attrs.get("attributes", attrs) if meta.name == "zarr.json" else attrs
            if "plate" in attrs or "plate" in (attrs.get("ome") or {}):
                return candidate
    raise ZipPlateError("the zip holds no OME-Zarr plate (no group with 'plate' metadata)")


def zip_folder(folder: Path, out: Path) -> None:
    """Zip a plate folder (stored, not compressed: zarr chunks are compressed already)."""
    tmp = out.with_name(f".{out.name}.partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.endswith(".partial"):
                archive.write(path, str(PurePosixPath(folder.name, *path.relative_to(folder).parts)))
    tmp.replace(out)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
