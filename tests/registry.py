"""Real registries for the image tests: Debian's ``docker-registry`` on a free 127.0.0.1 port,
optionally behind htpasswd basic auth, filled with ``skopeo``; and a small HTTP proxy of our own
in front of one, which counts blob downloads, can corrupt a blob, slow the transfer down, or
demand a bearer token (the WWW-Authenticate challenge flow).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "tests" / "images" / "build.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_registry_binary() -> str:
    for name in ("docker-registry", "registry"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("docker-registry not found: install the docker-registry package")


def build_test_images() -> Path:
    """The directory of the built test layouts (built once per machine, then cached)."""
    prebuilt = os.environ.get("BOXLITE_TEST_IMAGES")
    if prebuilt and (Path(prebuilt) / "done").is_file():
        return Path(prebuilt)
    out = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), str(REPO / "build" / "test-images")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


class Registry:
    """A ``docker-registry`` process on 127.0.0.1, storing into ``root``."""

    def __init__(self, root: Path, users: dict[str, str] | None = None) -> None:
        self.root = root
        self.users = users or {}
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.users:
            htpasswd = self.root / "htpasswd"
            lines = []
            for user, password in self.users.items():
                out = subprocess.run(
                    ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
                ).stdout
                lines.append(out.strip())
            htpasswd.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "boxlite-test", "path": str(htpasswd)}}
        path = self.root / "config.yml"
        # JSON is YAML: no YAML library needed.
        path.write_text(json.dumps(config))
        return path

    def start(self) -> Registry:
        binary = find_registry_binary()
        for _attempt in range(5):
            self.port = free_port()
            log = open(self.root / "registry.log", "ab")
            self.process = subprocess.Popen([binary, "serve", str(self._config())], stdout=log, stderr=log)
            log.close()
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.root / 'registry.log'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return True
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Starts again on the same port and storage (after `stop`)."""
        binary = find_registry_binary()
        log = open(self.root / "registry.log", "ab")
        self.process = subprocess.Popen([binary, "serve", str(self.root / "config.yml")], stdout=log, stderr=log)
        log.close()
        if not self._wait_ready():
            raise RuntimeError("docker-registry did not restart")

    def push(self, layout: Path, tag: str, repository: str, dest_tag: str | None = None, all: bool = False) -> None:
        """Copies ``layout:tag`` to ``repository:dest_tag`` here, digests preserved."""
        command = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        if all:
            command.append("--all")
        if self.users:
            user, password = next(iter(self.users.items()))
            command += ["--dest-creds", f"{user}:{password}"]
        command += [f"oci:{layout}:{tag}", f"docker://{self.host}/{repository}:{dest_tag or tag}"]
        subprocess.run(command, check=True, capture_output=True)

    def fill(self, images: Path) -> None:
        """Pushes the standard test images under Docker Hub-style names."""
        self.push(images / "alpine", "latest", "library/alpine")
        self.push(images / "alpine", "latest", "library/alpine", dest_tag="3.20")
        self.push(images / "python", "slim", "library/python")
        self.push(images / "layers", "latest", "boxlite/layers")
        self.push(images / "multiarch", "latest", "boxlite/multiarch", all=True)
        self.push(images / "foreign", "latest", "boxlite/foreign", all=True)


class Proxy:
    """An HTTP server in front of a registry that counts and can tamper with what it serves.

    ``corrupt``: blob digests whose bytes are altered (same length). ``delay``: seconds to
    sleep per 64 KiB of blob. ``bearer``: ``(user, password)`` turns on token auth: ``/v2/``
    requests need ``Authorization: Bearer <token>`` and ``/token`` hands the token out for
    those basic credentials.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.corrupt: set[str] = set()
        self.delay = 0.0
        self.bearer: tuple[str, str] | None = None
        self.token = secrets.token_hex(16)
        self.blob_gets: Counter[str] = Counter()
        self.requests: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_HEAD(self) -> None:
                proxy._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Proxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path
        with self.lock:
            self.requests.append(f"{method} {path}")
        if path.startswith("/token"):
            return self._token(handler)
        if self.bearer is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            realm = f'Bearer realm="http://{self.host}/token",service="boxlite-test"'
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "token required"}]}).encode()
            return self._send(handler, 401, {"WWW-Authenticate": realm, "Content-Type": "application/json"}, body)
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "range")}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        passed = {
            k: v
            for k, v in response.getheaders()
            if k.lower() in ("content-type", "docker-content-digest", "docker-distribution-api-version", "etag")
        }
        if "/blobs/sha256:" in path and method == "GET":
            digest = path.rsplit("/", 1)[1]
            with self.lock:
                self.blob_gets[digest] += 1
            if digest in self.corrupt and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            if self.delay:
                return self._send_slowly(handler, response.status, passed, body)
        self._send(handler, response.status, passed, body)

    def _send_slowly(self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        step = 64 * 1024
        for start in range(0, len(body), step):
            handler.wfile.write(body[start : start + step])
            handler.wfile.flush()
            time.sleep(self.delay)

    def _token(self, handler: BaseHTTPRequestHandler) -> None:
        expected = "Basic " + base64.b64encode(":".join(self.bearer or ("", "")).encode()).decode()
        if self.bearer is None or handler.headers.get("Authorization") != expected:
            return self._send(handler, 401, {"Content-Type": "application/json"}, b'{"details":"bad credentials"}')
        body = json.dumps({"token": self.token, "access_token": self.token, "expires_in": 300}).encode()
        self._send(handler, 200, {"Content-Type": "application/json"}, body)

    def blob_downloads(self) -> dict[str, int]:
        with self.lock:
            return dict(self.blob_gets)


def layout_blobs(layout: Path, tag: str) -> dict[str, int]:
    """``{digest: size}`` of the config and layers of ``layout:tag`` (manifest picked by tag)."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    out = {manifest["config"]["digest"]: manifest["config"]["size"]}
    out.update({layer["digest"]: layer["size"] for layer in manifest["layers"]})
    return out


def manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    return str(desc["digest"])


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
