from __future__ import annotations

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
