"""A loopback HTTP server for tests and benchmarks: serves a folder (a Zarr store made on the spot), counts the
requests and bytes, and can fail on purpose (5xx answers, dropped connections, truncated bodies, delays, down).

    with LoopbackServer(folder) as server:
        url = server.url + "/scroll.zarr"
        ...
        server.hits           # [Hit(path, status, nbytes), ...] in order
        server.fail(3, 500)   # the next 3 requests answer 500
        server.drop(2)        # the next 2 requests are closed without an answer
        server.down = True    # every request answers 503 until set back to False
        server.down_after = 5 # ... once 5 more chunks have been sent

Python's own ``http.server`` in a daemon thread; GET and HEAD only, no ranges, ``Content-Length`` always sent.
The faults of ``fail``, ``drop`` and ``truncate`` go to the next requests of chunks that exist (not metadata, not
missing chunks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


@dataclass(frozen=True)
class Hit:
    """One request: its path, the status answered (0: dropped or truncated) and the body bytes sent."""

    path: str
    status: int
    nbytes: int

    @property
    def is_chunk(self) -> bool:
        """Chunk data (not Zarr metadata)."""
        return self.path.rsplit("/", 1)[-1] not in METADATA_NAMES


class LoopbackServer:
    """Serve ``root`` on 127.0.0.1 (a free port); see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.hits: list[Hit] = []
        self.down = False
        self.delay_s = 0.0
        self.down_after: int | None = None
        self._faults: list[tuple[str, int]] = []  # ("status", code) | ("drop", 0) | ("truncate", 0), next first
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._answer(self, body=False)

            def do_GET(self) -> None:
                server._answer(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- faults

    def fail(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` (no body)."""
        with self._lock:
            self._faults += [("status", status)] * n

    def drop(self, n: int) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        with self._lock:
            self._faults += [("drop", 0)] * n

    def truncate(self, n: int) -> None:
        """Send the headers and half the body of the next ``n`` requests of existing files, then close."""
        with self._lock:
            self._faults += [("truncate", 0)] * n

    # ------------------------------------------------------------------------------------------- counts

    def reset(self) -> None:
        with self._lock:
            self.hits = []

    def chunk_hits(self, status: int | None = 200) -> list[Hit]:
        """Requests of chunk data (``status`` None: whatever the answer)."""
        return [h for h in self.hits if h.is_chunk and (status is None or h.status == status)]

    def chunk_bytes(self) -> int:
        """Bytes of chunk data sent in full answers."""
        return sum(h.nbytes for h in self.chunk_hits())

    # ------------------------------------------------------------------------------------------- answering

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        if self.delay_s:
            time.sleep(self.delay_s)
        file = (self.root / path.lstrip("/")).resolve()
        chunk = Hit(path, 0, 0).is_chunk and self.root in file.parents and file.is_file()
        with self._lock:
            if self.down_after is not None and self.down_after <= 0:
                self.down, self.down_after = True, None
            fault = ("status", 503) if self.down else (self._faults.pop(0) if self._faults and chunk else None)
        if fault is not None and fault[0] == "drop":
            self._record(path, 0, 0)
            handler.close_connection = True
            return
        if fault is not None and fault[0] == "status":
            self._send(handler, path, fault[1], b"", body)
            return
        if self.root not in file.parents or not file.is_file():
            self._send(handler, path, 404, b"", body)
            return
        data = file.read_bytes()
        if fault is not None and fault[0] == "truncate":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            self._record(path, 0, len(data) // 2)
            return
        self._send(handler, path, 200, data, body)

    def _send(self, handler: BaseHTTPRequestHandler, path: str, status: int, data: bytes, body: bool) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body and data:
            handler.wfile.write(data)
        self._record(path, status, len(data) if body else 0)

    def _record(self, path: str, status: int, nbytes: int) -> None:
        with self._lock:
            self.hits.append(Hit(path, status, nbytes))
            if self.down_after is not None and status == 200 and self.hits[-1].is_chunk:
                self.down_after -= 1
