"""Differential test: the proxy against a strict reference parser (h11).

Hypothesis generates *scenarios*: 1 to 4 *turns*, each one client connection (of two; a fresh
one once the proxy closed the last) sending 1 to 3 pipelined requests in 1 to 3 writes cut at
chosen offsets, to the real ProxyServer in front of one recording backend. Requests are valid or
mutated at the byte level: framing headers duplicated, renamed, re-cased or named in Connection
(`Connection: content-length`, `transfer-encoding`, `host`), Content-Length with
Transfer-Encoding, bad chunk sizes, obs-fold, no or two Hosts, HTTP/1.0, bodies sent unframed
(stray bytes after a request), bodies that are themselves a request (a smuggling payload), and
garbage after the last request. For each request the scenario scripts the backend's answer:
Content-Length, chunked or close-delimited, maybe after a 103, maybe mutated (framing headers
named in Connection, two Content-Lengths, both framings), maybe followed *in the same write* by
stray bytes (garbage, a whole second response, the declared body of a 204/304/HEAD answer), cut
into 1 to 3 writes. The clients take turns, so they share the proxy's pooled backend connection.

Every request target is unique (`/c<conn>t<turn>r<k>`, `/s-...` for a smuggling payload) and the
backend answers each with `X-Backend-Id: <target>` and a body naming it: every response says
which request it answers. What a client *sent* is what h11, parsing its bytes as a server,
accepts: the requests, in order, and how the stream ends (cleanly, truncated, rejected, or after
a request that closes the connection).

Asserted on every example:

1. Backend: everything each backend connection received parses with h11 as a server without
   error (so the forwarded framing agrees with the body, and Host is there), and each request in
   it is one a client sent and h11 accepted, with the same method, target and body, at most
   once, one client's requests in order: no smuggled or extra request, no body read as a
   request, nothing h11 rejected. A connection may end inside a request whose head a client sent
   (the proxy streams: a head goes out before a malformed body arrives in a later write).
2. Clients: what each client receives parses with h11 as a client, with nothing left over. The
   responses answer its accepted requests in order; one with `X-Backend-Id` has *its* request's
   id (never another request's, never a stray second response) and the status and body the
   backend sent; any other is a proxy error (>= 400). Every accepted request is answered unless
   an earlier response ended the connection (Connection: close, a close-delimited body); after a
   stream h11 rejects there is at most the proxy's error, then the close.
3. A request doproxy refuses as the client's fault (400/413/414/431/501) never reached the
   backend, and a *pristine* request (no mutation) is never refused so.
4. A clean backend response (no mutation, no stray bytes) to a request the backend received
   reaches its client intact: not a 502 caused by what an earlier exchange left on the
   connection.

Not asserted: that doproxy's status agrees with h11's verdict where the two legitimately differ.
doproxy is stricter (two equal Content-Lengths, `Content-Length: 3, 3`, `Chunked` are a 400
there, fine for h11) and may answer a mutated backend response with a 502, or cut it short and
close, where h11 would take it. Those are fine as long as nothing crosses, nothing is smuggled
and nothing h11 rejects reaches a backend. HTTP/1.0 keep-alive is not generated (h11 does not
implement it).

Stray bytes after a response arrive in the same write as its last byte: bytes arriving later,
on an idle pooled connection, race with the next request in any HTTP/1.1 proxy. The short sleeps
between writes pace delivery (so cuts reach the proxy as separate reads); nothing waits on them.

`DOPROXY_FUZZ_EXAMPLES` sets the number of examples (default 60); `make fuzz` runs 2000. The
explicit tests at the end pin what the harness found on the first run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field, replace

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doproxy.proxy.server import ProxyServer
from tests.conftest import StartProxy, port_of
from tests.support import Client, RawBackend, RequestReader

EXAMPLES = int(os.environ.get("DOPROXY_FUZZ_EXAMPLES", "60"))
HOST = "example.test"
CLIENT_ERRORS = frozenset({400, 413, 414, 431, 501})
PACE = 0.001  # seconds between two writes of one message (delivery pacing, not a readiness wait)
WAIT = 1.5  # seconds a client waits for the next byte of an answer it is owed

PROXY_CONFIG = {
    "timeouts": {"response-header": "2s", "client-header": "2s"},
    # 5xx answers are scripted: the one backend must never be ejected for them.
    "passive-health": {"consecutive-failures": 0},
}

# --- what is generated ----------------------------------------------------------------------

REQUEST_MUTATIONS = (
    "conn-cl",  # Connection: content-length
    "conn-te",  # Connection: transfer-encoding
    "conn-host",  # Connection: host
    "conn-close",  # Connection: close
    "dup-cl",  # Content-Length twice, same value
    "dup-cl-diff",  # Content-Length twice, different values
    "cl-list",  # Content-Length: n, n
    "cl-and-te",  # both Content-Length and Transfer-Encoding: chunked
    "dup-te",  # Transfer-Encoding: chunked twice
    "te-case",  # Transfer-Encoding: Chunked
    "te-gzip",  # Transfer-Encoding: gzip, chunked
    "rename-cl",  # Content-Length spelled otherwise (Content_Length, Content-Lengthx, ...)
    "rename-te",
    "case-cl",  # content-LENGTH
    "no-host",
    "dup-host",
    "obs-fold",
    "chunk-ext",  # 5;x=y
    "bad-chunk",  # zz
    "cl-plus",  # Content-Length: +n
)

CONNECTION_NAMES = {
    "conn-cl": "content-length",
    "conn-te": "transfer-encoding",
    "conn-host": "host",
    "conn-close": "close",
}

RESPONSE_MUTATIONS = (
    "conn-cl",
    "conn-te",
    "conn-close",
    "dup-cl",
    "dup-cl-diff",
    "cl-and-te",
    "te-case",
)


@dataclass(frozen=True)
class RespSpec:
    """The backend's scripted answer to one request."""

    status: int = 200
    framing: str = "cl"  # "cl", "chunked" or "close" (close-delimited)
    interim: bool = False  # a 103 Early Hints first
    mutations: tuple[str, ...] = ()
    stray: str | None = None  # None, "garbage", "second", "declared-body"
    cuts: tuple[int, ...] = ()  # where the bytes are cut into writes, per mille of the length

    @property
    def clean(self) -> bool:
        return self.stray is None and all(m == "conn-close" for m in self.mutations)


DEFAULT_RESPONSE = RespSpec()


@dataclass
class Turn:
    conn: int  # which client connection sends
    data: bytes  # the requests, as sent
    cuts: tuple[int, ...]  # offsets where `data` is cut into writes


@dataclass
class Scenario:
    turns: list[Turn]
    responses: dict[str, RespSpec]  # target -> the backend's scripted answer
    # Targets of requests sent exactly as a well-behaved client would: no mutation, framed.
    pristine: set[str] = field(default_factory=set)

    def __repr__(self) -> str:
        lines = ["Scenario("]
        for t in self.turns:
            lines.append(f"  client {t.conn} sends {t.data!r} cut at {list(t.cuts)}")
        for target, r in self.responses.items():
            if r != DEFAULT_RESPONSE:
                lines.append(f"  backend answers {target} with {r}")
        lines.append(")")
        return "\n".join(lines)


def _chunked(body: bytes, sizes: list[int], ext: bool = False, bad: bool = False) -> bytes:
    """`body` chunked in pieces of `sizes` (the rest in one more), then the last chunk."""
    pieces: list[bytes] = []
    pos = 0
    for n in sizes:
        if pos < len(body):
            pieces.append(body[pos : pos + n])
            pos += n
    if pos < len(body):
        pieces.append(body[pos:])
    out = b""
    for i, piece in enumerate(pieces):
        size = b"zz" if bad and i == 0 else b"%x" % len(piece)
        out += size + (b";x=y" if ext else b"") + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n\r\n"


@st.composite
def request_bytes(draw: st.DrawFn, target: str) -> tuple[bytes, list[str], bool, bool]:
    """One request (maybe mutated) for `target`, the targets of any smuggling payload in its
    body, whether it is pristine (what a well-behaved client sends), and whether it leaves
    stray bytes (an unframed body) in front of the next request."""
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE"]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0"]))
    framing = draw(st.sampled_from(["none", "cl", "cl", "chunked"]))
    mutations = draw(st.lists(st.sampled_from(REQUEST_MUTATIONS), max_size=2, unique=True))
    smuggled: list[str] = []
    if draw(st.integers(0, 3)) == 0:
        s = f"/s-{target[1:]}"
        smuggled.append(s)
        body = f"GET {s} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    else:
        body = draw(st.binary(max_size=12).map(lambda b: bytes(97 + x % 26 for x in b)))
    if framing == "none" and not draw(st.booleans()):
        body = b""  # most unframed requests have no body; the others send it as stray bytes
    headers: list[tuple[str, str]] = [("Host", HOST), ("User-Agent", "fuzz")]
    sizes = draw(st.lists(st.integers(1, 8), max_size=2))
    if framing == "cl" or "cl-and-te" in mutations:
        headers.append(("Content-Length", str(len(body))))
    if framing == "chunked" or "cl-and-te" in mutations:
        headers.append(("Transfer-Encoding", "chunked"))
        wire = _chunked(body, sizes, "chunk-ext" in mutations, "bad-chunk" in mutations)
    else:
        wire = body

    def rename(old: str, choices: list[str]) -> None:
        new = draw(st.sampled_from(choices))
        for i, (n, v) in enumerate(headers):
            if n == old:
                headers[i] = (new, v)

    for m in mutations:
        if m in CONNECTION_NAMES:
            headers.append(("Connection", CONNECTION_NAMES[m]))
        elif m == "dup-cl":
            headers.append(("Content-Length", str(len(wire))))
        elif m == "dup-cl-diff":
            headers.append(("Content-Length", str(len(wire) + 2)))
        elif m == "cl-list":
            headers = [(n, f"{v}, {v}") if n == "Content-Length" else (n, v) for n, v in headers]
        elif m == "dup-te":
            headers.append(("Transfer-Encoding", "chunked"))
        elif m == "te-case":
            headers = [(n, "Chunked") if n == "Transfer-Encoding" else (n, v) for n, v in headers]
        elif m == "te-gzip":
            headers = [
                (n, "gzip, chunked") if n == "Transfer-Encoding" else (n, v) for n, v in headers
            ]
        elif m == "rename-cl":
            rename("Content-Length", ["Content_Length", "Content-Lengthx", "Content-Length "])
        elif m == "rename-te":
            rename("Transfer-Encoding", ["Transfer_Encoding", "Transfer-Encodingx"])
        elif m == "case-cl":
            headers = [
                ("content-LENGTH", v) if n == "Content-Length" else (n, v) for n, v in headers
            ]
        elif m == "no-host":
            headers = [(n, v) for n, v in headers if n != "Host"]
        elif m == "dup-host":
            headers.append(("Host", "other.test"))
        elif m == "obs-fold":
            headers.append(("X-Folded", "one\r\n two"))
        elif m == "cl-plus":
            headers = [(n, f"+{v}") if n == "Content-Length" else (n, v) for n, v in headers]
    head = f"{method} {target} HTTP/{version}\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in headers)
    # (Unframed body bytes are not part of this request: they are the next one, malformed.)
    stray = framing == "none" and bool(body)
    pristine = not mutations and not (version == "1.0" and framing == "chunked") and not stray
    return head.encode() + b"\r\n" + wire, smuggled, pristine, stray


response_specs = st.builds(
    RespSpec,
    status=st.sampled_from([200, 200, 201, 404, 500, 204, 304]),
    framing=st.sampled_from(["cl", "cl", "chunked", "close"]),
    interim=st.integers(0, 5).map(lambda n: n == 0),
    mutations=st.lists(st.sampled_from(RESPONSE_MUTATIONS), max_size=2, unique=True).map(tuple),
    stray=st.sampled_from([None, None, None, "garbage", "second", "declared-body"]),
    cuts=st.lists(st.integers(1, 999), max_size=2).map(lambda c: tuple(sorted(c))),
).map(
    # A close-delimited body is everything until the close: bytes "after" it are its body.
    lambda r: replace(r, stray=None) if r.framing == "close" and r.status not in (204, 304) else r
)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    scenario = Scenario([], {})
    turns, responses = scenario.turns, scenario.responses
    for t in range(draw(st.integers(1, 4))):
        conn = draw(st.integers(0, 1))
        data = b""
        # A request behind an unframed body or a mutated one may begin with bytes its
        # predecessor did not consume (h11 then takes e.g. "T /x" as method "T", which llhttp
        # rightly refuses): it is no longer what a well-behaved client sends.
        after_stray = False
        for k in range(draw(st.integers(1, 3))):
            target = f"/c{conn}t{t}r{k}"
            raw, smuggled, pristine, stray = draw(request_bytes(target))
            if pristine and not after_stray:
                scenario.pristine.add(target)
            after_stray = after_stray or stray or not pristine
            data += raw
            for tgt in [target, *smuggled]:
                if draw(st.integers(0, 2)) == 0:
                    responses[tgt] = draw(response_specs)
                else:
                    responses[tgt] = DEFAULT_RESPONSE
        if draw(st.integers(0, 7)) == 0:
            data += b"garbage\r\n\r\n"
        cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2, unique=True))
        turns.append(Turn(conn, data, tuple(sorted(cuts))))
    return scenario


# --- the backend -----------------------------------------------------------------------------


def response_body(target: str) -> bytes:
    return f"rid={target}".encode()


def render_response(spec: RespSpec, target: str, method: bytes) -> tuple[bytes, int, bool]:
    """The bytes the backend sends, where the response proper ends, and whether it closes."""
    body = response_body(target)
    nobody = method == b"HEAD" or spec.status in (204, 304)
    headers = [("X-Backend-Id", target)]
    cl = len(body)
    if spec.framing == "chunked" or "cl-and-te" in spec.mutations:
        encoded = _chunked(body, [3])
        te = "Chunked" if "te-case" in spec.mutations else "chunked"
        headers.append(("Transfer-Encoding", te))
        if "cl-and-te" in spec.mutations:
            headers.append(("Content-Length", str(len(encoded))))
    else:
        encoded = body
    if spec.framing == "cl":
        headers.append(("Content-Length", str(cl)))
    for m in spec.mutations:
        if m == "conn-cl":
            headers.append(("Connection", "content-length"))
        elif m == "conn-te":
            headers.append(("Connection", "transfer-encoding"))
        elif m == "conn-close":
            headers.append(("Connection", "close"))
        elif m == "dup-cl":
            headers.append(("Content-Length", str(cl)))
        elif m == "dup-cl-diff":
            headers.append(("Content-Length", str(cl + 3)))
    out = b""
    if spec.interim:
        out += b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    out += f"HTTP/1.1 {spec.status} Scripted\r\n".encode()
    out += "".join(f"{n}: {v}\r\n" for n, v in headers).encode() + b"\r\n"
    if not nobody or spec.stray == "declared-body":
        out += encoded
    end = len(out)
    if spec.stray == "garbage":
        out += b"garbage!"
    elif spec.stray == "second":
        stray = response_body(f"stray{target}")
        out += (
            f"HTTP/1.1 200 OK\r\nX-Backend-Id: stray{target}\r\n"
            f"Content-Length: {len(stray)}\r\n\r\n"
        ).encode() + stray
    close = spec.framing == "close" or "conn-close" in spec.mutations
    return out, end, close


def expected_body(spec: RespSpec, target: str, method: bytes) -> bytes | None:
    """The body the client must get when the backend's response reaches it (None: ambiguous)."""
    if method == b"HEAD" or spec.status in (204, 304):
        return b""
    if "dup-cl-diff" in spec.mutations:
        return None  # two lengths: either one, or a 502, or a cut; crossing is what matters
    body = response_body(target)
    out, end, _ = render_response(spec, target, method)
    head = out[: out.index(b"\r\n\r\n", out.index(b"Scripted"))].lower()
    if b"content-length" not in head and b"transfer-encoding" not in head:
        return body + out[end:]  # close-delimited: the stray bytes are body
    return body


@dataclass
class Scripted:
    """A backend that answers each request as the scenario scripts it, and logs what it sent."""

    responses: dict[str, RespSpec]
    sent: list[bytearray] = field(default_factory=list)
    active: int = 0

    async def handler(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        self.active += 1
        sent = bytearray()
        self.sent.append(sent)
        conn = h11.Connection(h11.SERVER)
        target, method = "", b""
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return  # recorded; the analysis reports it
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    target, method = event.target.decode("latin-1"), bytes(event.method)
                elif isinstance(event, h11.EndOfMessage):
                    spec = self.responses.get(target, DEFAULT_RESPONSE)
                    out, end, close = render_response(spec, target, method)
                    if writer.is_closing():
                        return
                    try:
                        await write_cut(writer, out, spec_offsets(spec.cuts, len(out), end), sent)
                    except (ConnectionError, RuntimeError):
                        return  # the proxy closed the connection (uvloop: RuntimeError)
                    if close:
                        return
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                    if conn.their_state is not h11.DONE or conn.our_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        finally:
            self.active -= 1


def spec_offsets(per_mille: tuple[int, ...], length: int, end: int) -> list[int]:
    """Cut offsets for a response; never exactly where stray bytes begin (see the docstring)."""
    cuts = sorted({max(1, min(length - 1, length * p // 1000)) for p in per_mille})
    return [c for c in cuts if c != end and 0 < c < length]


async def write_cut(
    writer: asyncio.StreamWriter, data: bytes, cuts: list[int], log: bytearray | None = None
) -> None:
    pos = 0
    for cut in [*cuts, len(data)]:
        if cut <= pos:
            continue
        if pos:
            await asyncio.sleep(PACE)
        writer.write(data[pos:cut])
        if log is not None:
            log += data[pos:cut]
        await writer.drain()
        pos = cut


# --- the reference parsers ---------------------------------------------------------------------


@dataclass
class Req:
    method: bytes
    target: str
    body: bytes
    closes: bool  # the connection must close after it (HTTP/1.0 or Connection: close)


@dataclass
class Parsed:
    requests: list[Req]
    ending: str  # "ok", "truncated", "rejected: <why>", "closed" (after a closing request)
    truncated: Req | None = None  # the head of a request whose body never completed or failed
    rest: bytes = b""  # bytes h11 did not parse (after "closed")


def parse_requests(data: bytes) -> Parsed:
    """h11 as a server over everything one connection carried."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    requests: list[Req] = []
    current: Req | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            return Parsed(requests, f"rejected: {e}", current)
        if event is h11.NEED_DATA:
            if current is not None or conn.trailing_data[0]:
                return Parsed(requests, "truncated", current)
            return Parsed(requests, "ok")
        if event is h11.PAUSED:
            return Parsed(requests, "closed", rest=conn.trailing_data[0])
        if isinstance(event, h11.Request):
            current = Req(bytes(event.method), event.target.decode("latin-1"), b"", False)
        elif isinstance(event, h11.Data) and current is not None:
            current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) and current is not None:
            current.closes = conn.their_state is h11.MUST_CLOSE
            requests.append(current)
            current = None
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.their_state is not h11.DONE:
                return Parsed(requests, "closed", rest=conn.trailing_data[0])
            conn.start_next_cycle()


@dataclass
class Got:
    """One response a client received."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class ClientConn:
    """One client connection: what it sent (with h11's view of it) and what it received."""

    def __init__(self, client: Client, label: str) -> None:
        self.client = client
        self.label = label
        self.sent = b""
        self.accepted = 0  # requests of `parsed` that responses were read for
        self.parsed = Parsed([], "ok")
        self.h11 = h11.Connection(h11.CLIENT)
        self.received = b""
        self.eof = False
        self.done = False  # closed (by the proxy, or by us after an unfinished stream)

    async def read_event(self) -> object:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA or self.eof:
                return event
            try:
                async with asyncio.timeout(WAIT):
                    data = await self.client.reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            self.received += data
            if not data:
                self.eof = True
            self.h11.receive_data(data)

    async def response(self, method: bytes, target: str) -> Got | None:
        """The next final response (h11 told what was asked); None on a clean EOF first."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        if self.h11.our_state is not h11.IDLE:
            raise AssertionError(f"{self.label}: a response after the connection must close")
        self.h11.send(h11.Request(method=method, target=target, headers=[("Host", HOST)]))
        self.h11.send(h11.EndOfMessage())
        got: Got | None = None
        body = b""
        while True:
            try:
                event = await self.read_event()
            except h11.RemoteProtocolError:
                if self.eof and got is None and not self.h11.trailing_data[0]:
                    return None  # closed where a response should begin
                raise
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Response):
                got = Got(event.status_code, list(event.headers), b"")
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert got is not None
                got.body = body
                return got

    async def until_eof(self) -> bytes:
        """Everything left until the proxy closes, or raise if it keeps the connection open."""
        rest = self.h11.trailing_data[0]
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    data = await self.client.reader.read(65536)
                    if not data:
                        break
                    rest += data
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(
                f"{self.label}: the proxy kept the connection open (stream ended "
                f"{self.parsed.ending!r}); it sent {rest!r}"
            ) from None
        self.eof = True
        return bytes(rest)


# --- running one scenario ------------------------------------------------------------------------


@dataclass
class Answer:
    conn: str
    req: Req
    got: Got


async def run_scenario(start_proxy: StartProxy, scenario: Scenario) -> None:
    script = Scripted(scenario.responses)
    backend = await RawBackend(script.handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    port = port_of(proxy)
    conns: dict[int, ClientConn] = {}
    everything: list[ClientConn] = []
    answers: list[Answer] = []
    problems: list[str] = []
    try:
        async with asyncio.timeout(20):
            for n, turn in enumerate(scenario.turns):
                cc = conns.get(turn.conn)
                if cc is None or cc.done:
                    cc = ClientConn(await Client.connect(port), f"client {turn.conn}.{n}")
                    conns[turn.conn] = cc
                    everything.append(cc)
                await play_turn(cc, turn, scenario, answers, problems)
                if problems:
                    break
    finally:
        for cc in everything:
            await cc.client.close()
        await proxy.shutdown(grace=0)
        # The proxy's backend connections are closed now: let the backend read to their end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while script.active:
                    await asyncio.sleep(0.005)
        await backend.close()
    problems += check_backend(backend, script, everything, answers)
    if problems:
        detail = [f"{scenario!r}", *problems]
        for cc in everything:
            detail.append(f"{cc.label} sent {cc.sent!r}")
            detail.append(f"{cc.label} received {cc.received!r}")
        for i, (got, sent) in enumerate(zip(backend.received, script.sent, strict=False)):
            detail.append(f"backend connection {i} received {bytes(got)!r}")
            detail.append(f"backend connection {i} sent {bytes(sent)!r}")
        raise AssertionError("\n".join(detail))


async def play_turn(
    cc: ClientConn, turn: Turn, scenario: Scenario, answers: list[Answer], problems: list[str]
) -> None:
    # The proxy may close while a client still writes (after a response that closes): uvloop
    # says so with a RuntimeError on the closed transport, the kernel with a reset.
    with contextlib.suppress(ConnectionError, RuntimeError):
        await write_cut(cc.client.writer, turn.data, list(turn.cuts))
    cc.sent += turn.data
    before = len(cc.parsed.requests)
    cc.parsed = parse_requests(cc.sent)
    new = cc.parsed.requests[before:]
    current: Req | None = None
    ended = False  # the last response ended the connection: the rest goes unanswered
    try:
        for current in new:
            got = await cc.response(current.method, current.target)
            if got is None:
                problems.append(
                    f"{cc.label}: closed before answering {current.method!r} {current.target}"
                    " (no earlier response ended the connection)"
                )
                cc.done = True
                return
            answers.append(Answer(cc.label, current, got))
            problems += check_response(cc.label, current, got, scenario)
            if cc.h11.their_state is h11.MUST_CLOSE or cc.h11.our_state is h11.MUST_CLOSE:
                ended = True  # Connection: close, or a close-delimited body
                break
        current = None
        ending = cc.parsed.ending
        if ended or ending.startswith("rejected") or ending == "closed":
            rest = await cc.until_eof()
            refused_head = (
                answers
                and answers[-1].req.method == b"HEAD"
                and answers[-1].got.status in CLIENT_ERRORS
                and answers[-1].req.target not in scenario.pristine
            )
            if ended and rest:
                # A HEAD that doproxy refuses as malformed, where h11 is laxer, may get the
                # 400 page: a request that cannot be parsed has no method to honour.
                if not (refused_head and rest == b"400 Bad Request\n"):
                    problems.append(f"{cc.label}: bytes after a response that closes: {rest!r}")
            else:
                problems += check_tail(cc.label, ending, rest)
            cc.done = True
        elif ending == "truncated":
            cc.done = True  # the proxy waits for the rest: this client is finished
    except AssertionError as e:
        problems.append(str(e))
        cc.done = True
    except h11.RemoteProtocolError as e:
        spec = scenario.responses.get(current.target, DEFAULT_RESPONSE) if current else None
        if not (cc.eof and spec is not None and not spec.clean):
            # A mutated backend response may be cut short (the proxy must then close): only
            # that is fine.
            problems.append(f"{cc.label}: h11 rejects what the client received: {e}")
        cc.done = True
    except TimeoutError:
        problems.append(
            f"{cc.label}: no answer within {WAIT}s (stream {cc.parsed.ending!r}, waiting for "
            f"{current.target if current else 'the close'})"
        )
        cc.done = True


def check_response(label: str, req: Req, got: Got, scenario: Scenario) -> list[str]:
    rid = got.header(b"x-backend-id")
    if rid is None:
        if got.status < 400:
            return [f"{label}: {req.target} got a {got.status} that no backend sent"]
        if got.status in CLIENT_ERRORS and req.target in scenario.pristine:
            return [f"{label}: {req.target}, a pristine request, was refused with {got.status}"]
        return []
    if rid.decode("latin-1") != req.target:
        return [f"{label}: CROSSING: {req.target} got the response for {rid.decode()}"]
    spec = scenario.responses.get(req.target, DEFAULT_RESPONSE)
    problems = []
    if got.status != spec.status:
        problems.append(f"{label}: {req.target} got status {got.status}, backend sent {spec}")
    want = expected_body(spec, req.target, req.method)
    if want is not None and got.body != want:
        problems.append(f"{label}: {req.target} got body {got.body!r}, backend sent {want!r}")
    return problems


def check_tail(label: str, ending: str, rest: bytes) -> list[str]:
    """After the last accepted request's answer: at most one proxy error, then the close.
    The refused request may have been a HEAD (whose error then has no body): either reading
    passes."""
    if not rest:
        return []
    as_get = _check_tail(label, ending, rest, "GET")
    return as_get if as_get and _check_tail(label, ending, rest, "HEAD") else []


def _check_tail(label: str, ending: str, rest: bytes, method: str) -> list[str]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", HOST)]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(rest)
    conn.receive_data(b"")
    try:
        event = conn.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = conn.next_event()
        if not isinstance(event, h11.Response):
            return [f"{label}: after the answers ({ending}) came {rest!r}"]
        if event.status_code < 400 or any(n == b"x-backend-id" for n, _ in event.headers):
            return [f"{label}: after the answers ({ending}) came a response: {rest!r}"]
        while not isinstance(event, h11.EndOfMessage):
            event = conn.next_event()
        if conn.trailing_data[0]:
            return [f"{label}: bytes after the closing error: {rest!r}"]
    except h11.RemoteProtocolError as e:
        return [f"{label}: h11 rejects the end of the stream ({e}): {rest!r}"]
    return []


def check_backend(
    backend: RawBackend, script: Scripted, conns: list[ClientConn], answers: list[Answer]
) -> list[str]:
    sent: dict[str, tuple[str, int, Req]] = {}
    heads: set[str] = set()  # heads of requests h11 rejected in the body: may be streamed
    for cc in conns:
        for i, req in enumerate(cc.parsed.requests):
            sent[req.target] = (cc.label, i, req)
        if cc.parsed.truncated is not None:
            heads.add(cc.parsed.truncated.target)
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(backend.received):
        parsed = parse_requests(bytes(raw))
        where = f"backend connection {n}"
        if parsed.ending.startswith("rejected") or parsed.ending == "closed":
            problems.append(f"{where}: h11 {parsed.ending} what the proxy forwarded")
        last: dict[str, int] = {}
        for req in parsed.requests:
            origin = sent.get(req.target)
            if origin is None:
                problems.append(
                    f"{where}: SMUGGLED: {req.method!r} {req.target} was never a request h11 "
                    "accepted from a client"
                )
                continue
            label, index, want = origin
            seen[req.target] = seen.get(req.target, 0) + 1
            if (req.method, req.body) != (want.method, want.body):
                problems.append(
                    f"{where}: {req.target} arrived as {req.method!r} with body {req.body!r}; "
                    f"the client sent {want.method!r} with body {want.body!r}"
                )
            if index <= last.get(label, -1):
                problems.append(f"{where}: {label}'s requests out of order at {req.target}")
            last[label] = index
        if parsed.ending == "truncated":
            head = parsed.truncated
            if head is None:
                problems.append(f"{where}: ends inside a request head")
            elif head.target not in sent and head.target not in heads:
                problems.append(f"{where}: a request head no client sent: {head.target}")
    for target, count in seen.items():
        if count > 1:
            problems.append(f"{target} reached the backend {count} times")
    for a in answers:
        if a.got.header(b"x-backend-id") is not None:
            continue
        if a.got.status in CLIENT_ERRORS and a.req.target in seen:
            problems.append(
                f"{a.conn}: {a.req.target} was refused with {a.got.status} but reached the backend"
            )
        spec = script.responses.get(a.req.target, DEFAULT_RESPONSE)
        if a.req.target in seen and spec.clean:
            problems.append(
                f"{a.conn}: {a.req.target} reached the backend, which answered it cleanly, but "
                f"the client got the proxy's {a.got.status}"
            )
    return problems


# --- the property -----------------------------------------------------------------------------


# Passing examples take ~10-40 ms; a failure adds shrinking (each stalled answer costs WAIT).
@pytest.mark.timeout(max(60, EXAMPLES // 4))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(scenario=scenarios())
async def test_proxy_agrees_with_h11(start_proxy: StartProxy, scenario: Scenario) -> None:
    await run_scenario(start_proxy, scenario)


# --- explicit regressions: what the harness found first -------------------------------------------


async def settle(proxy: ProxyServer, script: Scripted, backend: RawBackend) -> list[Parsed]:
    """Shut the proxy down, let the backend read to the end, and parse what it received."""
    await proxy.shutdown(grace=0)
    async with asyncio.timeout(5):
        while script.active:
            await asyncio.sleep(0.005)
    await backend.close()
    return [parse_requests(bytes(r)) for r in backend.received]


async def read_all(client: Client) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(5):
            while data := await client.reader.read(65536):
                got += data
    return got


def responses_to(methods: list[bytes], data: bytes) -> list[Got]:
    """`data` parsed with h11 as the answers to requests with these methods; the rest ignored."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[Got] = []
    for method in methods:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is not h11.IDLE:
            break
        conn.send(h11.Request(method=method, target="/", headers=[("Host", HOST)]))
        conn.send(h11.EndOfMessage())
        got: Got | None = None
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                got = Got(event.status_code, list(event.headers), b"")
            elif isinstance(event, h11.Data) and got is not None:
                got.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and got is not None:
                out.append(got)
                break
            elif isinstance(event, h11.ConnectionClosed):
                return out
    return out


SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "raw",
    [
        b"POST /a HTTP/1.1\r\nHost: example.test\r\nConnection: content-length\r\n"
        b"Content-Length: %d\r\n\r\n" % len(SMUGGLE) + SMUGGLE,
        b"POST /a HTTP/1.1\r\nHost: example.test\r\nConnection: transfer-encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(SMUGGLE) + SMUGGLE + b"\r\n0\r\n\r\n",
    ],
    ids=["connection-content-length", "connection-transfer-encoding"],
)
async def test_framing_header_named_in_connection_keeps_the_body(
    start_proxy: StartProxy, raw: bytes
) -> None:
    """(a) A framing header named in Connection still frames the body: the backend gets one
    request with the body intact (or the proxy refuses it with a 400), never two requests."""
    script = Scripted({})
    backend = await RawBackend(script.handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    client = await Client.connect(port_of(proxy))
    await client.send(raw)
    async with asyncio.timeout(5):
        response = await client.response()
    await client.close()
    parsed = await settle(proxy, script, backend)
    requests = [(r.method, r.target, r.body) for p in parsed for r in p.requests]
    assert [p.ending for p in parsed] == ["ok"] * len(parsed)
    if response.status == 400:
        assert requests == []
    else:
        assert response.header("x-backend-id") == b"/a"
        assert requests == [(b"POST", "/a", SMUGGLE)]


def answer(target: bytes) -> bytes:
    body = b"rid=" + target
    return b"HTTP/1.1 200 OK\r\nX-Backend-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        target,
        len(body),
        body,
    )


POISONED = {
    # What the backend sends for the first request, all in one write.
    "second-response": (b"GET", answer(b"/a") + answer(b"/stray")),
    "garbage-after": (b"GET", answer(b"/a") + b"garbage!"),
    "body-after-204": (
        b"GET",
        b"HTTP/1.1 204 No Content\r\nX-Backend-Id: /a\r\n\r\n" + answer(b"/stray"),
    ),
    "body-after-304": (
        b"GET",
        b"HTTP/1.1 304 Not Modified\r\nX-Backend-Id: /a\r\nContent-Length: 9\r\n\r\nrid=/a...",
    ),
    "body-after-head": (b"HEAD", answer(b"/a")),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pipelined", [False, True], ids=["next-client", "pipelined"])
@pytest.mark.parametrize("case", POISONED)
async def test_stray_bytes_after_a_response_never_reach_another_request(
    start_proxy: StartProxy, case: str, pipelined: bool
) -> None:
    """(b) Bytes a backend sends after a complete response (a second response, garbage, a body
    after 204/304/HEAD) close that connection: the next request (another client's, or one
    pipelined behind) goes out on a fresh connection and gets its own response."""
    method, first = POISONED[case]
    served: list[bytes] = []

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            served.append(req.url)
            writer.write(first if len(served) == 1 else answer(req.url))
            await writer.drain()

    backend = await RawBackend(handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    a = await Client.connect(port_of(proxy))
    b = a if pipelined else await Client.connect(port_of(proxy))
    first_request = b"%s /a HTTP/1.1\r\nHost: example.test\r\n\r\n" % method
    second_request = b"GET /b HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
    await a.send(first_request + second_request if pipelined else first_request)
    if not pipelined:
        async with asyncio.timeout(5):
            answered = await a.response(head_request=method == b"HEAD")
        assert answered.header("x-backend-id") == b"/a"
        await b.send(second_request)
    got = responses_to([method, b"GET"] if pipelined else [b"GET"], await read_all(b))
    assert [(r.status, r.header(b"x-backend-id"), r.body) for r in got][-1:] == [
        (200, b"/b", b"rid=/b")
    ]
    assert backend.connections == 2  # the poisoned connection was not reused
    await a.close()
    await b.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("later", [False, True], ids=["one-write", "bad-one-later"])
async def test_bad_request_after_good_ones_is_answered_after_them(
    start_proxy: StartProxy, later: bool
) -> None:
    """(c) Pipelined good requests followed by a malformed one: the good ones' responses, in
    order, then the 400, then the close."""
    script = Scripted({})
    backend = await RawBackend(script.handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    client = await Client.connect(port_of(proxy))
    good = b"GET /1 HTTP/1.1\r\nHost: example.test\r\n\r\n"
    good += b"GET /2 HTTP/1.1\r\nHost: example.test\r\n\r\n"
    await write_cut(client.writer, good + b"garbage\r\n\r\n", [len(good)] if later else [])
    got = responses_to([b"GET", b"GET", b"GET"], await read_all(client))
    await client.close()
    summary = [(r.status, r.header(b"x-backend-id")) for r in got]
    assert summary == [(200, b"/1"), (200, b"/2"), (400, None)]
    parsed = await settle(proxy, script, backend)
    assert [r.target for p in parsed for r in p.requests] == ["/1", "/2"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("cuts", [[3], [3, 4]], ids=["GET|rest", "GET|space|rest"])
async def test_method_in_a_read_of_its_own(start_proxy: StartProxy, cuts: list[int]) -> None:
    """(d) A request whose method arrives in a read of its own (a TCP segment boundary right
    after it) is a valid request, answered by the backend: not a 400, not a reset."""
    script = Scripted({})
    backend = await RawBackend(script.handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    client = await Client.connect(port_of(proxy))
    await write_cut(client.writer, b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n", cuts)
    async with asyncio.timeout(5):
        response = await client.response()
    assert (response.status, response.header("x-backend-id")) == (200, b"/a")
    await client.close()


@pytest.mark.timeout(20)
async def test_proxy_error_to_head_has_no_body(start_proxy: StartProxy) -> None:
    """(e) The proxy's own error response to a HEAD request carries no body: a body would be
    read by the client as the start of the next response (here: the 502 for an invalid
    backend response, then a pipelined GET)."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            if req.method == b"HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            else:
                writer.write(answer(req.url))
            await writer.drain()

    backend = await RawBackend(handler).start()
    proxy = await start_proxy([backend.port], PROXY_CONFIG)
    client = await Client.connect(port_of(proxy))
    await client.send(b"HEAD /a HTTP/1.1\r\nHost: example.test\r\n\r\n")
    await client.send(b"GET /b HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    got = responses_to([b"HEAD", b"GET"], await read_all(client))
    await client.close()
    assert [(r.status, r.header(b"x-backend-id")) for r in got] == [(502, None), (200, b"/b")]


@pytest.mark.timeout(30)
async def test_last_request_answered_when_more_arrives_after_it(start_proxy: StartProxy) -> None:
    """A client's last request (HTTP/1.0 without keep-alive) is answered even when the client
    sends more after it, in a later write (found by the property test)."""
    head = b"HEAD /c0t0r0 HTTP/1.0\r\nHost: example.test\r\nUser-Agent: fuzz\r\nContent-Length: 5"
    data = head + b"\r\n\r\naaaaaGET /c0t0r1 HTTP/1.1\r\nHost: example.test\r\n\r\ngarbage\r\n\r\n"
    body_end = len(head) + 4 + 5
    await run_scenario(
        start_proxy,
        Scenario(
            turns=[Turn(conn=0, data=data, cuts=(body_end, body_end + 1))],
            responses={"/c0t0r0": RespSpec(), "/c0t0r1": RespSpec()},
        ),
    )
