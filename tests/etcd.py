"""Real etcd clusters for the tests (Debian's etcd-server; no mocks).

`EtcdCluster(tmp, size)` starts `size` members (1 or 3) on 127.0.0.1, each on free ports with
its data dir and log under `tmp`, and waits for every member's /health (polled with a deadline,
never a sleep). Members can be stopped, killed and started again with their data. As an async
context manager it always ends every process it started, by PID. The `etcd` and `etcd3`
fixtures (tests/conftest.py) are one- and three-member clusters.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType

import aiohttp
import pytest
import trustme

ETCD = "etcd"
ETCDCTL = "etcdctl"
INSTALL = "apt-get install etcd-server etcd-client (make test installs it as root)"

# Fast raft timings: a leader within a second, and a lease's minimum TTL (1.5 election
# timeouts) of 1 s.
FAST = ("--heartbeat-interval", "50", "--election-timeout", "500")

_clusters = itertools.count(1)


def etcd_available() -> bool:
    return shutil.which(ETCD) is not None and shutil.which(ETCDCTL) is not None


needs_etcd = pytest.mark.skipif(not etcd_available(), reason=f"etcd not installed: {INSTALL}")


class EtcdStartError(RuntimeError):
    pass


def free_port() -> int:
    """A port that was free a moment ago (etcd cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _environment() -> dict[str, str]:
    # ETCD_* variables configure etcd and ETCDCTL_* etcdctl: none of the user's may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    env["ETCDCTL_API"] = "3"
    return env


class EtcdMember:
    """One etcd process: its ports, data dir and log (etcd's stderr) under `dir`."""

    def __init__(self, name: str, dir: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.name = name
        self.dir = dir
        self.tls = tls  # (certificate, key) for the client port, served as https
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def spawn(self, initial_cluster: str, state: str, token: str) -> None:
        assert not self.running, f"{self.name} is already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", token,
            "--logger", "zap",
            "--log-outputs", "stderr",
            *FAST,
        ]  # fmt: skip
        if self.tls:
            args += ["--cert-file", str(self.tls[0]), "--key-file", str(self.tls[1])]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_environment(),
            )

    async def wait_exit(self, timeout: float) -> bool:
        """Wait (polling, bounded) for the process to end; False if it is still running."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (etcd hands over leadership and exits), SIGKILL if it does not."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            if not await self.wait_exit(timeout):
                await self.kill()

    async def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            await self.wait_exit(10.0)

    def kill_now(self) -> None:
        """SIGKILL and reap, without a loop (for cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class EtcdCluster:
    """`size` etcd members on 127.0.0.1, data and logs under `tmp`. With `tls`, the client
    ports serve https with a certificate from a test CA that `client_ssl` trusts."""

    def __init__(
        self, tmp: Path, size: int = 1, *, tls: bool = False, timeout: float = 15.0
    ) -> None:
        assert size >= 1
        self.tmp = tmp
        self.size = size
        self.timeout = timeout
        self.token = f"doproxy-test-{os.getpid()}-{next(_clusters)}"
        self.client_ssl: ssl.SSLContext | None = None
        self._ca_file: Path | None = None
        self._tls: tuple[Path, Path] | None = None
        if tls:
            self._make_certificates()
        self.members = [self._member(i) for i in range(size)]
        self._created = False

    def _member(self, i: int) -> EtcdMember:
        return EtcdMember(f"m{i}", self.tmp / f"m{i}", self._tls)

    def _make_certificates(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        folder = self.tmp / "tls"
        folder.mkdir(parents=True, exist_ok=True)
        self._tls = (folder / "cert.pem", folder / "key.pem")
        self._ca_file = folder / "ca.pem"
        cert.cert_chain_pems[0].write_to_path(str(self._tls[0]))
        cert.private_key_pem.write_to_path(str(self._tls[1]))
        ca.cert_pem.write_to_path(str(self._ca_file))
        self.client_ssl = ssl.create_default_context(cafile=str(self._ca_file))

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    async def __aenter__(self) -> EtcdCluster:
        try:
            await self.start_all()
        except BaseException:
            self.kill_all_now()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_all_now()

    async def start_all(self) -> None:
        """Start every member that is not running and wait until all are healthy. The first
        start creates the cluster (retried on fresh ports when one was taken meanwhile)."""
        if self._created:
            for i, member in enumerate(self.members):
                if not member.running:
                    self._spawn(i)
            await self.wait_healthy(range(self.size))
            return
        for attempt in range(3):
            for i in range(self.size):
                self._spawn(i, state="new")
            try:
                await self.wait_healthy(range(self.size))
            except EtcdStartError as exc:
                if attempt == 2 or "address already in use" not in str(exc):
                    raise
                self.kill_all_now()
                for member in self.members:
                    shutil.rmtree(member.dir, ignore_errors=True)
                self.members = [self._member(i) for i in range(self.size)]
                continue
            self._created = True
            return

    async def start(self, i: int) -> None:
        """Start member i again, with its data dir (it rejoins the existing cluster)."""
        self._spawn(i)
        await self.wait_healthy([i])

    async def stop(self, i: int) -> None:
        await self.members[i].stop()

    async def kill(self, i: int) -> None:
        await self.members[i].kill()

    async def stop_all(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))

    def kill_all_now(self) -> None:
        for member in self.members:
            member.kill_now()

    def _spawn(self, i: int, state: str = "existing") -> None:
        self.members[i].spawn(self.initial_cluster, state, self.token)

    async def wait_healthy(self, indices: range | list[int]) -> None:
        """Poll each member's /health until it reports a leader, within the deadline. A
        member that exits meanwhile fails the start at once, with its log."""
        deadline = time.monotonic() + self.timeout
        pending = [self.members[i] for i in indices]
        connector = aiohttp.TCPConnector(ssl=self.client_ssl or True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while pending:
                for member in list(pending):
                    if not member.running:
                        raise EtcdStartError(
                            f"etcd {member.name} exited while starting; its log ends:\n"
                            f"{member.log_tail()}"
                        )
                    if await _healthy(session, member.client_url):
                        pending.remove(member)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise EtcdStartError(
                        f"etcd {pending[0].name} not healthy within {self.timeout:g}s; its log "
                        f"ends:\n{pending[0].log_tail()}"
                    )
                await asyncio.sleep(0.05)

    async def etcdctl(self, *args: str, input: bytes | None = None) -> str:
        """Run etcdctl against the running members; its output, or an error with it."""
        endpoints = ",".join(m.client_url for m in self.members if m.running)
        proc = await asyncio.create_subprocess_exec(
            ETCDCTL,
            "--endpoints",
            endpoints,
            "--dial-timeout",
            "3s",
            *(("--cacert", str(self._ca_file)) if self._ca_file else ()),
            *args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )
        try:
            async with asyncio.timeout(15):
                out, _ = await proc.communicate(input)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed:\n{out.decode(errors='replace')}")
        return out.decode(errors="replace")


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with asyncio.timeout(0.5), session.get(url + "/health") as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return resp.status == 200 and isinstance(body, dict) and body.get("health") == "true"
