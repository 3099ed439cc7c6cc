from __future__ import annotations

import io

from doproxy.proxy.access import AccessLog
from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend, get, request


async def test_forwards_and_keeps_host(start_proxy: StartProxy, echo_backend: RawBackend) -> None:
    proxy = await start_proxy([echo_backend.port])
    r = await request(port_of(proxy), get("/hello?x=1", host="app.example"))
    assert r.status == 200
    assert r.body == b"GET /hello?x=1 len=0"
    sent = echo_backend.all_received
    assert b"Host: app.example\r\n" in sent
    assert b"X-Forwarded-Host: app.example\r\n" in sent
    assert b"X-Forwarded-Proto: http\r\n" in sent
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in sent


async def test_keep_alive_reuses_backend_connection(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    proxy = await start_proxy([echo_backend.port])
    c = await Client.connect(port_of(proxy))
    for i in range(20):
        await c.send(get(f"/{i}"))
        r = await c.response()
        assert r.status == 200
        assert r.body == f"GET /{i} len=0".encode()
    await c.close()
    # Twenty requests over one client connection used one backend connection.
    assert echo_backend.connections == 1


async def test_access_log_one_line_per_request(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    out = io.StringIO()
    proxy = await start_proxy([echo_backend.port], {"access-log": True})
    proxy.access = AccessLog("combined", stream=out)
    c = await Client.connect(port_of(proxy))
    await c.send(get("/a?b=1"))
    await c.response()
    await c.send(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx")
    await c.response()
    await c.close()
    empty = await start_proxy([], {"access-log": True})
    empty.access = proxy.access
    await request(port_of(empty), get("/none"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    backend = f"127.0.0.1:{echo_backend.port}"
    assert lines[0].startswith("127.0.0.1 - - [")
    assert '] "GET /a?b=1 HTTP/1.1" 200 ' in lines[0]
    assert lines[0].endswith(" " + backend)
    assert '] "POST /p HTTP/1.1" 200 ' in lines[1]
    assert '] "GET /none HTTP/1.1" 503 ' in lines[2]
    assert lines[2].endswith(" -")


async def test_access_log_is_off_by_default(
    start_proxy: StartProxy, echo_backend: RawBackend
) -> None:
    out = io.StringIO()
    proxy = await start_proxy([echo_backend.port])
    proxy.access = AccessLog("combined", stream=out)  # off: the connection never calls it
    await request(port_of(proxy), get())
    assert out.getvalue() == ""
