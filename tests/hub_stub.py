"""A minimal in-memory stand-in for the Hugging Face Hub HTTP API, for tests of uploads and downloads.

It answers exactly the endpoints that ``huggingface_hub`` (2.x) calls for ``create_repo``, ``upload_folder`` /
``create_commit`` (preupload, then an NDJSON commit whose files all travel base64-encoded, as "regular" files, so no
LFS or Xet storage is involved), ``repo_info`` / ``list_repo_tree`` and ``hf_hub_download`` / ``snapshot_download``
(``HEAD`` / ``GET .../resolve/<revision>/<path>``). Anything else gets a 501 and is recorded in ``unhandled``.

It listens on 127.0.0.1 only, on a free port, and shuts itself down after ``lifetime_s`` even if nobody stops it::

    with HubStub() as hub:
        HfApi(endpoint=hub.url).upload_folder(...)
        hub.files("org/name")  # {"README.md": b"...", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStub:
    """In-memory Hub: ``repos[repo_id]`` maps branch names to commit shas, ``trees[sha]`` holds each commit's files."""

    def __init__(self, lifetime_s: float = 600.0) -> None:
        self.branches: dict[str, dict[str, str]] = {}
        self.trees: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []  # one entry per commit: repo, revision, summary, files added
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stub", daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> HubStub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ inspection
    def unhandled_for(self, namespace: str) -> list[tuple[str, str]]:
        """The unanswered requests that concern repositories of ``namespace`` (the project's own requests): requests
        other libraries make on their own (e.g. a kernel lookup at import) are not the subject of these tests; the
        promise that none leaves the process is tested separately (tests/test_no_network.py)."""
        return [
            (method, path) for method, path in self.unhandled if f"/{namespace}/" in path or path == "/api/repos/create"
        ]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at a branch or commit."""
        sha = self.branches[repo_id].get(revision, revision)
        return dict(self.trees[sha])

    # ------------------------------------------------------------------------------------------ handlers
    def _create_repo(self, body: bytes, **_):
        payload = json.loads(body or b"{}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self._lock:
            if repo_id in self.branches:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
            sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            self.trees[sha] = {}
            self.branches[repo_id] = {"main": sha}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _validate_yaml(self, body: bytes, **_):
        """Parse the card's YAML header and check the few fields the real Hub is strict about."""
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        metadata = yaml.safe_load(match.group(1)) if match else {}
        errors = []
        if not isinstance(metadata, dict):
            errors.append("metadata must be a YAML mapping")
        else:
            bases = metadata.get("base_model") or []
            for base in [bases] if isinstance(bases, str) else bases:
                if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(base)):
                    errors.append(f'"base_model" must be a Hub repo id, got {base!r}')
            if "tags" in metadata and not isinstance(metadata["tags"], list):
                errors.append('"tags" must be a list')
        if errors:
            return 400, {"errors": [{"message": message} for message in errors]}, {}
        return 200, {"warnings": []}, {}

    def _preupload(self, body: bytes, repo: str, **_):
        if repo not in self.branches:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}, {}

    def _commit(self, body: bytes, repo: str, rev: str, **_):
        if repo not in self.branches:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        rev = unquote(rev)
        with self._lock:
            parent = self.branches[repo].get(rev)
            if parent is None:
                return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
            tree = dict(self.trees[parent])
            added, summary = {}, ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file" and value.get("encoding") == "base64":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                else:
                    return 400, {"error": f"the stub Hub does not support commit items of kind {key!r}"}, {}
            tree.update(added)
            sha = hashlib.sha1(parent.encode() + body).hexdigest()
            self.trees[sha] = tree
            self.branches[repo][rev] = sha
            self.commits.append({"repo": repo, "revision": rev, "summary": summary, "files": added})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True}, {}

    def _resolve_sha(self, repo: str, rev: str | None):
        if repo not in self.branches:
            return None, (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        rev = unquote(rev or "main")
        sha = self.branches[repo].get(rev, rev if rev in self.trees else None)
        if sha is None:
            return None, (404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return sha, None

    def _repo_info(self, repo: str, rev: str | None = None, **_):
        sha, error = self._resolve_sha(repo, rev)
        if error:
            return error
        siblings = [{"rfilename": path} for path in sorted(self.trees[sha])]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings, "tags": []}, {}

    def _tree(self, repo: str, rev: str, path: str | None = None, **_):
        sha, error = self._resolve_sha(repo, rev)
        if error:
            return error
        prefix = f"{path.strip('/')}/" if path else ""
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": _git_blob_id(content)}
            for name, content in sorted(self.trees[sha].items())
            if name.startswith(prefix)
        ]
        return 200, entries, {}

    def _resolve(self, repo: str, rev: str, path: str, **_):
        sha, error = self._resolve_sha(repo, rev)
        if error:
            return error
        content = self.trees[sha].get(unquote(path))
        if content is None:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_id(content)}"'}
        return 200, content, headers

    def _handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _dispatch(self, method: str) -> None:
                path = urlsplit(self.path).path
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with stub._lock:
                    stub.requests.append((method, path))
                for route_method, pattern, name in ROUTES:
                    match = pattern.match(path)
                    if route_method == method and match:
                        status, payload, headers = getattr(stub, f"_{name}")(body=body, **match.groupdict())
                        break
                else:
                    with stub._lock:
                        stub.unhandled.append((method, path))
                    status, payload, headers = 501, {"error": f"the stub Hub does not implement {method} {path}"}, {}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_HEAD(self) -> None:
                self._dispatch("HEAD")

            def do_POST(self) -> None:
                self._dispatch("POST")

        return Handler
