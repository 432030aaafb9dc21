"""A local fake of the Hugging Face Hub API, just enough for huggingface_hub 2.4's upload and download paths.

Tests must never reach huggingface.co, yet mocking ``HfApi`` methods proves nothing about the
HTTP conversation the real client has. This server speaks the endpoints the client actually
calls (read from ``hf_api.py`` / ``_commit_api.py`` / ``file_download.py``):

- ``POST /api/repos/create``                       create_repo (409 when it exists)
- ``POST /api/validate-yaml``                      README.md front matter check before a commit
- ``POST /api/{type}s/{repo}/preupload/{rev}``     answers ``uploadMode: regular`` for every file (no LFS, no xet)
- ``POST /api/{type}s/{repo}/commit/{rev}``        ndjson commit: base64 ``file`` adds, file/folder deletions
- ``POST /api/{type}s/{repo}/super-squash/{rev}``  super_squash_history: the history becomes one commit of the head
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``    repo_info (id, sha, private, siblings)
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]`` list_repo_tree / list_repo_files
- ``HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}`` hf_hub_download (X-Repo-Commit, ETag, Content-Length)

Every commit keeps a full snapshot of the repo, so a download by commit hash sees that commit.
Writes need ``Authorization: Bearer <token>``; reads of a private repo too.

Use the ``fake_hub`` fixture: it starts the server on a free 127.0.0.1 port and points
``huggingface_hub`` at it (``constants.ENDPOINT``, online mode, xet off, a private cache dir).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

TOKEN = "hf_fake_token_for_tests"
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+?)(?:/(preupload|commit|tree|revision|super-squash)/([^/]+)(/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_sha(content: bytes) -> str:
    """The git object id of a regular file (what the Hub reports as a non-LFS file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, full snapshot), oldest first

    @property
    def head(self) -> tuple[str, dict[str, bytes]]:
        return self.commits[-1]

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c[0] == revision), None)


class FakeHub:
    """The in-memory Hub state and the HTTP server that serves it."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (method, path), for tests that assert what was called
        self.commits: list[tuple[str, list[str]]] = []  # (repo id, paths added), for tests that assert what was sent
        self.squashes: list[str] = []  # repo ids, one per super-squash
        self._made = 0  # commits ever made: a commit sha is never reused, also after a squash
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- state helpers for tests ---------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The repo's files at its head commit."""
        return dict(self.repo(repo_id, repo_type).head[1])

    def every_version(self, repo_id: str, repo_type: str = "model") -> list[bytes]:
        """The content of every file in every commit the repo's history still holds."""
        return [data for _, files in self.repo(repo_id, repo_type).commits for data in files.values()]

    def _new_commit(self, repo: FakeRepo, files: dict[str, bytes]) -> str:
        self._made += 1
        sha = hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}#{self._made}".encode()).hexdigest()
        repo.commits.append((sha, files))
        return sha

    def _create(self, repo_id: str, repo_type: str, private: bool) -> FakeRepo:
        repo = FakeRepo(repo_id, repo_type, private)
        self._new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[(repo_type, repo_id)] = repo
        return repo

    # -- HTTP ----------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        return Handler

    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(req.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0)) if method == "POST" else b""
        self.requests.append((method, path))
        authorized = req.headers.get("Authorization", "") == f"Bearer {self.token}"
        try:
            with self.lock:
                status, headers, payload = self._route(method, path, query, body, authorized)
        except Exception as exc:  # noqa: BLE001 - a fake bug must show up as a 500, not a hang
            status, headers, payload = 500, {}, {"error": f"fake hub: {type(exc).__name__}: {exc}"}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req.send_response(status)
        headers = {
            "Content-Type": "application/json" if not isinstance(payload, bytes) else "application/octet-stream",
            **headers,
        }
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if method != "HEAD":
            req.wfile.write(data)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorized: bool
    ) -> tuple[int, dict[str, str], Any]:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body), authorized)
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {}, {"errors": [], "warnings": []}
        if method == "GET" and path == "/api/whoami-v2":
            return (200, {}, {"name": "user", "type": "user"}) if authorized else _error(401, "Invalid credentials")
        if match := _API.match(path):
            kind, repo_id, action, revision, rest = match.groups()
            repo = self.repos.get((kind[:-1], repo_id))
            if repo is None or (repo.private and not authorized):
                return _error(404, "Repository not found", "RepoNotFound")
            if action in ("preupload", "commit", "super-squash") and not authorized:
                return _error(401, "Invalid credentials in Authorization header")
            if method == "POST" and action == "preupload":
                files = json.loads(body)["files"]
                return (
                    200,
                    {},
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]},
                )
            if method == "POST" and action == "commit":
                return self._commit(repo, body)
            if method == "POST" and action == "super-squash":
                head = dict(repo.head[1])
                repo.commits = []
                self._new_commit(repo, head)
                self.squashes.append(repo_id)
                return 200, {}, {}
            snapshot = repo.at(unquote(revision or "main"))
            if snapshot is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if method == "GET" and action == "tree":
                return (
                    200,
                    {},
                    _tree(snapshot[1], (rest or "").strip("/"), query.get("recursive", ["false"])[0].lower() == "true"),
                )
            if method == "GET" and action in (None, "revision"):
                sha, files = snapshot
                return (
                    200,
                    {},
                    {
                        "id": repo_id,
                        "sha": sha,
                        "private": repo.private,
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                    },
                )
        if method in ("GET", "HEAD") and (match := _RESOLVE.match(path)):
            kind, repo_id, revision, filename = match.groups()
            repo = self.repos.get(((kind or "models")[:-1], repo_id))
            if repo is None or (repo.private and not authorized):
                return _error(404, "Repository not found", "RepoNotFound")
            snapshot = repo.at(revision)
            if snapshot is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            sha, files = snapshot
            if filename not in files:
                return _error(404, f"Entry not found: {filename}", "EntryNotFound")
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(files[filename])}"'}, files[filename]
        return _error(404, f"fake hub: no route for {method} {path}")

    def _create_repo(self, payload: dict[str, Any], authorized: bool) -> tuple[int, dict[str, str], Any]:
        if not authorized:
            return _error(401, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.endpoint}/{_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # the Hub names the repo in its 409 too: exist_ok reads "url"
            return (
                409,
                {"X-Error-Message": "You already created this repo"},
                {"error": "You already created this repo", "url": url},
            )
        self._create(repo_id, repo_type, payload.get("visibility") == "private" or bool(payload.get("private")))
        return 200, {}, {"url": url, "name": repo_id}

    def _commit(self, repo: FakeRepo, body: bytes) -> tuple[int, dict[str, str], Any]:
        files, added = dict(repo.head[1]), []
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                added.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {name: data for name, data in files.items() if not name.startswith(prefix)}
            elif key == "lfsFile":
                return _error(400, "fake hub: LFS uploads are not supported (preupload answers 'regular')")
        sha = self._new_commit(repo, files)
        self.commits.append((repo.repo_id, added))
        url = f"{self.endpoint}/{_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{sha}"
        return 200, {}, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None, "success": True}


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for name, data in sorted(files.items()):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if recursive or "/" not in rest:
            if recursive:  # the Hub lists the folders too
                parts = name.split("/")
                for i in range(len(prefix.split("/")) if prefix else 1, len(parts)):
                    sub = "/".join(parts[:i])
                    entries.setdefault(sub, {"type": "directory", "path": sub, "oid": git_blob_sha(sub.encode()), "size": 0})
            entries[name] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
        else:
            sub = prefix + rest.split("/")[0]
            entries.setdefault(sub, {"type": "directory", "path": sub, "oid": git_blob_sha(sub.encode()), "size": 0})
    return list(entries.values())


def _error(status: int, message: str, code: str | None = None) -> tuple[int, dict[str, str], Any]:
    return (
        status,
        ({"X-Error-Code": code, "X-Error-Message": message} if code else {"X-Error-Message": message}),
        {"error": message},
    )


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub that huggingface_hub talks to instead of huggingface.co, with HF_TOKEN set.

    ``constants`` are read when the library is imported (conftest sets HF_HUB_OFFLINE=1), so the
    fixture patches them: the endpoint *and* the download URL template (``hf_hub_url`` formats
    ``HUGGINGFACE_CO_URL_TEMPLATE``, not ``ENDPOINT``), online mode, xet off, a per-test cache."""
    from huggingface_hub import constants, hf_api

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # The module-level helpers (``huggingface_hub.file_exists``, used by PEFT) are bound to an HfApi
    # made at import time, with the real endpoint: without this they would go to huggingface.co.
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    try:
        yield hub
    finally:
        hub.close()
