"""A small in-memory Hugging Face Hub, enough for the unmodified `huggingface_hub` client.

It serves what ``create_repo``, ``upload_folder`` (LFS "basic" transfer, no Xet), ``create_branch``,
``model_info``, ``list_repo_tree``, ``hf_hub_download``, ``snapshot_download`` and ``whoami`` call,
with the status codes and ``X-Error-Code`` headers the client turns into its typed errors:

    GET  /api/whoami-v2
    POST /api/repos/create                          409 with "url" when the repo exists
    POST /api/validate-yaml                         the README.md front matter
    GET  /api/models/{ns}/{name}[/revision/{rev}]
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]
    POST /api/models/{ns}/{name}/preupload/{rev}
    POST /api/models/{ns}/{name}/commit/{rev}      newline-delimited JSON
    POST /api/models/{ns}/{name}/branch/{branch}
    POST /{ns}/{name}.git/info/lfs/objects/batch   then PUT /lfs-upload/{oid}, POST .../verify
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}      X-Repo-Commit, ETag, X-Linked-Etag/-Size

Only model repos; a token writes to its user's own namespace. ``echo_status`` (400, 403, 422, ...) turns it into a
hostile endpoint that answers every request with that status and the request's Authorization header in its error
message, as a misbehaving proxy might: what a client prints of a server's error must not show the token. Tests
start it on a port the system picks (port 0, bound by the server itself: no race with another process):

    with HubServer(tokens={"hf_alice": "alice"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url   # before huggingface_hub is imported, or pass endpoint=

and ``python tests/hub_server.py --port 8080 --token hf_alice:alice`` runs it by hand.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# As in the Hub's default .gitattributes: these go through LFS, as does any binary file.
LFS_PATTERNS = [
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.onnx",
    "*.npy",
    "*.npz",
    "*.zip",
    "*.gz",
    "*.tar",
    "*.msgpack",
    "*.pkl",
    "*.png",
    "*.jpg",
    "*.tif",
]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


def now() -> str:
    """The Hub's date format, e.g. 2024-05-01T12:00:00.000Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """The git object id: of the content, or of the LFS pointer."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> full file tree
    created: str = field(default_factory=lambda: now())

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit sha -> the commit sha."""
        return self.branches.get(revision) or (revision if revision in self.commits else None)

    def commit(self, branch: str, files: dict[str, Blob], message: str) -> str:
        sha = hashlib.sha1(f"{branch}{message}{time.time_ns()}{uuid.uuid4()}".encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubState:
    """Repos, LFS objects and tokens, shared by the request threads."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, once uploaded
        self.lfs_expected: dict[str, int] = {}  # sha256 -> size, announced by a batch request
        self.lock = threading.RLock()
        self.requests: list[str] = []  # "METHOD path", for tests to inspect
        self.echo_status: int | None = None  # answer everything with this status, echoing the Authorization header


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # ---- plumbing -------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # quiet: tests read state.requests instead
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_body(self) -> dict:
        return json.loads(self.body) if self.body else {}

    def send(
        self,
        status: int,
        payload=None,
        headers: dict | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def user(self) -> str | None:
        """The token's user; None without a token; a 401 for a token the Hub does not know."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def writer(self, repo_id: str) -> tuple[str, Repo]:
        user = self.user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        repo = self.repo(repo_id)
        if repo.owner != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return user, repo

    def repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self.user() != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def revision(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # ---- dispatch -------------------------------------------------------------------------

    def handle_any(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.state.requests.append(f"{self.command} {url.path}")
        self.body = self.read_body()  # always, so a keep-alive connection stays in step after an error
        try:
            with self.state.lock:
                if self.state.echo_status:
                    auth = self.headers.get("Authorization", "(none)")
                    raise HubError(self.state.echo_status, f"cannot handle request with Authorization: {auth}")
                if parts[0] != "lfs-upload":  # an upload URL is a capability, as a signed S3 URL would be
                    self.user()  # like the Hub: an unknown token is a 401 on any route, even a public read
                self.route(parts, query)
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self.send(error.status, {"error": error.message}, headers)

    do_GET = do_HEAD = do_POST = do_PUT = handle_any

    def route(self, p: list[str], query: dict) -> None:
        method = self.command
        if p[:2] == ["api", "whoami-v2"] and method == "GET":
            return self.whoami()
        if p[:3] == ["api", "repos", "create"] and method == "POST":
            return self.create_repo()
        if p[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.validate_yaml()
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            if not rest and method == "GET":
                return self.model_info(repo_id, "main")
            if rest[:1] == ["revision"] and len(rest) == 2 and method == "GET":
                return self.model_info(repo_id, rest[1])
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                return self.tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if rest[:1] == ["preupload"] and len(rest) == 2 and method == "POST":
                return self.preupload(repo_id, rest[1])
            if rest[:1] == ["commit"] and len(rest) == 2 and method == "POST":
                return self.commit(repo_id, rest[1], query)
            if rest[:1] == ["branch"] and len(rest) == 2 and method == "POST":
                return self.create_branch(repo_id, rest[1])
        if len(p) == 2 and p[0] == "lfs-upload" and method == "PUT":
            return self.lfs_put(p[1])
        if len(p) == 6 and p[1].endswith(".git") and p[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{p[0]}/{p[1].removesuffix('.git')}"
            if p[5] == "batch":
                return self.lfs_batch(repo_id)
            if p[5] == "verify":
                return self.lfs_verify(repo_id)
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
        raise HubError(404, f"no route for {method} /{'/'.join(p)}")

    # ---- account and repos ----------------------------------------------------------------

    def whoami(self) -> None:
        user = self.user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self.send(
            200,
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )

    def create_repo(self) -> None:
        payload = self.json_body()
        user = self.user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test Hub only has model repos")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.base}/{repo_id}"
        if repo_id in self.state.repos:
            return self.send(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = self.state.repos[repo_id] = Repo(owner=user, private=private)
        repo.commit("main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, "initial commit")
        self.send(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo_id: str, branch: str) -> None:
        payload = self.json_body()
        _, repo = self.writer(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.revision(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        self.send(200, {})

    def validate_yaml(self) -> None:
        content = self.json_body().get("content", "")
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as error:
                return self.send(400, {"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []})
            if metadata is not None and not isinstance(metadata, dict):
                return self.send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self.send(200, {"errors": [], "warnings": []})

    def model_info(self, repo_id: str, revision: str) -> None:
        repo = self.repo(repo_id)
        sha = self.revision(repo, revision)
        files = repo.commits[sha]
        card = card_metadata(files.get("README.md"))
        self.send(
            200,
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "createdAt": repo.created,
                "lastModified": now(),
                "downloads": 0,
                "likes": 0,
                "library_name": card.get("library_name"),
                "pipeline_tag": card.get("pipeline_tag"),
                "tags": card.get("tags", []),
                "cardData": card or None,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    # ---- files --------------------------------------------------------------------------

    def tree(self, repo_id: str, revision: str, path: str, query: dict) -> None:
        repo = self.repo(repo_id)
        files = repo.commits[self.revision(repo, revision)]
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        folders, entries = set(), []
        for name in sorted(files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                blob = files[name]
                entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": name}
                if blob.lfs:
                    entry["lfs"] = {
                        "oid": blob.sha256,
                        "size": len(blob.data),
                        "pointerSize": len(lfs_pointer(blob.sha256, len(blob.data))),
                    }
                entries.append(entry)
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        dirs = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self.send(200, dirs + entries)

    def resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.repo(repo_id)
        sha = self.revision(repo, revision)
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag}"', "Accept-Ranges": "none"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        self.send(200, raw=blob.data, headers=headers, content_type="application/octet-stream")

    # ---- upload: preupload, LFS, commit ----------------------------------------------------

    def preupload(self, repo_id: str, revision: str) -> None:
        payload = self.json_body()
        _, repo = self.writer(repo_id)
        files = repo.commits[self.revision(repo, revision)]
        answer = []
        for item in payload.get("files", []):
            sample = base64.b64decode(item["sample"])
            lfs = (
                any(fnmatch.fnmatch(item["path"], p) for p in LFS_PATTERNS)
                or b"\0" in sample
                or item["size"] > 10_000_000
            )
            existing = files.get(item["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.oid)
            answer.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self.send(200, {"files": answer})

    def lfs_batch(self, repo_id: str) -> None:
        payload = self.json_body()
        self.writer(repo_id)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "only the basic upload transfer is supported")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                self.state.lfs_expected[obj["oid"]] = obj["size"]
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.base}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self.send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid: str) -> None:
        data = self.body
        if oid not in self.state.lfs_expected:
            raise HubError(403, "upload not announced by a batch request")
        if hashlib.sha256(data).hexdigest() != oid or len(data) != self.state.lfs_expected[oid]:
            raise HubError(400, "uploaded bytes do not match the announced sha256 and size")
        self.state.lfs_objects[oid] = data
        self.send(200, raw=b"", headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, repo_id: str) -> None:
        payload = self.json_body()
        self.writer(repo_id)
        data = self.state.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, "object not uploaded")
        self.send(200, {})

    def commit(self, repo_id: str, revision: str, query: dict) -> None:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        _, repo = self.writer(repo_id)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this test Hub")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]])
        header = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[revision]:
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for name in [n for n in files if n.startswith(folder)]:
                    del files[name]
            else:
                raise HubError(400, f"unknown commit operation {key}")
        sha = repo.commit(revision, files, header.get("summary", ""))
        self.send(
            200,
            {"success": True, "commitOid": sha, "commitUrl": f"{self.base}/{repo_id}/commit/{sha}", "hookOutput": ""},
        )


def card_metadata(readme: Blob | None) -> dict:
    """The YAML front matter of a README.md, as the Hub exposes it in ``cardData``."""
    if readme is None or not readme.data.startswith(b"---"):
        return {}
    try:
        metadata = yaml.safe_load(readme.data.decode().split("---")[1])
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """The Hub on 127.0.0.1, in a background thread: ``with HubServer() as hub: ... hub.url``."""

    def __init__(self, tokens: dict[str, str] | None = None, port: int = 0, echo_status: int | None = None):
        self.state = HubState(tokens or {"hf_test_alice": "alice"})
        self.state.echo_status = echo_status
        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.httpd.state = self.state
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the test Hub by hand (HF_ENDPOINT=http://127.0.0.1:PORT).")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--echo-status",
        type=int,
        default=None,
        help="answer every request with this status, echoing its Authorization header back",
    )
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN:USER",
        help="a token and its user (default: hf_test_alice:alice)",
    )
    args = parser.parse_args()
    tokens = dict(t.split(":", 1) for t in args.token) or None
    server = HubServer(tokens, args.port, args.echo_status)
    print(f"test Hub at {server.url} (tokens: {', '.join(server.state.tokens)}); Ctrl-C to stop")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
