"""An HTTP server on 127.0.0.1 in a thread, for the test servers (tests/hub_server.py,
tests/s3_fault_proxy.py): a free port, its URL, and start/stop as a context manager."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer:
    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        """Bind ``handler`` to a free port (call from the subclass's __init__)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
