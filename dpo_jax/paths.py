"""One path type for every run-directory and data file: local paths and bucket URLs.

`as_path(p)` is an `etils.epath.Path`. Local paths go through the OS; `gs://` (and
`s3://`, `az://`) URLs go through fsspec (`pip install 'dpo_jax[gcs]'` brings gcsfs and
google-cloud-storage). Orbax takes the same paths; it writes a checkpoint's arrays
through tensorstore's own GCS driver and its small files through epath.

An object store is not a disk in three ways, absorbed here so callers write one code
path:
- no rename into place: `write_atomic` uploads the object in one request (an object
  write is atomic: readers see the old or the new object), a disk gets temp + rename;
- no append: `AppendFile` rewrites the whole object at each flush;
- no free-space query: `free_bytes` is None.
Libraries that read or write only local files (transformers, safetensors) get a local
copy (`local_copy`) or a local staging directory uploaded after (`staged_dir`).
"""

from __future__ import annotations

import contextlib
import glob as globlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping

import numpy as np
from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

_MAGIC = "*?["


def is_url(path: PathLike) -> bool:
    """Whether `path` names an object store (``gs://...``) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """The path as an `epath.Path`: local paths made absolute, URLs kept as they are."""
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(text))


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Replace the file at `path` with `data`; a kill leaves the old or the new content."""
    data = data.encode() if isinstance(data, str) else data
    path = as_path(path)
    if is_url(path):
        path.write_bytes(data)  # one object upload: atomic on object stores
        return
    # Unique even across hosts writing to a shared disk.
    tmp = path.with_name(f"{path.name}.tmp.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """`np.savez` of `arrays` to `path`, atomically (see `write_atomic`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read into memory."""
    source = io.BytesIO(as_path(path).read_bytes()) if is_url(path) else os.fspath(path)
    with np.load(source) as z:
        return {name: z[name] for name in z.files}


def glob(pattern: PathLike) -> list[str]:
    """Sorted matches of a glob (``**`` recursive); local patterns expand ``~``."""
    text = os.fspath(pattern)
    if not is_url(text):
        return sorted(globlib.glob(os.path.expanduser(text), recursive=True))
    if not any(c in text for c in _MAGIC):
        return [text] if epath.Path(text).exists() else []
    # fsspec directly: epath refuses `**` on buckets.
    import fsspec

    scheme = text.split("://", 1)[0]
    fs, _ = fsspec.core.url_to_fs(text)
    return sorted(f"{scheme}://{p}" for p in fs.glob(text))


def free_bytes(path: PathLike) -> int | None:
    """Free space of the file system holding `path`; None for object stores (no such thing)."""
    if is_url(path):
        return None
    try:
        return shutil.disk_usage(os.fspath(path)).free
    except OSError:
        return 0


def size(path: PathLike) -> int:
    """Size of one file in bytes."""
    if is_url(path):
        return int(as_path(path).stat().length)
    return os.path.getsize(os.fspath(path))  # epath's local stat also looks up the owner


def tree_bytes(path: PathLike) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    path = as_path(path)
    if not path.exists():
        return 0
    if is_url(path):
        import fsspec  # epath has no recursive listing for buckets

        fs, root = fsspec.core.url_to_fs(os.fspath(path))
        return int(fs.du(root, total=True))
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local directory with the files directly under `path` (itself when local)."""
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as local:
        for p in as_path(path).iterdir():
            if p.is_file():
                p.copy(epath.Path(local) / p.name)
        yield local


@contextlib.contextmanager
def staged_dir(path: PathLike) -> Iterator[str]:
    """A local directory whose files end up under `path` (itself when local).

    For writers that only know local files: what they leave there is uploaded when the
    block exits without an error.
    """
    if not is_url(path):
        os.makedirs(os.fspath(path), exist_ok=True)
        yield os.fspath(path)
        return
    target = as_path(path)
    with tempfile.TemporaryDirectory() as local:
        yield local
        target.mkdir(parents=True, exist_ok=True)
        for root, _, files in os.walk(local):
            rel = os.path.relpath(root, local)
            dest = target if rel == "." else target / rel
            for name in files:
                dest.mkdir(parents=True, exist_ok=True)
                epath.Path(root, name).copy(dest / name, overwrite=True)


class AppendFile:
    """A file only ever appended to, flushed on request (metrics, event files).

    Locally an append-mode file. An object cannot be appended to, so on a bucket the
    content is kept here and the whole object rewritten at each flush (these files are
    small: one line or record per logged step).
    """

    def __init__(self, path: PathLike):
        self.path = as_path(path)
        self._remote = is_url(self.path)
        if self._remote:
            self._data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._dirty = False
        else:
            self._file = open(os.fspath(self.path), "ab")  # noqa: SIM115 - closed by close()

    def write(self, data: bytes | str, flush: bool = True) -> None:
        """Append `data` (text is UTF-8 encoded); flush unless told not to."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        if self._remote:
            self._data += data
            self._dirty = True
        else:
            self._file.write(data)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Make what was written visible to readers of the path."""
        if not self._remote:
            self._file.flush()
        elif self._dirty:
            self.path.write_bytes(bytes(self._data))
            self._dirty = False

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if not self._remote:
            self._file.close()
