"""Content-addressed blob store and per-job folders under the data directory.

Blobs are named by the sha256 of their bytes (``blobs/ab/cd/abcd…``), written to a temporary file
in the same folder, flushed to disk and renamed into place: a crash or a full disk never leaves a
blob under its final name with the wrong content. A job writes only under ``jobs/<job id>/``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.science.hashing import file_sha256

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Names of files inside a job folder: letters, digits, '.', '_', '-' and at most one level of '/'.
_RESULT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}(/[A-Za-z0-9_.-]{1,100})?$")


class StorageError(OSError):
    """The data directory cannot take the write (full, read-only, missing)."""


class BlobNotFound(KeyError):
    pass


class UploadTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the upload is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    path: Path


def _storage_error(exc: OSError, where: Path) -> StorageError:
    # Messages reach API clients and job records: they name no server path (the log does).
    log.error("data directory write failed under %s: %s", where, exc)
    if exc.errno == errno.ENOSPC:
        return StorageError(errno.ENOSPC, "the data directory is full; free space and retry")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(exc.errno, "the data directory is not writable; ask an administrator")
    return StorageError(exc.errno, f"could not write to the data directory ({exc.strerror})")


def disk_full_error(exc: BaseException) -> StorageError | None:
    """The StorageError a database error stands for when the database's disk is full (SQLite)."""
    text = str(getattr(exc, "orig", exc)).lower()
    if "disk is full" in text or "no space left" in text or "could not extend file" in text:
        return StorageError(errno.ENOSPC, "the data directory is full; free space and retry")
    return None


def is_sha256(value: str) -> bool:
    return bool(_SHA256.fullmatch(value))


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise BlobNotFound(sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and self.path_for(sha256).is_file()

    def put_bytes(self, data: bytes) -> StoredBlob:
        return self.put_stream(_iter_bytes(data))

    def put_file(self, stream: BinaryIO, max_bytes: int | None = None) -> StoredBlob:
        return self.put_stream(iter(lambda: stream.read(CHUNK), b""), max_bytes=max_bytes)

    def put_stream(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> StoredBlob:
        tmp_dir = self.root / "tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        except OSError as exc:
            raise _storage_error(exc, self.root) from exc
        tmp_path = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path_for(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_file() and final.stat().st_size == size:
                tmp_path.unlink()  # already stored: same name means same content
            else:
                os.replace(tmp_path, final)
            return StoredBlob(sha256=sha, size_bytes=size, path=final)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            raise _storage_error(exc, self.root) from exc
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def clean_tmp(self, older_than_s: float) -> int:
        """Remove temporary files of writes that never finished (a killed process); -> files removed.

        Only files older than ``older_than_s`` go: a younger one may be a write in progress.
        """
        tmp_dir = self.root / "tmp"
        removed = 0
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(tmp_dir))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue  # gone already, or not ours to remove
        if removed:
            log.info("removed %d leftover temporary file(s) from %s", removed, tmp_dir)
        return removed

    def read_bytes(self, sha256: str) -> bytes:
        path = self.path_for(sha256)
        if not path.is_file():
            raise BlobNotFound(sha256)
        return path.read_bytes()

    def verify(self, sha256: str) -> bool:
        """True when the stored bytes still hash to their name."""
        return file_sha256(self.path_for(sha256)) == sha256


def _iter_bytes(data: bytes) -> Iterable[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
    if not data:
        yield b""


def check_result_name(name: str) -> str:
    """Refuse anything that could escape a job folder."""
    # fullmatch: '$' alone would let a trailing newline through; '.' and '..' name folders, not files.
    if not _RESULT_NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"not a valid result name: {name!r}")
    return name


class JobFolder:
    """The only place a job writes. Files land atomically (temporary name, then rename)."""

    def __init__(self, jobs_root: Path, job_id: str):
        if not re.fullmatch(r"[0-9a-f-]{36}", job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        self.path = Path(jobs_root) / job_id

    def file(self, name: str) -> Path:
        return self.path / check_result_name(name)

    def write_bytes(self, name: str, data: bytes) -> tuple[Path, str]:
        target = self.file(name)
        tmp = target.with_name(f".{target.name}.partial")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            # A full disk must not leave a half-written file behind (nor fill it further).
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise _storage_error(exc, self.path) from exc
        return target, hashlib.sha256(data).hexdigest()

    def clear(self) -> None:
        """A re-run starts from an empty folder, so no file of a killed attempt survives."""
        shutil.rmtree(self.path, ignore_errors=True)
