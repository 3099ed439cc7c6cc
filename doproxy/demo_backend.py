"""A small HTTP backend for the demo and the tests: answers every request with who it is.

It is an asyncio Protocol with httptools, like the proxy, so it is cheap enough to stand beside
it on one machine. `GET /health` answers 200 "ok" at once; any other request gets a short text
body that names the backend, the method and the path, after reading (and counting) the request
body.

Capacity-limited service (for the autoscaler's demo)
----------------------------------------------------
With `capacity=c` and `service_time=s`, the backend behaves like a server with c workers: at
most c requests are in service at once, each for s seconds (an event-loop timer, nothing
blocks), and the others wait in one FIFO queue shared by all connections. Latency is therefore s
while at most c requests are in flight and grows by about s for every further c, which is what
makes an autoscaler that watches latency add a backend. `capacity=0` means no limit (each request
still takes `service_time`); the defaults (0, 0.0) answer at once, as the backend always did.
Health checks bypass the queue, so an overloaded backend is slow, not dead.

Responses on one connection leave in request order (HTTP/1.1 pipelining), so a pipelined health
check behind a slow request waits for that request's answer, as it must.

`python -m doproxy.demo_backend --host H --port P --name N --capacity C --service-time S` runs
one on uvloop until SIGTERM or SIGINT; it prints one line to stderr when it listens.
`--boot-delay SECONDS` makes it wait before it listens, like a slow application boot.
`--error-rate FRACTION` answers that fraction of requests (not health checks) with a 500, spread
evenly (every 20th for 0.05), like a release with a bug: the rollout demo and tests use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools


class _Job:
    """One request's service: `finish` runs when the service time is over, unless cancelled."""

    __slots__ = ("cancelled", "finish")

    def __init__(self, finish: Callable[[], None]) -> None:
        self.finish = finish
        self.cancelled = False


class Service:
    """The backend's workers: at most `capacity` jobs in service, the rest queue FIFO."""

    def __init__(
        self, capacity: int = 0, service_time: float = 0.0, error_rate: float = 0.0
    ) -> None:
        if capacity < 0 or service_time < 0:
            raise ValueError("capacity and service_time must not be negative")
        if not 0 <= error_rate <= 1:
            raise ValueError("error_rate must be within 0..1")
        self.capacity = capacity
        self.service_time = service_time
        self.error_rate = error_rate
        self._errors_due = 0.0
        self.in_service = 0
        self.queue: deque[_Job] = deque()

    @property
    def instant(self) -> bool:
        return self.service_time == 0 and self.capacity == 0

    def fails_next(self) -> bool:
        """Does the next request get a 500? Exactly error_rate of them, evenly spread."""
        if not self.error_rate:
            return False
        self._errors_due += self.error_rate
        if self._errors_due >= 1.0 - 1e-9:
            self._errors_due -= 1.0
            return True
        return False

    def submit(self, job: _Job) -> None:
        if self.capacity == 0 or self.in_service < self.capacity:
            self._start(job)
        else:
            self.queue.append(job)

    def _start(self, job: _Job) -> None:
        self.in_service += 1
        asyncio.get_running_loop().call_later(self.service_time, self._done, job)

    def _done(self, job: _Job) -> None:
        self.in_service -= 1
        if not job.cancelled:
            job.finish()
        # A queued job whose client went away does not take a worker.
        while self.queue:
            nxt = self.queue.popleft()
            if not nxt.cancelled:
                self._start(nxt)
                break


class _Slot:
    """One response on a connection, in request order; `data` is None until it is ready."""

    __slots__ = ("close", "data", "job")

    def __init__(self, close: bool) -> None:
        self.data: bytes | None = None
        self.close = close
        self.job: _Job | None = None


class DemoBackendProtocol(asyncio.Protocol):
    def __init__(self, name: str, service: Service | None = None) -> None:
        self.name = name
        self.service = service or Service()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body_len = 0
        self.pending: deque[_Slot] = deque()  # responses not yet written, in request order
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for slot in self.pending:
            if slot.job is not None:
                slot.job.cancelled = True
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            slot = _Slot(close=True)
            slot.data = (
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self.pending.append(slot)
            self.closing = True
            self._flush()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        if self.transport is None or self.closing:
            return
        method = self.parser.get_method()
        health = self.url == b"/health"
        if health:
            body = b"ok\n"
        else:
            body = b"%s: %s %s (%d bytes in)\n" % (
                self.name.encode(),
                method,
                self.url,
                self.body_len,
            )
        keep = self.parser.should_keep_alive()
        status = b"200 OK"
        if not health and self.service.fails_next():
            status, body = b"500 Internal Server Error", b"%s: failed\n" % self.name.encode()
        head = b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % (
            status,
            len(body),
        )
        if not keep:
            head += b"Connection: close\r\n"
            self.closing = True  # nothing after this request is answered
        data = head + b"\r\n" + (b"" if method == b"HEAD" else body)
        slot = _Slot(close=not keep)
        self.pending.append(slot)
        if health or self.service.instant:
            slot.data = data
            self._flush()
            return

        def finish() -> None:
            slot.data = data
            self._flush()

        slot.job = _Job(finish)
        self.service.submit(slot.job)

    def _flush(self) -> None:
        """Write every ready response at the head of the line (request order)."""
        while self.pending and self.pending[0].data is not None and self.transport is not None:
            slot = self.pending.popleft()
            assert slot.data is not None
            self.transport.write(slot.data)
            if slot.close:
                self.transport.close()
                return


async def start_demo_backend(
    name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    capacity: int = 0,
    service_time: float = 0.0,
    error_rate: float = 0.0,
) -> tuple[asyncio.Server, int]:
    """Start one demo backend; returns the server and the port it listens on.

    `capacity` requests at most are in service at once (0: no limit), each for `service_time`
    seconds; the rest wait in a FIFO queue. See the module docstring.
    """
    service = Service(capacity, service_time, error_rate)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DemoBackendProtocol(name, service), host, port)
    return server, server.sockets[0].getsockname()[1]


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.boot_delay:
        # A slow-booting application, for tests that need a machine caught while it boots.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.boot_delay)
        if stop.is_set():
            return
    server, port = await start_demo_backend(
        args.name,
        args.host,
        args.port,
        capacity=args.capacity,
        service_time=args.service_time,
        error_rate=args.error_rate,
    )
    print(f"demo backend {args.name} listening on {args.host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    # Stop listening and leave; the loop's shutdown closes the open connections. (Waiting for
    # wait_closed() could hang on an idle keep-alive client.)
    server.close()


def _not_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..1")
    return value


def main(argv: list[str] | None = None) -> None:
    import uvloop

    p = argparse.ArgumentParser(
        prog="python -m doproxy.demo_backend", description="Run one demo backend."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--name", default="demo-backend")
    p.add_argument(
        "--capacity", type=_not_negative(int), default=0, help="requests in service; 0: any"
    )
    p.add_argument(
        "--service-time", type=_not_negative(float), default=0.0, help="seconds per request"
    )
    p.add_argument(
        "--boot-delay", type=_not_negative(float), default=0.0, help="seconds before listening"
    )
    p.add_argument(
        "--error-rate",
        type=_fraction,
        default=0.0,
        help="fraction of requests answered 500 (0..1), evenly spread",
    )
    args = p.parse_args(argv)
    uvloop.run(_serve(args))


if __name__ == "__main__":
    main()
