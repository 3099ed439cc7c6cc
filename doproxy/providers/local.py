"""Local processes as machines: the `[local-provisioner]` provider.

It makes the autoscaler real on a laptop and in CI, and it serves users who scale local workers.

Theory of operation
-------------------
A machine is a process started from the `command` template, with {host}, {port} and {name}
filled in. The template is split like a shell would (shlex) but no shell runs it; a leading
`python` (or `python3`) means the interpreter doproxy itself runs on (sys.executable), so the
command works inside a virtualenv that is not on PATH.

*Finding machines.* The provider keeps no state of its own. Every process it starts carries
markers in its environment: DOPROXY_MACHINE=<name>, DOPROXY_TAGS=<comma-separated tags>,
DOPROXY_PORT=<port> and DOPROXY_HOST=<host>. `list()` scans /proc/*/environ of the processes of
our own user and groups the marked ones by name; a machine is ours when every tag of
`[local-provisioner] tags` is among its tags. The kernel keeps a process's initial environment
for its whole life, and children inherit it, so:

- a crash of the proxy at any point leaves either a marked process or none: the next `list()`
  finds it, after a restart too, whoever its parent is now;
- a pid reused by an unrelated process carries no marker, so it is never mistaken for ours;
- a machine whose command forks workers (or runs a non-exec wrapper) is the whole set of
  processes carrying its name; its `pid` is the session leader (the process we started).

One limit: a program that overwrites its own environment area to change its process title
(setproctitle, which gunicorn uses when that package is installed) erases its marker, and
doproxy no longer sees it. Run such programs without the title change.

*Starting.* A process starts in its own session (setsid), so a kill -9 of the proxy, or a
Ctrl-C in its terminal, does not take it along, and with stdin, stdout and stderr not inherited
from the proxy (/dev/null, or `<log-dir>/<name>.log`): a backend that outlives the proxy must
not hold the proxy's pipes open. Its port is the first one of `ports` that no marked process
uses (any tags: they share this machine's ports) and that can be bound on `host` now. Choosing
the port and starting the process happen under an exclusive flock on a per-user lock file, so
two doproxy processes (a server and the CLI) do not pick the same port while a new process has
not bound it yet. `create()` returns at once with status "new" (once /proc shows the new
process's marker: the kernel fills in its environment a moment after exec begins).

*Status.* A machine is "new" until an HTTP GET of `health-path` answers 2xx or 3xx, then
"active"; no marked process means MachineNotFound. A process that exited is gone: its zombie
(if we are its parent) carries no environment and is reaped on the next scan.

*Stopping.* `destroy()` sends SIGTERM to every process of the machine, then SIGKILL to what is
left after `stop-timeout`, and polls /proc until none is left and each one signalled has
exited (so its port is free): this works as well for processes started by an earlier life of
the proxy, which are not our children. Each signal goes through a pidfd opened *before* the
marker is checked, so it reaches the process that was checked and no other, even if its pid
were reused in between. A machine already gone is not an error.
`reboot()` stops the machine and starts it again with the same name, port and tags, and returns
when it answers its health path again (within `boot-timeout`).

Scanning /proc is synchronous (a few milliseconds for a few hundred processes, more on a busy
host): every scan runs in a worker thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import functools
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

from doproxy.core.settings import LocalProvisioner
from doproxy.errors import MachineNotFound, ProviderError
from doproxy.provisioning import Machine, Spec, wait_active

log = logging.getLogger(__name__)

MARK_MACHINE = "DOPROXY_MACHINE"
MARK_TAGS = "DOPROXY_TAGS"
MARK_PORT = "DOPROXY_PORT"
MARK_HOST = "DOPROXY_HOST"
# The command a rollout started it with (a spec's), so a reboot restarts the same program; unset
# for machines of the configured command.
MARK_COMMAND = "DOPROXY_COMMAND"
MARKS = (MARK_MACHINE, MARK_TAGS, MARK_PORT, MARK_HOST, MARK_COMMAND)
_MARK_KEYS = {m.encode() for m in MARKS}
_MARKED = MARK_MACHINE.encode() + b"="

# Host-name-like machine names: they end up in argv, environments and log file names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PLACEHOLDER = re.compile(r"\{(host|port|name)\}")

# The health probe: (host, port, path) -> does it answer 2xx/3xx?
Probe = Callable[[str, int, str], Awaitable[bool]]

# How long SIGKILLed processes may take to disappear before destroy() gives up.
KILL_GRACE = 10.0


@dataclass(frozen=True)
class Proc:
    """One live process carrying our marker, as /proc shows it."""

    pid: int
    machine: str
    tags: tuple[str, ...]
    host: str
    port: int
    session: int
    ticks: int  # start time in clock ticks since boot: with the pid, it names the process
    command: str = ""  # a rollout's command (MARK_COMMAND); "" for the configured one

    @property
    def started(self) -> float:
        """Seconds since the epoch (to about a second: the boot time in /proc is whole)."""
        return _boot_time() + self.ticks / os.sysconf("SC_CLK_TCK")


# --- the command --------------------------------------------------------------------------


def command_argv(template: str, host: str, port: int, name: str) -> list[str]:
    """The argv of a machine: the template split by shlex, placeholders filled in per word (so
    a value can never add words), and a leading python/python3 replaced by sys.executable."""
    values = {"host": host, "port": str(port), "name": name}
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise ProviderError(f"local-provisioner command {template!r}: {e}") from None
    if not words:
        raise ProviderError("local-provisioner command is empty")
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], w) for w in words]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


# --- /proc ----------------------------------------------------------------------------------


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _stat(pid: int) -> tuple[bytes, int, int] | None:
    """(state, session id, start time in clock ticks since boot) of `pid`, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name in parentheses may contain anything; the fields after it are numbers.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return fields[0], int(fields[3]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _exited(pid: int, ticks: int) -> bool:
    """Has the process (pid, start ticks) exited? A zombie has: it holds no files or ports any
    more. (A process that is exiting has no environment, hence no marker, a little earlier,
    while it may still hold its sockets: destroy() waits for this too.)"""
    st = _stat(pid)
    return st is None or st[0] in _DEAD or st[2] != ticks


_DEAD = (b"Z", b"X", b"x")  # zombie or dead: waiting for its parent to reap it at most


def read_proc(pid: int) -> Proc | None:
    """The marked process `pid` of our user, or None (gone, a zombie, not ours, unmarked)."""
    d = f"/proc/{pid}"
    try:
        if os.stat(d).st_uid != os.geteuid():
            return None
        with open(f"{d}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    if _MARKED not in env:  # the cheap test first: most processes are not ours
        return None
    st = _stat(pid)
    if st is None or st[0] in _DEAD:
        return None
    marks: dict[bytes, str] = {}
    for item in env.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in _MARK_KEYS:
            marks[key] = value.decode("utf-8", "replace")
    name = marks.get(MARK_MACHINE.encode(), "")
    try:
        port = int(marks.get(MARK_PORT.encode(), ""))
    except ValueError:
        return None
    if not name:
        return None
    tags = tuple(t for t in marks.get(MARK_TAGS.encode(), "").split(",") if t)
    host = marks.get(MARK_HOST.encode(), "")
    command = marks.get(MARK_COMMAND.encode(), "")
    return Proc(pid, name, tags, host, port, st[1], st[2], command)


def scan() -> list[Proc]:
    """Every marked process of our user, any tags (our own process excepted)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            p = read_proc(int(entry))
            if p is not None:
                out.append(p)
    # Reap after looking: a child of ours that the scan saw as a zombie (so not listed) is
    # certainly reaped now, and never lingers.
    _reap()
    return out


def signal_if_ours(pid: int, name: str, tags: tuple[str, ...], sig: int) -> bool:
    """Send `sig` to `pid` only when it is a live process of machine `name` with all of `tags`.

    The pidfd is opened before the check, so the signal reaches the process that was checked
    even if it exited and its pid was reused in between (then the signal is simply not sent).
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # a kernel without pidfds (before 5.3): check, then kill
        fd = -1
    try:
        p = read_proc(pid)
        if p is None or p.machine != name or not set(tags) <= set(p.tags):
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


# --- our children -----------------------------------------------------------------------------

# Processes this Python process started, by pid, until they are reaped. Module-wide, not per
# provider: a child belongs to the process, and one provider may destroy what another (an
# earlier instance, e.g. before a reload) started; its zombie must still be reaped.
_children: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
_stopping: set[str] = set()  # machines being destroyed: their exits are expected


def _reap() -> None:
    for pid, (popen, name) in list(_children.items()):
        status = popen.poll()
        if status is None:
            continue
        if _children.pop(pid, None) is None:
            continue  # reaped by a scan in another thread meanwhile
        if name in _stopping:
            log.debug("local machine %s (pid %d) exited with status %d", name, pid, status)
        else:
            log.warning(
                "local machine %s (pid %d) exited with status %d; its output is in "
                "[local-provisioner] log-dir (set one to keep it)",
                name,
                pid,
                status,
            )


# A machine's processes. (Inside LocalProvider, `list` is the method.)
Procs = list[Proc]


# --- choosing a port ----------------------------------------------------------------------


def _bindable(host: str, port: int) -> bool:
    """Can a server bind host:port now? (With SO_REUSEADDR, as servers do: TIME_WAIT is free.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _lock_path() -> Path:
    return Path(tempfile.gettempdir()) / f"doproxy-local-ports-{os.geteuid()}.lock"


@contextlib.asynccontextmanager
async def _ports_locked(patience: float) -> AsyncIterator[None]:
    """Hold the per-user port lock (an exclusive flock) while a port is chosen and taken.

    Polled with LOCK_NB rather than blocking the event loop; a holder keeps it for
    milliseconds. Without a usable lock file (say, a read-only temp dir) it goes on unlocked:
    the bind check still catches every port a running process has bound.
    """
    try:
        fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.debug("local provider: no port lock (%s); going on without", e)
        fd = -1
    try:
        if fd >= 0:
            deadline = time.monotonic() + patience
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ProviderError(
                            f"another doproxy held the local port lock {_lock_path()} for "
                            f"{patience:.0f}s"
                        ) from None
                    await asyncio.sleep(0.005)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the flock


# --- the provider -------------------------------------------------------------------------


class LocalProvider:
    """Backends as local processes; see the module docstring."""

    kind = "local"

    def __init__(
        self,
        settings: LocalProvisioner,
        base: Path,
        *,
        environ: Mapping[str, str] | None = None,
        probe: Probe | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = 0.05,
        probe_timeout: float = 1.0,
        owner_tag: str = "",
    ) -> None:
        """`base` is the config file's folder (workdir and log-dir are relative to it);
        `environ` is the environment the processes start from (default: ours), without any
        marker it may carry; `probe` replaces the HTTP health probe."""
        self.settings = settings
        self.base = base
        self.environ = dict(os.environ if environ is None else environ)
        self.probe: Probe = probe or self._http_probe
        self.clock = clock
        self.poll_interval = poll_interval
        self.probe_timeout = probe_timeout
        self.tags = tuple(settings.tags)
        # This installation's own tag (doproxy.machines.owner_tag): carried by every process
        # we start besides `tags`; `list()` still finds every machine with `tags`.
        self.owner_tag = owner_tag
        self._create_tags = (*self.tags, owner_tag) if owner_tag else self.tags
        self._session: aiohttp.ClientSession | None = None

    # -- Provider ---------------------------------------------------------------------------

    async def list(self) -> list[Machine]:
        groups = self._groups(await asyncio.to_thread(scan))
        names = sorted(groups)
        statuses = await asyncio.gather(*(self._status(groups[n]) for n in names))
        return [self._machine(groups[n], s) for n, s in zip(names, statuses, strict=True)]

    async def get(self, machine_id: str) -> Machine:
        procs = self._groups(await asyncio.to_thread(scan)).get(machine_id)
        if not procs:
            raise MachineNotFound(f"no local process {machine_id!r} with tags {self.tags}")
        return self._machine(procs, await self._status(procs))

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        if not _NAME.fullmatch(name):
            raise ProviderError(f"{name!r} is not a valid machine name (letters, digits, .-_)")
        spec = spec or Spec()
        tags = (*self._create_tags, *(t for t in spec.tags if t not in self._create_tags))
        if spec.command:
            command_argv(spec.command, host="h", port=1, name=name)  # refused before any start
        host = self.settings.host
        async with _ports_locked(self.settings.boot_timeout):
            procs = await asyncio.to_thread(scan)
            existing = self._groups(procs).get(name)
            if existing:  # idempotent by name: an earlier attempt did start it
                port = pid = 0
            else:
                port = self._free_port(host, {p.port for p in procs}, name)
                pid = await self._spawn(name, host, port, tags, spec.command)
        if existing:
            log.info("local machine %s exists already (pid %d)", name, _leader(existing).pid)
            return self._machine(existing, await self._status(existing))
        log.info("started local machine %s on %s:%d (pid %d)", name, host, port, pid)
        return Machine(
            id=name,
            name=name,
            status="new",
            private_ip=host,
            tags=tags,
            created=dt.datetime.now(dt.UTC),
            port=port,
            pid=pid,
            extra=self._extra(name),
        )

    async def destroy(self, machine_id: str) -> None:
        await self._stop(machine_id)

    async def reboot(self, machine_id: str) -> None:
        procs = self._groups(await asyncio.to_thread(scan)).get(machine_id)
        if not procs:
            raise MachineNotFound(f"no local process {machine_id!r} with tags {self.tags}")
        main = _leader(procs)
        await self._stop(machine_id)
        async with _ports_locked(self.settings.boot_timeout):
            # Our process held the port until now; someone else may have taken it since.
            if not _bindable(main.host, main.port):
                raise ProviderError(
                    f"cannot restart local machine {machine_id}: {main.host}:{main.port} "
                    "was taken while it stopped"
                )
            pid = await self._spawn(machine_id, main.host, main.port, main.tags, main.command)
        log.info("restarted local machine %s (pid %d)", machine_id, pid)
        await wait_active(
            self,
            machine_id,
            self.settings.boot_timeout,
            interval=self.poll_interval,
            clock=self.clock,
        )

    async def close(self) -> None:
        """Close the probe's HTTP session. The processes keep running."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- internals ---------------------------------------------------------------------------

    def _free_port(self, host: str, taken: set[int], name: str) -> int:
        """The first port of the range that no machine of ours (any tags) has and that can be
        bound now. Both tests matter: a process just started has not bound its port yet."""
        for port in self.settings.port_range():
            if port not in taken and _bindable(host, port):
                return port
        raise ProviderError(f"no free port in {self.settings.ports} on {host} for {name}")

    def _groups(self, procs: Procs) -> dict[str, Procs]:
        """Our machines' processes (every one of our tags present), by machine name."""
        want = set(self.tags)
        groups: dict[str, Procs] = {}
        for p in procs:
            if want <= set(p.tags):
                groups.setdefault(p.machine, []).append(p)
        return groups

    def _machine(self, procs: Procs, status: str) -> Machine:
        main = _leader(procs)
        return Machine(
            id=main.machine,
            name=main.machine,
            status=status,
            private_ip=main.host,
            tags=main.tags,
            created=dt.datetime.fromtimestamp(main.started, dt.UTC),
            port=main.port,
            pid=main.pid,
            extra=self._extra(main.machine),
        )

    def _extra(self, name: str) -> dict[str, str]:
        log_file = self._log_file(name)
        return {"log": str(log_file)} if log_file is not None else {}

    def _log_file(self, name: str) -> Path | None:
        if not self.settings.log_dir:
            return None
        return self.base / self.settings.log_dir / f"{name}.log"

    async def _status(self, procs: Procs) -> str:
        main = _leader(procs)
        path = self.settings.health_path
        ok = await self.probe(main.host, main.port, path if path.startswith("/") else "/" + path)
        return "active" if ok else "new"

    async def _http_probe(self, host: str, port: int, path: str) -> bool:
        if self._session is None:
            # No keep-alive: a probe connection must not linger in a backend being stopped.
            # trust_env stays off: an HTTP(S)_PROXY variable must not reroute local probes.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.probe_timeout),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with self._session.get(f"http://{netloc}{path}", allow_redirects=False) as r:
                return 200 <= r.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _spawn(
        self, name: str, host: str, port: int, tags: tuple[str, ...], command: str = ""
    ) -> int:
        """Start the machine's process (with `command`, else the configured one); return its
        pid once a scan can find it."""
        popen = self._popen(name, host, port, tags, command)
        _children[popen.pid] = (popen, name)
        # Popen returns once exec() has begun, but the kernel shows the new environment in
        # /proc only a moment later (it sets it up after closing the close-on-exec pipe that
        # Popen waits on). Until then a scan would not find the machine: wait for the marker.
        deadline = time.monotonic() + 5.0
        while read_proc(popen.pid) is None and popen.poll() is None:
            if time.monotonic() > deadline:
                log.warning(
                    "local machine %s (pid %d) shows no marker in /proc yet; a later scan finds "
                    "it, nothing to do",
                    name,
                    popen.pid,
                )
                break
            await asyncio.sleep(0.001)
        return popen.pid

    def _popen(
        self, name: str, host: str, port: int, tags: tuple[str, ...], command: str = ""
    ) -> subprocess.Popen[bytes]:
        argv = command_argv(command or self.settings.command, host, port, name)
        env = {k: v for k, v in self.environ.items() if k not in MARKS}
        env[MARK_MACHINE] = name
        env[MARK_TAGS] = ",".join(tags)
        env[MARK_PORT] = str(port)
        env[MARK_HOST] = host
        if command:
            env[MARK_COMMAND] = command
        workdir = self.base / self.settings.workdir if self.settings.workdir else self.base
        out: int | IO[bytes] = subprocess.DEVNULL
        log_file = self._log_file(name)
        try:
            if log_file is not None:
                log_file.parent.mkdir(parents=True, exist_ok=True)
                out = open(log_file, "ab")  # noqa: SIM115 - the child gets it; we close ours
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log_file is not None else subprocess.DEVNULL,
                cwd=workdir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise ProviderError(
                f"cannot start local machine {name} ({argv[0]!r} in {workdir}): {e.strerror or e}"
            ) from None
        finally:
            if not isinstance(out, int):
                out.close()
        return popen

    async def _stop(self, name: str) -> None:
        """SIGTERM every process of the machine, SIGKILL after stop-timeout, until none is left.

        The machine's processes are looked up afresh on every round, so a worker it forks while
        stopping is signalled too, and a process that is gone is never signalled.
        """
        start = self.clock()
        termed: dict[int, int] = {}  # pid -> start ticks of every process sent SIGTERM
        killed: set[int] = set()
        _stopping.add(name)
        try:
            while True:
                procs = self._groups(await asyncio.to_thread(scan)).get(name, [])
                if not procs and all(_exited(pid, ticks) for pid, ticks in termed.items()):
                    if termed:
                        log.info("stopped local machine %s", name)
                    return
                elapsed = self.clock() - start
                if elapsed < self.settings.stop_timeout:
                    for p in procs:
                        if p.pid not in termed and signal_if_ours(
                            p.pid, name, self.tags, signal.SIGTERM
                        ):
                            termed[p.pid] = p.ticks
                elif elapsed < self.settings.stop_timeout + KILL_GRACE:
                    for p in procs:
                        sent = signal_if_ours(p.pid, name, self.tags, signal.SIGKILL)
                        if sent and p.pid not in killed:
                            killed.add(p.pid)
                            log.warning(
                                "local machine %s (pid %d) ignored SIGTERM for %.1fs: SIGKILL. "
                                "Make it exit on SIGTERM, or raise [local-provisioner] "
                                "stop-timeout",
                                name,
                                p.pid,
                                elapsed,
                            )
                else:
                    left = {p.pid for p in procs} | {
                        pid for pid, ticks in termed.items() if not _exited(pid, ticks)
                    }
                    pids = ", ".join(str(pid) for pid in sorted(left))
                    raise ProviderError(f"local machine {name} (pid {pids}) survived SIGKILL")
                await asyncio.sleep(self.poll_interval)
        finally:
            _reap()
            _stopping.discard(name)


def _leader(procs: Procs) -> Proc:
    """The process we started: the session leader (setsid), else the oldest one left."""
    leaders = [p for p in procs if p.pid == p.session]
    return min(leaders or procs, key=lambda p: (p.ticks, p.pid))
