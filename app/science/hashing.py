"""One way to hash a file's bytes, used for blobs, weights and shipped models alike.

>>> import tempfile, os
>>> with tempfile.NamedTemporaryFile(delete=False) as f:
...     _ = f.write(b"abc")
>>> file_sha256(f.name)[:16]
'ba7816bf8f01cfea'
>>> os.unlink(f.name)
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights and plates can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
