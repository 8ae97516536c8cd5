"""A loopback stand-in for the few Hugging Face Hub endpoints huggingface_hub's client calls to pull and
push a model repo, so the real client runs end to end with no network (the tests point HF_ENDPOINT
at it).

Served, as the client (huggingface_hub 2.x) calls them:
    POST /api/repos/create                          create_repo (409 if it exists)
    POST /api/models/ORG/NAME/branch/BRANCH         create_branch (409 if it exists)
    POST /api/models/ORG/NAME/preupload/REV         upload modes: every file "regular" (inline in
                                                    the commit), so no LFS/xet transfer is needed
    POST /api/models/ORG/NAME/commit/REV            the NDJSON commit: header, then base64 files
    POST /api/validate-yaml                         README.md front matter check, as the Hub's: the
                                                    YAML parses to a mapping, base_model is a repo id
                                                    or a list of them (huggingface_hub's
                                                    validate_repo_id rules), base_model_relation one
                                                    of the Hub's four, tags a list of strings; else
                                                    400 (``reject_yaml`` makes it refuse anyway)
    GET  /api/models/ORG/NAME/revision/REV          repo_info (commit sha, file list)
    GET  /api/models/ORG/NAME/tree/REV              list_repo_tree
    HEAD/GET /ORG/NAME/resolve/REV/PATH             file metadata and content
A missing repo or revision answers 404 with the X-Error-Code header the client maps to
RepositoryNotFoundError / RevisionNotFoundError. Every request is logged in ``requests``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")  # the Hub's model-card spec


def card_metadata_error(meta) -> str | None:
    """Why the Hub would refuse this README.md front matter, or None (the checks cpift's cards meet)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(meta, dict):
        return "Invalid metadata: the front matter is not a YAML mapping"
    if "base_model" in meta:
        ids = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
        for i in ids:
            try:
                if not isinstance(i, str):
                    raise HFValidationError("not a string")
                validate_repo_id(i)
            except HFValidationError:
                return f'Invalid metadata in README.md: "base_model" with value "{i}" is not a valid model id'
    if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
        return (f'Invalid metadata in README.md: "base_model_relation" must be one of '
                f'{", ".join(BASE_MODEL_RELATIONS)}')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        return 'Invalid metadata in README.md: "tags" must be an array of strings'
    return None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.reject_yaml: str | None = None  # an error message validate-yaml answers with, when set
        self.validated: list[str] = []  # every README.md content validate-yaml was asked about
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- state

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "") -> str:
        """Add files to a branch as one commit (creating the repo); return the commit sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.commits.get(repo.branches.get(branch, ""), {})
            tree = {**parent, **files}
            sha = hashlib.sha1(json.dumps([repo_id, branch, len(repo.commits),
                                           sorted((p, git_blob_sha(b)) for p, b in tree.items())]).encode()).hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            repo.messages[sha] = message
            return sha

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    # ---------------------------------------------------------------- HTTP

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        self.requests.append((method, path))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:3] == ["api", "repos", "create"]:
            return self._create_repo(h, json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            return self._validate_yaml(h, json.loads(body)["content"])
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "branch":
                return self._create_branch(h, repo_id, repo, rev)
            if action == "tree":
                rev = rev.split("/")[0]
            sha = repo.resolve(rev)
            if sha is None:
                return self._send(h, 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                      "shouldIgnore": False} for f in files]})
            if action == "commit":
                return self._commit(h, repo_id, rev, body)
            if action == "revision":
                return self._send(h, 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                           "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])]})
            if action == "tree":
                return self._send(h, 200, [{"type": "file", "oid": git_blob_sha(b), "size": len(b), "path": p}
                                           for p, b in sorted(repo.commits[sha].items())])
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self.repos.get(f"{parts[0]}/{parts[1]}")
            sha = repo.resolve(parts[3]) if repo else None
            data = repo.commits[sha].get("/".join(parts[4:])) if sha else None
            if data is None:
                return self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"',
                       "Content-Type": "application/octet-stream"}
            return self._send_bytes(h, 200, data, headers, head=method == "HEAD")
        return self._send(h, 404, {"error": f"fake hub: no route for {method} {path}"})

    def _create_repo(self, h, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return self._send(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        with self._lock:
            self.repos[repo_id] = Repo(private=private)
        self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    message="initial commit")
        self._send(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, h, content: str) -> None:
        import yaml

        error = self.reject_yaml
        if error is None:
            head = content.split("---\n")
            try:
                meta = yaml.safe_load(head[1]) if content.startswith("---\n") and len(head) > 2 else None
            except yaml.YAMLError as e:
                meta, error = None, f"Invalid YAML in the metadata: {str(e).splitlines()[0]}"
            error = error or card_metadata_error(meta)
        self.validated.append(content)
        if error is not None:
            return self._send(h, 400, {"errors": [{"message": error}]})
        self._send(h, 200, {"errors": [], "warnings": []})

    def _create_branch(self, h, repo_id: str, repo: Repo, branch: str) -> None:
        if branch in repo.branches:
            return self._send(h, 409, {"error": f"Reference already exists: refs/heads/{branch}"})
        with self._lock:
            repo.branches[branch] = repo.branches["main"]
        self._send(h, 200, {})

    def _commit(self, h, repo_id: str, rev: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {}
        for item in lines:
            if item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self._send(h, 400, {"error": f"fake hub: unsupported commit item {item['key']}"})
        sha = self.commit(repo_id, files, branch=rev, message=header["summary"])
        self._send(h, 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"})

    def _send(self, h, status: int, payload, headers: dict | None = None) -> None:
        self._send_bytes(h, status, json.dumps(payload).encode(),
                         {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def _send_bytes(h, status: int, data: bytes, headers: dict, head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)
