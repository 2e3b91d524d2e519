"""A local Google Cloud Storage emulator, so that `gs://` paths are testable offline.

Run as a script (`python tests/gcs_emulator.py PORT PARENT_PID`) this module is the
launcher: it serves an in-memory bucket named `bucket` on 127.0.0.1:PORT with
`gcp-storage-emulator` until stopped or orphaned, patched in five ways:

- a `moveTo` route (gcsfs renames objects with it; without it every rename waits
  ~33 s for retries before gcsfs falls back to copy + delete);
- the `x-goog-generation` header on downloads (tensorstore takes a read's generation
  from it; without it a read-modify-write, such as an OCDBT manifest update, fails
  with "Malformed StorageGeneration");
- multipart uploads read byte for byte (the emulator's email parser dropped a final `\r`
  of binary content);
- a listen backlog of 128 instead of 5 (tensorstore opens many connections at once);
- a request counter: `GET /_count` answers `{"total": n, "by_method": {...}}` and
  `POST /_reset` zeroes it, so benchmarks can count what a call costs in requests.

Imported, it gives the pytest fixtures `gcs_bucket` (one emulator per session, started
on first use) and `gcs_dir` (a fresh `gs://bucket/<unique>` per test), and
`emulator_environment()`: the variables that point every client at the emulator's port,
chosen on first call. `tests/conftest.py` exports them before anything imports fsspec
(which reads `FSSPEC_*` variables once, on import) or gcsfs; subprocesses inherit them.

The emulator ignores generation preconditions (`ifGenerationMatch=0` succeeds where GCS
answers 412), so nothing tested here may rely on them.

Example:
    ```python
    with Emulator(configure_environment()) as emulator:
        epath.Path("gs://bucket/x.txt").write_text("hi")
        assert emulator.request_count() >= 1
    ```
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from etils import epath

__all__ = [
    "BUCKET",
    "Emulator",
    "configure_environment",
    "emulator_environment",
    "gcs_bucket",
    "gcs_dir",
]

HOST = "127.0.0.1"
BUCKET = "bucket"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
# The emulator's URL once chosen; inherited by subprocesses, so they reuse it.
URL_VARIABLE = "ARTIFEX_GCS_EMULATOR_URL"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def environment(url: str) -> dict[str, str]:
    """The variables that point gcsfs, tensorstore and google-auth at `url`, offline."""
    # A closed port: any metadata-server look-up fails at once instead of waiting.
    nowhere = f"{HOST}:{free_port()}"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
    return {
        URL_VARIABLE: url,
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
        "FSSPEC_GCS_TOKEN": "anon",
        # Otherwise gcsfs asks a gRPC endpoint for the bucket type, 60 s per retry.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": nowhere,
        "GCE_METADATA_IP": nowhere,
        "GCE_METADATA_ROOT": nowhere,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def emulator_environment() -> dict[str, str]:
    """The client settings for this process's emulator, choosing its port on first use.

    `os.environ.update(emulator_environment())` before fsspec is imported is all a
    process needs; subprocesses inherit the settings.
    """
    return environment(os.environ.get(URL_VARIABLE) or f"http://{HOST}:{free_port()}")


def configure_environment() -> str:
    """Export `emulator_environment()` and return the emulator's URL; idempotent.

    For a process that may have imported fsspec already (a benchmark run): its GCS
    token is then set in fsspec's config directly.
    """
    settings = emulator_environment()
    os.environ.update(settings)
    url = settings[URL_VARIABLE]
    if "fsspec" in sys.modules:
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    return url


class Emulator:
    """The launcher of this file run in a subprocess, serving `url`, stopped by its PID."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Never through a proxy: the emulator is on this machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and wait (at most `START_TIMEOUT_S`) until it answers."""
        # Open as long as the server runs; closed in stop().
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(self.port), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                self._call("GET", "/")
                return
            time.sleep(0.05)
        log = self.log()
        self.stop()
        raise RuntimeError(
            f"GCS emulator on {self.url} did not answer within {START_TIMEOUT_S:.0f} s; "
            f"its output:\n{log}"
        )

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers); safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def log(self) -> str:
        """What the server printed so far (its errors, for a failure message)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def request_count(self) -> int:
        """HTTP requests served since the start or the last `reset_count()`."""
        return int(self.request_counts()["total"])

    def request_counts(self) -> dict[str, Any]:
        """`{"total": n, "by_method": {"GET": .., ...}}` since the last reset."""
        return dict(json.loads(self._call("GET", "/_count")))

    def reset_count(self) -> None:
        self._call("POST", "/_reset")

    def _call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, method=method)
        with self._opener.open(request, timeout=5) as response:
            return bytes(response.read())


@pytest.fixture(scope="session")
def gcs_bucket() -> Iterator[Emulator]:
    """One emulator for the test session, serving the bucket `bucket`."""
    url = os.environ.get(URL_VARIABLE)
    if url is None:
        pytest.fail(
            "the GCS emulator is not configured: tests/conftest.py must run "
            "os.environ.update(emulator_environment()) before anything imports fsspec"
        )
    with Emulator(url) as emulator:
        yield emulator


@pytest.fixture
def gcs_dir(gcs_bucket: Emulator) -> epath.Path:
    """A fresh, empty `gs://bucket/<unique>` prefix for one test."""
    from etils import epath

    return epath.Path(f"gs://{BUCKET}/test-{uuid.uuid4().hex[:12]}")


def _multipart_upload(raw: bytes, content_type: str) -> dict[str, Any]:
    """The metadata and the exact bytes of a multipart upload. The emulator's own parser
    (Python's email parser) reads line endings into the content, and drops a final `\r`
    of binary data, where the part ends at the line break before the next delimiter (`\n`
    from gcsfs, `\r\n` from clients that follow RFC 2046)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    pieces = raw.split(b"--" + boundary.encode())[1:-1]
    crlf = pieces[0].startswith(b"\r\n")
    newline = b"\r\n" if crlf else b"\n"
    parts = []
    for piece in pieces:
        head, _, body = piece[len(newline) :].partition(newline * 2)
        if body.endswith(newline):
            body = body[: -len(newline)]
        headers = dict(
            (name.strip().lower(), value.strip())
            for line in head.decode().split(newline.decode())
            for name, _, value in [line.partition(":")]
        )
        parts.append((headers, body))
    (_, meta), (headers, content) = parts[0], parts[1]
    kind = headers.get("content-type", "application/octet-stream").split(";")[0]
    return {"meta": json.loads(meta), "content": content, "content-type": kind}


def _serve(port: int, parent: int) -> None:
    """The launcher: the patched emulator on 127.0.0.1:`port` until SIGTERM, or until
    process `parent` is gone (killed without a chance to stop it)."""
    import http.server
    import signal
    import socketserver
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def move(request: Any, response: Any, storage: Any) -> None:
        params = request.params
        try:
            moved = objects._copy(
                request.base_url,
                storage,
                params["bucket_name"],
                params["object_id"],
                params["bucket_name"],
                params["dest_object_id"],
            )
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        objects._delete(storage, params["bucket_name"], params["object_id"])
        response.json(moved)

    move_route = (
        rf"^{server.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/"
        r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
        {server.POST: move},
    )
    download = objects.download

    def download_with_generation(request: Any, response: Any, storage: Any) -> None:
        download(request, response, storage)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            params = request.params
            with contextlib.suppress(NotFound):
                stored = storage.get_file_obj(params["bucket_name"], params["object_id"])
                response["x-goog-generation"] = stored["generation"]
                response["x-goog-metageneration"] = stored["metageneration"]

    objects.download = download_with_generation  # `objects.get` with alt=media calls it
    routes = [
        (regex, {m: download_with_generation if h is download else h for m, h in methods.items()})
        for regex, methods in server.HANDLERS
    ]
    server.HANDLERS = (move_route, *routes)

    counts: Counter[str] = Counter()
    lock = threading.Lock()
    handle = server.Router.handle

    def counting_handle(router: Any, method: str) -> None:
        path = router._request_handler.path.split("?", 1)[0]
        if path in ("/_count", "/_reset"):
            with lock:
                if path == "/_reset":
                    counts.clear()
                body = json.dumps({"total": sum(counts.values()), "by_method": dict(counts)})
            reply = router._request_handler
            reply.send_response(HTTPStatus.OK)
            reply.send_header("Content-Type", "application/json")
            reply.send_header("Content-Length", str(len(body)))
            reply.end_headers()
            reply.wfile.write(body.encode())
            return
        if path != "/":  # the readiness probe is not the client's
            with lock:
                counts[method] += 1
        handle(router, method)

    server.Router.handle = counting_handle
    read_data = server._read_data

    def read_data_exactly(request_handler: Any, query: Any) -> Any:
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related"):
            return read_data(request_handler, query)
        raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
        return _multipart_upload(raw, content_type) if raw else None

    server._read_data = read_data_exactly
    http.server.HTTPServer.request_queue_size = 128
    report_error = http.server.HTTPServer.handle_error

    def handle_error(self: socketserver.BaseServer, request: Any, client_address: Any) -> None:
        # A client that hung up (a cancelled read) is no error of the server's.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            report_error(self, request, client_address)

    http.server.HTTPServer.handle_error = handle_error  # type: ignore[method-assign]
    emulator = server.create_server(HOST, port, in_memory=True, default_bucket=BUCKET)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    emulator.start()
    try:
        while not stop.wait(0.5) and os.getppid() == parent:
            pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    # Quiet: the emulator warns on every text response.
    import logging

    logging.basicConfig(level=logging.ERROR)
    _serve(int(sys.argv[1]), int(sys.argv[2]))
