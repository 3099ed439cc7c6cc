"""The admin listener's HTTP/1.1 server: a protocol per connection, requests, responses, a router.

Why it is written here: the admin listener ran on aiohttp's web server, and importing aiohttp
(with aiohttp.web) costs a server ~12 MiB resident, of the 64 MiB issue 12 allows for all of a
server's processes holding 10,000 idle connections. The data plane already loads httptools, and
its llhttp does all the parsing here (request line, headers, chunked bodies, and the framing
rules that refuse request smuggling); this module only frames the answers, routes, and bounds
what a client can make the listener hold. It offers just what the admin handlers use, under the
names aiohttp.web gives them (Request, Response, StreamResponse, json_response, the HTTP
exceptions, an Application with a router and middlewares), so the handlers read as they did.
aiohttp stays what the DigitalOcean provider (pydo.aio) and cluster mode's etcd client run on;
each imports it only when used.

Bounds, so that a hostile client cannot make the listener hold unbounded memory or sockets:
- at most MAX_CONNECTIONS connections at once: the next one is answered 503 and closed;
- a request head (request line and headers) above MAX_HEAD bytes, or with more than
  MAX_HEADERS headers: 431, and closed;
- a body above the application's client_max_size (by its Content-Length, or as chunked data
  arrives): 413, and closed;
- a request must arrive whole within REQUEST_TIMEOUT of its first byte: else 408, and closed;
  a new connection that sends nothing for REQUEST_TIMEOUT, or a keep-alive one idle for
  KEEPALIVE_TIMEOUT, is closed;
- a client that reads nothing of what it is sent for WRITE_TIMEOUT is cut off;
- pipelined requests are answered in order; reading pauses while they are, and at most
  MAX_PIPELINED may wait (more in one read: 400 for the rest, and closed);
- whatever llhttp refuses, a request with both Content-Length and Transfer-Encoding among it
  (request smuggling): 400, and closed. Nothing is upgraded: a request asking for it is
  answered as any other, and the connection closed after it (CONNECT: 400).
So a connection holds at most one head, one body and what one read brought of pipelined
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, cast, overload
from urllib.parse import parse_qsl, unquote

import httptools

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 128
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100  # a head of many tiny headers would cost far more as Python objects
MAX_BODY = 64 * 1024  # the default client_max_size
REQUEST_TIMEOUT = 10.0
KEEPALIVE_TIMEOUT = 75.0
WRITE_TIMEOUT = 30.0
MAX_PIPELINED = 16

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def reason(status: int) -> str:
    return REASONS.get(status, "Unknown")


# --- errors a handler raises --------------------------------------------------------------------


class HTTPException(Exception):
    """An answer with this status; `text` says why (empty: the status's reason)."""

    status = 500

    def __init__(self, *, text: str = "") -> None:
        super().__init__(text or self.reason)
        self.text = text

    @property
    def reason(self) -> str:
        return reason(self.status)


class HTTPBadRequest(HTTPException):
    status = 400


class HTTPNotFound(HTTPException):
    status = 404


class HTTPMethodNotAllowed(HTTPException):
    status = 405


class HTTPConflict(HTTPException):
    status = 409


class HTTPInternalServerError(HTTPException):
    status = 500


class HTTPServiceUnavailable(HTTPException):
    status = 503


# --- requests -----------------------------------------------------------------------------------


class Headers:
    """A request's headers by name, in any case; of a repeated one, the first."""

    __slots__ = ("_by_name",)

    def __init__(self, by_name: dict[str, str]) -> None:
        self._by_name = by_name  # lower-case names

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._by_name.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)


class Request:
    """One request, read whole (its body too) before a handler sees it."""

    def __init__(
        self,
        conn: _Connection,
        method: str,
        path: str,
        query_string: str,
        version: str,
        headers: Headers,
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path  # percent-decoded, as aiohttp's
        self.query_string = query_string
        self.version = version  # "1.1", "1.0"
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.match_info: dict[str, str] = {}
        self._query: dict[str, str] | None = None

    @property
    def host(self) -> str:
        """The Host header ("" without one)."""
        return self.headers.get("Host", "")

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters; of a repeated one, the first."""
        if self._query is None:
            pairs = parse_qsl(self.query_string, keep_blank_values=True)
            self._query = dict(reversed(pairs))
        return self._query

    async def json(self) -> Any:
        """The body as JSON (ValueError, UnicodeDecodeError when it is not)."""
        return json.loads(self.body.decode("utf-8"))


# --- responses ----------------------------------------------------------------------------------


class StreamResponse:
    """An answer written as it goes (chunked; to an HTTP/1.0 client, up to the close): `await
    prepare(request)` sends the head, `await write(data)` each part. Writing to a client that
    has gone, or after the head of a HEAD request, raises ConnectionResetError."""

    def __init__(self, *, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self._conn: _Connection | None = None
        self._chunked = False
        self._head_only = False

    @property
    def prepared(self) -> bool:
        return self._conn is not None

    async def prepare(self, request: Request) -> None:
        if self._conn is not None:
            return
        conn = request._conn
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self._chunked = request.version != "1.0"
        if not self._chunked:
            conn.close_after = True  # the body ends with the connection
        head = _head(
            self.status,
            self.headers,
            length=None,
            chunked=self._chunked,
            keep=self._chunked and conn.keeps(request),
            version=request.version,
        )
        conn.start_stream(self)
        conn.write(head)
        await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("write() before prepare()")
        if self._head_only:
            raise ConnectionResetError("a HEAD request is answered with the head only")
        if conn.lost:
            raise ConnectionResetError("the client has gone")
        if not data:
            return
        conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await conn.drain()

    async def _finish(self) -> None:
        conn = self._conn
        if conn is not None and self._chunked and not self._head_only and not conn.lost:
            conn.write(b"0\r\n\r\n")
            await conn.drain()


class Response(StreamResponse):
    """An answer whose body is known whole (sent with its Content-Length)."""

    def __init__(
        self,
        *,
        body: bytes = b"",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self.body = body
        if content_type is not None:
            self.headers["Content-Type"] = content_type


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)))
    return _date_cache[1]


def _head(
    status: int,
    headers: Mapping[str, str],
    *,
    length: int | None,
    chunked: bool,
    keep: bool,
    version: str,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    named = False
    for name, value in headers.items():
        low = name.lower()
        if low in _FRAMING:
            continue  # framing is this module's
        named = named or low == "content-type"
        lines.append(f"{name}: {value}")
    if not named and length:
        lines.append("Content-Type: application/octet-stream")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append(f"Date: {_date()}")
    lines.append("Server: doproxy")
    if not keep:
        lines.append("Connection: close")
    elif version == "1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _error_bytes(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = _head(
        status,
        {"Content-Type": "application/json; charset=utf-8"},
        length=len(body),
        chunked=False,
        keep=False,
        version="1.1",
    )
    return head + body


# --- routing ------------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[StreamResponse]]
Middleware = Callable[[Request, Handler], Awaitable[StreamResponse]]
_F = TypeVar("_F")


def middleware(f: _F) -> _F:
    """Marks a middleware, as aiohttp's decorator does (here it changes nothing)."""
    return f


_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def _pattern(path: str) -> re.Pattern[str]:
    """ "/api/backends/{id}/{verb:drain|enable}" as a regular expression: `{name}` matches one
    path segment, `{name:regex}` what the regex does."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(path):
        out.append(re.escape(path[pos : m.start()]))
        out.append(f"(?P<{m[1]}>{m[2] or '[^{}/]+'})")
        pos = m.end()
    out.append(re.escape(path[pos:]))
    return re.compile("".join(out))


class Router:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.routes.append((method, _pattern(path), handler))

    def add_get(self, path: str, handler: Handler) -> None:
        """GET, and HEAD (the same answer without its body)."""
        self.add_route("GET", path, handler)
        self.add_route("HEAD", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add_route("POST", path, handler)

    def add_put(self, path: str, handler: Handler) -> None:
        self.add_route("PUT", path, handler)

    def resolve(self, request: Request) -> Handler:
        """The request's handler (its match_info set), else one raising 404 or 405: raised
        inside the middlewares, so that the Host and token checks come first."""
        known = False
        for method, pattern, handler in self.routes:
            m = pattern.fullmatch(request.path)
            if m is None:
                continue
            if method == request.method:
                request.match_info = m.groupdict()
                return handler
            known = True
        error = HTTPMethodNotAllowed() if known else HTTPNotFound()

        async def refuse(request: Request) -> StreamResponse:
            raise error

        return refuse


class Application:
    def __init__(
        self, *, middlewares: Iterable[Middleware] = (), client_max_size: int = MAX_BODY
    ) -> None:
        self.router = Router()
        self.middlewares = list(middlewares)
        self.client_max_size = client_max_size

    async def handle(self, request: Request) -> StreamResponse:
        handler = self.router.resolve(request)
        for mw in reversed(self.middlewares):
            handler = _wrapped(mw, handler)
        return await handler(request)


def _wrapped(mw: Middleware, inner: Handler) -> Handler:
    async def call(request: Request) -> StreamResponse:
        return await mw(request, inner)

    return call


# --- the listener -------------------------------------------------------------------------------


class _Refusal(Exception):
    """Raised in a parser callback: answer `status` with `message`, and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Server:
    """Serves an Application on one address: `await start(host, port)`, `await stop()`."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._all_gone: asyncio.Event | None = None

    async def start(self, host: str | None, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        names = [s.getsockname() for s in self._server.sockets]
        return [(str(name[0]), int(name[1])) for name in names]

    async def stop(self, grace: float = 1.0) -> None:
        """Stop listening; idle connections close at once, busy ones after their answer, and
        whatever is still open after `grace` seconds is cut."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        self._all_gone = asyncio.Event()
        for conn in list(self.connections):
            conn.shut()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._all_gone.wait()
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._server.wait_closed()
            self._server = None

    def _gone(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()


class _Connection(asyncio.Protocol):
    """One client connection: parse (llhttp), queue whole requests, answer them in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.max_body = server.app.client_max_size
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: list[Request | _Refusal] = []
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = True  # between requests (no byte of the next one read yet)
        self.in_request = False  # a request is being read
        self.in_head = False  # ... its head
        self.head_bytes = 0  # bytes read while in a head
        self.head_size = 0  # the head's URL and headers
        self.header_count = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.closing = False  # nothing more is read: close once what is queued is answered
        self.close_after = False  # close after the answer being written
        self.lost = False
        self.stream: StreamResponse | None = None  # a stream being written
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # --- asyncio's side ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        server.connections.add(self)
        if server.closing or len(server.connections) > MAX_CONNECTIONS:
            self.closing = True
            self.transport.write(
                _error_bytes(
                    503,
                    f"the admin listener has {MAX_CONNECTIONS} connections open already; "
                    "try again later",
                )
            )
            self.transport.close()
            return
        self._arm(REQUEST_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._disarm()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self.stream is not None and self.task is not None:
            self.task.cancel()  # the stream's reader has gone; nothing else is cancelled
        self.server._gone(self)

    def eof_received(self) -> bool | None:
        if self.stream is not None and self.task is not None:
            self.task.cancel()
        if self.task is None and not self.queue:
            return None  # close
        self.closing = True  # answer what is queued, then close
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.waiting:
            self.waiting = False
            self._arm(REQUEST_TIMEOUT)  # the next request's first byte: its deadline runs
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Answered as any request (it is queued already), nothing after it is read.
            self._stop_reading()
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if not isinstance(err, _Refusal):
                raise
            self._refuse(err.status, err.message)
            return
        except httptools.HttpParserError as e:
            self._refuse(400, f"the request is not valid HTTP/1.1 ({e})")
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._refuse(431, f"the request head is larger than {MAX_HEAD} bytes")
                return
        self._kick()

    # --- llhttp's callbacks ---

    def on_message_begin(self) -> None:
        self.in_request = self.in_head = True
        self.head_bytes = self.head_size = self.header_count = 0
        self.url = b""
        self.headers = {}
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_grew(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_grew(len(name) + len(value) + 4)
        self.header_count += 1
        if self.header_count > MAX_HEADERS:
            raise _Refusal(431, f"the request has more than {MAX_HEADERS} headers")
        key = name.decode("latin-1").lower()
        if key not in self.headers:
            self.headers[key] = value.decode("utf-8", "replace")

    def _head_grew(self, n: int) -> None:
        self.head_size += n
        if self.head_size > MAX_HEAD:
            raise _Refusal(431, f"the request head is larger than {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        self.in_head = False
        length = self.headers.get("content-length")
        if length is not None and int(length) > self.max_body:
            raise _Refusal(413, f"the body is larger than {self.max_body} bytes")
        expect = self.headers.get("expect", "").lower()
        if expect == "100-continue" and self.task is None and not self.queue and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.max_body:
            raise _Refusal(413, f"the body is larger than {self.max_body} bytes")
        self.body += body

    def on_message_complete(self) -> None:
        self.in_request = False
        if len(self.queue) >= MAX_PIPELINED:
            raise _Refusal(400, f"more than {MAX_PIPELINED} pipelined requests")
        parser = self.parser
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise _Refusal(400, "the request target is not a URL path") from None
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            unquote(url.path.decode("latin-1")),
            (url.query or b"").decode("latin-1"),
            parser.get_http_version(),
            Headers(self.headers),
            bytes(self.body),
            parser.should_keep_alive(),
        )
        self.body = bytearray()
        self.queue.append(request)
        self._disarm()  # no deadline while it is answered
        if self.transport is not None:
            self.transport.pause_reading()

    # --- answering ---

    def keeps(self, request: Request) -> bool:
        """Does the connection stay open after this request's answer? (When nothing more is
        read, it does while answers queued behind this one are still to be written.)"""
        last = self.closing and not self.queue
        return (
            request.keep_alive and not last and not self.close_after and not self.lost
        ) and not self.server.closing

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("the client has gone")
        if not self._write_paused:
            return
        self._drained = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self._drained
        except TimeoutError:
            self.abort()
            raise ConnectionResetError(
                f"the client read nothing for {WRITE_TIMEOUT:.0f} s"
            ) from None
        if self.lost:
            raise ConnectionResetError("the client has gone")

    def start_stream(self, stream: StreamResponse) -> None:
        self.stream = stream
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()  # to see the client leave (and queue what it sends)

    def _kick(self) -> None:
        if self.task is None and self.queue and not self.lost:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self.queue and not self.lost:
                item = self.queue.pop(0)
                if isinstance(item, _Refusal):
                    self.write(_error_bytes(item.status, item.message))
                    self.close_after = True
                    break
                if not await self._answer(item):
                    self.close_after = True
                    break
        except ConnectionResetError:
            self.close_after = True
        finally:
            self.task = None
        if self.lost or self.transport is None:
            return
        if self.close_after or (self.closing and not self.queue):
            self.transport.close()
            return
        # Ready for the next request (a pipelined one may be half read already).
        self.waiting = not self.in_request
        self._arm(KEEPALIVE_TIMEOUT if self.waiting else REQUEST_TIMEOUT)
        if not self.closing:
            self.transport.resume_reading()

    async def _answer(self, request: Request) -> bool:
        """Answer one request; whether the connection stays open."""
        try:
            resp = await self.server.app.handle(request)
        except HTTPException as e:
            resp = json_response({"error": e.text or e.reason}, status=e.status)
        except Exception:
            log.exception("admin listener: %s %s failed", request.method, request.path)
            if self.stream is not None:
                return False  # its head is sent: the stream ends cut
            resp = json_response({"error": "internal error (see the server's log)"}, status=500)
        finally:
            self.stream = None
        if resp.prepared:
            await resp._finish()
            return resp._chunked and self.keeps(request)
        keep = self.keeps(request)
        body = resp.body if isinstance(resp, Response) else b""
        head = _head(
            resp.status,
            resp.headers,
            length=len(body),
            chunked=False,
            keep=keep,
            version=request.version,
        )
        self.write(head if request.method == "HEAD" else head + body)
        await self.drain()
        return keep

    # --- ending ---

    def _refuse(self, status: int, message: str) -> None:
        """Read nothing more; answer what is queued, then this, then close."""
        self._stop_reading()
        self.in_head = self.in_request = False
        self.queue.append(_Refusal(status, message))
        self._kick()

    def _stop_reading(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.pause_reading()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.task is not None or self.lost or self.transport is None:
            return
        if self.in_request:
            self._refuse(408, f"the request did not arrive whole within {REQUEST_TIMEOUT:g} s")
        else:
            self.transport.close()  # nothing asked: an idle connection

    def shut(self) -> None:
        """The server stops: close now if idle, else after the answer being written."""
        self._stop_reading()
        if self.task is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()
