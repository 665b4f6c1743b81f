"""A fault-injecting HTTP proxy for tests: it stands in front of an S3 server (moto's) and answers
some requests with the faults that real object storage shows under load.

Faults, drawn per request from a seeded random generator at a rate, plus one on every ``every``-th
request whatever the draw, the kinds taking turns (so that each kind surely occurs however the
requests of a parallel job interleave), or on every request with ``always``, or with ``first_each`` on
the first request of each distinct method and path (query included), the kinds taking turns: then
every request a job makes must be retried once for it to succeed, whatever the order:

- ``slowdown``: 503 with S3's SlowDown error (throttling)
- ``internal``: 500 with S3's InternalError
- ``drop``: the connection closes without an answer; half of these after the request reached the
  server (its PUT stored, the answer lost), half before
- ``cut``: a GET answer with a body closes midway through the body

and, only with ``always``, ``echo``: 403 InvalidAccessKeyId whose message repeats the request's
access key and session token, as S3's answers about credentials can (for the tests that check
that credentials never reach an error row or a log).

``counts`` tells how many of each were injected, and ``forwarded`` how many requests went through.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from tests.local_http import LocalHTTPServer

FAULTS = ("slowdown", "internal", "drop", "cut")
ECHO = "echo"
ERROR_ANSWERS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Connection headers concern one hop; the proxy sets its own.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy(LocalHTTPServer):
    """``FaultProxy(upstream, rate=0.2, seed=1)`` faults about a fifth of the requests;
    ``FaultProxy(upstream, every=8)`` faults every 8th, slowdown, internal, drop and cut in turn;
    ``FaultProxy(upstream, always="slowdown")`` faults every one; ``methods`` limits the faults to
    requests of those HTTP methods, ``path_contains`` to requests whose path holds that text. Use as a
    context manager."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, every: int = 0, always: str | None = None,
                 methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "POST", "DELETE"), path_contains: str = "",
                 first_each: bool = False):
        if always is not None and always not in (*FAULTS, ECHO):
            raise ValueError(f"always: {always!r} is not one of {(*FAULTS, ECHO)}")
        self.upstream = urlsplit(upstream)
        self.rate = rate
        self.every = every
        self.always = always
        self.methods = methods
        self.path_contains = path_contains
        self.first_each = first_each
        self.faulted: list[tuple[str, str]] = []  # (method, path) of each first_each fault, in order
        self.counts: Counter[str] = Counter()
        self.forwarded = 0
        self._random = random.Random(seed)
        self._seen = 0
        self._turn = 0  # the kind in FAULTS that the next scheduled fault takes
        self._cut_due = False  # a scheduled cut fell on a request that was no GET: the next GET takes it
        self._lock = threading.Lock()
        self.serve(_handler(self))


    def draw(self, method: str, path: str) -> tuple[str | None, bool]:
        """The fault for the next request (None: forward it), and for a drop whether the request
        reaches the server first. Only a GET gets a ``cut``."""
        with self._lock:
            if method not in self.methods or self.path_contains not in path:
                return None, False
            if self.always is not None:
                return self.always, False
            if self.first_each:
                return self._first_of(method, path)
            reaches_server = self._random.random() < 0.5
            kinds = [f for f in FAULTS if f != "cut" or method == "GET"]
            if self._cut_due and method == "GET":
                self._cut_due = False
                return "cut", reaches_server
            self._seen += 1
            if self.every and self._seen % self.every == 0:
                scheduled = FAULTS[self._turn % len(FAULTS)]
                self._turn += 1
                if scheduled in kinds:
                    return scheduled, reaches_server
                self._cut_due = True
            fault = self._random.choice(kinds) if self._random.random() < self.rate else None
            return fault, reaches_server

    def _first_of(self, method: str, path: str) -> tuple[str | None, bool]:
        if (method, path) in self.faulted:
            return None, False
        self.faulted.append((method, path))
        kinds = [f for f in FAULTS if f != "cut" or method == "GET"]
        turn = len(self.faulted)
        # A drop reaches the server on every other turn: a PUT stored whose answer was lost.
        return kinds[turn % len(kinds)], turn % 2 == 0

    def count(self, fault: str | None) -> None:
        with self._lock:
            if fault is None:
                self.forwarded += 1
            else:
                self.counts[fault] += 1

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _hang_up(self) -> None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _echo(self) -> tuple[int, str, str]:
            credential = self.headers.get("Authorization", "").partition("Credential=")[2].split("/")[0]
            token = self.headers.get("X-Amz-Security-Token", "")
            return (403, "InvalidAccessKeyId", f"The AWS Access Key Id you provided ({credential}) with session "
                                               f"token {token} does not exist in our records.")

        def _handle(self) -> None:
            body = self._body()
            fault, reaches_server = proxy.draw(self.command, self.path)
            if fault in ERROR_ANSWERS or fault == ECHO:
                status, code, message = self._echo() if fault == ECHO else ERROR_ANSWERS[fault]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                proxy.count(fault)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)
                return
            if fault == "drop":
                if reaches_server:
                    proxy.forward(self.command, self.path, self._forward_headers(body), body).read()
                proxy.count(fault)
                self._hang_up()
                return
            answer = proxy.forward(self.command, self.path, self._forward_headers(body), body)
            data = answer.read()
            cut = fault == "cut" and len(data) >= 2
            proxy.count("cut" if cut else None)
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            # A HEAD answer tells the object's length without a body.
            length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                return
            if cut:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._hang_up()
                return
            self.wfile.write(data)

        def _forward_headers(self, body: bytes) -> dict[str, str]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            return headers

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
