"""Reading uploads safely: bounded size, validated content, file names never used as paths.

Multipart parsing spools each file to a temporary file; uploads are validated from that file and
streamed from it into the blob store, so a request never holds its files' bytes in memory.
"""

from __future__ import annotations

import os
import re

from fastapi import UploadFile

from app.api.errors import Problem

CHUNK = 1 << 20


def upload_size(upload: UploadFile, max_bytes: int) -> int:
    """The upload's size (from its spooled file, nothing read), refusing empty and oversized files."""
    upload.file.seek(0, os.SEEK_END)
    total = upload.file.tell()
    upload.file.seek(0)
    if total > max_bytes:
        raise Problem(
            413,
            f"{display_name(upload.filename)} is larger than the upload limit of {max_bytes} bytes",
            slug="upload-too-large",
            limit_bytes=max_bytes,
        )
    if total == 0:
        raise Problem(422, f"{display_name(upload.filename)} is empty", slug="empty-upload")
    return total


class _SpooledSource:
    """The spooled file of an upload as tifffile can open it (it wants a path-like ``name``)."""

    name = "upload.tif"

    def __init__(self, file):
        self._file = file

    def __getattr__(self, attr):
        return getattr(self._file, attr)


def upload_source(upload: UploadFile) -> _SpooledSource:
    """The upload's file, rewound, for readers that take a binary file object."""
    upload.file.seek(0)
    return _SpooledSource(upload.file)


def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refusing more than ``max_bytes`` before reading any."""
    upload_size(upload, max_bytes)
    return upload.file.read()


def display_name(filename: str | None) -> str:
    """A file name fit for messages and records: no directories, no control characters."""
    if not filename:
        return "the uploaded file"
    name = re.split(r"[\\/]", filename)[-1]
    name = re.sub(r"[^\w .()+-]", "_", name)[:200]
    return name or "the uploaded file"
