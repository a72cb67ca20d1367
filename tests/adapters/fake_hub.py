"""A minimal Hugging Face Hub on loopback: the endpoints huggingface_hub's snapshot_download calls.

    GET  /api/models/{repo}[/revision/{rev}]      repo info; `sha` is the commit the revision names
    GET  /api/models/{repo}/tree/{rev}            file listing (path, size, oid)
    HEAD /{repo}/resolve/{rev}/{file}             X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}             the bytes

Errors carry the Hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound). A private
repo needs `Authorization: Bearer <its token>`; without one the answer is 401, as the real Hub's is.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    token: str | None                               # None: public
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.failures: dict[str, tuple[int, str]] = {}  # path part → (status, message) answered instead
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def publish(self, repo_id: str, files: dict[str, bytes], token: str | None = None,
                branch: str = "main") -> str:
        """Commit `files` (the whole tree) to `branch` of `repo_id`; returns the commit sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(token))
            sha = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files.items()))).encode()).hexdigest()
            repo.commits[sha] = dict(files)
            repo.refs[branch] = sha
            return sha

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    info_route = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
    tree_route = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
    file_route = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            failure = next((f for part, f in hub.failures.items() if part in path), None)
            if failure is not None:
                return self._error(failure[0], None, failure[1])
            routes = ((tree_route, "tree"), (info_route, "info"), (file_route, "file"))
            routed = next(((kind, m) for route, kind in routes if (m := route.match(path))), None)
            if routed is None:
                return self._error(404, "NotFound", "no such route")
            kind, match = routed
            repo = hub.repos.get(match["repo"])
            if repo is None:
                return self._error(401 if self._bearer() is None else 404, "RepoNotFound", "Repository not found")
            if repo.token is not None and self._bearer() != repo.token:
                if self._bearer() is None:
                    return self._error(401, "RepoNotFound", "Invalid username or password.")
                return self._error(401, None, "Invalid credentials in Authorization header")
            rev = match.groupdict().get("rev") or "main"
            sha = repo.refs.get(rev, rev if rev in repo.commits else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = repo.commits[sha]
            if kind == "info":
                siblings = [{"rfilename": name} for name in sorted(files)]
                return self._send(200, json.dumps({"id": match["repo"], "sha": sha, "private": repo.token is not None,
                                                   "siblings": siblings}).encode(), body)
            if kind == "tree":
                listing = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                           for name, data in sorted(files.items())]
                return self._send(200, json.dumps(listing).encode(), body)
            data = files.get(match["file"])
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", sha)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(200, data, body, headers, content_type="application/octet-stream")

        def _bearer(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

        def _error(self, status: int, code: str | None, message: str, sha: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if sha:
                headers["X-Repo-Commit"] = sha
            self._send(status, json.dumps({"error": message}).encode(), self.command != "HEAD", headers)

        def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
