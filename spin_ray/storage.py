"""Run storage through fsspec (local disk, s3://, gs://, memory://): atomic writes, fresh listings, logs, a probe.

Object stores have no rename and no append, and their clients cache directory listings per process
(s3fs, gcsfs): a listing that decides what is done must not come from another moment's cache. So:
a file is written whole in one PUT (locally: a temp file beside it, then a rename), never appended
to on an object store (`JsonLines` rewrites the object), and every listing and read here drops the
client's cached listing of that folder first.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

# The fsspec implementation each bucket protocol needs, and the extra that installs it.
PROTOCOL_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class StorageError(RuntimeError):
    """Run storage that cannot be used: the message is one line naming the URL, bucket or package."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a URL; a missing fsspec implementation is a StorageError naming the extra."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package, extra = PROTOCOL_EXTRAS.get(protocol(url), (f"an fsspec implementation of {protocol(url)}://", None))
        hint = f"pip install 'spin_ray[{extra}]'" if extra else f"install {package}"
        raise StorageError(f"{url}: {protocol(url)}:// storage needs the {package} package ({hint})") from None
    except ValueError as error:
        raise StorageError(f"{url}: not a storage URL fsspec knows ({error})") from None


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Forget the client's cached listing of `path` and its folder, so the next call asks the store."""
    fs.invalidate_cache(path)
    fs.invalidate_cache(path.rstrip("/").rsplit("/", 1)[0])


def _as_url(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """A listed path in the form of `like`: plain for a local path given plain, else with its protocol back."""
    return path if "://" not in like else fs.unstrip_protocol(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    _fresh(fs, path)
    return fs.exists(path)


def list_dir(url: str) -> list[str]:
    """The entries directly under `url` as full URLs, from the store itself (not a cached listing); [] if absent."""
    fs, path = filesystem(url)
    _fresh(fs, path)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(_as_url(fs, name, url) for name in names if name.rstrip("/") != path.rstrip("/"))


def find_files(url: str, suffix: str = "") -> list[str]:
    """Every file under `url` (recursively) whose name ends with `suffix`, as full URLs."""
    fs, path = filesystem(url)
    _fresh(fs, path)
    return sorted(_as_url(fs, name, url) for name in fs.find(path) if name.endswith(suffix))


def read_bytes(url: str) -> bytes | None:
    fs, path = filesystem(url)
    _fresh(fs, path)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def read_json(url: str) -> dict | None:
    data = read_bytes(url)
    return None if data is None else json.loads(data)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write `data` to `url` so that no reader ever sees a partial file.

    Local paths: a temporary file beside the target, fsync, then os.replace (atomic on POSIX).
    Object stores: a single PUT only becomes visible when complete.
    """
    fs, path = filesystem(url)
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
    fs.pipe_file(path, data)
    _fresh(fs, path)


def atomic_write_json(url: str, payload: dict) -> None:
    atomic_write_bytes(url, json.dumps(payload, indent=2, sort_keys=True).encode())


def remove(url: str) -> None:
    """Delete a file or a whole folder; absent is fine."""
    fs, path = filesystem(url)
    _fresh(fs, path)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    _fresh(fs, path)


def upload_folder(local: str, url: str) -> None:
    """Copy a local folder's files to `url` (replacing what is there). Callers write their completion marker after."""
    fs, path = filesystem(url)
    remove(url)
    if isinstance(fs, LocalFileSystem):
        import shutil

        shutil.copytree(local, path)
        return
    fs.put(local.rstrip("/") + "/", path, recursive=True)
    _fresh(fs, path)


def download_folder(url: str, local: str, skip: tuple[str, ...] = ()) -> None:
    """Copy every file under `url` into the local folder `local` (created), except names ending in `skip`."""
    fs, path = filesystem(url)
    _fresh(fs, path)
    os.makedirs(local, exist_ok=True)
    for name in fs.find(path):
        if skip and name.endswith(skip):
            continue
        relative = name[len(path.rstrip("/")) + 1 :]
        target = os.path.join(local, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(name, target)


@contextlib.contextmanager
def local_copy(url: str):
    """A local path holding the file at `url` while the block runs (the file itself when it is local)."""
    if is_local(url):
        yield filesystem(url)[1]
        return
    with tempfile.TemporaryDirectory(prefix="spin-ray-") as folder:
        path = os.path.join(folder, url.rstrip("/").rsplit("/", 1)[-1])
        with open(path, "wb") as handle:
            handle.write(read_bytes(url) or b"")
        yield path


class JsonLines:
    """An append-only JSON-lines log (one writer) on any store: appended in place on a local disk, rewritten
    whole (one PUT) on an object store, which has no append (gcsfs would turn append into overwrite)."""

    def __init__(self, url: str):
        self.url = url
        self.local = is_local(url)
        self.records = read_json_lines(url)

    def keep(self, predicate) -> None:
        """Drop the records `predicate` rejects (e.g. steps after the checkpoint a run resumes from)."""
        kept = [record for record in self.records if predicate(record)]
        if len(kept) != len(self.records):
            self.records = kept
            atomic_write_bytes(self.url, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict) -> None:
        self.records.append(record)
        if not self.local:
            atomic_write_bytes(self.url, "".join(json.dumps(r) + "\n" for r in self.records).encode())
            return
        fs, path = filesystem(self.url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_json_lines(url: str) -> list[dict]:
    """The records of a JSON-lines file ([] if absent); a torn last line (a crash mid-append) is dropped."""
    data = read_bytes(url)
    if not data:
        return []
    records = []
    for line in data.decode().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def preflight(url: str) -> None:
    """Write, read back and delete a probe object under `url`: the storage exists, is reachable with these
    credentials and is writable. Any failure is one StorageError line naming the URL (and bucket)."""
    probe = join(url, f".spin_ray_probe-{uuid.uuid4().hex[:12]}")
    payload = uuid.uuid4().hex.encode()
    try:
        atomic_write_bytes(probe, payload)
        if read_bytes(probe) != payload:
            raise StorageError(f"{url}: a probe object written there read back different bytes")
        remove(probe)
    except StorageError:
        raise
    except Exception as error:  # each client raises its own types: name the cause in one line
        raise StorageError(describe_storage_error(url, error)) from None


def describe_storage_error(url: str, error: BaseException) -> str:
    """One line for a failed storage operation: which bucket or path, and what went wrong."""
    where = url
    if protocol(url) != "file":
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        where = f"bucket {bucket!r} ({url})"
    name = type(error).__name__
    text = " ".join(str(error).split()) or name
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        return (f"{where}: no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an "
                "instance role)")
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "invalid_grant" in text:
        return f"{where}: the credentials were rejected ({text})"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError") or (
            "Could not connect" in text or "Connect call failed" in text):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        return f"{where}: cannot reach the storage endpoint {endpoint} ({text})"
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return f"{where}: does not exist (create the bucket or fix run.storage_path)"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{where}: not writable with these credentials ({text})"
    return f"{where}: storage check failed: {name}: {text}"
