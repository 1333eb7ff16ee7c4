"""The HTTP side of a remote runtime: requests, the API key, and server errors turned back into
``boxlite.errors`` classes.

Async calls go through an ``httpx.AsyncClient`` of the running event loop (a client is tied to
the loop it was made on, so each loop gets its own); the few calls the API makes without
``await`` (``Box.info()``, ``Boxlite.metrics()``, ``Execution.kill()``) and file transfers (run
in a worker thread) use one ``httpx.Client``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from ..errors import BoxliteError, UpstreamUnavailableError, error_from_wire
from .options import BoxliteRestOptions
from .session import ExecSession

#: Bytes of a non-JSON error body quoted in the error message at most.
_QUOTED_BODY = 300
#: Largest WebSocket message accepted from the server (output chunks are far smaller).
WS_MAX_MESSAGE = 16 * 1024 * 1024


async def _close_when_the_loop_ends(client: httpx.AsyncClient) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await client.aclose()


def _quote(part: str) -> str:
    return quote(part, safe="")


class RestClient:
    """Requests to one server under ``/v1/<prefix>``, authenticated, with typed errors."""

    def __init__(self, options: BoxliteRestOptions) -> None:
        self.url = options.url.rstrip("/")
        self.root = f"/v1/{_quote(options.path_prefix or 'default')}"
        self.timeout = float(options.timeout)
        self._headers = {} if options.credential is None else {"Authorization": f"Bearer {options.credential.key}"}
        self._quick = httpx.Timeout(self.timeout)
        # Creating, starting, stopping and transfers take as long as the server lets them.
        self._long = httpx.Timeout(self.timeout, read=None, write=None)
        # One client per event loop (a client's connections belong to the loop that made them),
        # closed by a task of that loop when the loop ends (asyncio.run cancels its tasks).
        self._async: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Task[None]]
        ] = weakref.WeakKeyDictionary()
        self._sync: httpx.Client | None = None
        self._lock = threading.Lock()
        # The exec session of each loop (opened at its first command, again if it dropped), and
        # whether the server offers one (asked once, from /v1/config).
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[asyncio.Lock, list[ExecSession]]] = (
            weakref.WeakKeyDictionary()
        )
        self.session_offered: bool | None = None

    # -- paths -------------------------------------------------------------------------------

    def box_path(self, box: str, *rest: str) -> str:
        return "/".join([self.root, "boxes", _quote(box), *rest])

    def execution_path(self, box: str, execution_id: str, *rest: str) -> str:
        return self.box_path(box, "executions", _quote(execution_id), *rest)

    # -- clients -----------------------------------------------------------------------------

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._async.get(loop)
            if held is None:
                client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._quick)
                held = (client, loop.create_task(_close_when_the_loop_ends(client)))
                self._async[loop] = held
            return held[0]

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._sync is None:
                self._sync = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._quick)
            return self._sync

    async def aclose(self) -> None:
        """Closes the connections of this loop and the blocking ones (a later request opens new
        ones); other loops' close when those loops end."""
        with self._lock:
            held = self._async.pop(asyncio.get_running_loop(), None)
            sessions = self._sessions.pop(asyncio.get_running_loop(), None)
            sync, self._sync = self._sync, None
        for session in sessions[1] if sessions is not None else []:
            await session.close()
        if sync is not None:
            sync.close()
        if held is not None:
            held[1].cancel()  # its cleanup closes the client
            await asyncio.gather(held[1], return_exceptions=True)

    def close_sync(self) -> None:
        """Closes the blocking connections; each loop's close when that loop ends."""
        with self._lock:
            sync, self._sync = self._sync, None
        if sync is not None:
            sync.close()

    # -- requests ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        long: bool = False,
    ) -> Any:
        """Sends a request; the parsed JSON answer (``None`` for an empty one)."""
        client = self._async_client()
        try:
            response = await client.request(
                method,
                path,
                json=json_body,
                params=params,
                content=content,
                headers=headers,
                timeout=self._long if long else self._quick,
            )
        except httpx.HTTPError as e:
            raise self.unreachable(e, method, path) from e
        return self.parse(response)

    async def read_limited(self, path: str, params: Mapping[str, str], limit: int) -> bytes:
        """A raw answer's body, at most ``limit`` bytes of it (the rest is not read)."""
        client = self._async_client()
        data = bytearray()
        try:
            async with client.stream("GET", path, params=params, timeout=self._long) as response:
                if response.is_error:
                    await response.aread()
                    raise self.error_of(response)
                async for chunk in response.aiter_bytes():
                    data += chunk[: limit - len(data)]
                    if len(data) >= limit:
                        break
        except httpx.HTTPError as e:
            raise self.unreachable(e, "GET", path) from e
        return bytes(data)

    def request_sync(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        long: bool = False,
    ) -> Any:
        try:
            response = self._sync_client().request(
                method,
                path,
                json=json_body,
                params=params,
                content=content,
                headers=headers,
                timeout=self._long if long else self._quick,
            )
        except httpx.HTTPError as e:
            raise self.unreachable(e, method, path) from e
        return self.parse(response)

    @contextmanager
    def stream_sync(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[Iterator[bytes]]:
        """A streamed answer's body, chunk by chunk (an error answer raises before)."""
        try:
            with self._sync_client().stream(method, path, params=params, headers=headers, timeout=self._long) as r:
                if r.is_error:
                    r.read()
                    raise self.error_of(r)
                yield self._chunks(r, method, path)
        except httpx.HTTPError as e:
            raise self.unreachable(e, method, path) from e

    def _chunks(self, response: httpx.Response, method: str, path: str) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as e:
            raise self.unreachable(e, method, path) from e

    # -- exec session ------------------------------------------------------------------------

    async def exec_session(self) -> ExecSession | None:
        """This loop's exec session, opened if need be; ``None`` if the server has none."""
        if self.session_offered is None:
            try:
                config = await self.request("GET", "/v1/config")
            except UpstreamUnavailableError:
                raise
            except BoxliteError:
                config = None
            capabilities = config.get("capabilities") if isinstance(config, dict) else None
            self.session_offered = isinstance(capabilities, dict) and capabilities.get("exec_session") is True
        if not self.session_offered:
            return None
        loop = asyncio.get_running_loop()
        with self._lock:
            held = self._sessions.get(loop)
            if held is None:
                held = self._sessions[loop] = (asyncio.Lock(), [])
        lock, current = held
        async with lock:
            if not current or not current[0].open:
                current[:] = [ExecSession(self, await self.websocket(f"{self.root}/session"))]
            return current[0]

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(self, path: str) -> ClientConnection:
        """An open WebSocket to ``path``; a refused handshake raises the server's error."""
        ws_url = "ws" + self.url[len("http") :] + path
        try:
            return await connect(
                ws_url,
                additional_headers=self._headers,
                open_timeout=self.timeout,
                max_size=WS_MAX_MESSAGE,
                compression=None,
            )
        except InvalidStatus as e:
            response = e.response
            raise self._error_from_body(response.status_code, bytes(response.body or b"")) from e
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as e:
            raise self.unreachable(e, "GET", path) from e

    # -- answers and errors ------------------------------------------------------------------

    def parse(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise self.error_of(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise self.bad_reply(
                f"an answer that is not JSON to {response.request.method} {response.request.url.path}"
            ) from e

    def error_of(self, response: httpx.Response) -> BoxliteError:
        return self._error_from_body(response.status_code, bytes(response.content))

    def _error_from_body(self, status: int, body: bytes) -> BoxliteError:
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None
        if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
            text = body[:_QUOTED_BODY].decode(errors="replace").strip()
            quoted = f": {text}" if text else ""
            parsed = {"error": {"message": f"the server at {self.url} answered HTTP {status}{quoted}"}}
        return error_from_wire(parsed, status)

    def unreachable(self, error: BaseException, method: str, path: str) -> UpstreamUnavailableError:
        what = f"{method} {path}"
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, OSError)):
            return UpstreamUnavailableError(
                f"cannot reach the boxlite server at {self.url} ({error or type(error).__name__}); "
                "is `boxlite serve` running there, and is the URL right?"
            )
        if isinstance(error, (httpx.TimeoutException, asyncio.TimeoutError)):
            return UpstreamUnavailableError(
                f"the boxlite server at {self.url} did not answer {what} within {self.timeout:g} s"
            )
        return UpstreamUnavailableError(
            f"lost the connection to the boxlite server at {self.url} during {what}: {error or type(error).__name__}"
        )

    def lost(self, when: str, reason: str) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(f"lost the connection to the boxlite server at {self.url} {when}: {reason}")

    def bad_reply(self, what: str) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(f"the server at {self.url} sent {what}; is it a boxlite server?")


__all__ = ["RestClient"]
