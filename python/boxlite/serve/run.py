"""``boxlite serve``: binds, starts uvicorn over the app, says where it listens, and on
SIGINT/SIGTERM stops serving, kills the commands it started and stops the runtime's boxes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn

from .._native import Options
from .._runtime import Boxlite
from ..errors import InvalidArgumentError
from .app import create_app
from .config import ServeConfig, config_from_args, is_loopback

#: Largest WebSocket message a client may send (stdin chunks; docs/serve.md).
WS_MAX_MESSAGE = 1024 * 1024


def check_bind(config: ServeConfig, host: str) -> None:
    if not config.keys and not is_loopback(host):
        raise InvalidArgumentError(
            f"refusing to listen on {host} without an API key: anyone who reaches it could run code in its "
            "boxes; give --api-key KEY or --api-keys-file FILE, or listen on 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(1024)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    config: ServeConfig, home: str | None, host: str, port: int, say: Callable[[str], None] | None = None
) -> None:
    """Serves the runtime at ``home`` until SIGINT/SIGTERM. ``port=0`` picks a free port; the
    URL is said (on stderr by default) once requests are answered."""
    say = say or (lambda text: print(f"boxlite serve: {text}", file=sys.stderr, flush=True))
    check_bind(config, host)
    sock = bind(host, port)
    runtime = Boxlite(Options(home_dir=home))
    server = _Server(
        uvicorn.Config(
            create_app(runtime, config),
            log_level="warning",
            lifespan="on",
            ws="websockets-sansio",
            ws_max_size=WS_MAX_MESSAGE,
            ws_per_message_deflate=False,  # small frames on fast links: compressing costs more than it saves
            proxy_headers=False,  # no proxy is trusted to name the client
            timeout_graceful_shutdown=5,
        )
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, setattr, server, "should_exit", True)
    try:
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn only sets a flag)
            await asyncio.sleep(0.02)
        if server.started:
            say(f"listening on {url_of(sock)}" + ("" if config.keys else " (no API key: loopback only)"))
        await serving
        if not server.started:
            raise InvalidArgumentError("the server did not start; see the messages above")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        sock.close()
        # The boxes are stopped whatever ended the serving; shielded from a second Ctrl-C.
        await asyncio.shield(runtime.shutdown())


async def main(args: argparse.Namespace) -> int:
    """``boxlite serve`` (the flags are in ``config.add_flags``)."""
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"invalid --port {args.port}: use 0 to 65535")
    await serve(config_from_args(args), args.home, args.host, args.port)
    return 0
