"""Reading uploads safely: bounded size, validated content, file names never used as paths."""

from __future__ import annotations

import re

from fastapi import UploadFile

from app.api.errors import Problem

CHUNK = 1 << 20


def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refusing more than ``max_bytes`` before reading them all."""
    chunks, total = [], 0
    while True:
        chunk = upload.file.read(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise Problem(413, f"{display_name(upload.filename)} is larger than the upload limit of "
                          f"{max_bytes} bytes", slug="upload-too-large", limit_bytes=max_bytes)
        chunks.append(chunk)
    if total == 0:
        raise Problem(422, f"{display_name(upload.filename)} is empty", slug="empty-upload")
    return b"".join(chunks)


def display_name(filename: str | None) -> str:
    """A file name fit for messages and records: no directories, no control characters."""
    if not filename:
        return "the uploaded file"
    name = re.split(r"[\\/]", filename)[-1]
    name = re.sub(r"[^\w .()+-]", "_", name)[:200]
    return name or "the uploaded file"
