"""Real registries for the image tests and benchmarks: Debian's ``docker-registry`` on a free
127.0.0.1 port, optionally behind htpasswd basic auth, filled with ``skopeo``; and a small HTTP
proxy of our own in front of one, which counts blob downloads, can corrupt a blob, slow the
transfer down, or demand a bearer token (the WWW-Authenticate challenge flow).
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType


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


class Registry:
    """A ``docker-registry`` process on 127.0.0.1, storing into ``root`` (its config and log
    are there too). ``with Registry(root) as reg:`` starts it and stops it at the end."""

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

    def _spawn(self) -> bool:
        with open(self.root / "registry.log", "ab") as log:
            self.process = subprocess.Popen(
                [find_registry_binary(), "serve", str(self.root / "config.yml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self._wait_ready()

    def start(self) -> Registry:
        for _attempt in range(5):
            self.port = free_port()
            self._config()
            if self._spawn():
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
        if not self._spawn():
            raise RuntimeError("docker-registry did not restart")

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def push(self, layout: Path, tag: str, repository: str, dest_tag: str | None = None, all: bool = False) -> str:
        """Copies ``layout:tag`` to ``repository:dest_tag`` here, digests preserved; returns the
        reference it is at."""
        ref = f"{self.host}/{repository}:{dest_tag or tag}"
        command = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        if all:
            command.append("--all")
        if self.users:
            user, password = next(iter(self.users.items()))
            command += ["--dest-creds", f"{user}:{password}"]
        command += [f"oci:{layout}:{tag}", f"docker://{ref}"]
        subprocess.run(command, check=True, capture_output=True)
        return ref

    def fill(self, images: Path) -> None:
        """Pushes the stand-ins of `testkit.images.build_all` under Docker Hub-style names."""
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

    def _send(
        self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, step: int = 0
    ) -> None:
        """Sends the response; with `step`, the body in chunks of that size, `delay` apart."""
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if not step:
            handler.wfile.write(body)
            return
        for start in range(0, len(body), step):
            handler.wfile.write(body[start : start + step])
            handler.wfile.flush()
            time.sleep(self.delay)

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
        step = 0
        if "/blobs/sha256:" in path and method == "GET":
            digest = path.rsplit("/", 1)[1]
            with self.lock:
                self.blob_gets[digest] += 1
            if digest in self.corrupt and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            if self.delay:
                step = 64 * 1024
        self._send(handler, response.status, passed, body, step)

    def _token(self, handler: BaseHTTPRequestHandler) -> None:
        expected = "Basic " + base64.b64encode(":".join(self.bearer or ("", "")).encode()).decode()
        if self.bearer is None or handler.headers.get("Authorization") != expected:
            return self._send(handler, 401, {"Content-Type": "application/json"}, b'{"details":"bad credentials"}')
        body = json.dumps({"token": self.token, "access_token": self.token, "expires_in": 300}).encode()
        self._send(handler, 200, {"Content-Type": "application/json"}, body)

    def blob_downloads(self) -> dict[str, int]:
        with self.lock:
            return dict(self.blob_gets)
