"""A test double of the Hugging Face Hub's HTTP API, on 127.0.0.1, for offline push tests.

It is **not** a Hub: it implements only the calls ``huggingface_hub`` makes for
``create_repo(exist_ok=True)``, ``create_branch``, ``create_commit``/``upload_folder`` (the card's
``validate-yaml`` check with a few of the Hub's metadata rules, preupload, the git-LFS batch API with
its upload and verify actions, and the NDJSON commit) and for downloads
(``HEAD``/``GET /{repo}/resolve/{revision}/{path}``), answering with the status codes, JSON and
headers (``X-Error-Code``, ``X-Repo-Commit``, ``ETag``) that the client reads to tell success from
each kind of failure. What arrives is stored in memory, so tests can compare it byte for byte.

Tokens: ``tokens`` maps a token to ``"write"`` or ``"read"``; any other ``Bearer`` token is
rejected with 401 ("Invalid credentials in Authorization header", as the Hub says), a read token
gets 403 on every write. The namespace of the write token is ``user``; another namespace is 403.
Upload mode: ``*.safetensors`` and files of 10 MB or more go through LFS, everything else is
sent inline in the commit ("regular"), so a small collapsed model exercises both paths.
Written against huggingface_hub 2.4.0 with ``HF_HUB_DISABLE_XET=1`` (the Xet transfer path is not
implemented); see ``shared/research/hub_offline.md``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
_REPO = r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)
    modes: dict[str, str] = field(default_factory=dict)  # path -> "lfs" | "regular", as last committed


class FakeHub:
    """Start with ``with FakeHub() as hub: hub.url ...``; inspect ``hub.repos`` and ``hub.log``."""

    def __init__(self, tokens: dict[str, str] | None = None, user: str = "user"):
        self.tokens = tokens if tokens is not None else {"hf_test_write": "write", "hf_test_read": "read"}
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.auth_seen: list[str] = []
        self.validated_yaml: list[str] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --------------------------------------------------------------- lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].refs[ref])

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        """Pre-create a repo (e.g. one the token may read but not write)."""
        repo = self.repos[repo_id] = Repo(repo_id, private)
        repo.refs["main"].update(files or {})
        return repo


def _metadata_problem(meta: dict[str, Any]) -> str | None:
    """A few of the Hub's model-card metadata rules: the types of the common keys and the shape of
    ``model-index`` (what the Hub needs to show evaluation results)."""
    for key in ("license", "library_name", "pipeline_tag", "base_model"):
        if key in meta and not isinstance(meta[key], (str, list)):
            return f'"{key}" must be a string'
    for key in ("tags", "datasets", "metrics"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            return f'"{key}" must be an array of strings'
    index = meta.get("model-index")
    if index is None:
        return None
    if not isinstance(index, list):
        return '"model-index" must be an array'
    for entry in index:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("results"), list):
            return '"model-index[]" needs a "name" and an array of "results"'
        for r in entry["results"]:
            if not isinstance(r.get("task", {}).get("type"), str):
                return '"model-index[].results[].task.type" is required'
            if not all(isinstance(r.get("dataset", {}).get(k), str) for k in ("name", "type")):
                return '"model-index[].results[].dataset" needs "name" and "type"'
            if not r.get("metrics") or not all(isinstance(m, dict) and isinstance(m.get("type"), str) and "value" in m
                                               for m in r["metrics"]):
                return '"model-index[].results[].metrics[]" needs "type" and "value"'
    return None


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # -------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False) -> None:
        if isinstance(body, (bytes, bytearray)):
            data, ctype = bytes(body), "application/octet-stream"
        else:
            data, ctype = json.dumps({} if body is None else body).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)
        self.hub.log.append((self.command, self.path, status))

    def _dispatch(self) -> None:
        head = self.command == "HEAD"
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
            with self.hub.lock:
                out = self._route(body)
            status, payload, headers = out if isinstance(out, tuple) else (200, out, {})
            self._send(status, payload, headers, head)
        except _Reply as r:
            self._send(r.status, r.body, r.headers, head)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # -------------------------------------------------------------- auth
    def _who(self) -> str | None:
        """The token's access ("write"/"read"), None without a token; 401 for an unknown one."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        self.hub.auth_seen.append(token)
        if token not in self.hub.tokens:
            raise _error(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _need_write(self, namespace: str) -> str:
        who = self._who()
        if who is None:
            raise _error(401, "You must be authenticated to access this resource")
        if who != "write":
            raise _error(403, "You don't have the rights to write this resource (read-only token)")
        if namespace != self.hub.user:
            raise _error(403, f"You don't have the rights to create a model under the namespace '{namespace}'")
        return who

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        who = self._need_write(repo_id.split("/")[0]) if write else self._who()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and who is None):
            raise _error(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _ref(repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev in repo.refs:
            return rev
        for ref, sha in repo.heads.items():
            if sha == rev:
                return ref
        raise _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # -------------------------------------------------------------- routes
    def _route(self, body: bytes) -> Any:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        base = self.hub.url
        m = None

        if self.command == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            namespace = req.get("organization") or self.hub.user
            self._need_write(namespace)
            repo_id = f"{namespace}/{req['name']}"
            if repo_id in self.hub.repos:
                raise _Reply(409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"})
            private = req.get("private") or req.get("visibility") == "private"
            self.hub.add_repo(repo_id, private=bool(private))
            return {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id}

        if self.command == "POST" and path == "/api/validate-yaml":
            self._who()
            content = json.loads(body)["content"]
            self.hub.validated_yaml.append(content)
            front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(front.group(1)) if front else None
            except yaml.YAMLError as e:
                raise _Reply(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
            if front and not isinstance(meta, dict):
                raise _Reply(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            problem = _metadata_problem(meta or {})
            if problem:  # the Hub answers 400 with the reason as text (ModelCard.validate raises ValueError)
                raise _Reply(400, {"errors": [{"message": problem}], "warnings": []})
            return {"errors": [], "warnings": []}

        if m := re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(.+))?", path):
            if self.command != "GET":
                raise _Reply(405)
            repo = self._repo(m.group(1))
            ref = self._ref(repo, m.group(2) or "main")
            return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.heads[ref], "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(repo.refs[ref])]}

        if self.command == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/branch/(.+)", path)):
            repo = self._repo(m.group(1), write=True)
            branch = unquote(m.group(2))
            if branch in repo.refs:
                raise _error(409, f"Reference {branch} already exists", None)
            start = self._ref(repo, (json.loads(body or b"{}") or {}).get("startingPoint") or "main")
            repo.refs[branch], repo.heads[branch] = dict(repo.refs[start]), repo.heads[start]
            return {}

        if self.command == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/preupload/(.+)", path)):
            repo = self._repo(m.group(1), write=True)
            if "create_pr" not in query:
                self._ref(repo, m.group(2))
            files = json.loads(body)["files"]
            return {"files": [{"path": f["path"], "shouldIgnore": False,
                               "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] >= LFS_THRESHOLD
                               else "regular"} for f in files]}

        if self.command == "POST" and (m := re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)):
            self._repo(m.group(1), write=True)
            req = json.loads(body)
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.hub.lfs:  # no actions: the server already has it
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{base}/lfs-verify/{obj['oid']}"}}
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        if self.command == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != m.group(1):
                raise _error(400, "sha256 of the uploaded object does not match its oid")
            self.hub.lfs[m.group(1)] = body
            return {}

        if self.command == "POST" and (m := re.fullmatch(r"/lfs-verify/([0-9a-f]{64})", path)):
            req = json.loads(body)
            if self.hub.lfs.get(m.group(1)) is None or len(self.hub.lfs[m.group(1)]) != req["size"]:
                raise _error(404, "object not uploaded")
            return {}

        if self.command == "POST" and (m := re.fullmatch(rf"/api/models/{_REPO}/commit/(.+)", path)):
            return self._commit(self._repo(m.group(1), write=True), m.group(2), body, "create_pr" in query)

        if self.command in ("GET", "HEAD") and (m := re.fullmatch(rf"/{_REPO}/resolve/([^/]+)/(.+)", path)):
            repo = self._repo(m.group(1))
            ref = self._ref(repo, m.group(2))
            name = unquote(m.group(3))
            data = repo.refs[ref].get(name)
            if data is None:
                raise _Reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                  "X-Repo-Commit": repo.heads[ref]})
            lfs = repo.modes.get(name) == "lfs"
            etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha(data)
            headers = {"X-Repo-Commit": repo.heads[ref], "ETag": f'"{etag}"'}
            if lfs:
                headers["X-Linked-Etag"], headers["X-Linked-Size"] = f'"{etag}"', str(len(data))
            return 200, data, headers

        raise _error(404, f"the Hub test double does not implement {self.command} {path}")

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _error(400, "commit payload must start with a header line")
        if create_pr:
            ref = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}"
            repo.refs[ref], repo.heads[ref] = dict(repo.refs["main"]), repo.heads["main"]
        else:
            ref = self._ref(repo, rev)
        tree = dict(repo.refs[ref])
        modes: dict[str, str] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _error(400, "expected base64 file content")
                tree[value["path"]] = base64.b64decode(value["content"])
                modes[value["path"]] = "regular"
            elif key == "lfsFile":
                data = self.hub.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise _error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                tree[value["path"]] = data
                modes[value["path"]] = "lfs"
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            else:
                raise _error(400, f"the Hub test double does not implement commit operation '{key}'")
        sha = hashlib.sha1(json.dumps([repo.heads[ref], sorted((p, git_blob_sha(d)) for p, d in tree.items()),
                                       lines[0]["value"]], sort_keys=True).encode()).hexdigest()
        repo.refs[ref], repo.heads[ref] = tree, sha
        repo.modes.update(modes)
        repo.commits.append({"ref": ref, "oid": sha, "header": lines[0]["value"], "modes": modes})
        out = {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha}
        if create_pr:
            out["pullRequestUrl"] = f"{self.hub.url}/{repo.repo_id}/discussions/{ref.rsplit('/', 1)[1]}"
        return out
