"""The admin listener's HTTP/1.1 layer (doproxy/admin/http.py) against ordinary and hostile
clients, on real sockets: keep-alive, HEAD, pipelining, streams, and the bounds (head and body
size, slow clients, connections, request smuggling). And that a plain server never imports
aiohttp, the reason the layer exists."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httptools
import pytest

from doproxy.admin import http as web
from doproxy.admin.server import addr_path
from tests.support import Client, Response

pytestmark = pytest.mark.timeout(30)


class App:
    """A small application on the layer, recording what its handlers saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # paths handled
        self.streams = 0  # streams being written
        self.release = asyncio.Event()  # /slow answers once set
        self.app = web.Application(client_max_size=1024)
        r = self.app.router
        r.add_get("/echo/{name}", self.echo)
        r.add_post("/body", self.body)
        r.add_get("/slow", self.slow)
        r.add_get("/stream", self.stream)
        r.add_get("/flood", self.flood)
        self.flood_error: BaseException | None = None

    async def echo(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response(
            {"name": request.match_info["name"], "query": request.query, "host": request.host}
        )

    async def body(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response({"json": await request.json()})

    async def slow(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        await self.release.wait()
        return web.json_response({"slow": True})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.streams += 1
        try:
            await resp.write(b"first\n\n")
            await self.release.wait()
            await resp.write(b"second\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.streams -= 1
        return resp

    async def flood(self, request: web.Request) -> web.StreamResponse:
        """Writes 1 MiB after 1 MiB to a client that reads nothing."""
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"x" * (1 << 20))
        except ConnectionResetError as e:
            self.flood_error = e
        return resp


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, web.Server, int]]:
    app = App()
    server = web.Server(app.app)
    await server.start("127.0.0.1", 0)
    try:
        yield app, server, server.addresses[0][1]
    finally:
        app.release.set()
        await server.stop()


async def responses(c: Client, n: int) -> list[Response]:
    """The next `n` responses on a connection, however they arrive (several in one read)."""
    found: list[Response] = []
    parts: dict[str, Any] = {}

    class Collect:
        def on_message_begin(self) -> None:
            parts.update(headers=[], body=bytearray())

        def on_header(self, name: bytes, value: bytes) -> None:
            parts["headers"].append((name, value))

        def on_body(self, body: bytes) -> None:
            parts["body"] += body

        def on_message_complete(self) -> None:
            found.append(Response(parser.get_status_code(), parts["headers"], bytes(parts["body"])))

    parser = httptools.HttpResponseParser(Collect())
    async with asyncio.timeout(5):
        while len(found) < n:
            data = await c.reader.read(65536)
            if not data:
                raise EOFError(f"closed after {len(found)} responses")
            parser.feed_data(data)
    return found


def req(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{length}{extra}\r\n".encode() + body


async def test_keep_alive_head_query_and_errors(served: tuple[App, web.Server, int]) -> None:
    app, _, port = served
    c = await Client.connect(port)
    try:
        await c.send(req("GET", "/echo/a%20b?x=1&x=2&y="))
        r = await c.response()
        assert r.status == 200 and r.header("Content-Type") == b"application/json; charset=utf-8"
        assert r.header("Connection") is None and r.header("Date") is not None
        assert json.loads(r.body) == {
            "name": "a b",
            "query": {"x": "1", "y": ""},  # the first of a repeated parameter
            "host": "127.0.0.1",
        }
        # HEAD: GET's head, Content-Length included, and no body; the connection goes on.
        await c.send(req("GET", "/echo/a"))
        got = await c.response()
        await c.send(req("HEAD", "/echo/a"))
        head = await c.response(head_request=True)
        assert head.status == 200 and head.body == b""
        assert head.header("Content-Length") == str(len(got.body)).encode()
        assert head.header("Content-Type") == got.header("Content-Type")
        await c.send(req("GET", "/nothing"))
        missing = await c.response()
        await c.send(req("PUT", "/echo/a"))
        wrong = await c.response()
        assert (missing.status, json.loads(missing.body)) == (404, {"error": "Not Found"})
        assert (wrong.status, json.loads(wrong.body)) == (405, {"error": "Method Not Allowed"})
        await c.send(req("POST", "/body", b'{"a": [1, 2]}'))
        r = await c.response()
        assert (r.status, json.loads(r.body)) == (200, {"json": {"a": [1, 2]}})
        assert app.seen == ["/echo/a b", "/echo/a", "/echo/a", "/body"]
    finally:
        await c.close()


async def test_http10_expect_continue_and_chunked_bodies(
    served: tuple[App, web.Server, int],
) -> None:
    _, _, port = served
    # HTTP/1.0 without keep-alive: answered, then closed.
    c = await Client.connect(port)
    await c.send(b"GET /echo/old HTTP/1.0\r\nHost: localhost\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.header("Connection") == b"close"
    assert await c.closed()
    # Expect: 100-continue is answered before the body is sent.
    c = await Client.connect(port)
    try:
        await c.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await c.send(b"[]")
        r = await c.response()
        assert (r.status, json.loads(r.body)) == (200, {"json": []})
        # A chunked body is read whole.
        await c.send(
            b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\n[12\r\n2\r\n3]\r\n0\r\n\r\n"
        )
        r = await c.response()
        assert (r.status, json.loads(r.body)) == (200, {"json": [123]})
    finally:
        await c.close()


async def test_pipelined_requests_are_answered_in_order(
    served: tuple[App, web.Server, int],
) -> None:
    app, _, port = served
    c = await Client.connect(port)
    try:
        # The first waits; the others, read in the same packet, wait behind it.
        await c.send(req("GET", "/slow") + req("POST", "/body", b"[1]") + req("GET", "/echo/three"))
        await asyncio.sleep(0.2)
        assert app.seen == ["/slow"]
        app.release.set()
        answers = await responses(c, 3)
        assert [a.status for a in answers] == [200, 200, 200]
        assert [json.loads(a.body) for a in answers] == [
            {"slow": True},
            {"json": [1]},
            {"name": "three", "query": {}, "host": "127.0.0.1"},
        ]
    finally:
        await c.close()


async def test_too_many_pipelined_requests(
    served: tuple[App, web.Server, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "MAX_PIPELINED", 2)
    app, _, port = served
    c = await Client.connect(port)
    await c.send(b"".join(req("GET", f"/echo/{i}") for i in range(5)))
    answers = await responses(c, 3)
    assert [a.status for a in answers] == [200, 200, 400]
    assert "pipelined" in json.loads(answers[2].body)["error"]
    assert await c.closed()
    assert app.seen == ["/echo/0", "/echo/1"]


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
    ],
)
async def test_request_smuggling_is_refused(
    served: tuple[App, web.Server, int], headers: str
) -> None:
    """Two framings of one body (the front and the back of a chain could each take another):
    400 and closed, and nothing behind it is handled."""
    app, _, port = served
    smuggled = req("GET", "/echo/smuggled")
    c = await Client.connect(port)
    await c.send(f"POST /body HTTP/1.1\r\nHost: x\r\n{headers}\r\n0\r\n\r\n".encode() + smuggled)
    r = await c.response()
    assert r.status == 400 and "not valid HTTP/1.1" in json.loads(r.body)["error"]
    assert r.header("Connection") == b"close"
    assert await c.closed()
    assert app.seen == []


async def test_nothing_is_upgraded(served: tuple[App, web.Server, int]) -> None:
    """An Upgrade request is answered as any other, then closed (what follows it is not
    HTTP/1.1 any more); CONNECT names no path: 400."""
    app, _, port = served
    c = await Client.connect(port)
    await c.send(
        req("GET", "/echo/up", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n")
        + b"\x81\x05hello"
    )
    r = await c.response()
    assert r.status == 200 and r.header("Connection") == b"close"
    assert await c.closed()
    c = await Client.connect(port)
    await c.send(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
    r = await c.response()
    assert r.status == 400 and await c.closed()
    assert app.seen == ["/echo/up"]


async def test_an_oversized_head_is_refused(served: tuple[App, web.Server, int]) -> None:
    _, _, port = served
    # Whole, in one write.
    c = await Client.connect(port)
    await c.send(req("GET", "/echo/a", extra=f"X-Big: {'b' * web.MAX_HEAD}\r\n"))
    r = await c.response()
    assert r.status == 431 and await c.closed()
    # Many small headers.
    many = "".join(f"X-{i}: {i}\r\n" for i in range(web.MAX_HEADERS + 1))
    c = await Client.connect(port)
    await c.send(req("GET", "/echo/a", extra=many))
    r = await c.response()
    assert r.status == 431 and "headers" in json.loads(r.body)["error"]
    assert await c.closed()
    # Growing without end, header after header, never finished: refused once past the limit,
    # not held.
    c = await Client.connect(port)
    await c.send(b"GET /echo/a HTTP/1.1\r\nHost: x\r\n")
    line = b"X-More: " + b"m" * 1000 + b"\r\n"
    try:
        for _ in range(web.MAX_HEAD // len(line) + 2):
            await c.send(line)
    except (ConnectionResetError, BrokenPipeError):
        pass
    r = await c.response()
    assert r.status == 431
    assert await c.closed()
    # One endless header value (llhttp gathers it before any callback sees it).
    c = await Client.connect(port)
    await c.send(b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Long: ")
    try:
        for _ in range(web.MAX_HEAD // 1000 + 2):
            await c.send(b"v" * 1000)
    except (ConnectionResetError, BrokenPipeError):
        pass
    r = await c.response()
    assert r.status == 431 and await c.closed()


async def test_an_oversized_body_is_refused(served: tuple[App, web.Server, int]) -> None:
    app, _, port = served  # client_max_size = 1024
    # Said by its Content-Length: refused before it is sent.
    c = await Client.connect(port)
    await c.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n")
    r = await c.response()
    assert r.status == 413 and "1024" in json.loads(r.body)["error"]
    assert await c.closed()
    # Chunked: refused as it passes the limit.
    c = await Client.connect(port)
    await c.send(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(3):
            await c.send(b"200\r\n" + b"[" * 512 + b"\r\n")
    except (ConnectionResetError, BrokenPipeError):
        pass
    r = await c.response()
    assert r.status == 413 and await c.closed()
    # At the limit it is read.
    body = b"[" + b" " * 1022 + b"]"
    c = await Client.connect(port)
    try:
        await c.send(req("POST", "/body", body))
        r = await c.response()
        assert (r.status, json.loads(r.body)) == (200, {"json": []})
    finally:
        await c.close()
    assert app.seen == ["/body"]


async def test_slow_and_idle_clients_time_out(
    served: tuple[App, web.Server, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(web, "KEEPALIVE_TIMEOUT", 0.5)
    app, _, port = served
    loop = asyncio.get_running_loop()
    # A head that never ends (a byte now and then does not extend the deadline): 408.
    c = await Client.connect(port)
    started = loop.time()
    await c.send(b"GET /echo/a HTTP/1.1\r\n")
    for _ in range(3):
        await asyncio.sleep(0.1)
        await c.send(b"X")
    r = await c.response()
    assert r.status == 408 and await c.closed()
    assert loop.time() - started < 2
    # A body that stops short: 408.
    c = await Client.connect(port)
    await c.send(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n[1")
    r = await c.response()
    assert r.status == 408 and await c.closed()
    # A connection that sends nothing, and one idle after its answer: closed.
    c = await Client.connect(port)
    assert await c.closed(timeout=3)
    c = await Client.connect(port)
    await c.send(req("GET", "/echo/a"))
    assert (await c.response()).status == 200
    await asyncio.sleep(0.35)  # past the request timeout, within keep-alive
    await c.send(req("GET", "/echo/b"))
    assert (await c.response()).status == 200
    assert await c.closed(timeout=3)
    assert app.seen == ["/echo/a", "/echo/b"]


async def test_a_client_that_reads_nothing_is_cut_off(
    served: tuple[App, web.Server, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "WRITE_TIMEOUT", 0.5)
    app, server, port = served
    c = await Client.connect(port)
    await c.send(req("GET", "/flood"))
    for _ in range(100):
        if app.flood_error is not None:
            break
        await asyncio.sleep(0.1)
    assert isinstance(app.flood_error, ConnectionResetError)
    for _ in range(50):
        if not server.connections:
            break
        await asyncio.sleep(0.1)
    assert not server.connections
    await c.close()


async def test_connections_are_capped(
    served: tuple[App, web.Server, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 3)
    _, server, port = served
    held = [await Client.connect(port) for _ in range(3)]
    for c in held:
        await c.send(req("GET", "/echo/held"))
        assert (await c.response()).status == 200
    extra = await Client.connect(port)
    try:
        r = await extra.response()
        assert r.status == 503 and "connections" in json.loads(r.body)["error"]
    except (EOFError, ConnectionResetError):
        pass  # or closed before its answer could be read
    assert await extra.closed()
    # Those held still work; one closed makes room.
    await held[0].send(req("GET", "/echo/again"))
    assert (await held[0].response()).status == 200
    await held[0].close()
    for _ in range(50):
        if len(server.connections) < 3:
            break
        await asyncio.sleep(0.05)
    room = await Client.connect(port)
    await room.send(req("GET", "/echo/room"))
    assert (await room.response()).status == 200
    for c in (*held[1:], room):
        await c.close()


async def test_streams(served: tuple[App, web.Server, int]) -> None:
    app, server, port = served
    # HEAD: the head only, and the connection goes on.
    c = await Client.connect(port)
    await c.send(req("HEAD", "/stream"))
    head = await c.response(head_request=True)
    assert head.status == 200 and head.header("Content-Type") == b"text/event-stream"
    await c.send(req("GET", "/echo/after"))
    assert (await c.response()).status == 200
    await c.close()
    # A client that leaves ends its stream at once (not at the next write).
    c = await Client.connect(port)
    await c.send(req("GET", "/stream"))
    head_bytes = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Transfer-Encoding: chunked" in head_bytes
    first = b"7\r\nfirst\n\n\r\n"
    assert await asyncio.wait_for(c.reader.readexactly(len(first)), 5) == first
    assert app.streams == 1
    await c.close()
    for _ in range(50):
        if app.streams == 0 and not server.connections:
            break
        await asyncio.sleep(0.05)
    assert app.streams == 0 and not server.connections
    # A stream ends with its last chunk; a stop closes what is open.
    c = await Client.connect(port)
    await c.send(req("GET", "/stream"))
    await asyncio.wait_for(c.reader.readuntil(b"first\n\n\r\n"), 5)
    app.release.set()
    rest = await asyncio.wait_for(c.reader.readuntil(b"0\r\n\r\n"), 5)
    assert rest == b"8\r\nsecond\n\n\r\n0\r\n\r\n"
    await server.stop()
    assert await c.closed()
    assert not server.connections


async def test_a_stop_waits_for_an_answer_being_made(
    served: tuple[App, web.Server, int],
) -> None:
    app, server, port = served
    idle = await Client.connect(port)
    busy = await Client.connect(port)
    await busy.send(req("GET", "/slow"))
    while app.seen != ["/slow"]:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.stop(grace=5))
    assert await idle.closed(timeout=2)
    app.release.set()
    r = await busy.response()
    assert r.status == 200 and r.header("Connection") == b"close"
    assert await busy.closed()
    await asyncio.wait_for(stopping, 5)


async def test_a_client_leaving_the_event_stream_frees_it_at_once(tmp_path: Path) -> None:
    """The admin listener's own stream: its place among MAX_STREAMS and its waiter in the event
    log are given back when the client leaves, not at the next keep-alive (15 s later)."""
    from doproxy.config import load_settings
    from doproxy.inventory import load_inventory
    from doproxy.runtime import Runtime
    from tests.test_admin import config, inventory

    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(config())
    (tmp_path / "inventory.toml").write_text(inventory(9))
    rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
    await rt.start()
    try:
        admin = rt.admin
        assert admin is not None and admin.address is not None
        for _ in range(3):
            c = await Client.connect(admin.address[1])
            await c.send(req("GET", "/api/events/stream"))
            head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.wait_for(c.reader.readuntil(b"retry: 2000\n\n\r\n"), 5)
            assert admin._streams == 1
            await c.close()
            for _ in range(100):
                if admin._streams == 0 and not rt.events._waiters:
                    break
                await asyncio.sleep(0.02)
            assert admin._streams == 0 and not rt.events._waiters
    finally:
        await rt.stop()


async def test_a_plain_server_never_imports_aiohttp(tmp_path: Path) -> None:
    """No DigitalOcean provider, no cluster: `doproxy serve`, its admin listener and every
    read-only endpoint run without aiohttp (~12 MiB resident; issue 12's memory budget).
    The server runs as it ships, in a process of its own (this one, the tests' clients, has
    aiohttp loaded), with `-X importtime`, which names on stderr every module it imports."""
    (tmp_path / "doproxy.toml").write_text(
        'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n'
        '[admin]\nbind = "127.0.0.1:0"\n'
    )
    (tmp_path / "inventory.toml").write_text(
        '[[droplet]]\nid = 1\nname = "b1"\nserver-host = "127.0.0.1:9"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "doproxy",
        "serve",
        "--config",
        str(tmp_path / "doproxy.toml"),
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        addr = addr_path(tmp_path / "inventory.toml")
        async with asyncio.timeout(20):
            while not addr.exists() or not addr.read_text().strip():
                assert proc.returncode is None, "the server stopped"
                await asyncio.sleep(0.05)
        port = int(addr.read_text().strip().rsplit(":", 1)[1])
        for path in (
            "/",
            "/healthz",
            "/metrics",
            "/api/status",
            "/api/autoscaler",
            "/api/events",
            "/api/openapi.json",
            "/api/config",
        ):
            c = await Client.connect(port)
            try:
                await c.send(req("GET", path))
                assert (await c.response()).status == 200, path
            finally:
                await c.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in err.decode().splitlines()
        if line.startswith("import time:")
    ]
    assert "doproxy.admin.http" in imported  # (the listing is there)
    assert [m for m in imported if m.split(".")[0] == "aiohttp"] == []
