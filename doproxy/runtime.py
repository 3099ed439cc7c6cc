"""A running doproxy: the proxy, its health checks and statistics, and hot reload.

Theory of operation (reload)
----------------------------
A reload is all-or-nothing: parse and validate the config and the inventory, build the new
pool, load every TLS certificate, open a new listener if `bind` or `https` changed, and only
when every step succeeded swap them
in. On any error every problem is logged and the last valid configuration keeps running.

Backends are matched by identity (inventory id, else address) and address: an unchanged backend
keeps its Backend object, so its health, statistics and pooled connections carry over; a new
backend is health-checked at once; a removed one gets no new requests, finishes the ones in
flight, and its idle connections are closed. Each request reads the pool current when it starts
(one snapshot per request).

The scaler's provider is rebuilt when what it is made of changed: its `[do-provisioner]` or
`[local-provisioner]` settings, or the token or user-data read from their files (a rotated
token-file is a change even when the config is not). The token and user-data files are read,
and the new provider opened, before anything is applied, so a bad one fails the whole reload
and the running provider carries on. The scaler itself keeps running (its timers and cooldowns
stand); from the swap on, every provider call goes to the new provider, and the old one is
closed once the last call that started on it has returned. A change of provider kind (local
<-> DigitalOcean) restarts the scaler instead.

A changed `bind` opens the new listener first and then closes the old one, so no connection is
refused in between; connections accepted on the old one finish normally. Certificates are
picked per handshake by the listener's SNI callback (CertificateSelector); a reload hands it
the newly loaded ones, so a renewed, added or removed certificate reaches new handshakes without
reopening the listener, and open connections keep theirs. Reloads come from SIGHUP and, with
`watch-config`, from changes to the files doproxy reads: the config file, the inventory, every
certificate and key file, the error pages and, with a scaler on DigitalOcean, its token-file and
user-data file (watched through their folders, so editors that save by rename work). Changes to
any other file in those folders are filtered out before they reach us (a log file written into
the config folder must not wake the watcher on every line), and watchfiles' own "N changes
detected" INFO lines are silenced: logged into such a folder, each would be a change itself.

The access log (access-log, access-log-format, access-log-file) is part of the configuration
too: a reload that changes it opens the new file before anything is applied (a file that cannot
be opened fails the reload, naming access-log-file), swaps it in, then flushes and closes the
old one; a reload that leaves it alone keeps the file open. SIGUSR1 reopens the file at its
path, for logrotate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doproxy import service
from doproxy.admin.server import AdminServer, configured_token
from doproxy.config import load_settings, resolve_in
from doproxy.core.balancers import Balancer, make_balancer
from doproxy.core.health import State
from doproxy.core.http11 import ErrorPage
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings, parse_bind, worker_count
from doproxy.errors import ConfigError, DoproxyError, Problem, ProviderError
from doproxy.events import EventLog
from doproxy.health import HealthChecker
from doproxy.inventory import load_inventory
from doproxy.machines import (
    InventoryStore,
    hold_server_lock,
    open_provider,
    provider_kind,
    set_state,
)
from doproxy.metrics import Metrics
from doproxy.proxy.access import AccessLog, switch
from doproxy.proxy.backend import Backend, Pool
from doproxy.proxy.server import ProxyServer, make_tls_context
from doproxy.statistics import StatsCollector
from doproxy.stores import open_store
from doproxy.upgrade import (
    Link,
    Predecessor,
    UpgradeListener,
    hand_over_sockets,
    trace,
    upgrade_socket_path,
)
from doproxy.workers import Fleet, WorkerState

if TYPE_CHECKING:
    import builtins

    import watchfiles

    from doproxy.autoscaler import Autoscaler
    from doproxy.cluster.node import ClusterNode
    from doproxy.cluster.store import EtcdStore
    from doproxy.provisioning import Machine, Provider, Spec
    from doproxy.wake import Waker

log = logging.getLogger(__name__)

# watchfiles logs "N changes detected" at INFO for every batch: with doproxy's log file in a
# watched folder, that line is itself a change, forever. Its warnings still show.
logging.getLogger("watchfiles").setLevel(logging.WARNING)


def build_pool(
    settings: Settings,
    entries: list[InventoryEntry],
    clock: Callable[[], float] = time.monotonic,
    reuse: list[Backend] | None = None,
    balancer: Balancer | None = None,
) -> Pool:
    """A pool for `entries`, reusing the Backend objects of `reuse` that did not change, and
    `balancer` (the running pool's) when it is of the configured type: its structures (the
    hash ring's points, the turn) carry over instead of being built again for every backend."""
    old = {(b.key, b.entry.server_host): b for b in reuse or []}
    backends = []
    for e in entries:
        if e.state == "provisioning":
            continue  # an intent, not a backend yet
        b = old.get((e.key, e.server_host))
        if b is None:
            b = Backend(e)
        else:
            b.entry = e  # weight, state, name may change without losing anything
            b.name = e.name or e.server_host
        backends.append(b)
    kind = settings.loadbalancing.type
    if balancer is None or balancer.name != kind:
        balancer = make_balancer(kind, clock)
    return Pool(
        backends=backends,
        balancer=balancer,
        slow_start=settings.loadbalancing.slow_start,
        # The first pool (no `reuse`) is the start-up one: its backends start warm.
        warm=reuse is None,
        clock=clock,
    )


def load_error_pages(settings: Settings, base: Path) -> dict[int, ErrorPage]:
    """Read every [error-pages] file now, so a missing one is a config error, not a 500 later."""
    pages: dict[int, ErrorPage] = {}
    problems = []
    for code, name in settings.error_pages.items():
        path = resolve_in(base, name)
        try:
            body = path.read_bytes()
        except OSError as e:
            problems.append(
                Problem(str(path), f"error-pages.{code}", f"cannot read: {e.strerror or e}")
            )
            continue
        kind = mimetypes.guess_type(path.name)[0] or "text/plain"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        pages[code] = (kind.encode(), body)
    if problems:
        raise ConfigError(problems)
    return pages


@dataclass(frozen=True)
class CertificateFiles:
    """One certificate of the config: its PEM files and the config key that names them."""

    where: str  # "tls-cert-file" (the 2015 keys) or "tls-certificate[i]"
    cert: Path
    key: Path

    @property
    def cert_key(self) -> str:
        return "tls-cert-file" if self.where == "tls-cert-file" else f"{self.where}.cert-file"

    @property
    def key_key(self) -> str:
        return "tls-key-file" if self.where == "tls-cert-file" else f"{self.where}.key-file"


def certificate_files(settings: Settings, base: Path) -> list[CertificateFiles]:
    """Every certificate the config names, the default (served without a matching SNI) first."""
    out = []
    if settings.tls_cert_file:
        out.append(
            CertificateFiles(
                "tls-cert-file",
                resolve_in(base, settings.tls_cert_file),
                resolve_in(base, settings.tls_key_file),
            )
        )
    for i, c in enumerate(settings.tls_certificate):
        out.append(
            CertificateFiles(
                f"tls-certificate[{i}]", resolve_in(base, c.cert_file), resolve_in(base, c.key_file)
            )
        )
    return out


def tls_files(settings: Settings, base: Path) -> set[Path]:
    """Every certificate and key file the config names (watched for changes)."""
    return {f for c in certificate_files(settings, base) for f in (c.cert, c.key)}


def certificate_names(pem: bytes) -> list[str]:
    """The DNS names a PEM certificate (the first of a chain) is for: its subjectAltName DNS
    entries, else its subject's common name (what clients stopped checking, but a certificate
    without SANs names nothing else)."""
    # Imported here, not at the top: cryptography costs ~8 MiB of resident memory, and only a
    # configuration with certificates (https) ever reads one.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return list(san.value.get_values_for_type(x509.DNSName))


class Certificates:
    """The loaded certificates, and which one a handshake gets for the name it asked for (SNI).

    An exact name wins over a wildcard; `*.example.com` covers exactly one label in front of
    example.com (not example.com itself, not a.b.example.com), as clients check it. When two
    certificates name the same host the first listed wins. Anything else gets the default.
    """

    def __init__(self, loaded: list[tuple[ssl.SSLContext, list[str]]]) -> None:
        self.default = loaded[0][0]
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for *.example.com
        for ctx, names in loaded:
            for name in names:
                name = name.lower().rstrip(".")
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ctx)
                elif "*" not in name:
                    self.exact.setdefault(name, ctx)

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            ctx = self.wildcard.get(parent) if dot else None
        return self.default if ctx is None else ctx


class CertificateSelector:
    """The listener's SNI callback: hands each handshake the context of its certificate.

    The listener keeps one SSLContext for its life; a reload swaps `certificates`, so renewed or
    added certificates reach new handshakes without reopening the listener. Every handshake is
    switched, even without SNI, because after a reload the default certificate lives in a new
    context too. All contexts come from make_tls_context, so the policy (versions, ciphers,
    ALPN) is the same whichever is picked.
    """

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self.context = certificates.default  # the listener's
        self.context.sni_callback = self

    def __call__(
        self, ssl_object: ssl.SSLObject, server_name: str | None, current: ssl.SSLContext
    ) -> None:
        chosen = self.certificates.pick(server_name)
        if chosen is not current:
            ssl_object.context = chosen


def load_certificates(settings: Settings, base: Path) -> Certificates | None:
    """Load every certificate of the config (None without https), or raise ConfigError naming
    each file that cannot be read or used, so a reload with a bad one changes nothing."""
    if not settings.https:
        return None
    problems = []
    loaded = []
    for c in certificate_files(settings, base):
        pem: bytes | None = None
        try:
            pem = c.cert.read_bytes()
        except OSError as e:
            problems.append(Problem(str(c.cert), c.cert_key, f"cannot read: {e.strerror or e}"))
        try:
            c.key.read_bytes()
        except OSError as e:
            problems.append(Problem(str(c.key), c.key_key, f"cannot read: {e.strerror or e}"))
            continue
        if pem is None:
            continue
        try:
            ctx = make_tls_context(str(c.cert), str(c.key))
            names = certificate_names(pem)
        except (OSError, ssl.SSLError, ValueError) as e:
            problems.append(
                Problem(str(c.cert), c.where, f"cannot use this certificate and key: {e}")
            )
            continue
        loaded.append((ctx, names))
    if problems:
        raise ConfigError(problems)
    return Certificates(loaded)


@dataclass(frozen=True)
class Snapshot:
    """One configuration as the runtime applies it, loaded and validated in one pass: the
    settings, every path resolved against the config's folder, the inventory, the TLS
    certificates and the error pages. Building it changes nothing that runs, so start-up and a
    reload apply a whole new one, or nothing (a bad certificate or page fails the reload)."""

    settings: Settings
    base: Path
    inventory_path: Path
    entries: list[InventoryEntry]
    certificates: Certificates | None
    error_pages: dict[int, ErrorPage]
    # What the scaler's provider is made of (provider_config), when provisioning is on: the
    # token and user-data files are read here, so one that cannot be read fails the load.
    provider: tuple[object, ...] | None = None


def load_snapshot(
    settings: Settings, base: Path, entries: list[InventoryEntry] | None = None
) -> Snapshot:
    """Everything `settings` names, read and checked now (the inventory too, unless given)."""
    inventory_path = resolve_in(base, settings.inventory_file)
    if entries is None:
        entries = load_inventory(inventory_path)
    return Snapshot(
        settings=settings,
        base=base,
        inventory_path=inventory_path,
        entries=entries,
        certificates=load_certificates(settings, base),
        error_pages=load_error_pages(settings, base),
        provider=provider_config(settings, base) if settings.provisioning.enable else None,
    )


def access_log_identity(settings: Settings, base: Path) -> tuple[str, Path | None] | None:
    """What the access log is made of (format, file or None for standard output), or None
    when it is off: a reload that keeps this keeps its open file."""
    if not settings.access_log:
        return None
    name = settings.access_log_file
    return (settings.access_log_format, resolve_in(base, name) if name else None)


def open_access_log(settings: Settings, base: Path) -> AccessLog | None:
    """The access log `settings` ask for, opened now (None when off), or ConfigError naming
    access-log-file when the file cannot be opened for appending."""
    identity = access_log_identity(settings, base)
    if identity is None:
        return None
    fmt, path = identity
    try:
        return AccessLog(fmt, path)
    except OSError as e:
        raise ConfigError(
            [
                Problem(
                    str(path),
                    "access-log-file",
                    f"cannot open for appending: {e.strerror or e}; create its folder or make "
                    "it writable by the user doproxy runs as, or name another file",
                )
            ]
        ) from None


def check_access_log(settings: Settings, base: Path) -> None:
    """What `doproxy check` can tell about access-log-file without creating it: ConfigError
    when it names a folder, or a file it could not append to or create (as this user)."""
    identity = access_log_identity(settings, base)
    if identity is None or identity[1] is None:
        return
    path = identity[1]
    if path.is_dir():
        problem = "is a folder; name a file in it"
    elif path.exists():
        if os.access(path, os.W_OK):
            return
        problem = "not writable; make it writable by the user doproxy runs as"
    elif not path.parent.is_dir():
        problem = "its folder does not exist; create it, or name another file"
    elif os.access(path.parent, os.W_OK | os.X_OK):
        return
    else:
        problem = "cannot be created: its folder is not writable by the user doproxy runs as"
    raise ConfigError([Problem(str(path), "access-log-file", problem)])


def _signatures(files: set[Path]) -> dict[Path, tuple[int, int] | None]:
    """Modification time and size of each file (None when missing), to notice any change."""
    out: dict[Path, tuple[int, int] | None] = {}
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            out[f] = None
        else:
            out[f] = (st.st_mtime_ns, st.st_size)
    return out


def provider_config(settings: Settings, base: Path) -> tuple[object, ...]:
    """What the scaler's provider is made of, to tell whether a reload changed it.

    For DigitalOcean this reads the token (its file, or the environment) and the user-data
    file, so it raises ProviderError when either cannot be read. The token is kept only as a
    digest.
    """
    kind = provider_kind(settings)
    if kind == "local":
        return (kind, settings.local_provisioner)
    from doproxy.providers.digitalocean import load_token, read_user_data

    do = settings.do_provisioner
    token = hashlib.sha256(load_token(do, base, os.environ).encode()).hexdigest()
    return (kind, do.model_copy(update={"token": ""}), token, read_user_data(do, base))


class SwappableProvider:
    """The scaler's provider, which a reload can replace without stopping the scaler.

    Each call goes to the provider current when the call starts. `swap` makes a new one
    current and closes the old one as soon as no call that started on it is still running
    (a create waiting for its machine, say), so nothing in flight loses its connection.
    """

    def __init__(self, provider: Provider) -> None:
        self.current = provider
        self.kind = provider.kind
        self._busy: dict[int, int] = {}  # id(provider) -> calls in progress on it

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[Provider]:
        p = self.current
        self._busy[id(p)] = self._busy.get(id(p), 0) + 1
        try:
            yield p
        finally:
            self._busy[id(p)] -= 1
            if not self._busy[id(p)]:
                del self._busy[id(p)]
                if p is not self.current:
                    await p.close()

    async def swap(self, provider: Provider) -> None:
        old, self.current, self.kind = self.current, provider, provider.kind
        if id(old) not in self._busy:
            await old.close()

    async def list(self) -> builtins.list[Machine]:
        async with self._using() as p:
            return await p.list()

    async def get(self, machine_id: str) -> Machine:
        async with self._using() as p:
            return await p.get(machine_id)

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        async with self._using() as p:
            return await p.create(name, spec)

    async def destroy(self, machine_id: str) -> None:
        async with self._using() as p:
            await p.destroy(machine_id)

    async def reboot(self, machine_id: str) -> None:
        async with self._using() as p:
            await p.reboot(machine_id)

    async def close(self) -> None:
        await self.current.close()


def _only(names: set[str]) -> Callable[[watchfiles.Change, str], bool]:
    """A watchfiles filter that lets through changes to `names` and nothing else."""
    return lambda _, path: path in names


class Runtime:
    def __init__(
        self,
        settings: Settings,
        entries: list[InventoryEntry],
        config_file: Path | None = None,
        upgrade: bool = False,
    ) -> None:
        self.config_file = config_file
        # Take the sockets and the control plane over from the doproxy running on this
        # inventory (doproxy.upgrade) instead of binding and locking ourselves.
        self.upgrade = upgrade and config_file is not None
        self.upgrade_listener: UpgradeListener | None = None
        self.handed_over = False  # this one handed over to a successor and drains
        self.on_handed_over: Callable[[], None] = lambda: None  # run_proxy's stop
        self.base = config_file.resolve().parent if config_file else Path.cwd()
        self.settings = settings
        self.entries = entries
        self.server: ProxyServer | None = None
        self.tls: CertificateSelector | None = None  # the listener's, when https
        self.checker: HealthChecker | None = None
        self.stats: StatsCollector | None = None
        self.reloads = 0  # successful reloads (tests and the status page read it)
        self._tasks: list[asyncio.Task[Any]] = []  # those that run as long as the server
        # Those started by an event (a SIGHUP's reload, a scaler's stop): each forgets itself
        # when done, so a thousand SIGHUPs leave nothing behind.
        self._pending: set[asyncio.Task[Any]] = set()
        self._exit = contextlib.ExitStack()
        self._draining_since: dict[Backend, float] = {}
        self.autoscaler: Autoscaler | None = None
        self.provider: SwappableProvider | None = None  # the scaler's
        self._provider_config: tuple[object, ...] | None = None  # what it was made of
        self._reload_lock = asyncio.Lock()
        self.events = EventLog()  # what happened, for the admin API and the status page
        self.last_reload_error: str | None = None  # why the last reload failed, if it did
        self.admin: AdminServer | None = None
        self.metrics = Metrics(self)  # read at scrape time; nothing per request
        self.access: AccessLog | None = None  # the access log's writer, when it is on
        # The worker processes (workers > 1; docs/workers.md), else None: this process serves.
        self.fleet: Fleet | None = None
        self.worker_total = worker_count(settings.workers, os.cpu_count())
        # Where the inventory lives: the file, or etcd in cluster mode (doproxy.cluster).
        self.store: InventoryStore = open_store(settings, self.base)
        self.owner = ""  # the store's owner tag, read at start (the scaler's and the CLI's)
        self.cluster: ClusterNode | None = None  # this node's part in a cluster (store etcd)
        self._leader_store: EtcdStore | None = None  # the guarded store while we lead
        self.waker: Waker | None = None  # scale to zero: holds requests while the pool wakes

    async def start(self) -> ProxyServer:
        settings = self.settings
        predecessor: Predecessor | None = None
        if self.upgrade:
            # The lock stays with the running doproxy until it released its control plane.
            predecessor = await Predecessor.connect(upgrade_socket_path(self.inventory_path))
        elif self.config_file is not None:
            # First of all: a second server on this inventory is refused before it listens.
            # The lock tells the CLI a server runs here and will finish its drains.
            self._lock()
        if settings.cluster.store == "etcd" and self.config_file is not None:
            await self._join_cluster()
        snap = load_snapshot(settings, self.base, self.entries)
        access = open_access_log(settings, self.base)
        self.tls = None if snap.certificates is None else CertificateSelector(snap.certificates)
        ctx = None if self.tls is None else self.tls.context
        server = ProxyServer(settings, build_pool(settings, snap.entries), ctx)
        server.error_pages = snap.error_pages
        self._use_access_log(server, access)  # before the first connection is accepted
        try:
            if predecessor is not None and predecessor.bind == settings.bind:
                await self._listen_inherited(server, predecessor.groups)
            elif self.worker_total == 1:
                await server.listen()
            else:
                # Bound here, served by the workers: see doproxy.workers.
                await server.rebind(
                    settings.bind, ctx, listeners=self.worker_total, start_serving=False
                )
        except BaseException:
            self._use_access_log(server, None)
            raise
        self.server = server
        self._use_waker(settings)
        if self.worker_total > 1:
            self.fleet = Fleet(self, self.worker_total)
            try:
                await self.fleet.start()
            except BaseException:
                await self.fleet.stop(0.0)
                await server.shutdown(0.0)
                self._use_access_log(server, None)
                self._exit.close()
                raise
        if predecessor is not None:
            # We serve: the old one stops accepting, hands the control plane over and drains.
            await predecessor.serving()
            await self._take_lock()
        if self.config_file is not None and settings.admin.enable:
            # A taken admin address stops the start, as a taken traffic port does.
            admin = AdminServer(self, self.metrics.exposition)
            try:
                await admin.start()
            except BaseException:
                await server.shutdown()
                self._use_access_log(server, None)
                self._exit.close()
                raise
            self.admin = admin
        self.checker = HealthChecker(settings, sink=self._health_changed)
        self.checker.watch(server.pool.backends)
        self.stats = StatsCollector(lambda: server.pool, settings.backend.latency_average_seconds)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.stats.run(time.monotonic)))
        self._tasks.append(loop.create_task(self._watch_ejections()))
        if self.config_file is not None:
            self._tasks.append(loop.create_task(self._finish_drains()))
            if self.cluster is not None:
                self.cluster.start()  # the leader, once elected, starts the scaler
            elif settings.provisioning.enable:
                self.owner = await self.store.owner_tag()
                self.start_autoscaler(made_of=snap.provider)
        if self.config_file is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload_soon)
            # logrotate's `postrotate kill -USR1`, as for nginx. Handled even with the access
            # log off: SIGUSR1's default action would end the process.
            loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
            loop.add_signal_handler(signal.SIGUSR2, self._upgrade_soon)
            if settings.watch_config:
                ready = asyncio.Event()
                self._tasks.append(loop.create_task(self._watch(ready)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await ready.wait()
        for host, port in server.addresses:
            log.info("listening on %s:%d (%s)", host, port, "https" if ctx else "http")
        log.info("%d backend(s), balancing %s", len(self.entries), settings.loadbalancing.type)
        if self.fleet is not None:
            log.info("%d workers serve the listener", self.fleet.count)
        if self.config_file is not None:
            self.upgrade_listener = UpgradeListener(
                upgrade_socket_path(self.inventory_path), self._hand_over
            )
            self.upgrade_listener.start()
        if predecessor is not None:
            log.info("upgrade: this doproxy (pid %d) has taken over", os.getpid())
        return server

    async def _listen_inherited(
        self, server: ProxyServer, groups: list[list[socket.socket]]
    ) -> None:
        """Serve the listening sockets a predecessor handed over: ourselves (workers = 1), or
        hold them for our workers, with more listeners on the same port when we run more
        workers than it did."""
        serving = self.worker_total == 1
        for group in groups:
            for sock in group:
                await server.listen(sock=sock, start_serving=serving)
        if not serving and len(groups) < self.worker_total:
            host, _ = parse_bind(self.settings.bind)
            port = server.addresses[0][1]
            for _ in range(self.worker_total - len(groups)):
                await server.listen(f"{host or ''}:{port}", start_serving=False)

    def _lock(self) -> None:
        """Take the inventory lock (DoproxyError while another server holds it), held until
        self._exit closes."""
        self._exit.enter_context(hold_server_lock(self.inventory_path))
        trace("lock")
        self._exit.callback(trace, "unlock")  # LIFO: written while the lock is still held

    async def _take_lock(self, every: float = 0.05) -> None:
        """Take the inventory lock once the predecessor released it (it is releasing it now)."""
        waited = 0.0
        while True:
            try:
                # In a thread: hold_server_lock retries for an instant with time.sleep.
                await asyncio.to_thread(self._lock)
                return
            except DoproxyError as e:
                if waited == 0.0 or int(waited) // 10 != int(waited + every) // 10:
                    log.warning("upgrade: waiting for the inventory lock: %s", e)
            await asyncio.sleep(every)
            waited += every

    # --- upgrade: the running side (doproxy.upgrade) ---------------------------------------

    def _upgrade_soon(self) -> None:
        if self.handed_over:
            log.info("SIGUSR2: ignored, this doproxy has handed over and drains")
            return
        log.info("SIGUSR2: starting a new doproxy to take over (doproxy upgrade)")
        self._spawn(self._start_successor())

    async def _start_successor(self) -> None:
        """Run `doproxy upgrade` with our config: the program installed now (a new version),
        our config file as it is now. It outlives us; its exit is logged if it ends first."""
        assert self.config_file is not None
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "doproxy",
            "upgrade",
            "--config",
            str(self.config_file),
            "--log-level",
            level if level in ("debug", "info", "warning", "error") else "info",
            stdin=asyncio.subprocess.DEVNULL,
        )
        code = await proc.wait()
        if not self.handed_over:
            log.error(
                "upgrade: the new doproxy (pid %d) exited with %d before taking over (the "
                "lines above say why); this one carries on",
                proc.pid,
                code,
            )

    async def _hand_over(self, link: Link) -> None:
        """A successor connected to the upgrade socket: give it the sockets; once it serves,
        stop accepting, release the control plane (the lock last), then drain."""
        server = self.server
        assert server is not None
        async with self._reload_lock:  # no reload or inventory change half-way through
            pid = await hand_over_sockets(link, self.settings.bind, server.listening_sockets())
            log.info(
                "upgrade: the new doproxy (pid %d) serves; this one stops accepting, hands the "
                "control plane over and drains",
                pid,
            )
            self.handed_over = True
            grace = self.settings.timeouts.shutdown_grace
            if self.fleet is not None:
                self.fleet.begin_drain(grace, close_idle=False)
            server.stop_accepting()
            await self._release_control_plane()
            link.send({"type": "released"})
            await link.flush()
        self.on_handed_over()

    async def _release_control_plane(self) -> None:
        """Stop everything that acts on the inventory or the provider, then release the lock."""
        if self.upgrade_listener is not None:
            self.upgrade_listener.close()
            self.upgrade_listener = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.autoscaler is not None:
            await self._stop_scaler(self.autoscaler)
            self.autoscaler = None
        if self.cluster is not None:
            # Leadership goes now (the lease is revoked), not a TTL later: the successor is
            # elected at once. This process leads no more, so it records no drain either.
            await self.cluster.stop()
        self._exit.close()  # the inventory lock: the successor takes it now
        log.info("upgrade: inventory lock and control plane released")

    # --- workers (doproxy.workers.Control) ------------------------------------------------------

    def worker_state(self) -> WorkerState:
        server = self.server
        assert server is not None
        return WorkerState(
            settings=self.settings,
            base=str(self.base),
            pool=server.pool,
            server=server,
            error_pages=server.error_pages,
            sockets=server.listening_sockets(),
        )

    def workers_status(self) -> list[dict[str, Any]]:
        """Each worker's process, generation and counts (empty without workers)."""
        return [] if self.fleet is None else self.fleet.status()

    def start_autoscaler(
        self, provider: Provider | None = None, made_of: tuple[object, ...] | None = None
    ) -> None:
        from doproxy.autoscaler import Autoscaler

        if made_of is None:
            with contextlib.suppress(ProviderError):
                made_of = provider_config(self.settings, self.base)
        provider = provider or open_provider(self.settings, self.base, owner=self.owner)
        if self.cluster is not None:
            from doproxy.cluster.node import LeaderOnly

            provider = LeaderOnly(provider, self.cluster)
        self.provider = SwappableProvider(provider)
        self._provider_config = made_of
        self.autoscaler = Autoscaler(
            self, self.provider, events=self.events, store=self._leader_store
        )
        self.autoscaler.start()
        trace("scaler-on")
        p = self.settings.provisioning
        log.info(
            "autoscaler on (%s, %d-%d backends, %s)%s",
            provider.kind,
            p.min_backends,
            p.max_backends,
            p.mode,
            " in dry-run" if p.dry_run else "",
        )

    async def _stop_scaler(self, scaler: Autoscaler) -> None:
        await scaler.stop()
        trace("scaler-off")

    @property
    def backends(self) -> list[Backend]:
        """The backends of the pool in service now."""
        return self.server.pool.backends if self.server is not None else []

    @property
    def inventory_path(self) -> Path:
        return resolve_in(self.base, self.settings.inventory_file)

    def takes_traffic(self, key: str) -> bool:
        """Is the backend `key` eligible for new requests right now?"""
        server = self.server
        return server is not None and any(b.key == key for b in server.pool.eligible)

    async def apply_inventory(self, entries: list[InventoryEntry] | None = None) -> bool:
        """Apply the inventory (read from its store, unless given) to the running pool, with
        the running settings.

        Membership changes (add, drain, disable, remove) take this path, never a config
        reload: they must not depend on doproxy.toml being valid at that moment (a drain that
        did not apply once let a scale-down destroy a machine still in rotation).
        """
        async with self._reload_lock:
            server = self.server
            if server is None:
                return False
            try:
                if entries is None:
                    entries = await self.store.load()
            except (DoproxyError, OSError) as e:
                log.error(
                    "inventory not applied, keeping the running pool: %s; fix the inventory "
                    "and save it again",
                    e,
                )
                return False
            added, removed = self._apply_pool(
                build_pool(
                    self.settings,
                    entries,
                    reuse=server.pool.backends,
                    balancer=server.pool.balancer,
                )
            )
            self.entries = entries
            self.reloads += 1  # an applied change, as a reload is
            if self.fleet is not None:
                await self.fleet.apply()
            log.info(
                "inventory applied: %d backend(s) (%d new, %d removed)",
                len(server.pool.backends),
                len(added),
                len(removed),
            )
            if added or removed:
                self.events.publish(
                    "membership",
                    f"inventory applied: {len(server.pool.backends)} backend(s) "
                    f"({', '.join(b.name for b in added) or 'none'} new, "
                    f"{', '.join(b.name for b in removed) or 'none'} removed)",
                )
            return True

    def _apply_pool(self, pool: Pool) -> tuple[list[Backend], list[Backend]]:
        """Swap in `pool`; close what removed backends kept idle. Returns (added, removed)."""
        server = self.server
        assert server is not None and self.checker is not None
        old_pool = server.pool
        # Sets: `b not in list` for every backend was O(n^2), a second at 2,000 backends.
        old_set, new_set = set(old_pool.backends), set(pool.backends)
        removed = [b for b in old_pool.backends if b not in new_set]
        added = [b for b in pool.backends if b not in old_set]
        server.set_pool(pool)
        if pool.balancer is old_pool.balancer:
            # Shared with the old pool, which may have refreshed it for its own list since:
            # make it the new pool's again.
            pool.refresh()
        for b in removed:
            while b.idle:
                b.idle.pop().close()
        self.checker.watch(pool.backends)
        return added, removed

    def traffic(self) -> tuple[int, float]:
        """The exchange totals the autoscaler decides on: this listener's (see
        ProxyServer.exchanges), or in a cluster the sum of every node's."""
        if self.cluster is not None:
            return self.cluster.traffic()
        return self.local_traffic()

    def local_traffic(self) -> tuple[int, float]:
        """This node's listener's exchange totals."""
        server = self.server
        return (server.exchanges, server.exchange_time) if server is not None else (0, 0.0)

    # --- scale to zero (doproxy.wake) --------------------------------------------------------

    def _use_waker(self, settings: Settings) -> None:
        """Hold requests while a sleeping pool wakes when scale-to-zero is on (else 503)."""
        p = settings.provisioning
        if p.enable and p.scale_to_zero:
            if self.waker is None:
                from doproxy.wake import Waker

                self.waker = Waker(settings, self.backends_pool, poke=self._poke_scaler)
            else:
                self.waker.configure(settings)
        elif self.waker is not None:
            waker, self.waker = self.waker, None
            self._spawn(waker.stop())  # anything held gets its 503
        if self.server is not None:
            self.server.waker = self.waker

    def backends_pool(self) -> Pool:
        assert self.server is not None
        return self.server.pool

    def _poke_scaler(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.poke()

    def local_wake_state(self) -> tuple[int, float | None, bool]:
        """This node's (requests waiting, seconds since a real request, wake failed)."""
        w = self.waker
        if w is None:
            return 0, None, False
        return w.waiting, w.quiet_for(), w.failed_at is not None

    def wake_state(self) -> tuple[int, float | None, bool]:
        """What the scaler decides on: this node's, or in a cluster every node's together
        (the requests waiting anywhere, the most recent real request anywhere)."""
        waiting, quiet, failed = self.local_wake_state()
        if self.cluster is not None and self.waker is not None:
            for name, n in self.cluster.nodes.items():
                if name == self.cluster.name:
                    continue
                waiting += int(n.get("waiting", 0))
                q = n.get("quiet_for")
                if isinstance(q, (int, float)):
                    quiet = q if quiet is None else min(quiet, float(q))
                failed = failed or bool(n.get("wake_failed"))
        return waiting, quiet, failed

    def wake_failure_handled(self) -> None:
        if self.waker is not None:
            self.waker.failed_at = None

    # --- cluster mode (doproxy.cluster.node) -------------------------------------------------

    async def _join_cluster(self) -> None:
        """Cluster mode: the inventory comes from etcd; when etcd does not answer, from the
        local copy the node keeps (the inventory file), and the node keeps trying."""
        from doproxy.cluster.node import ClusterNode
        from doproxy.cluster.store import EtcdStore

        assert isinstance(self.store, EtcdStore)
        c = self.settings.cluster
        self.cluster = ClusterNode(self, c, self.store, cache=self.inventory_path)
        entries = await self.cluster.connect(within=c.timeout * len(c.endpoints) + 1.0)
        if entries is not None:
            self.entries = entries
        else:
            log.warning(
                "cluster: starting with the local copy of the inventory (%d backend(s)) from "
                "%s; etcd is read again as soon as it answers",
                len(self.entries),
                self.inventory_path,
            )

    async def lead(self, store: EtcdStore) -> None:
        """This node was elected: it runs the scaler, writing through the guarded `store`."""
        self._leader_store = store
        if not self.settings.provisioning.enable or self.autoscaler is not None:
            return
        self.owner = await store.owner_tag()
        made_of = None
        with contextlib.suppress(ProviderError):
            made_of = provider_config(self.settings, self.base)
        try:
            self.start_autoscaler(made_of=made_of)
        except DoproxyError as e:
            log.error("cluster: this leader cannot start its autoscaler: %s", e)

    async def follow(self) -> None:
        """This node leads no more: its scaler stops at once (what it was doing is left as
        intents and draining entries that the next leader reconciles)."""
        view, self._leader_store = self._leader_store, None
        scaler, self.autoscaler = self.autoscaler, None
        self.provider = None
        if scaler is not None:
            await self._stop_scaler(scaler)
            log.info("autoscaler off (not the leader)")
        if view is not None:
            await view.release()  # its writer task, which no one would end otherwise

    async def _finish_drains(self, every: float = 0.1) -> None:
        """Turn "draining" backends "disabled" once nothing is in flight (or time is up).

        See doproxy.machines: the inventory is where the CLI and the autoscaler ask for a drain
        and where they see it finished.
        """
        while True:
            await asyncio.sleep(every)
            assert self.server is not None
            now = time.monotonic()
            draining = [b for b in self.server.pool.backends if b.entry.state == "draining"]
            for b in list(self._draining_since):
                if b not in draining:
                    del self._draining_since[b]
            for b in draining:
                since = self._draining_since.setdefault(b, now)
                timed_out = now - since >= self.settings.provisioning.drain_timeout
                if b.in_flight and not timed_out:
                    continue
                while b.idle:
                    b.idle.pop().close()
                if b.entry.id in (0, ""):
                    continue  # no id to address it by; it stays out of rotation as it is
                log.info(
                    "backend %s drained%s",
                    b.name,
                    f" (timeout, {b.in_flight} request(s) still in flight)" if b.in_flight else "",
                )
                if self.cluster is not None and not self.cluster.drained_everywhere(b, timed_out):
                    # Other nodes may still have requests in flight to it: the leader marks
                    # it once every node reports it drained (doproxy.cluster.node).
                    continue
                try:
                    await set_state(self.store, str(b.entry.id), "disabled")
                except (OSError, DoproxyError) as e:
                    log.error(
                        "cannot record the drain of %s in the inventory: %s; make the inventory "
                        "writable (retried)",
                        b.name,
                        e,
                    )
                    continue
                b.entry = b.entry.model_copy(update={"state": "disabled"})
                del self._draining_since[b]
                if self.fleet is not None:
                    self.fleet.push()

    def _refresh(self) -> None:
        if self.server is not None:
            self.server.pool.refresh()
        if self.fleet is not None:
            self.fleet.push()

    def _health_changed(self, backend: Backend, state: State) -> None:
        self._refresh()
        if state is State.DOWN:
            why = backend.health.problem or "failed its health checks"
            self.events.publish(
                "health", f"{backend.name} is down: {why}", "warning", backend=backend.name
            )
        else:
            self.events.publish("health", f"{backend.name} is up again", backend=backend.name)

    async def _watch_ejections(self, every: float = 1.0) -> None:
        """Passive-health ejections as events: the data plane only counts them (Backend.
        ejections); this compares the counts once a second, off the request path."""
        seen: dict[Backend, int] = {}
        while True:
            await asyncio.sleep(every)
            for b in self.backends:
                before = seen.get(b, b.ejections)
                if b.ejections > before:
                    self.events.publish(
                        "ejection",
                        f"{b.name} ejected: failed real requests in a row (passive health)",
                        "warning",
                        backend=b.name,
                    )
                seen[b] = b.ejections
            # A set: `b not in list` for each of 2,000 backends was 4M comparisons a second.
            current = set(self.backends)
            for gone in [b for b in seen if b not in current]:
                del seen[gone]

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in a task that stop() cancels and that is forgotten once done."""
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _reload_soon(self) -> None:
        if self.handed_over:
            log.info("SIGHUP: ignored, this doproxy has handed over and drains")
            return
        log.info("SIGHUP: reloading")
        self._spawn(self.reload())

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log file at its configured path (after logrotate renamed
        the old one). Synchronous: the signal's callback runs on the loop."""
        access = self.access
        if access is None or access.path is None:
            log.info("SIGUSR1: no access log file to reopen")
            return
        if access.reopen():
            log.info("SIGUSR1: access log reopened at %s", access.path)
        if self.fleet is not None:
            self.fleet.signal(signal.SIGUSR1)  # each worker writes to its own open file

    def _use_access_log(self, server: ProxyServer, access: AccessLog | None) -> None:
        """Make `access` the running access log; flush and close the one it replaces."""
        switch((self, server), access)

    def _watched(self) -> set[Path]:
        """Every file doproxy reads, so a change to any of them reloads (and nothing else)."""
        s = self.settings
        files = set()
        if self.config_file is not None:
            files.add(self.config_file.resolve())
        if s.cluster.store == "file":  # in a cluster it is etcd's local copy, not the source
            files.add(resolve_in(self.base, s.inventory_file))
        if s.https:
            files |= tls_files(s, self.base)
        files |= {resolve_in(self.base, name) for name in s.error_pages.values()}
        if s.provisioning.enable and provider_kind(s) == "digitalocean":
            do = s.do_provisioner
            files |= {resolve_in(self.base, f) for f in (do.token_file, do.user_data) if f}
        return files

    async def _watch(self, ready: asyncio.Event) -> None:
        # Imported here: watchfiles (and the anyio it brings) costs ~1.3 MiB of resident memory,
        # and only watch-config = true runs this task.
        import watchfiles

        while True:
            files = self._watched()
            folders = {str(f.parent) for f in files}
            names = {str(f) for f in files}
            inventory = self.inventory_path
            before = _signatures(files)
            # yield_on_timeout: an empty batch tells us the watcher runs, so start() can wait
            # for it, and a change made while it was starting is still seen (by signature).
            async for changes in watchfiles.awatch(
                *folders,
                watch_filter=_only(names),
                debounce=50,
                step=20,
                yield_on_timeout=True,
                rust_timeout=200,
            ):
                if not ready.is_set():
                    ready.set()
                    if _signatures(files) != before:
                        await self.reload()
                if changes:  # only the files we read (watch_filter)
                    if {Path(p) for _, p in changes} == {inventory}:
                        await self.apply_inventory()  # membership only: the config is not read
                    else:
                        await self.reload()
                if self._watched() != files:
                    break  # the config now names other files: watch those

    async def reload(self) -> bool:
        """Reload config and inventory. Returns True when the new configuration is running."""
        async with self._reload_lock:
            # Under systemd: RELOADING=1 now and READY=1 when done, whatever the outcome (the
            # unit is running either way); `systemctl reload` waits for the pair.
            service.reloading()
            ok = False
            try:
                ok = await self._reload()
            except ConfigError as e:
                for problem in e.problems:
                    log.error(
                        "reload failed, keeping the running configuration: %s; fix it, then "
                        "save again or send SIGHUP",
                        problem,
                    )
                error = "; ".join(str(p) for p in e.problems)
            except (OSError, ssl.SSLError, ProviderError, DoproxyError) as e:
                log.error(
                    "reload failed, keeping the running configuration: %s; fix it, then save "
                    "again or send SIGHUP",
                    e,
                )
                error = str(e)
            except Exception as e:
                # A bug, not a bad file: still no READY=1 left unsent (systemd would hold the
                # unit in "reloading"), and no dead config watcher.
                log.exception("reload failed, keeping the running configuration")
                error = f"unexpected {type(e).__name__}: {e} (a bug: please report it)"
            else:
                self.last_reload_error = None
                self.events.publish("reload", f"reloaded (generation {self.reloads})", result="ok")
                service.notify(f"READY=1\nSTATUS={self.status()}")
                return ok
            self.last_reload_error = error
            self.events.publish(
                "reload",
                f"reload failed, the running configuration stays: {error}",
                "error",
                result="failed",
            )
            service.notify(f"READY=1\nSTATUS={self.status()}; the last reload failed (see the log)")
            return False

    def status(self) -> str:
        """One line for the service manager (`systemctl status` shows it)."""
        if self.server is None:
            return "starting"
        where = ", ".join(f"{host}:{port}" for host, port in self.server.addresses)
        return f"serving on {where}"

    async def _reload(self) -> bool:
        config_file = self.config_file
        assert config_file is not None
        # In a cluster the inventory is etcd's (applied by the watch), not the local copy.
        entries = self.entries if self.cluster is not None else None
        cluster = self.settings.cluster

        def load() -> Snapshot | None:
            settings = load_settings(config_file)
            if settings.cluster != cluster:
                return None  # refused below, before the rest is read
            return load_snapshot(settings, self.base, entries)

        # The whole new configuration, read and validated before anything is applied, in a
        # thread: reading files and parsing an inventory of thousands of entries must not
        # hold up the event loop, which serves requests meanwhile. Nothing in it changes
        # what runs; the loop applies its result, or nothing.
        snap = await asyncio.to_thread(load)
        if snap is None:
            raise ConfigError(
                [
                    Problem(
                        str(self.config_file),
                        "cluster",
                        "[cluster] changes take effect on a restart, not a reload; the running "
                        "configuration stays",
                    )
                ]
            )
        # The access log: opened now when it changes (an unwritable file fails the reload and
        # the running one carries on), kept open when it does not.
        access = self.access
        if access_log_identity(snap.settings, self.base) != access_log_identity(
            self.settings, self.base
        ):
            access = open_access_log(snap.settings, self.base)
        try:
            return await self._reload_snapshot(snap, access)
        except BaseException:
            if access is not None and access is not self.access:
                access.close()  # not swapped in: nothing was written to it
            raise

    async def _reload_snapshot(self, snap: Snapshot, access: AccessLog | None) -> bool:
        """The rest of a reload: check what is left to check, then apply `snap` and `access`."""
        assert self.server is not None
        server = self.server
        settings, entries = snap.settings, snap.entries
        old = self.settings
        listen_changed = settings.bind != old.bind or settings.https != old.https
        # Every certificate is loaded (and so validated) anew on every reload: a renewed file
        # keeps its name, and one bad file fails the whole reload.
        certificates = snap.certificates
        pool = build_pool(
            settings, entries, reuse=server.pool.backends, balancer=server.pool.balancer
        )
        error_pages = snap.error_pages
        # A provider for a scaler that starts now (or whose provider changes): opened before
        # anything is applied, so a missing token fails the reload, not half of it.
        # Same for a provider whose settings, token or user-data changed: it replaces the
        # running one, and a token file that cannot be read fails the reload.
        new_provider: Provider | None = None
        changed_provider: Provider | None = None
        made_of: tuple[object, ...] | None = None
        scaler = self.autoscaler
        # In a cluster only the leader runs a scaler (it starts one when elected).
        if settings.provisioning.enable and (self.cluster is None or self.cluster.leading):
            made_of = snap.provider
            if scaler is None or provider_kind(settings) != scaler.provider.kind:
                new_provider = open_provider(settings, self.base, owner=self.owner or None)
            elif made_of != self._provider_config:
                changed_provider = open_provider(settings, self.base, owner=self.owner or None)
        admin_changed = settings.admin != old.admin
        if admin_changed and settings.admin.enable:
            configured_token(settings.admin, self.base)  # a token-file that cannot be read fails
        # Everything is valid: apply.
        if settings.workers != old.workers:
            log.warning(
                "workers changed from %s to %s: a reload keeps the running %d; it takes effect "
                "on an upgrade (doproxy upgrade, see docs/deploy.md) or a restart",
                old.workers,
                settings.workers,
                self.worker_total,
            )
        if listen_changed:
            tls = None if certificates is None else CertificateSelector(certificates)
            try:
                await server.rebind(
                    settings.bind,
                    None if tls is None else tls.context,
                    listeners=self.worker_total,
                    start_serving=self.fleet is None,
                )
            except BaseException:
                for unused in (new_provider, changed_provider):
                    if unused is not None:
                        await unused.close()
                raise
            self.tls = tls
            for host, port in server.addresses:
                log.info("now listening on %s:%d (%s)", host, port, "https" if tls else "http")
        elif certificates is not None and self.tls is not None:
            # Same listener: its SNI callback picks from the new certificates from now on
            # (connections already open keep the certificate they shook hands with).
            self.tls.certificates = certificates
        server.set_settings(settings)
        self._use_waker(settings)
        self._use_access_log(server, access)
        assert self.checker is not None
        self.checker.settings = settings
        added, removed = self._apply_pool(pool)
        server.error_pages = error_pages
        self.settings, self.entries = settings, entries
        self.reloads += 1
        if self.fleet is not None:
            # Every worker switches to the new table (and listeners) before this returns.
            await self.fleet.apply(listeners_changed=listen_changed)
        if scaler is not None and (not settings.provisioning.enable or new_provider is not None):
            self.autoscaler = None
            self._spawn(self._stop_scaler(scaler))
            log.info("autoscaler off")
        if scaler is None or new_provider is not None or not settings.provisioning.enable:
            self.provider = None
        if new_provider is not None:
            self.start_autoscaler(new_provider, made_of)
        if changed_provider is not None and self.provider is not None:
            if self.cluster is not None:
                from doproxy.cluster.node import LeaderOnly

                # The leader's provider keeps its guard through a reconfiguration.
                changed_provider = LeaderOnly(changed_provider, self.cluster)
            await self.provider.swap(changed_provider)
            self._provider_config = made_of
            log.info("autoscaler: %s provider reconfigured", changed_provider.kind)
        if admin_changed:
            await self._restart_admin()
        log.info(
            "reloaded: %d backend(s) (%d new, %d removed), balancing %s",
            len(pool.backends),
            len(added),
            len(removed),
            settings.loadbalancing.type,
        )
        return True

    async def _restart_admin(self) -> None:
        """Apply changed [admin] settings: the old listener closes, a new one opens. If the
        new address cannot be had, the admin listener stays off and says so (the proxy and
        the rest of the reload are not undone for it)."""
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if not self.settings.admin.enable:
            log.info("admin listener off")
            return
        admin = AdminServer(self, self.metrics.exposition)
        try:
            await admin.start()
        except DoproxyError as e:
            log.error("%s; the admin listener is off until a reload fixes it", e)
            return
        self.admin = admin

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        tasks = [*self._tasks, *self._pending]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.upgrade_listener is not None:
            self.upgrade_listener.close()
            self.upgrade_listener = None
        if self.config_file is not None:
            for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_signal_handler(sig)
        if self.waker is not None:
            await self.waker.stop()
        if self.autoscaler is not None:
            await self._stop_scaler(self.autoscaler)
        if self.cluster is not None:
            if not self.handed_over:  # else stopped at the handover
                await self.cluster.stop()
        else:
            await self.store.close()
        self._exit.close()
        if self.checker is not None:
            await self.checker.stop()
        # Handed over: idle keep-alive connections get their next response with Connection:
        # close rather than a close that may race their next request (doproxy.upgrade).
        close_idle = not self.handed_over
        if self.fleet is not None:
            await self.fleet.stop(self.settings.timeouts.shutdown_grace, close_idle=close_idle)
        if self.server is not None:
            await self.server.shutdown(close_idle=close_idle)
            # After the last response: every line is in, flushed and closed.
            self._use_access_log(self.server, None)
