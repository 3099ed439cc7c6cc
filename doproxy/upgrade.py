"""Zero-downtime upgrade: a new doproxy takes the listening sockets and the control plane over
from the running one (docs/deploy.md).

Theory of operation
-------------------
Every server with a config listens on a unix socket beside its inventory,
`<inventory>.upgrade.sock` (mode 0600: only its user may take its sockets over). A new doproxy
started with `doproxy upgrade --config FILE` (or spawned by the running one on SIGUSR2)
connects to it, and the two speak doproxy.workers.Channel messages:

    new  --hello {pid}-------------------------------------------->  old
    new  <--sockets {bind, groups} + the listening fds (SCM_RIGHTS)--  old
         new serves them (itself, or its workers)
    new  --serving------------------------------------------------->  old
         old stops accepting (closes its listeners: the sockets stay open in the new one,
         so nothing queued is lost), stops its control plane (admin listener, autoscaler,
         inventory watch and drains), closes this socket and releases the inventory lock
    new  <--released------------------------------------------------  old
         new takes the lock (retrying while the old still holds it), then starts its
         admin listener, autoscaler, watchers and this socket; old drains and exits

The inventory lock is held by one process at every moment (released by the old before the new
takes it), and the autoscaler, drains and admin API run only in the process that holds it: at
no moment do two processes act on the inventory or the provider. Serving never stops: both
processes serve from the moment the new one has the sockets until the old one stops accepting,
and connections waiting in a listener's queue are the new one's to accept. The old one drains
without closing idle keep-alive connections at once (a close can race a request a client is
sending on it, which that client sees as a reset); each gets its next response with
`Connection: close`, and whatever is still idle when shutdown-grace ends is closed then.

If the new process ends before it says "serving", the old one carries on as if nothing had
happened. The admin listener is closed by the old process before the lock is released and
opened by the new one after: its address is unavailable for that instant (its port is bound
anew, so a fixed port stays the same; port 0 gets a new one, written to the addr file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from doproxy.errors import DoproxyError
from doproxy.workers import Channel

log = logging.getLogger(__name__)

HANDOVER_TIMEOUT: Final = 60.0  # seconds either side waits for the other's next message
_MAX_PATH: Final = 107  # sun_path, less its terminating NUL


def upgrade_socket_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".upgrade.sock")


class Link:
    """One end of a handover connection: Channel messages as an async queue."""

    def __init__(self, sock: socket.socket) -> None:
        self.inbox: asyncio.Queue[tuple[dict[str, Any], list[int]] | None] = asyncio.Queue()
        self.channel = Channel(
            sock,
            lambda message, fds: self.inbox.put_nowait((message, fds)),
            lambda: self.inbox.put_nowait(None),
        )

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.channel.send(message, fds or ())

    async def receive(
        self, kind: str, within: float = HANDOVER_TIMEOUT
    ) -> tuple[dict[str, Any], list[int]]:
        """The next message, which must be of type `kind`; DoproxyError when the other side
        ends, says something else, or says nothing for `within` seconds."""
        try:
            async with asyncio.timeout(within):
                got = await self.inbox.get()
        except TimeoutError:
            raise DoproxyError(
                f"upgrade: no {kind!r} from the other doproxy in {within:.0f}s"
            ) from None
        if got is None:
            raise DoproxyError(f"upgrade: the other doproxy ended the handover before {kind!r}")
        message, fds = got
        if message.get("type") != kind:
            for fd in fds:
                os.close(fd)
            raise DoproxyError(f"upgrade: expected {kind!r}, got {message.get('type')!r}")
        return message, fds

    async def flush(self, within: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.channel._out and not self.channel.closed:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)

    def close(self) -> None:
        self.channel.close()


def peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a unix socket (Linux SO_PEERCRED)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


class UpgradeListener:
    """The running server's side: accepts one successor at a time on the upgrade socket."""

    def __init__(self, path: Path, hand_over: Callable[[Link], Coroutine[Any, Any, None]]) -> None:
        self.path = path
        self._hand_over = hand_over
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind the socket (we hold the inventory lock: one left behind was a dead server's)."""
        if len(os.fsencode(self.path)) > _MAX_PATH:
            log.warning(
                "upgrade socket %s: path longer than %d bytes, so `doproxy upgrade` cannot "
                "reach this server; use a shorter inventory path to have it",
                self.path,
                _MAX_PATH,
            )
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: taking our sockets over is for our user only
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(4)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sock is not None:  # None once handed over
            conn, _ = await loop.sock_accept(self._sock)
            uid = peer_uid(conn)
            if uid is not None and uid not in (os.geteuid(), 0):
                # The file's mode already keeps others out; this holds even if it was changed.
                log.warning(
                    "upgrade socket: refused a process of uid %d (only uid %d may take this "
                    "server's sockets over)",
                    uid,
                    os.geteuid(),
                )
                conn.close()
                continue
            link = Link(conn)
            try:
                await self._hand_over(link)
            except DoproxyError as e:
                log.error("%s; this doproxy carries on serving", e)
            finally:
                link.close()

    def close(self) -> None:
        """Stop accepting successors and remove the socket file (before the lock is released,
        so the next server finds no stale one of ours)."""
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class Predecessor:
    """The new server's side: the running doproxy it takes over from."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.bind = ""
        self.groups: list[list[socket.socket]] = []

    @classmethod
    async def connect(cls, path: Path) -> Predecessor:
        """Connect, say hello, and receive the listening sockets."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except OSError as e:
            sock.close()
            raise DoproxyError(
                f"upgrade: no running doproxy answers at {path} ({e.strerror or e}); start "
                "this one with `doproxy --config FILE` instead"
            ) from None
        me = cls(Link(sock))
        me.link.send({"type": "hello", "pid": os.getpid()})
        message, fds = await me.link.receive("sockets")
        me.bind = str(message["bind"])
        at = 0
        for size in message["groups"]:
            me.groups.append([socket.socket(fileno=fd) for fd in fds[at : at + int(size)]])
            at += int(size)
        log.info(
            "upgrade: took %d listening socket(s) over from the running doproxy (pid %s)",
            len(fds),
            message.get("pid"),
        )
        return me

    async def serving(self) -> None:
        """Tell the old one we serve; wait until it released the control plane (or ended)."""
        self.link.send({"type": "serving", "pid": os.getpid()})
        try:
            await self.link.receive("released")
        except DoproxyError as e:
            # It ended (or is stuck): the lock decides. We wait for it below either way.
            log.warning("%s; taking the inventory lock as soon as it is free", e)
        self.link.close()


async def hand_over_sockets(link: Link, bind: str, groups: list[list[socket.socket]]) -> int:
    """The old side's first half: answer hello with the sockets; return the successor's pid."""
    hello, _ = await link.receive("hello")
    link.send(
        {"type": "sockets", "bind": bind, "groups": [len(g) for g in groups], "pid": os.getpid()},
        [s.fileno() for g in groups for s in g],
    )
    await link.receive("serving")
    return int(hello.get("pid", 0))


# A test hook: with DOPROXY_TEST_CONTROL_TRACE naming a file, each process appends a line when
# it takes or releases the inventory lock and when its autoscaler starts or stops, so a test
# can check that no two processes ever held them at once (tests/test_upgrade.py). O_APPEND
# writes of one short line do not interleave.
_TRACE: Final = os.environ.get("DOPROXY_TEST_CONTROL_TRACE", "")


def trace(event: str) -> None:
    if not _TRACE:
        return
    fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{event} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
