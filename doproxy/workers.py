"""Several data-plane processes behind one control plane (`workers = N`, N > 1).

Theory of operation
-------------------
The main process keeps the control plane (health checks, reloads, the autoscaler, the admin
listener) and binds the listening sockets itself, one per worker on the same port
(SO_REUSEPORT: the kernel spreads new connections over them evenly), without ever accepting on
them. Each worker is `python -m doproxy.worker FD`, where FD is its end of a unix socketpair:
the control channel (`Channel`: length-prefixed JSON, with file descriptors passed beside a
message by SCM_RIGHTS). Over it the worker gets its listening socket(s) and the backend table,
and serves them with an ordinary ProxyServer on uvloop.

Because the main process holds every listening socket, a worker that dies loses none: the
connections the kernel steers to its socket wait in that socket's backlog until the
replacement (started at once, then with a growing pause if it keeps dying) accepts them.

    main  --init {settings, table, generation} + listening fds-->  worker
    main  <--ready {pid}------------------------------------------  worker
    main  --table {generation, table[, settings][, fds]}-------->  worker  (every change)
    main  <--ack {generation}-------------------------------------  worker
    main  <--report {counter deltas, in flight, samples}------------  worker  (every REPORT_EVERY)
    main  <--passive {[backend, ok], ...}--------------------------  worker  (at once, see below)
    main  --failing {backends}----------------------------------->  worker  (a run of failures
                                                                               opened elsewhere)
    main  --drain {grace, close_idle}---------------------------->  worker
    main  <--report (the last), then EOF -------------------------  worker exits

The table: every backend of the pool with its inventory entry and what only the main process
knows: health (the checks run there), its ejection and since when it is eligible (slow start
ramps from that). A worker applies a table in one event-loop callback, so each worker switches
between requests and never serves half a table; `generation` is the runtime's count of applied
configurations (Runtime.reloads), and a worker acknowledges each one. A reload waits (up to
ACK_TIMEOUT) until every worker acknowledged the new generation and names the ones that did
not (the status page shows each worker's generation), so when a reload returns, every live
worker serves the new configuration.

Counters travel as deltas (the worker remembers what it sent), which the main process adds to
its own Backend and ProxyServer objects, the ones metrics, statistics, the admin API and the
autoscaler read: they see the sum over the workers, and stay monotonic when a worker dies and
its replacement starts counting from zero. In-flight counts are gauges: the main process keeps
each worker's last report and sums the live ones. Latency samples travel too (at most
SAMPLES_PER_REPORT per backend per report, a uniform subsample above that).

Passive health: the main process keeps each backend's run of failed requests for all the
workers, so a backend is ejected after `consecutive-failures` failures in a row wherever they
happened, and a success on any worker ends the run, as in one process. A worker never ejects:
it sends each failed request at once (a failure is rare, and already costs far more than a
message: a 5xx or a retry, often a log line), and the first success after one; the main
process counts them with the code a single process runs (ProxyState.backend_failed,
backend_ok), ejects within max-ejection-percent and pushes the table to every worker. A
healthy response costs a worker one test of an integer, as it does one process: a worker tells
a success only while a run is open, which it knows from its own failures and from the main
process, which tells every worker when a run opens ("failing", and a flag in the table). Sent
at once (a worker sends the news of one event-loop iteration as one message, and always before
a report), the news of different workers reach the main process in the order they happened,
give or take the time a message takes: with requests failing on several workers at once, a
few more may fail between the one that completes the run and the table that ejects the
backend reaching every worker.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from doproxy.core.health import State
from doproxy.core.settings import Settings
from doproxy.errors import DoproxyError
from doproxy.proxy.backend import Backend, Pool

log = logging.getLogger(__name__)

REPORT_EVERY: Final = 0.5  # seconds between a worker's reports
SAMPLES_PER_REPORT: Final = 1000  # latency samples per backend per report, at most
ACK_TIMEOUT: Final = 5.0  # seconds a reload waits for every worker to take the new table
READY_TIMEOUT: Final = 30.0  # seconds a starting worker has to say it serves
RESTART_PAUSE: Final = 0.1  # first pause before restarting a worker that died, doubled each time
RESTART_PAUSE_MAX: Final = 10.0
HEALTHY_RUN: Final = 30.0  # a worker that ran this long restarts without a pause again

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 256 * 1024 * 1024
_MAX_FDS = 64  # per recvmsg


# --- the control channel ---------------------------------------------------------------------


class Channel:
    """Length-prefixed JSON messages over a unix stream socket, with file descriptors.

    A message that carries descriptors names how many ("fds": n); they are sent with its first
    bytes (SCM_RIGHTS), so by the time its last byte is read they have arrived, in order, and
    are taken from the queue of received ones. Reads and writes never block the loop: it reads
    when the socket is readable, and writes what the socket takes, keeping the rest until it is
    writable again.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[dict[str, Any], list[int]], None],
        on_close: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_close = on_close
        self._in = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._writing = False
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self.closed:
            return
        if fds:
            message = {**message, "fds": len(fds)}
        body = json.dumps(message, separators=(",", ":")).encode()
        self._out.append((memoryview(_HEADER.pack(len(body)) + body), list(fds)))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], ancillary)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            if sent == len(data):
                self._out.popleft()
            else:
                self._out[0] = (data[sent:], [])  # the descriptors went with the first bytes
        if self._out and not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._writable)
        elif not self._out and self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _writable(self) -> None:
        self._flush()

    def _readable(self) -> None:
        try:
            data, ancdata, _, _ = self.sock.recvmsg(
                256 * 1024, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self.close()
            return
        buf = self._in
        buf += data
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > _MAX_MESSAGE:
                log.error("control channel: a %d-byte message; closing it", size)
                self.close()
                return
            if len(buf) < _HEADER.size + size:
                break
            message = json.loads(bytes(buf[_HEADER.size : _HEADER.size + size]))
            del buf[: _HEADER.size + size]
            fds_in = [self._fds.popleft() for _ in range(int(message.get("fds", 0)))]
            self._on_message(message, fds_in)
            if self.closed:
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        self._on_close()


# --- what travels ----------------------------------------------------------------------------

# Sections a worker has no use for, left out of what it is sent: the provider's token among
# them never leaves the main process.
_CONTROL_ONLY = ("do-provisioner", "local-provisioner", "provisioning", "admin")


def worker_settings(settings: Settings) -> dict[str, Any]:
    """The settings a worker serves with, as JSON (no secret in them)."""
    data = settings.model_dump(mode="json", by_alias=True)
    for section in _CONTROL_ONLY:
        data.pop(section, None)
    return data


def table(pool: Pool) -> list[dict[str, Any]]:
    """The pool as a worker applies it: each backend's entry and what the main process knows."""
    return [
        {
            "entry": b.entry.model_dump(mode="json", by_alias=True),
            "up": b.health.up,
            "ejected_until": b.ejected_until,
            "eligible_since": b.eligible_since,
            # A run of failed requests is open: a worker tells the backend's next success.
            "failing": b.passive_failures > 0,
        }
        for b in pool.backends
    ]


_SERVER_COUNTERS: Final = (
    "exchanges",
    "exchange_time",
    "retried",
    "express_requests",
    "express_responses",
)
_SERVER_LISTS: Final = ("durations", "generated")
_BACKEND_COUNTERS: Final = (
    "requests",
    "failures",
    "latency_sum",
    "protocol_errors",
    "connections",
)
# Not among them: ejections. Only the main process ejects (see Fleet._passive) and counts them.


# --- the main process's side -----------------------------------------------------------------


class Control(Protocol):
    """What the fleet needs from the running proxy (doproxy.runtime.Runtime)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def reloads(self) -> int: ...

    def worker_state(self) -> WorkerState:
        """The table and listeners a worker serves now."""
        ...


@dataclass
class WorkerState:
    settings: Settings
    base: str  # the config's folder: a worker reads the certificates and access log from it
    pool: Pool
    server: Any  # the main process's ProxyServer, whose counters receive the workers' deltas
    error_pages: dict[int, tuple[bytes, bytes]]
    # The listeners, each a list of sockets (one per address family): listener i is served
    # by worker i % count.
    sockets: list[list[socket.socket]]


@dataclass
class Worker:
    """One worker slot: the process serving it now, and what it last reported."""

    slot: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    pid: int = 0
    generation: int = -1  # the last generation it acknowledged
    started: float = 0.0
    restarts: int = 0
    failures: int = 0  # deaths in a row without a healthy run (the restart pause grows)
    ready: asyncio.Future[None] | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    connections: int = 0
    requests: int = 0  # exchanges this slot's workers served, restarts included
    last_report: float = 0.0


class Fleet:
    """The worker processes of one runtime: start, push tables, collect reports, restart, drain."""

    def __init__(self, control: Control, count: int) -> None:
        self.control = control
        self.workers = [Worker(slot=i) for i in range(count)]
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._push_pending = False
        self._sent_settings: Settings | None = None

    @property
    def count(self) -> int:
        return len(self.workers)

    async def start(self) -> None:
        """Start every worker and wait until each serves its listener."""
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        for w in self.workers:
            assert w.ready is not None
            async with asyncio.timeout(READY_TIMEOUT):
                await w.ready

    def _slot_sockets(self, slot: int, sockets: list[list[socket.socket]]) -> list[int]:
        # More listeners than workers (inherited from a doproxy that ran more): some serve two.
        return [
            s.fileno() for i, group in enumerate(sockets) if i % self.count == slot for s in group
        ]

    async def _spawn(self, w: Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "doproxy.worker",
                str(child.fileno()),
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        loop = asyncio.get_running_loop()
        w.proc, w.pid, w.started = proc, proc.pid, time.monotonic()
        w.generation, w.in_flight, w.connections = -1, {}, 0
        w.ready = loop.create_future()
        w.channel = Channel(
            parent,
            lambda message, fds: self._message(w, message, fds),
            lambda: None,
        )
        state = self.control.worker_state()
        self._sent_settings = state.settings
        w.channel.send(
            {
                "type": "init",
                "slot": w.slot,
                "generation": self.control.reloads,
                "settings": worker_settings(state.settings),
                "base": state.base,
                "error_pages": _pages(state.error_pages),
                "table": table(state.pool),
            },
            self._slot_sockets(w.slot, state.sockets),
        )
        self._spawn_task(self._watch(w, proc))

    def _spawn_task(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        """Wait for the worker to end; unless the fleet is stopping, start another in its slot."""
        code = await proc.wait()
        if w.proc is not proc:
            return
        channel = w.channel
        if channel is not None:
            # Its last report may still be in the socket: read it before forgetting the worker.
            with contextlib.suppress(Exception):
                channel._readable()
            channel.close()
        self._forget_in_flight(w)
        w.acked.set()  # a reload waiting for its acknowledgement looks again
        if w.ready is not None and not w.ready.done():
            w.ready.set_exception(
                DoproxyError(
                    f"worker {w.slot} exited with {_exit_status(code)} before it served; the "
                    "lines above say why"
                )
            )
            w.ready.exception()  # retrieved here: start() may not be waiting on it any more
        if self.stopping:
            return
        ran = time.monotonic() - w.started
        w.failures = 0 if ran >= HEALTHY_RUN else w.failures + 1
        pause = 0.0 if w.failures <= 1 else min(RESTART_PAUSE * 2 ** (w.failures - 1), 10.0)
        log.warning(
            "worker %d (pid %d) exited with %s after %.1fs; starting another in %.1fs (its "
            "listening socket stays open meanwhile, connections wait in its backlog). If it "
            "keeps exiting, the lines above say why; set workers = 1 to serve without workers",
            w.slot,
            w.pid,
            _exit_status(code),
            ran,
            pause,
        )
        w.restarts += 1
        if pause:
            await asyncio.sleep(pause)
        if not self.stopping:
            await self._spawn(w)

    def _forget_in_flight(self, w: Worker) -> None:
        backends = _index(self.control.worker_state().pool)
        for key, n in w.in_flight.items():
            b = backends.get(key)
            if b is not None:
                b.in_flight = max(b.in_flight - n, 0)
        w.in_flight = {}
        w.connections = 0

    # --- messages from a worker ------------------------------------------------------------

    def _message(self, w: Worker, message: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)  # a worker sends none
        kind = message.get("type")
        if kind == "ready":
            w.generation = int(message["generation"])
            w.acked.set()
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(None)
            log.info("worker %d serving (pid %d)", w.slot, w.pid)
            if w.generation != self.control.reloads:
                self.push()  # a reload happened while it started
        elif kind == "ack":
            w.generation = int(message["generation"])
            w.acked.set()
        elif kind == "report":
            self._report(w, message)
        elif kind == "passive":
            self._passive(w, message["events"])

    def _report(self, w: Worker, report: dict[str, Any]) -> None:
        state = self.control.worker_state()
        server = state.server
        w.last_report = time.monotonic()
        counters = report["server"]
        for name in _SERVER_COUNTERS:
            setattr(server, name, getattr(server, name) + counters[name])
        for name in _SERVER_LISTS:
            mine = getattr(server, name)
            for i, n in enumerate(counters[name]):
                mine[i] += n
        w.requests += counters["exchanges"]
        w.connections = int(report["connections"])
        backends = _index(state.pool)
        in_flight: dict[tuple[str, str], int] = {}
        for key, host, deltas, responses, flying, samples in report["backends"]:
            b = backends.get((key, host))
            if b is None:
                continue  # left the pool since: its counts leave with it
            for name, n in zip(_BACKEND_COUNTERS, deltas, strict=True):
                setattr(b, name, getattr(b, name) + n)
            for i, n in enumerate(responses):
                b.responses[i] += n
            b.samples.extend(samples)
            before = w.in_flight.get((key, host), 0)
            b.in_flight = max(b.in_flight + flying - before, 0)
            in_flight[(key, host)] = flying
        for key, n in w.in_flight.items():
            if key not in in_flight:
                b = backends.get(key)
                if b is not None:
                    b.in_flight = max(b.in_flight - n, 0)
        w.in_flight = in_flight

    def _passive(self, w: Worker, events: list[list[Any]]) -> None:
        """A worker's passive-health news, in the order it saw them: [key, host, ok] for each
        real request that failed at a backend (ok false) and for the first one it answered
        after failures (ok true). The runs of failures are kept here, on the main process's
        Backend objects, by the very code a single process runs (ProxyState.backend_failed and
        backend_ok on its ProxyServer, which serves nothing itself): so a run counts the
        failures of every worker, a success on any worker ends it, and the ejection (within
        max-ejection-percent of the whole pool, twice as long as the backend's last one) is
        decided once, counted once and pushed to every worker.

        A worker tells a success only when it knows a run is open (Backend.passive_failures
        not 0; a response tests that and nothing else): its own failures open one, and for a
        run opened by another worker the main process tells every worker at once ("failing"
        below, and in every table). So the news cost a message per failure and a few per run,
        never one per healthy response."""
        state = self.control.worker_state()
        server = state.server
        backends = _index(state.pool)
        ejected = False
        opened: list[list[str]] = []
        for key, host, ok in events:
            b = backends.get((key, host))
            if b is None:
                continue  # left the pool since
            if ok:
                server.backend_ok(b)
                continue
            ejections = b.ejections
            server.backend_failed(b)
            if b.ejections != ejections:
                ejected = True
            elif b.passive_failures == 1:
                opened.append([key, host])
        if ejected:
            self.push()
        if opened:
            for other in self.workers:
                if other is not w and other.channel is not None:
                    other.channel.send({"type": "failing", "backends": opened})

    # --- pushing tables ---------------------------------------------------------------------

    def push(self) -> None:
        """Send every worker the current table, soon: a burst of changes (health checks of many
        backends turning at once) becomes one push."""
        if self._push_pending or self.stopping:
            return
        self._push_pending = True
        asyncio.get_running_loop().call_soon(self._push_now)

    def _push_now(self, fds_for: Callable[[int], list[int]] | None = None) -> None:
        """Send the table now; `fds_for(slot)`: new listeners for each worker, which go with
        the settings they belong to (bind, https)."""
        self._push_pending = False
        state = self.control.worker_state()
        message: dict[str, Any] = {
            "type": "table",
            "generation": self.control.reloads,
            "table": table(state.pool),
        }
        if state.settings is not self._sent_settings or fds_for is not None:
            self._sent_settings = state.settings
            message["settings"] = worker_settings(state.settings)
            message["error_pages"] = _pages(state.error_pages)
        for w in self.workers:
            if w.channel is not None and w.ready is not None and w.ready.done():
                w.acked.clear()
                w.channel.send(message, fds_for(w.slot) if fds_for else ())

    async def apply(self, listeners_changed: bool = False) -> list[Worker]:
        """Push the new generation to every worker and wait until each acknowledged it (up to
        ACK_TIMEOUT). Returns the workers that did not (logged as such)."""
        sockets = self.control.worker_state().sockets
        self._push_now(
            (lambda slot: self._slot_sockets(slot, sockets)) if listeners_changed else None
        )
        generation = self.control.reloads
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACK_TIMEOUT):
                for w in self.workers:
                    # A worker that died is skipped: its replacement starts with this table.
                    while w.generation < generation and self._alive(w):
                        await w.acked.wait()
                        w.acked.clear()
        lagging = [w for w in self.workers if w.generation < generation and self._alive(w)]
        for w in lagging:
            log.warning(
                "worker %d (pid %d) has not taken generation %d after %.0fs (it serves "
                "generation %d); it is restarted if it is stuck, else it catches up",
                w.slot,
                w.pid,
                generation,
                ACK_TIMEOUT,
                w.generation,
            )
        return lagging

    @staticmethod
    def _alive(w: Worker) -> bool:
        return w.proc is not None and w.proc.returncode is None and w.ready is not None

    # --- status and stopping ----------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "slot": w.slot,
                "pid": w.pid,
                "alive": w.proc is not None and w.proc.returncode is None,
                "generation": w.generation,
                "restarts": w.restarts,
                "requests": w.requests,
                "connections": w.connections,
                "in_flight": sum(w.in_flight.values()),
            }
            for w in self.workers
        ]

    def signal(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    @property
    def connections(self) -> int:
        return sum(w.connections for w in self.workers)

    def begin_drain(self, grace: float, close_idle: bool = True) -> None:
        """Tell every worker to stop accepting and drain (once); see stop()."""
        if self.stopping:
            return
        self.stopping = True
        for w in self.workers:
            if w.channel is not None:
                w.channel.send({"type": "drain", "grace": grace, "close_idle": close_idle})

    async def stop(self, grace: float, close_idle: bool = True) -> None:
        """Tell every worker to drain (stop accepting, finish what is in flight within `grace`)
        and wait for them to exit; one still running a few seconds after that is killed."""
        self.begin_drain(grace, close_idle)
        procs = []
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                procs.append((w, w.proc))
        for w, proc in procs:
            try:
                async with asyncio.timeout(grace + 5.0):
                    await proc.wait()
            except TimeoutError:
                log.warning("worker %d (pid %d) did not drain in time: killing it", w.slot, w.pid)
                proc.kill()
                await proc.wait()
        # Let each watcher read its worker's last report.
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(task)
        for task in list(self._tasks):
            task.cancel()


def _index(pool: Pool) -> dict[tuple[str, str], Backend]:
    return {(b.key, b.entry.server_host): b for b in pool.backends}


def _pages(pages: dict[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {
        str(code): [kind.decode("latin-1"), body.decode("latin-1")]
        for code, (kind, body) in pages.items()
    }


def pages_from(data: dict[str, list[str]]) -> dict[int, tuple[bytes, bytes]]:
    return {
        int(code): (kind.encode("latin-1"), body.encode("latin-1"))
        for code, (kind, body) in data.items()
    }


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            import signal

            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def health_state(up: bool) -> State:
    return State.UP if up else State.DOWN


__all__ = [
    "ACK_TIMEOUT",
    "REPORT_EVERY",
    "SAMPLES_PER_REPORT",
    "Channel",
    "Control",
    "Fleet",
    "Worker",
    "WorkerState",
    "pages_from",
    "table",
    "worker_settings",
]
