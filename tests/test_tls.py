"""TLS termination at the proxy: TLS 1.2 and 1.3 with Mozilla's "intermediate" ciphers only.

The refusals are checked against a control server first (same certificate, permissive settings),
so a refused handshake shows the proxy's policy at work, not a client that could not work anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from doproxy.config import load_settings
from doproxy.errors import ConfigError
from doproxy.inventory import load_inventory
from doproxy.proxy.server import make_tls_context
from doproxy.runtime import Runtime
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import Client, RawBackend, get

# Building a TLS 1.1 context is the point of two tests; Python warns that the version is old.
legacy_tls = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")


@dataclass
class Tls:
    ca: trustme.CA
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        return make_tls_context(str(self.cert_file), str(self.key_file))

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    ca = trustme.CA()
    # An RSA certificate, so that RSA key exchange (AES128-SHA) is possible at all and its
    # refusal below is the cipher policy's doing.
    cert = ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(cert_file, append=i > 0)
    cert.private_key_pem.write_to_path(key_file)
    return Tls(ca, cert_file, key_file)


@pytest.fixture
async def permissive_server(tls: Tls) -> AsyncIterator[int]:
    """A plain TLS server with the same certificate that accepts TLS 1.1 and legacy ciphers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def tls11_client(tls: Tls) -> ssl.SSLContext:
    ctx = tls.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def aes128_sha_client(tls: Tls) -> ssl.SSLContext:
    ctx = tls.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA")  # RSA key exchange: no forward secrecy
    return ctx


async def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Complete a TLS handshake with 127.0.0.1:port; return the (version, cipher) agreed."""
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
    try:
        obj = writer.get_extra_info("ssl_object")
        version = obj.version()
        cipher = obj.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]
    finally:
        writer.close()


async def https_get(port: int, ctx: ssl.SSLContext, path: str) -> tuple[int, bytes, str]:
    c = await Client.connect(port, ssl=ctx, server_hostname="localhost")
    try:
        version = c.writer.get_extra_info("ssl_object").version()
        await c.send(get(path, host="secure.example"))
        async with asyncio.timeout(5):
            r = await c.response()
        return r.status, r.body, version
    finally:
        await c.close()


async def test_https_request_through_proxy(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls
) -> None:
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    c = await Client.connect(port_of(proxy), ssl=tls.client_context(), server_hostname="localhost")
    try:
        for i in range(3):  # keep-alive over one TLS connection
            await c.send(get(f"/s{i}", host="secure.example"))
            async with asyncio.timeout(5):
                r = await c.response()
            assert r.status == 200
            assert r.body == f"GET /s{i} len=0".encode()
    finally:
        await c.close()
    sent = echo_backend.all_received
    assert sent.count(b"X-Forwarded-Proto: https\r\n") == 3
    assert b"X-Forwarded-Proto: http\r\n" not in sent
    assert b"Host: secure.example\r\n" in sent
    assert echo_backend.connections == 1


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
    ids=["tls1.2", "tls1.3"],
)
async def test_tls12_and_tls13_clients_succeed(
    start_proxy: StartProxy,
    echo_backend: RawBackend,
    tls: Tls,
    version: ssl.TLSVersion,
    name: str,
) -> None:
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    ctx = tls.client_context()
    ctx.minimum_version = version
    ctx.maximum_version = version
    status, body, agreed = await https_get(port_of(proxy), ctx, "/v")
    assert agreed == name
    assert status == 200
    assert body == b"GET /v len=0"
    assert b"X-Forwarded-Proto: https\r\n" in echo_backend.all_received


async def test_tls12_default_cipher_has_forward_secrecy(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls
) -> None:
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    ctx = tls.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # the client offers everything; the server chooses
    version, cipher = await handshake(port_of(proxy), ctx)
    assert version == "TLSv1.2"
    assert cipher.startswith(("ECDHE-", "DHE-"))
    assert "GCM" in cipher or "CHACHA20" in cipher


@legacy_tls
async def test_tls11_client_is_refused(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls, permissive_server: int
) -> None:
    # Control: this client does speak TLS 1.1 to a server that allows it.
    assert (await handshake(permissive_server, tls11_client(tls)))[0] == "TLSv1.1"
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(port_of(proxy), tls11_client(tls))
    assert echo_backend.connections == 0


@legacy_tls
async def test_cipher_without_forward_secrecy_is_refused(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls, permissive_server: int
) -> None:
    # Control: this client does agree on AES128-SHA with a server that allows it.
    assert await handshake(permissive_server, aes128_sha_client(tls)) == ("TLSv1.2", "AES128-SHA")
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(port_of(proxy), aes128_sha_client(tls))
    assert echo_backend.connections == 0


async def test_plain_http_to_the_tls_port_is_not_forwarded(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls
) -> None:
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    c = await Client.connect(port_of(proxy))
    try:
        await c.send(get("/plain"))
        assert await c.closed(timeout=2)
    finally:
        await c.close()
    assert echo_backend.connections == 0


async def test_alpn_settles_on_http11(
    start_proxy: StartProxy, echo_backend: RawBackend, tls: Tls
) -> None:
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    ctx = tls.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # what browsers and curl offer
    c = await Client.connect(port_of(proxy), ssl=ctx, server_hostname="localhost")
    try:
        assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        await c.send(get("/alpn"))
        async with asyncio.timeout(5):
            assert (await c.response()).status == 200
    finally:
        await c.close()


class BioTlsClient:
    """A TLS client driven by hand over a plain TCP stream (ssl.MemoryBIO), so that it can do
    what asyncio's TLS transports cannot: send close_notify and keep the TCP connection open."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> BioTlsClient:
        c = cls(*await asyncio.open_connection("127.0.0.1", port), ctx)
        while True:
            try:
                c.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await c._exchange()
        await c._flush()
        return c

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            self.writer.write(data)
            await self.writer.drain()

    async def _exchange(self) -> None:
        await self._flush()
        data = await self.reader.read(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def close_notify(self) -> None:
        """Half-close at the TLS level: "I will send nothing more" (TLS 1.3 allows reading on)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self._flush()

    async def read_until_closed(self) -> bytes:
        got = bytearray()
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                if self.incoming.eof:
                    return bytes(got)
                await self._exchange()
                continue
            except ssl.SSLZeroReturnError:  # close_notify from the proxy
                return bytes(got)
            if not chunk:
                return bytes(got)
            got += chunk

    def close(self) -> None:
        self.writer.close()


async def test_no_asyncio_warnings_in_normal_tls_traffic(
    start_proxy: StartProxy,
    echo_backend: RawBackend,
    tls: Tls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio's TLS transports cannot half-close; the proxy must not ask them to (a warning per
    connection otherwise), whether the client closes while idle, mid-request or in a tunnel."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    proxy = await start_proxy([echo_backend.port], {}, ssl_context=tls.server_context())
    port = port_of(proxy)
    # Keep-alive requests, then an ordinary close.
    assert (await https_get(port, tls.client_context(), "/a"))[0] == 200
    # A request with Connection: close: the proxy closes.
    c = await Client.connect(port, ssl=tls.client_context(), server_hostname="localhost")
    await c.send(get("/close", extra="Connection: close\r\n"))
    async with asyncio.timeout(5):
        assert (await c.response()).status == 200
    assert await c.closed(timeout=2)
    await c.close()
    # Half-closes after the request: TLS close_notify (with and without a TCP FIN after it),
    # and a bare TCP FIN. Over TLS that ends the connection; the response is not sent.
    for how in ("close_notify", "close_notify+fin", "fin"):
        b = await BioTlsClient.connect(port, tls.client_context())
        await b.send(get(f"/half/{how}"))
        if how.startswith("close_notify"):
            await b.close_notify()
        if how.endswith("fin"):
            b.writer.write_eof()
        async with asyncio.timeout(5):
            await b.read_until_closed()
        b.close()
    # A close_notify while idle between requests.
    b = await BioTlsClient.connect(port, tls.client_context())
    await b.close_notify()
    async with asyncio.timeout(5):
        assert await b.read_until_closed() == b""
    b.close()
    # Nothing is left hanging, and the proxy serves on.
    await wait_for(lambda: not proxy.pool.backends[0].in_flight)
    assert (await https_get(port, tls.client_context(), "/after"))[0] == 200
    problems = [r for r in caplog.records if r.name.startswith("asyncio")]
    assert problems == [], [r.getMessage() for r in problems]


async def test_no_asyncio_warnings_from_a_websocket_over_tls(
    start_proxy: StartProxy, tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    caplog.set_level(logging.WARNING, logger="asyncio")

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as backend:
        proxy = await start_proxy(
            [backend.sockets[0].getsockname()[1]], {}, ssl_context=tls.server_context()
        )
        uri = f"wss://localhost:{port_of(proxy)}/chat"
        async with asyncio.timeout(10):
            async with connect(uri, ssl=tls.client_context(), proxy=None, close_timeout=2) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
            # The client's close_notify ends the tunnel; wait until the proxy has let go too.
            await wait_for(lambda: not proxy.connections)
    problems = [r for r in caplog.records if r.name.startswith("asyncio")]
    assert problems == [], [r.getMessage() for r in problems]


# --- several certificates, picked by SNI; reloads ---------------------------------------------


@dataclass
class Issued:
    cert_file: Path
    key_file: Path
    serial: int


def issue(ca: trustme.CA, folder: Path, stem: str, *names: str) -> Issued:
    """A certificate for `names`, written to stem.pem and stem.key (each saved by rename, as
    certbot-like tools and editors do, so a reload never reads half a file)."""
    cert = ca.issue_cert(*names)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    paths = folder / f"{stem}.pem", folder / f"{stem}.key"
    for path, data in zip(paths, (chain, cert.private_key_pem.bytes()), strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    serial = x509.load_pem_x509_certificate(chain).serial_number
    return Issued(*paths, serial)


def sni_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    # The default certificate is served for names it does not carry: that is the point here.
    ctx.check_hostname = False
    return ctx


async def served_serial(port: int, ca: trustme.CA, name: str | None) -> int:
    """The serial number of the certificate served for SNI `name` (None: no SNI at all)."""
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection(
            # For an IP address the client sends no SNI (RFC 6066 allows host names only).
            "127.0.0.1",
            port,
            ssl=sni_client(ca),
            server_hostname=name or "127.0.0.1",
        )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


MakeRuntime = Callable[[str], Awaitable[Runtime]]


@pytest.fixture
async def make_runtime(tmp_path: Path, echo_backend: RawBackend) -> AsyncIterator[MakeRuntime]:
    """A running doproxy (Runtime) from config text, in front of echo_backend."""
    made: list[Runtime] = []

    async def _make(config_text: str) -> Runtime:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(
            f'bind = "127.0.0.1:0"\n{config_text}\n[backend]\ndisable-health-check = true\n'
            '[admin]\nbind = "127.0.0.1:0"\n'
        )
        inv = tmp_path / "inventory.toml"
        inv.write_text(f'[[droplet]]\nid = 1\nserver-host = "127.0.0.1:{echo_backend.port}"\n')
        rt = Runtime(load_settings(cfg), load_inventory(inv), cfg)
        await rt.start()
        made.append(rt)
        return rt

    yield _make
    for rt in made:
        await rt.stop()


def rt_port(rt: Runtime) -> int:
    assert rt.server is not None
    return rt.server.addresses[0][1]


TABLES = """
https = true
tls-cert-file = "default.pem"
tls-key-file = "default.key"

[[tls-certificate]]
cert-file = "a.pem"
key-file = "a.key"

[[tls-certificate]]
cert-file = "b.pem"
key-file = "b.key"

[[tls-certificate]]
cert-file = "w.pem"
key-file = "w.key"
"""


@dataclass
class Certs:
    ca: trustme.CA
    default: Issued
    a: Issued
    b: Issued
    w: Issued


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    return Certs(
        ca,
        issue(ca, tmp_path, "default", "default.test"),
        issue(ca, tmp_path, "a", "a.test"),
        issue(ca, tmp_path, "b", "b.test", "www.b.test"),
        issue(ca, tmp_path, "w", "*.w.test"),
    )


async def test_sni_picks_the_certificate_for_the_name(
    make_runtime: MakeRuntime, echo_backend: RawBackend, certs: Certs
) -> None:
    rt = await make_runtime(f"watch-config = false\n{TABLES}")
    port = rt_port(rt)
    expected = {
        "a.test": certs.a,
        "b.test": certs.b,
        "www.b.test": certs.b,  # every DNS name of the certificate counts
        "A.Test": certs.a,  # names are case-insensitive
        "x.w.test": certs.w,  # *.w.test: one label in front of w.test
        "w.test": certs.default,  # ...not w.test itself
        "y.x.w.test": certs.default,  # ...nor two labels
        "default.test": certs.default,
        "unknown.test": certs.default,
        None: certs.default,  # no SNI at all
    }
    for name, issued in expected.items():
        assert await served_serial(port, certs.ca, name) == issued.serial, name
    # And traffic flows over the certificate picked by SNI.
    ctx = sni_client(certs.ca)
    ctx.check_hostname = True
    c = await Client.connect(port, ssl=ctx, server_hostname="b.test")
    try:
        await c.send(get("/sni", host="b.test"))
        async with asyncio.timeout(5):
            r = await c.response()
        assert (r.status, r.body) == (200, b"GET /sni len=0")
        assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
    finally:
        await c.close()
    assert b"X-Forwarded-Proto: https\r\n" in echo_backend.all_received


async def test_without_tls_cert_file_the_first_table_is_the_default(
    make_runtime: MakeRuntime, certs: Certs
) -> None:
    tables = TABLES.replace('tls-cert-file = "default.pem"\ntls-key-file = "default.key"\n', "")
    rt = await make_runtime(f"watch-config = false\n{tables}")
    port = rt_port(rt)
    assert await served_serial(port, certs.ca, None) == certs.a.serial
    assert await served_serial(port, certs.ca, "unknown.test") == certs.a.serial
    assert await served_serial(port, certs.ca, "b.test") == certs.b.serial


async def test_alpn_is_the_same_whichever_certificate_is_picked(
    make_runtime: MakeRuntime, certs: Certs
) -> None:
    rt = await make_runtime(f"watch-config = false\n{TABLES}")
    for name in ("a.test", "x.w.test", None):
        ctx = sni_client(certs.ca)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        async with asyncio.timeout(5):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", rt_port(rt), ssl=ctx, server_hostname=name or "127.0.0.1"
            )
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        finally:
            writer.close()


async def test_a_renewed_certificate_is_served_after_reload_and_open_connections_go_on(
    make_runtime: MakeRuntime, certs: Certs, tmp_path: Path
) -> None:
    rt = await make_runtime(f"watch-config = true\n{TABLES}")
    assert rt.server is not None
    listener_ctx = rt.server.ssl_context
    port = rt_port(rt)
    # A keep-alive connection made with the old certificate for b.test.
    old = await Client.connect(port, ssl=sni_client(certs.ca), server_hostname="b.test")
    await old.send(get("/before", host="b.test"))
    async with asyncio.timeout(5):
        assert (await old.response()).status == 200

    renewed = issue(certs.ca, tmp_path, "b", "b.test", "www.b.test")  # the watcher reloads
    assert renewed.serial != certs.b.serial
    await wait_for(lambda: rt.reloads == 1)

    assert await served_serial(port, certs.ca, "b.test") == renewed.serial
    assert await served_serial(port, certs.ca, "a.test") == certs.a.serial
    assert await served_serial(port, certs.ca, None) == certs.default.serial
    # Same listener, same port: the SNI callback picks from the new certificates.
    assert rt.server.ssl_context is listener_ctx and rt_port(rt) == port
    # The open connection was not dropped, and keeps the certificate it shook hands with.
    try:
        await old.send(get("/after", host="b.test"))
        async with asyncio.timeout(5):
            r = await old.response()
        assert (r.status, r.body) == (200, b"GET /after len=0")
        der = old.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert x509.load_der_x509_certificate(der).serial_number == certs.b.serial
    finally:
        await old.close()

    # A renewed default (the 2015 keys) is served to clients without SNI.
    default = issue(certs.ca, tmp_path, "default", "default.test")
    await wait_for(lambda: rt.reloads == 2)
    assert await served_serial(port, certs.ca, None) == default.serial


async def test_a_bad_certificate_fails_the_whole_reload(
    make_runtime: MakeRuntime,
    certs: Certs,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = await make_runtime(f"watch-config = false\n{TABLES}")
    port = rt_port(rt)
    renewed_a = issue(certs.ca, tmp_path, "a", "a.test")  # good, but must not be applied alone
    b_pem = certs.b.cert_file.read_bytes()

    def garbage() -> None:
        certs.b.cert_file.write_text("not a certificate\n")

    def missing_key() -> None:
        certs.b.cert_file.write_bytes(b_pem)
        certs.b.key_file.rename(tmp_path / "b.key.away")

    def wrong_key() -> None:
        (tmp_path / "b.key.away").rename(certs.b.key_file)
        certs.b.key_file.write_bytes(certs.w.key_file.read_bytes())

    breakages = [
        (garbage, "tls-certificate[1]: cannot use this certificate and key"),
        (missing_key, "tls-certificate[1].key-file: cannot read"),
        (wrong_key, "tls-certificate[1]: cannot use this certificate and key"),
    ]
    for breakage, message in breakages:
        caplog.clear()
        breakage()
        assert not await rt.reload()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(message in e for e in errors), errors
        # Nothing changed: the old certificates, a's included, are served.
        assert await served_serial(port, certs.ca, "a.test") == certs.a.serial
        assert await served_serial(port, certs.ca, "b.test") == certs.b.serial
        assert await served_serial(port, certs.ca, None) == certs.default.serial
    assert rt.reloads == 0
    # Fixed: the reload goes through, with both renewals.
    renewed_b = issue(certs.ca, tmp_path, "b", "b.test")
    assert await rt.reload()
    assert await served_serial(port, certs.ca, "a.test") == renewed_a.serial
    assert await served_serial(port, certs.ca, "b.test") == renewed_b.serial


async def test_certificates_can_be_added_and_removed_by_reload(
    make_runtime: MakeRuntime, certs: Certs, tmp_path: Path
) -> None:
    only_default = TABLES.split("[[tls-certificate]]")[0]
    rt = await make_runtime(f"watch-config = false\n{only_default}")
    port = rt_port(rt)
    assert await served_serial(port, certs.ca, "a.test") == certs.default.serial
    cfg = tmp_path / "doproxy.toml"
    text = cfg.read_text()
    cfg.write_text(text.replace(only_default, TABLES))
    assert await rt.reload()
    assert await served_serial(port, certs.ca, "a.test") == certs.a.serial
    assert await served_serial(port, certs.ca, "x.w.test") == certs.w.serial
    cfg.write_text(text)
    assert await rt.reload()
    assert await served_serial(port, certs.ca, "a.test") == certs.default.serial


def run_check(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "doproxy", "check"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=folder,
    )


def test_check_names_each_missing_certificate_file(tmp_path: Path, certs: Certs) -> None:
    (tmp_path / "doproxy.toml").write_text(TABLES)
    (tmp_path / "inventory.toml").write_text("")
    assert run_check(tmp_path).returncode == 0
    certs.b.cert_file.unlink()
    certs.default.key_file.unlink()
    r = run_check(tmp_path)
    assert r.returncode == 1
    assert "tls-certificate[1].cert-file: cannot read: No such file or directory" in r.stderr
    assert "tls-key-file: cannot read" in r.stderr
    assert "2 problem(s)" in r.stderr


def test_https_needs_a_certificate(tmp_path: Path) -> None:
    cases = {
        "https = true\n": "https = true needs a certificate",
        'https = true\ntls-cert-file = "c.pem"\n': "needs tls-key-file too",
        'https = true\n[[tls-certificate]]\ncert-file = "c.pem"\n': (
            "tls-certificate[0].key-file: Field required"
        ),
    }
    for text, message in cases.items():
        (tmp_path / "doproxy.toml").write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(tmp_path / "doproxy.toml")
        assert message in str(info.value), text
    # The 2015 example names files that do not exist; with https = false that is fine.
    (tmp_path / "doproxy.toml").write_text(
        'https = false\ntls-cert-file = "cert.file"\ntls-key-file = "key.file"\n'
    )
    assert not load_settings(tmp_path / "doproxy.toml").https
