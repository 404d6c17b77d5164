"""Atomic writes on any fsspec filesystem: a file is either absent or complete, never partial."""

from __future__ import annotations

import json
import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that no reader ever sees a partial file.

    Local paths: write a temporary file beside the target, fsync, then os.replace (atomic on
    POSIX). Object stores (s3, gs, memory): a single PUT only becomes visible when complete.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def atomic_write_json(url: str, payload: dict) -> None:
    atomic_write_bytes(url, json.dumps(payload, indent=2, sort_keys=True).encode())


def read_json(url: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())
