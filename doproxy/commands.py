"""The machine commands: create, list, add, delete, destroy, reboot and sanitize.

They are the 2015 doproxy's commands, made safe: every change to the inventory is atomic and
locked (so a running server's own writes are never lost), a create is recorded before it is
made (doproxy.machines), and destroy and reboot drain the backend through a running server
instead of sleeping. Each returns an exit code; the CLI (doproxy.cli) parses the arguments and
turns our errors into messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from doproxy.config import load_settings, resolve_relative
from doproxy.core.inventory_model import InventoryEntry
from doproxy.errors import DoproxyError, MachineNotFound, ProviderError
from doproxy.health import probe, probe_target
from doproxy.inventory import dump_inventory, load_inventory, update_inventory, write_atomically
from doproxy.machines import (
    OWNER_PREFIX,
    InventoryStore,
    Survey,
    adopt,
    create_machine,
    drain,
    drop_intent,
    find_entry,
    open_provider,
    owner_id_of,
    owner_path,
    provisioner,
    remove_entry,
    set_state,
    survey,
)
from doproxy.provisioning import Machine, Provider, entry_for, new_name
from doproxy.stores import open_store

if TYPE_CHECKING:
    from doproxy.cluster.store import EtcdStore

Confirm = Callable[[str], str]  # shows a question, returns the answer ("" when there is none)


class Context:
    """What every command needs: the settings, the inventory's path, a provider, output."""

    def __init__(
        self,
        config_file: str,
        *,
        environ: Mapping[str, str] | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        confirm: Confirm | None = None,
        provider: Provider | None = None,
    ) -> None:
        self.config_file = config_file
        self.settings = load_settings(config_file, environ)
        self.base = Path(config_file).resolve().parent
        self.inventory = resolve_relative(config_file, self.settings.inventory_file)
        self.store: InventoryStore = open_store(self.settings, self.base)
        self.out = Console(file=out or sys.stdout, highlight=False, soft_wrap=True)
        self.err = Console(file=err or sys.stderr, highlight=False, soft_wrap=True)
        self.confirm = confirm or _ask
        self._environ = environ
        self._provider = provider
        self._owner: str | None = None  # the store's owner tag, once read (prepare)

    async def prepare(self) -> None:
        """Read what the provider needs from the store (its owner tag) before a command."""
        self._owner = await self.store.owner_tag()

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = open_provider(
                self.settings, self.base, self._environ, owner=self._owner
            )
        return self._provider

    @property
    def create_timeout(self) -> float:
        return provisioner(self.settings).boot_timeout

    def say(self, text: str) -> None:
        self.err.print(text)

    async def close(self) -> None:
        if self._provider is not None:
            await self._provider.close()
        await self.store.close()


def _ask(question: str) -> str:
    if not sys.stdin.isatty():
        return ""
    try:
        return input(question)
    except EOFError:
        return ""


class Waiting:
    """A long wait (a machine booting, a drain), shown while it lasts.

    On a terminal: one live line, a spinner, what is awaited and its status, and the elapsed
    time, redrawn in place; when the wait ends the line is replaced by its last state. Anywhere
    else (a log, a pipe, a test) a live line would be a mess of control codes, so: a plain line
    per change of status and every 10 s, which logs and terminals both read well.
    """

    def __init__(self, console: Console, what: str) -> None:
        self.console = console
        self.what = what
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._status = ""
        self._shown_at = -10.0
        self._line = ""

    def __enter__(self) -> Waiting:
        if self.console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.what, total=None)
        return self

    def update(self, status: str, elapsed: float, detail: str = "") -> None:
        """`status` is what changed (a line each time it does); `detail` (e.g. a count of
        requests in flight) is shown with it but is no reason for a line of its own."""
        text = f"{self.what}: {status}{detail}" if status or detail else self.what
        self._line = f"  {text} ({elapsed:.0f}s)"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)
        elif status != self._status or elapsed - self._shown_at >= 10.0:
            self._status, self._shown_at = status, elapsed
            self.console.print(self._line, markup=False, highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            if self._line:
                self.console.print(self._line, markup=False, highlight=False)


def _progress(ctx: Context, waiting: Waiting) -> Callable[[Machine, float], None]:
    """A machine's status while it boots, for wait_active."""

    def show(m: Machine, elapsed: float) -> None:
        waiting.update(m.status, elapsed)

    return show


# --- create, add, delete ------------------------------------------------------------------------


async def create(ctx: Context, name: str | None) -> int:
    settings = ctx.settings
    name = name or new_name(provisioner(settings).name_prefix)
    ctx.say(f"creating {ctx.provider.kind} machine {name} ...")
    with Waiting(ctx.err, f"waiting for {name}") as waiting:
        entry = await create_machine(
            ctx.provider,
            name,
            settings,
            ctx.store,
            ctx.create_timeout,
            _progress(ctx, waiting),
        )
    await ctx.store.nudge()
    ctx.out.print(f"created {entry.name} (id {entry.id}) serving at {entry.server_host}")
    return 0


async def add(ctx: Context, machine_id: str) -> int:
    entries = await ctx.store.load()
    if find_entry(entries, machine_id) is not None:
        raise DoproxyError(f"{machine_id} is already in the inventory ({ctx.store.where})")
    m = await ctx.provider.get(machine_id)
    if not m.private_ip:
        raise DoproxyError(
            f"{m.name} ({m.id}) has no private IPv4 address; doproxy sends traffic over the "
            "private network only (create the droplet with a VPC)"
        )
    if not m.active:
        raise DoproxyError(f"{m.name} ({m.id}) is {m.status!r}, not running; add it once active")
    entry = entry_for(m, ctx.settings, ctx.provider.kind)

    def change(current: list[InventoryEntry]) -> list[InventoryEntry]:
        if find_entry(current, machine_id) is not None:  # added meanwhile: refuse, change nothing
            raise DoproxyError(f"{machine_id} is already in the inventory ({ctx.store.where})")
        return [*current, entry]

    await ctx.store.update(change)
    await ctx.store.nudge()
    ctx.out.print(f"added {m.name} (id {m.id}) at {entry.server_host}")
    return 0


async def delete(ctx: Context, machine_id: str) -> int:
    removed = await remove_entry(ctx.store, machine_id)
    if removed is None:
        raise DoproxyError(f"{machine_id} is not in the inventory ({ctx.store.where})")
    await ctx.store.nudge()
    ctx.out.print(
        f"removed {removed.name or machine_id} from the inventory; the machine keeps running"
    )
    return 0


# --- destroy and reboot ---------------------------------------------------------------------------


async def destroy(ctx: Context, machine_id: str, yes: bool) -> int:
    entry = find_entry(await ctx.store.load(), machine_id)
    label = f"{entry.name} ({machine_id})" if entry and entry.name else machine_id
    if not yes:
        answer = ctx.confirm(f"destroy {label}? This cannot be undone. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            ctx.say("not destroyed (answer y, or pass --yes)")
            return 1
    # The scaler's order: drain, destroy, forget. The entry is marked `retiring` first, so a
    # running server counts it as present meanwhile, and when this command dies half-way the
    # server's next reconcile finishes the destroy (for a machine this installation owns).
    if entry is not None:
        outcome = await drain_shown(ctx, machine_id, label, retiring=True)
        ctx.say(f"  drain: {outcome}")
    try:
        await ctx.provider.destroy(machine_id)
    except ProviderError:
        if entry is not None:
            ctx.say(f"  {label} stays in the inventory, disabled; run this again to finish")
        raise
    if entry is not None:
        await remove_entry(ctx.store, machine_id)
        await ctx.store.nudge()
    ctx.out.print(f"destroyed {label}")
    return 0


async def reboot(ctx: Context, machine_id: str, within: float | None = None) -> int:
    entry = find_entry(await ctx.store.load(), machine_id)
    if entry is None:
        raise DoproxyError(f"{machine_id} is not in the inventory ({ctx.store.where})")
    label = f"{entry.name} ({machine_id})" if entry.name else machine_id
    outcome = await drain_shown(ctx, machine_id, label)
    ctx.say(f"  drain: {outcome}")
    ctx.say(f"rebooting {label} ...")
    try:
        await ctx.provider.reboot(machine_id)
        await _wait_healthy(ctx, entry, within or ctx.create_timeout)
    except (ProviderError, TimeoutError) as e:
        ctx.say(f"  {label} stays disabled in the inventory: {e or 'not healthy in time'}")
        raise
    await set_state(ctx.store, machine_id, "active")
    await ctx.store.nudge()
    ctx.out.print(f"rebooted {label}; it takes traffic again")
    return 0


async def drain_shown(
    ctx: Context, machine_id: str, label: str, retiring: bool | None = None
) -> str:
    """Drain through the inventory (doproxy.machines.drain), the wait for a running server to
    finish it shown as it lasts."""
    with Waiting(ctx.err, f"draining {label}") as waiting:

        def show(elapsed: float) -> None:
            waiting.update("waiting for the server to finish it", elapsed)

        return await drain(ctx.store, machine_id, ctx.settings, retiring=retiring, progress=show)


async def _wait_healthy(ctx: Context, entry: InventoryEntry, within: float) -> None:
    target = probe_target(entry, ctx.settings)
    if target is None:
        raise ProviderError(f"health-url {entry.health_url!r} of {entry.name} names no host")
    url = f"{'https' if target.https else 'http'}://{target.host_header}{target.path}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    each = max(ctx.settings.health.timeout or ctx.settings.backend.health_check_timeout, 1.0)
    while True:
        problem = await probe(target, each, ctx.settings.health.expect_status, "")
        if not problem:
            return
        if loop.time() >= deadline:
            raise ProviderError(f"{url} is not healthy after {within:.0f}s: {problem}")
        await asyncio.sleep(0.2)


# --- list and sanitize -------------------------------------------------------------------------


async def list_machines(ctx: Context, output: str) -> int:
    machines = sorted(await ctx.provider.list(), key=lambda m: (m.created or _EPOCH, m.name))
    known = {str(e.id) for e in await ctx.store.load()}
    if output == "json":
        rows = [
            {
                "id": m.id,
                "name": m.name,
                "status": m.status,
                "private_ip": m.private_ip,
                "public_ip": m.public_ip,
                "tags": list(m.tags),
                "created": m.created.isoformat() if m.created else None,
                "in_inventory": m.id in known,
            }
            for m in machines
        ]
        ctx.out.file.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if output == "toml":
        entries = [entry_for(m, ctx.settings, ctx.provider.kind) for m in machines if m.private_ip]
        ctx.out.file.write(dump_inventory(entries))
        return 0
    tags = provisioner(ctx.settings).tags
    table = Table(title=f"{ctx.provider.kind} machines tagged {', '.join(tags)}")
    for col in ("id", "name", "status", "private ip", "public ip", "created", "inventory"):
        table.add_column(col)
    for m in machines:
        table.add_row(
            m.id,
            m.name,
            m.status,
            m.private_ip or "-",
            m.public_ip or "-",
            m.created.strftime("%Y-%m-%d %H:%M") if m.created else "-",
            "yes" if m.id in known else "no",
        )
    ctx.out.print(table)
    return 0


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _describe(found: Survey) -> list[str]:
    lines = []
    for e in found.gone:
        lines.append(
            f"gone:     inventory entry {e.name or ''} ({e.id}): its machine no longer exists"
        )
    for e in found.intents_lost:
        lines.append(f"lost:     {e.name}: recorded as provisioning, but no such machine exists")
    for e, m in found.intents_found:
        lines.append(f"creating: {e.name} ({m.id}, {m.status}): its creation was interrupted")
    for e in found.retiring:
        lines.append(f"retiring: {e.name} ({e.id}): its destroy was interrupted")
    for m in found.orphans:
        lines.append(
            f"orphan:   {m.name} ({m.id}, {m.status}, {m.private_ip or 'no private ip'}): "
            "ours, but not in the inventory"
        )
    for e in found.foreign_gone:
        lines.append(
            f"foreign:  inventory entry {e.name or ''} ({e.id}): its machine no longer exists, "
            "but this installation did not create it; kept (`doproxy delete` removes it)"
        )
    for m in found.strangers:
        lines.append(
            f"stranger: {m.name} ({m.id}): has the tags but not our owner tag; another "
            f"installation's, left alone (`doproxy add {m.id}` adopts it)"
        )
    return lines


async def sanitize(ctx: Context, apply: bool, orphans: str | None) -> int:
    """List (and with `apply` fix) every difference between the inventory and the provider.

    `orphans` answers the question asked for each orphan: "adopt", "destroy" or "keep"; None
    means ask (and keep when there is nobody to ask).
    """
    found = await survey(ctx.provider, await ctx.store.load(), await ctx.store.owner_tag())
    for line in _describe(found):
        ctx.out.print(line)
    if found.clean:
        ctx.out.print("inventory and provider agree")
        return 0
    if not apply:
        ctx.out.print("run `doproxy sanitize apply` to fix these")
        return 0
    for e in [*found.gone, *found.intents_lost]:
        if e.id not in (0, ""):
            await remove_entry(ctx.store, str(e.id))
        else:
            await drop_intent(ctx.store, e.name)
        ctx.out.print(f"removed {e.name or e.id} from the inventory")
    for _, m in found.intents_found:
        with Waiting(ctx.err, f"waiting for {m.name}") as waiting:
            entry = await adopt(
                ctx.provider,
                m,
                ctx.settings,
                ctx.store,
                ctx.create_timeout,
                _progress(ctx, waiting),
            )
        ctx.out.print(f"adopted {entry.name} ({entry.id}) at {entry.server_host}")
    for e in found.retiring:
        with contextlib.suppress(MachineNotFound):
            await ctx.provider.destroy(str(e.id))
        await remove_entry(ctx.store, str(e.id))
        ctx.out.print(f"destroyed {e.name} ({e.id}), whose destroy was interrupted")
    for m in found.orphans:
        choice = (
            orphans
            or ctx.confirm(
                f"{m.name} ({m.id}) is tagged but not in the inventory: adopt, destroy or keep? "
            )
            .strip()
            .lower()
            or "keep"
        )
        if choice == "adopt":
            if not (m.private_ip or m.active):
                ctx.out.print(f"kept {m.name}: no private address yet")
                continue
            entry = await adopt(ctx.provider, m, ctx.settings, ctx.store, ctx.create_timeout)
            ctx.out.print(f"adopted {entry.name} ({entry.id}) at {entry.server_host}")
        elif choice == "destroy":
            with contextlib.suppress(MachineNotFound):
                await ctx.provider.destroy(m.id)
            ctx.out.print(f"destroyed {m.name} ({m.id})")
        else:
            ctx.out.print(f"kept {m.name} ({m.id}) out of the inventory")
    await ctx.store.nudge()
    return 0


# --- inventory push and pull (cluster mode) --------------------------------------------------


def _etcd(ctx: Context) -> EtcdStore:
    from doproxy.cluster.store import EtcdStore

    if not isinstance(ctx.store, EtcdStore):
        raise DoproxyError(
            "push and pull move the inventory between its file and etcd: set [cluster] store = "
            '"etcd" (and its endpoints) in the config first (docs/cluster.md)'
        )
    return ctx.store


async def inventory_push(ctx: Context, replace: bool) -> int:
    """The inventory file (and its owner id) into etcd, where every node of the cluster reads
    it. An inventory already in etcd is replaced only with `replace`."""
    store = _etcd(ctx)
    entries = await asyncio.to_thread(load_inventory, ctx.inventory)
    there = await store.load()
    if there and not replace and [e.key for e in there] != [e.key for e in entries]:
        raise DoproxyError(
            f"{store.where} already holds an inventory of {len(there)} backend(s); pass "
            "--replace to overwrite it with the file's, or `doproxy inventory pull` to read it"
        )
    mine = await asyncio.to_thread(owner_id_of, ctx.inventory)
    if mine:
        # The machines this installation made carry its owner tag: the cluster must keep it,
        # or it would call them another installation's.
        await store.adopt_owner(mine)
    await store.replace(entries)
    ctx.out.print(
        f"pushed {len(entries)} backend(s) from {ctx.inventory.name} to {store.where}"
        + (f" (owner {mine})" if mine else "")
    )
    return 0


async def inventory_pull(ctx: Context) -> int:
    """The inventory in etcd (and its owner id) into the inventory file."""
    store = _etcd(ctx)
    entries = await store.load()
    owner = (await store.owner_tag()).removeprefix(OWNER_PREFIX)

    def write() -> None:
        update_inventory(ctx.inventory, lambda _: entries)
        write_atomically(owner_path(ctx.inventory), owner + "\n")

    await asyncio.to_thread(write)
    ctx.out.print(f"pulled {len(entries)} backend(s) from {store.where} into {ctx.inventory.name}")
    return 0


async def run(ctx: Context, command: Awaitable[int], prepare: bool = True) -> int:
    """Run a command and always close the provider's connections."""
    try:
        if prepare:
            await ctx.prepare()
        return await command
    finally:
        await ctx.close()
