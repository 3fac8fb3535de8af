"""A tiny offline stand-in for the Hugging Face Hub HTTP API, enough for ``snapshot_download`` / ``hf_hub_download``.

Serves model and dataset repos held in memory (``{path_in_repo: bytes}``) or read from local folders::

    with FakeHub() as hub:
        hub.add("org/data", {"train.jsonl": b'{"text": "hi"}\\n'}, repo_type="dataset")
        hub.add("org/model", Path("some/model/folder"))          # repo_type="model" by default
        env = {**os.environ, **hub.env(tmp_path / "hf_home")}   # HF_ENDPOINT, HF_HOME, no proxy, no telemetry
        subprocess.run([sys.executable, "-c", "..."], env=env)

``HF_ENDPOINT`` is read when ``huggingface_hub`` is imported, so run the downloading code in a subprocess started
with :meth:`FakeHub.env` (the server itself runs in a thread of the test process).

Endpoints (the ones huggingface_hub 0.2x-2.x uses for downloads):

* ``GET /api/{models,datasets}/{repo}`` and ``.../revision/{rev}``: repo info with ``sha`` and ``siblings``.
* ``GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]?recursive=``: file listing (``type``, ``path``, ``size``,
  ``oid``), one page.
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (models) and ``/datasets/{repo}/resolve/{rev}/{file}``: the file with
  ``X-Repo-Commit``, ``ETag`` (the git blob sha1, quoted) and ``Content-Length``; ``Range: bytes=a-b`` is honoured.

Unknown repos, revisions or files answer 404 with the ``X-Error-Code`` huggingface_hub maps to its own errors.
Every request is appended to :attr:`FakeHub.requests` as ``(method, path)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("model", "dataset")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(sorted(files.items()))
        digest = hashlib.sha1()
        for path, data in self.files.items():
            digest.update(path.encode() + b"\0" + _git_blob_sha1(data).encode())
        self.sha = digest.hexdigest()  # 40 hex digits, changes when any file does


class FakeHub:
    """The server; use as a context manager (or call :meth:`start` / :meth:`stop`)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- content -------------------------------------------------------------------------------------------------
    def add(self, repo_id: str, files: dict[str, bytes | str] | str | Path, *, repo_type: str = "model") -> str:
        """Add (or replace) a repo from ``{path: bytes | str}`` or a local folder (all files, recursively).

        Returns the repo's commit sha.
        """
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if isinstance(files, (str, Path)):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        blobs = {path: data.encode("utf-8") if isinstance(data, str) else bytes(data) for path, data in files.items()}
        repo = _Repo(blobs)
        self.repos[(repo_type, repo_id)] = repo
        return repo.sha

    # ---- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, hf_home: str | Path) -> dict[str, str]:
        """Environment variables that point huggingface_hub at this server with a private cache."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- lookup --------------------------------------------------------------------------------------------------
    def _find(self, repo_type: str, rest: str) -> tuple[str, _Repo, str] | None:
        """Split ``org/name/<tail>`` into a known repo and the tail (longest repo id first)."""
        for (kind, repo_id), repo in sorted(self.repos.items(), key=lambda kv: -len(kv[0][1])):
            if kind == repo_type and (rest == repo_id or rest.startswith(repo_id + "/")):
                return repo_id, repo, rest[len(repo_id) + 1 :]
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, *, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message}, head=head)

    @staticmethod
    def _rev_ok(repo: _Repo, rev: str) -> bool:
        return rev in ("main", repo.sha)

    # ---- dispatch ------------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        self.hub.requests.append(("HEAD" if head else "GET", path))
        m = re.fullmatch(r"/api/(models|datasets)/(.+)", path)
        if m:
            return self._api(m.group(1)[:-1], m.group(2), query, head)
        is_dataset = path.startswith("/datasets/")
        repo_type, rest = ("dataset", path[len("/datasets/"):]) if is_dataset else ("model", path[1:])
        found = self.hub._find(repo_type, rest)
        if found is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {rest}", head=head)
        _, repo, tail = found
        m = re.fullmatch(r"resolve/([^/]+)/(.+)", tail)
        if not m:
            return self._error(404, "EntryNotFound", f"unknown path {path}", head=head)
        rev, file = m.groups()
        if not self._rev_ok(repo, rev):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        if file not in repo.files:
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}", head=head)
        data = repo.files[file]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_git_blob_sha1(data)}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng and not head:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, head=head)

    def _api(self, repo_type: str, rest: str, query: dict, head: bool) -> None:
        found = self.hub._find(repo_type, rest)
        if found is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {rest}", head=head)
        repo_id, repo, tail = found
        if tail == "" or tail.startswith("revision/"):
            rev = tail[len("revision/"):] if tail else "main"
            if not self._rev_ok(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            info = {"id": repo_id, "sha": repo.sha, "private": False, "disabled": False, "gated": False,
                    "siblings": [{"rfilename": p} for p in repo.files], "tags": [],
                    "lastModified": "2024-01-01T00:00:00.000Z"}
            if repo_type == "model":
                info["modelId"] = repo_id
            return self._json(info)
        m = re.fullmatch(r"tree/([^/]+)(?:/(.*))?", tail)
        if m:
            rev, sub = m.group(1), (m.group(2) or "").strip("/")
            if not self._rev_ok(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._json(_tree(repo, sub, recursive))
        return self._error(404, "EntryNotFound", f"unknown api path {rest}", head=head)


def _tree(repo: _Repo, sub: str, recursive: bool) -> list[dict]:
    prefix = sub + "/" if sub else ""
    entries: list[dict] = []
    folders: set[str] = set()
    for path, data in repo.files.items():
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix):]
        dirs = rel.split("/")[:-1]
        for depth in range(1, len(dirs) + 1 if recursive else min(1, len(dirs)) + 1):
            folders.add(prefix + "/".join(dirs[:depth]))
        if recursive or not dirs:
            entries.append({"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)})
    folder_entries = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
                      for f in sorted(folders)]
    return folder_entries + entries
