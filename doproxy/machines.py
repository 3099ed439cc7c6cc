"""Keeping the inventory and the provider in step: intents, reconciliation, and drains.

Theory of operation
-------------------
Creating a machine is a three-step affair, and a crash can happen between any two steps:

1. record the intent: an inventory entry in state "provisioning" with the chosen name;
2. ask the provider; the machine gets our tags, so `Provider.list()` finds it whatever happens;
3. when the machine is active, the entry gets its id and address and turns "active".

`survey()` compares the inventory with the provider's list and sorts every difference into one
of four kinds; `apply()` fixes them:

- an intent whose machine exists (the crash came after step 2): adopt it, i.e. wait until it is
  active and complete the entry;
- an intent without a machine (the crash came before step 2, or the create failed): drop it;
- an entry whose machine is gone (destroyed elsewhere): drop it;
- a tagged machine that no entry knows (created by hand, or an older crash): an orphan, adopted
  or destroyed as the caller decides (`doproxy sanitize apply` asks; the server follows
  `[provisioning] orphans`).

Ownership: every installation (one inventory) has an owner id, made once and kept beside the
inventory in `<inventory>.owner`. Every machine it creates carries `doproxy-owner-<id>` besides
the configured tags, and so does its inventory entry. The configured tags may be shared with
other installations; the owner tag is not. So survey() calls a machine an orphan (to adopt or
destroy) only when it carries our owner tag, and forgets an entry whose machine is gone only
when the entry carries it too: a hand-written entry, or a machine of another installation, is
reported, never removed or destroyed automatically.

So after a `kill -9` at any point no machine is leaked (every machine we made is tagged and ends
up in the inventory or destroyed) and none is forgotten (every entry refers to a live machine).

Draining goes through the inventory too, so the CLI and a running server agree on it: whoever
wants a backend drained sets its state to "draining"; the server stops sending it new requests
at once (it reloads the inventory), and sets the state to "disabled" when nothing is in flight
any more or the drain timeout passed. The CLI knows a server is running because the server holds
an exclusive lock on `<inventory>.server` for its whole life (a second server on the same
inventory is refused at start); the file also holds its pid, so the CLI can send SIGHUP when the
server does not watch its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from doproxy.config import resolve_in
from doproxy.core.cost import PoolCost, pool_cost
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.errors import (
    ConfigError,
    DoproxyError,
    MachineNotFound,
    Problem,
    ProviderError,
    ProviderRefused,
)
from doproxy.inventory import inventory_lock, load_inventory, update_inventory, write_atomically
from doproxy.journal import Journal, Overrides, OverridesFile, journal_path, overrides_path
from doproxy.provisioning import Machine, Provider, Spec, entry_for, wait_active

log = logging.getLogger(__name__)


# --- ownership ------------------------------------------------------------------------------

OWNER_PREFIX = "doproxy-owner-"
_OWNER_ID = re.compile(r"[0-9a-z]{4,32}")


def owner_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".owner")


def owner_id_of(inventory: Path) -> str:
    """The owner id kept beside the inventory file ("" when it has none yet)."""
    try:
        text = owner_path(inventory).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    return text if _OWNER_ID.fullmatch(text) else ""


def owner_tag(inventory: Path) -> str:
    """This installation's owner tag, `doproxy-owner-<id>`; the id is made on first need and
    kept in `<inventory>.owner` (written atomically under the inventory's lock, so two
    processes starting at once agree on one id)."""
    p = owner_path(inventory)

    def read() -> str:
        try:
            return p.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    text = read()
    if not text:
        with inventory_lock(inventory):
            text = read()
            if not text:
                text = uuid.uuid4().hex[:12]
                write_atomically(p, text + "\n")
    if not _OWNER_ID.fullmatch(text):
        raise ConfigError(
            [Problem(str(p), "", "must hold only an owner id (4-32 lower-case letters or digits)")]
        )
    return OWNER_PREFIX + text


def owned(e: InventoryEntry, owner: str) -> bool:
    """Did this installation create (or adopt as its own) the entry's machine?"""
    return owner in e.tags


# --- where the inventory lives ---------------------------------------------------------------

Change = Callable[[list[InventoryEntry]], list[InventoryEntry]]


class InventoryStore(Protocol):
    """Where the inventory lives: a file beside the config (FileStore, the default) or etcd
    (cluster mode, doproxy.cluster.store.EtcdStore). Every change is a function of the latest
    entries, applied whole (read, change, validate, write, with no other write in between); a
    change whose result does not validate writes nothing."""

    @property
    def where(self) -> str:
        """The inventory's location, for messages (a path, or etcd's endpoints and prefix)."""
        ...

    async def load(self) -> list[InventoryEntry]: ...

    async def update(self, change: Change) -> list[InventoryEntry]: ...

    async def owner_tag(self) -> str:
        """This installation's owner tag (`doproxy-owner-<id>`), made on first need."""
        ...

    async def server_running(self) -> bool:
        """Does a server run on this inventory (one that finishes drains)?"""
        ...

    async def nudge(self) -> None:
        """Make running servers apply a change now (a no-op where they watch it anyway)."""
        ...

    def journal(self, limit: int) -> Journal:
        """The scaler's journal (doproxy.journal), kept with the inventory."""
        ...

    def overrides(self) -> Overrides:
        """The admin API's overrides of the scaler (pause, min/max), kept with the inventory."""
        ...

    async def close(self) -> None: ...


class FileStore:
    """The inventory file (doproxy.inventory), locked and written atomically. Its blocking
    lock, reads and fsyncs run in a thread, so a server's event loop keeps serving."""

    def __init__(self, path: Path, watched: bool = True) -> None:
        self.path = path
        self.watched = watched  # does a running server watch its files (watch-config)?

    @property
    def where(self) -> str:
        return self.path.name  # messages name the file as the user wrote it in the config

    async def load(self) -> list[InventoryEntry]:
        return await asyncio.to_thread(load_inventory, self.path)

    async def update(self, change: Change) -> list[InventoryEntry]:
        return await asyncio.to_thread(update_inventory, self.path, change)

    async def owner_tag(self) -> str:
        return await asyncio.to_thread(owner_tag, self.path)

    async def server_running(self) -> bool:
        return running_server(self.path) is not None

    async def nudge(self) -> None:
        pid = running_server(self.path)
        if pid and not self.watched:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGHUP)

    def journal(self, limit: int) -> Journal:
        return Journal(journal_path(self.path), limit)

    def overrides(self) -> Overrides:
        return OverridesFile(overrides_path(self.path))

    async def close(self) -> None:
        pass


# --- the provider ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioner:
    """What the configured provisioner's section says, whichever one it is."""

    kind: str  # "local" or "digitalocean": the provider open_provider opens
    tags: tuple[str, ...]
    name_prefix: str  # new machines are called this + 8 random hex digits
    boot_timeout: float  # a new (or rebooted) machine must be up within this
    poll_interval: float  # between status polls while waiting
    size: str = ""  # what new machines are made of: a droplet size slug ("" for local ones)
    # What a new machine costs per hour when the config says it (local: cost-per-hour); None
    # when only the provider can tell (a droplet size's price, learned from its droplets).
    price: float | None = None


def provisioner(settings: Settings) -> Provisioner:
    if settings.local_provisioner.enable:
        lp = settings.local_provisioner
        return Provisioner("local", lp.tags, "local-", lp.boot_timeout, 0.1, "", lp.cost_per_hour)
    do = settings.do_provisioner
    return Provisioner(
        "digitalocean", do.tags, do.hostname_prefix, do.create_timeout, do.poll_interval, do.size
    )


def inventory_cost(settings: Settings, entries: list[InventoryEntry]) -> PoolCost:
    """What the inventory's machines cost per hour, from what the inventory and the config
    say (no provider asked): a running autoscaler knows more (Autoscaler.cost)."""
    p = provisioner(settings)
    return pool_cost(
        (e for e in entries if e.state != "provisioning"),
        lambda e: managed_by(e, p.kind),
        {},
        p.price,
        creating=sum(1 for e in entries if e.state == "provisioning"),
    )


def provider_kind(settings: Settings) -> str:
    """Which provider `open_provider` opens for these settings."""
    return provisioner(settings).kind


def open_provider(
    settings: Settings,
    base: Path,
    environ: Mapping[str, str] | None = None,
    owner: str | None = None,
) -> Provider:
    """The configured provider: local processes when [local-provisioner] is enabled, else
    DigitalOcean (the CLI commands work with a token even when [do-provisioner] enable is
    false, as the 2015 doproxy's did). `owner` is the store's owner tag (read from the
    inventory file's `.owner` when not given)."""
    owner = owner or owner_tag(resolve_in(base, settings.inventory_file))
    if settings.local_provisioner.enable:
        from doproxy.providers.local import LocalProvider

        local: Provider = LocalProvider(settings.local_provisioner, base, owner_tag=owner)
        return local
    from doproxy.providers.digitalocean import DigitalOceanProvider, load_token, read_user_data

    do = settings.do_provisioner
    token = load_token(do, base, os.environ if environ is None else environ)
    remote: Provider = DigitalOceanProvider(
        do, token, user_data=read_user_data(do, base), owner_tag=owner
    )
    return remote


# --- inventory edits ------------------------------------------------------------------------


async def record_intent(
    store: InventoryStore, name: str, provider: str, tags: tuple[str, ...]
) -> None:
    """Step 1: write down that we are about to create `name`, before asking the provider."""
    intent = InventoryEntry(name=name, state="provisioning", provider=provider, tags=tags)

    def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        # Once only, even when a store runs the change again after a write whose outcome it
        # could not know (etcd: a retried transaction that had in fact been applied).
        if any(_is_intent(e, name) for e in entries):
            return entries
        return [*entries, intent]

    await store.update(change)


def _is_intent(e: InventoryEntry, name: str) -> bool:
    return e.state == "provisioning" and e.name == name


async def note_machine_id(store: InventoryStore, name: str, machine_id: str) -> None:
    """Step 2 done: the provider gave the machine an id; keep it with the intent."""

    def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        return [
            e.model_copy(update={"id": machine_id}) if _is_intent(e, name) else e for e in entries
        ]

    await store.update(change)


async def complete_intent(store: InventoryStore, name: str, entry: InventoryEntry) -> None:
    """Step 3: replace the intent with the machine's real entry (added when the intent is gone)."""

    def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        rest = [e for e in entries if not _is_intent(e, name) and e.key != entry.key]
        return [*rest, entry]

    await store.update(change)


async def drop_intent(store: InventoryStore, name: str) -> None:
    await store.update(lambda entries: [e for e in entries if not _is_intent(e, name)])


def find_entry(entries: list[InventoryEntry], machine_id: str) -> InventoryEntry | None:
    for e in entries:
        if str(e.id) == machine_id and e.id not in (0, ""):
            return e
    return None


async def remove_entry(store: InventoryStore, machine_id: str) -> InventoryEntry | None:
    """Remove the entry with this id; returns it (None when there was none)."""
    removed: list[InventoryEntry] = []

    def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        removed.clear()  # a store may run the change again (etcd, after a conflict)
        keep = []
        for e in entries:
            if e.id not in (0, "") and str(e.id) == machine_id:
                removed.append(e)
            else:
                keep.append(e)
        return keep

    await store.update(change)
    return removed[0] if removed else None


async def set_state(
    store: InventoryStore, machine_id: str, state: str, retiring: bool | None = None
) -> bool:
    """Set the state of the entry with this id (and its `retiring` mark, when given); False
    when there is no such entry."""
    found = False
    update: dict[str, object] = {"state": state}
    if retiring is not None:
        update["retiring"] = retiring

    def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
        nonlocal found
        found = False  # a store may run the change again (etcd, after a conflict)
        out = []
        for e in entries:
            if e.id not in (0, "") and str(e.id) == machine_id:
                found = True
                e = e.model_copy(update=update)
            out.append(e)
        return out

    await store.update(change)
    return found


# --- reconciliation -------------------------------------------------------------------------


def managed_by(e: InventoryEntry, kind: str) -> bool:
    """Is this entry's machine one the provider `kind` manages?

    Entries name their provider; a 2015 inventory's [[droplet]] entries do not, and a numeric
    id there is a droplet id, so they belong to DigitalOcean.
    """
    if e.provider:
        return e.provider == kind
    return kind == "digitalocean" and isinstance(e.id, int) and e.id != 0


@dataclass
class Survey:
    intents_found: list[tuple[InventoryEntry, Machine]] = field(default_factory=list)
    intents_lost: list[InventoryEntry] = field(default_factory=list)
    gone: list[InventoryEntry] = field(default_factory=list)
    orphans: list[Machine] = field(default_factory=list)
    # Entries marked `retiring` whose machine (ours) still exists: a destroy was interrupted.
    retiring: list[InventoryEntry] = field(default_factory=list)
    # Reported only, never changed: entries we did not create whose machine is gone, and
    # machines with the shared tags but not our owner tag that the inventory does not list.
    foreign_gone: list[InventoryEntry] = field(default_factory=list)
    strangers: list[Machine] = field(default_factory=list)
    # Every machine the survey saw (listed, or asked for by id), by id: their prices.
    seen: dict[str, Machine] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (
            self.intents_found or self.intents_lost or self.gone or self.orphans or self.retiring
        )


async def survey(provider: Provider, entries: list[InventoryEntry], owner: str) -> Survey:
    """Compare the inventory with the provider's tagged machines. Reads only.

    `owner` is this installation's owner tag (owner_tag): only machines and entries carrying it
    are ours to adopt, destroy or forget.
    """
    machines = await provider.list()
    by_id = {m.id: m for m in machines}
    by_name = {m.name: m for m in machines}
    result = Survey(seen=dict(by_id))
    known: set[str] = set()
    for e in entries:
        if not managed_by(e, provider.kind):
            continue
        if e.state == "provisioning":
            m = by_id.get(str(e.id)) if e.id not in (0, "") else None
            m = m or by_name.get(e.name)
            if m is None:
                result.intents_lost.append(e)
            else:
                known.add(m.id)
                result.intents_found.append((e, m))
            continue
        mid = str(e.id)
        if mid not in by_id:
            # Not tagged (a droplet the 2015 doproxy made, or one adopted by hand): ask directly.
            try:
                result.seen[mid] = await provider.get(mid)
            except MachineNotFound:
                (result.gone if owned(e, owner) else result.foreign_gone).append(e)
                continue
        known.add(mid)
        if e.retiring and owned(e, owner):
            result.retiring.append(e)
    for m in machines:
        if m.id in known:
            continue
        # Only our own owner tag makes a machine ours: the shared tags may be another
        # installation's too (it is adopted only when the inventory lists it, above).
        (result.orphans if owner in m.tags else result.strangers).append(m)
    return result


async def adopt(
    provider: Provider,
    machine: Machine,
    settings: Settings,
    store: InventoryStore,
    within: float,
    progress: Callable[[Machine, float], None] | None = None,
    mark: dict[str, object] | None = None,
) -> InventoryEntry:
    """Wait until the machine is active, then give it its entry (completing any intent), with
    the fields in `mark` set (a rollout's canary-weight)."""
    m = await wait_active(
        provider, machine.id, within, provisioner(settings).poll_interval, progress
    )
    entry = entry_for(m, settings, provider.kind)
    if mark:
        entry = entry.model_copy(update=mark)
    await complete_intent(store, m.name, entry)
    return entry


async def create_machine(
    provider: Provider,
    name: str,
    settings: Settings,
    store: InventoryStore,
    within: float,
    progress: Callable[[Machine, float], None] | None = None,
    spec: Spec | None = None,
    mark: dict[str, object] | None = None,
) -> InventoryEntry:
    """Create a machine crash-safely: intent, create, wait until active, complete the entry.
    `spec` replaces parts of the configured one (a rollout's); its tags go on the intent too.

    When the create fails for sure, the intent is dropped; when the outcome is unknown (the
    provider cannot tell whether the machine exists), the intent stays for the next survey.
    A machine that does not become active in time stays recorded as "provisioning" with its id.
    """
    tags = (*provisioner(settings).tags, await store.owner_tag(), *(spec.tags if spec else ()))
    await record_intent(store, name, provider.kind, tags)
    try:
        machine = await provider.create(name, spec)
    except ProviderRefused:
        # Refused outright (401, 403, 422): nothing was created, so nothing is left to find.
        await drop_intent(store, name)
        raise
    except ProviderError:
        try:
            found = [m for m in await provider.list() if m.name == name]
        except ProviderError:
            log.warning(
                "create of %s failed and its outcome is unknown; kept as provisioning: "
                "reconciliation (or `doproxy sanitize apply`) finds the machine or drops it",
                name,
            )
            raise
        if not found:
            await drop_intent(store, name)
            raise
        machine = found[0]
    await note_machine_id(store, name, machine.id)
    return await adopt(provider, machine, settings, store, within, progress, mark)


# --- the server lock and drains ---------------------------------------------------------------


def server_lock_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".server")


@contextlib.contextmanager
def hold_server_lock(inventory: Path) -> Iterator[None]:
    """Held by a running server: tells the CLI that someone will act on "draining". Exclusive:
    two servers on one inventory would both scale it, so the second one is refused."""
    p = server_lock_path(inventory)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A CLI command probing (running_server) holds it for an instant: look again.
                if attempt < 19:
                    time.sleep(0.01)
        else:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DoproxyError(
                f"another doproxy server (pid {text or 'unknown'}) already runs on the "
                f"inventory {inventory}; stop it first, or give this one its own "
                "inventory-file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def running_server(inventory: Path) -> int | None:
    """The pid of a server running on this inventory, or None."""
    p = server_lock_path(inventory)
    try:
        fd = os.open(p, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            # Shared: CLI commands probing at once do not exclude each other.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def nudge_server(inventory: Path, settings: Settings) -> None:
    """Make a running server reload now when it does not watch its files itself."""
    pid = running_server(inventory)
    if pid and not settings.watch_config:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGHUP)


async def drain(
    store: InventoryStore,
    machine_id: str,
    settings: Settings,
    clock: Callable[[], float] | None = None,
    retiring: bool | None = None,
    progress: Callable[[float], None] | None = None,
) -> str:
    """Drain a backend through the inventory and wait for a running server to finish it.
    `retiring=True` marks the entry as about to be destroyed (see InventoryEntry.retiring);
    `progress(elapsed)` is called while it waits (the CLI's progress line).

    Returns what happened, for the user: "drained", "no server running" or "not in inventory".
    """
    if not await set_state(store, machine_id, "draining", retiring):
        return "not in inventory"
    if not await store.server_running():
        await set_state(store, machine_id, "disabled")
        return "no server running"
    await store.nudge()
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    start = now()
    deadline = start + settings.provisioning.drain_timeout + 10.0
    while now() < deadline:
        e = find_entry(await store.load(), machine_id)
        if e is None or e.state != "draining":
            return "drained"
        if progress is not None:
            progress(now() - start)
        await asyncio.sleep(0.1)
    # The server did not answer (stuck or gone): the drain timeout has passed in any case.
    await set_state(store, machine_id, "disabled")
    return "drain timed out"
