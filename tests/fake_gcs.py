"""An in-memory `gs://` for tests: one store, reached the two ways production reaches GCS.

- epath / fsspec (everything `dpo_jax.paths` does, and Orbax's small files): the
  `gs` protocol is an fsspec `MemoryFileSystem` with its own store.
- tensorstore (Orbax's arrays): its native `gcs` driver talks HTTP to the GCS JSON API;
  `TENSORSTORE_GCS_HTTP_URL` points it at a loopback server here that serves the same
  store (objects, generations and the conditional-write preconditions tensorstore uses).

Nothing leaves the machine. One piece of Google's SDK is stubbed: Orbax asks the
`google-cloud-storage` client whether a bucket has a hierarchical namespace; the stub
answers "flat bucket" (the GCS default).
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import threading
import types
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

BUCKET = "dpo-jax-test-bucket"


class BucketFS(MemoryFileSystem):
    """fsspec's memory file system under the `gs://` protocol, keys `bucket/path` like gcsfs."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict[str, Any] = {}  # not MemoryFileSystem's global store
    pseudo_dirs = [""]

    # Like GCS (and gcsfs), directories are only prefixes of objects: making one stores
    # nothing, an empty one does not exist, and listing a missing one is an error.
    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        pass

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        pass

    def rmdir(self, path: Any) -> None:
        pass

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.strip("/")


_lock = threading.Lock()
_generations: dict[str, tuple[Any, int]] = {}
_counter = itertools.count(1)


def _generation(key: str) -> int | None:
    """GCS generation of an object: a new number whenever its content object changed."""
    f = BucketFS.store.get(key)
    if f is None:
        return None
    seen = _generations.get(key)
    if seen is None or seen[0] is not f:
        seen = (f, next(_counter))
        _generations[key] = seen
    return seen[1]


def _metadata(bucket: str, name: str) -> dict[str, Any]:
    key = f"{bucket}/{name}"
    return {
        "kind": "storage#object",
        "bucket": bucket,
        "name": name,
        "generation": str(_generation(key)),
        "metageneration": "1",
        "size": str(len(BucketFS.store[key].getvalue())),
        "timeCreated": "2026-01-01T00:00:00.000Z",
        "updated": "2026-01-01T00:00:00.000Z",
    }


class _GcsJsonApi(http.server.BaseHTTPRequestHandler):
    """The part of the GCS JSON API tensorstore's `gcs` kvstore driver uses."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: tuple = ()) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj).encode(), (("Content-Type", "application/json"),))

    def _route(self) -> tuple[str, str | None, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        # /storage/v1/b/<bucket>/o[/<object>] or /upload/storage/v1/b/<bucket>/o
        parts = url.path.split("/")
        at = parts.index("b")
        bucket = urllib.parse.unquote(parts[at + 1])
        rest = parts[at + 3 :]
        name = urllib.parse.unquote("/".join(rest)) if rest else None
        return bucket, name, query

    def _precondition_fails(self, query: dict[str, str], generation: int | None) -> bool:
        if "ifGenerationMatch" in query:
            want = int(query["ifGenerationMatch"])
            return generation is not None if want == 0 else generation != want
        return False

    def do_GET(self) -> None:
        bucket, name, query = self._route()
        with _lock:
            if name is None:  # list
                prefix = query.get("prefix", "")
                start, end = query.get("startOffset"), query.get("endOffset")
                names = sorted(
                    k[len(bucket) + 1 :] for k in BucketFS.store if k.startswith(bucket + "/")
                )
                items = [
                    _metadata(bucket, n)
                    for n in names
                    if n.startswith(prefix)
                    and (start is None or n >= start)
                    and (end is None or n < end)
                ]
                return self._json({"kind": "storage#objects", "items": items})
            key = f"{bucket}/{name}"
            generation = _generation(key)
            if self._precondition_fails(query, generation):
                return self._send(412)
            if query.get("ifGenerationMatch") == "0":
                return self._send(204)
            if generation is None:
                return self._send(404)
            if query.get("ifGenerationNotMatch") == str(generation):
                return self._send(304)
            if query.get("alt") != "media":
                return self._json(_metadata(bucket, name))
            data = BucketFS.store[key].getvalue()
        headers = (
            ("Content-Type", "application/octet-stream"),
            ("x-goog-generation", str(generation)),
            ("x-goog-metageneration", "1"),
        )
        byte_range = self.headers.get("Range")
        if not byte_range:
            return self._send(200, data, headers)
        first, last = byte_range.split("=", 1)[1].split("-")
        lo = int(first)
        hi = int(last) if last else len(data) - 1
        if lo >= len(data) > 0:
            return self._send(416, b"", headers)
        body = data[lo : hi + 1]
        span = (("Content-Range", f"bytes {lo}-{lo + len(body) - 1}/{len(data)}"),)
        return self._send(206, body, headers + span)

    def do_POST(self) -> None:
        bucket, _, query = self._route()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        name = query["name"]
        key = f"{bucket}/{name}"
        with _lock:
            if self._precondition_fails(query, _generation(key)):
                return self._send(412)
            with BucketFS().open(key, "wb") as f:
                f.write(body)
            meta = _metadata(bucket, name)
        self._json(meta)

    def do_DELETE(self) -> None:
        bucket, name, query = self._route()
        key = f"{bucket}/{name}"
        with _lock:
            generation = _generation(key)
            if generation is None:
                return self._send(404)
            if self._precondition_fails(query, generation):
                return self._send(412)
            BucketFS.store.pop(key, None)
        self._send(204)


_server: http.server.ThreadingHTTPServer | None = None


def _start_server() -> str:
    # One server per process: tensorstore may read its endpoint once.
    global _server
    if _server is None:
        _server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GcsJsonApi)
        _server.daemon_threads = True
        threading.Thread(target=_server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{_server.server_address[1]}"


@contextlib.contextmanager
def fake_gcs(monkeypatch: Any) -> Iterator[type[BucketFS]]:
    """`gs://` served from memory for the duration of the block (an empty store)."""
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    url = _start_server()
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
    monkeypatch.setattr(
        gcs_utils,
        "get_bucket",
        lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False),
    )
    from fsspec.registry import _registry  # test-only: put the registry back as it was

    previous = {p: _registry.get(p) for p in ("gs", "gcs")}
    for p in previous:
        fsspec.register_implementation(p, BucketFS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    BucketFS.store.clear()
    BucketFS.pseudo_dirs[:] = [""]
    try:
        yield BucketFS
    finally:
        BucketFS.store.clear()
        for p, cls in previous.items():
            if cls is None:
                _registry.pop(p, None)
            else:
                _registry[p] = cls
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
