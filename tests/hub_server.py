"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving model repositories from local folders
through the file API that huggingface_hub calls (point HF_ENDPOINT at ``url``):

- ``GET /api/models/ORG/NAME[/revision/REV]``: model info, with the commit (``sha``) and the files
  (``siblings``, with sizes)
- ``GET /api/models/ORG/NAME/tree/REV[/PATH]``: the recursive file listing
- ``HEAD``/``GET /ORG/NAME/resolve/REV/PATH``: a file, with the ETag, X-Repo-Commit and Content-Length
  headers that huggingface_hub reads

A revision is ``main`` or the repository's commit; anything else is 404 RevisionNotFound, and an
unknown repository 404 RepoNotFound. A gated repository lists its files to anyone but serves them
only with ``Authorization: Bearer TOKEN``: 401 GatedRepo without a token, 403 with another one (as
the Hub does). ``requests`` counts the requests by (method, repository, file path or api route);
``hold_weights_until_infos`` holds weight downloads back until that many model lookups came.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.local_http import LocalHTTPServer


@dataclass
class Repo:
    folder: Path
    commit: str
    gated: bool = False

    def files(self) -> dict[str, Path]:
        return {str(p.relative_to(self.folder)): p for p in sorted(self.folder.rglob("*")) if p.is_file()}


API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?")
TREE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)")


class HubServer(LocalHTTPServer):
    """``HubServer({"org/name": Repo(folder, commit)}, token="...")``; use as a context manager."""

    def __init__(self, repos: dict[str, Repo], token: str | None = None):
        self.repos = repos
        self.token = token
        self.requests: Counter[tuple[str, str, str]] = Counter()
        # GETs of weight files wait (at most a minute) until this many model info requests came:
        # the first download on a node is still under way when the other actors look the model up.
        self.hold_weights_until_infos = 0
        self._lock = threading.Lock()
        self.serve(_handler(self))

    def gets(self, repo: str) -> Counter[str]:
        """How many times each file of ``repo`` was downloaded (GET)."""
        return Counter({path: n for (method, name, path), n in self.requests.items()
                        if method == "GET" and name == repo and not path.startswith("/api")} )



def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": message})

        def _repo(self, name: str, revision: str | None) -> Repo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif revision not in (None, "main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo

        def _handle(self) -> None:
            path = unquote(urlsplit(self.path).path)
            routes = (("tree", TREE), ("info", API), ("file", RESOLVE))
            kind, match = next(((k, m) for k, pattern in routes if (m := pattern.fullmatch(path))), (None, None))
            if match is None:
                self._error(404, "EntryNotFound", "no such route")
                return
            name = match["repo"]
            with hub._lock:
                hub.requests[(self.command, name, match["path"] if kind == "file" else f"/api/{kind}")] += 1
            repo = self._repo(name, match["revision"])
            if repo is None:
                return
            files = repo.files()
            if kind == "info":
                siblings = [{"rfilename": f, "size": p.stat().st_size, "blobId": _etag(p.read_bytes())[:40]}
                            for f, p in files.items()]
                self._send(200, json.dumps({"id": name, "modelId": name, "sha": repo.commit, "private": False,
                                            "gated": "manual" if repo.gated else False, "tags": ["diffusers"],
                                            "siblings": siblings}).encode())
            elif kind == "tree":
                under = (match["path"] or "").strip("/")
                entries = [{"type": "file", "path": f, "size": p.stat().st_size, "oid": _etag(p.read_bytes())[:40]}
                           for f, p in files.items() if not under or f.startswith(under + "/")]
                self._send(200, json.dumps(entries).encode())
            else:
                self._file(repo, files.get(match["path"]))

        def _hold(self, repo: Repo) -> None:
            name = next(n for n, r in hub.repos.items() if r is repo)
            deadline = time.monotonic() + 60
            while hub.requests[("GET", name, "/api/info")] < hub.hold_weights_until_infos:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)

        def _file(self, repo: Repo, file: Path | None) -> None:
            if repo.gated:
                given = self.headers.get("Authorization", "")
                if not given:
                    self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated")
                    return
                if given != f"Bearer {hub.token}":
                    self._error(403, "GatedRepo", "Access to this model is restricted: ask for access on its page")
                    return
            if file is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            if self.command == "GET" and file.suffix == ".safetensors":
                self._hold(repo)
            data = file.read_bytes()
            self._send(200, data, {"ETag": f'"{_etag(data)}"', "X-Repo-Commit": repo.commit,
                                   "Accept-Ranges": "bytes"}, content_type="application/octet-stream")

        do_GET = do_HEAD = _handle

    return Handler
