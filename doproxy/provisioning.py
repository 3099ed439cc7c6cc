"""What the CLI commands and the autoscaler need from a provider, and the glue they share.

A provider makes and removes machines: DigitalOcean droplets (doproxy.providers.digitalocean)
or local processes (doproxy.providers.local). Both speak the small `Provider` protocol below,
which is defined here, by its consumers. Every machine a provider creates carries our tags, and
`list()` returns exactly those, so a machine whose creation was interrupted (a crash, a kill -9
right after the API call) is still found by the next reconcile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.errors import MachineNotFound, ProviderError, ProviderRefused, ProvisionTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    """A machine as the provider reports it."""

    id: str  # the provider's id: a droplet id ("3164444") or a local one ("local-9101")
    name: str
    status: str  # DigitalOcean's words: "new", "active", "off", "archive"
    private_ip: str = ""  # IPv4; "" while a droplet is still new
    public_ip: str = ""
    tags: tuple[str, ...] = ()
    created: dt.datetime | None = None
    port: int | None = None  # where it serves; None means [backend] new-host-port
    pid: int = 0  # local processes only
    # What it costs per hour (a droplet's size.price_hourly); None when the provider does not
    # say (local processes: their price is the config's cost-per-hour).
    price_hourly: float | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def active(self) -> bool:
        return self.status == "active"


USER_DATA_LIMIT = 64 * 1024  # DigitalOcean's limit on user_data


def read_user_data_file(path: Path, what: str) -> str:
    """The text of a user-data file named by `what` (the config key, or the CLI's option);
    ProviderError says why it cannot be used (unreadable, not UTF-8, over the limit)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ProviderError(f"cannot read {what} {path}: {reason}") from None
    if len(text.encode()) > USER_DATA_LIMIT:
        raise ProviderError(f"{what} {path} is larger than DigitalOcean's limit of 64 KiB")
    return text


@dataclass(frozen=True)
class Spec:
    """What a new machine is made from where it differs from the config: a rollout's new spec
    (doproxy.rollout). An empty field keeps the config's value. `tags` are added to ours (a
    rollout's own tag, which tells its machines from the old ones)."""

    image: str = ""  # DigitalOcean: an image slug or a custom image's number
    size: str = ""  # DigitalOcean: a size slug
    user_data: str = ""  # DigitalOcean: the user data itself (the CLI reads the file)
    command: str = ""  # local provider: the command line, as [local-provisioner] command
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "size": self.size,
            "user_data": self.user_data,
            "command": self.command,
            "tags": list(self.tags),
        }

    @classmethod
    def from_json(cls, data: object) -> Spec:
        if not isinstance(data, dict):
            return cls()
        tags = data.get("tags") or []
        return cls(
            image=str(data.get("image") or ""),
            size=str(data.get("size") or ""),
            user_data=str(data.get("user_data") or ""),
            command=str(data.get("command") or ""),
            tags=tuple(str(t) for t in tags) if isinstance(tags, list) else (),
        )

    def public(self) -> dict[str, object]:
        """For the admin API, the log and the status page: user data may hold secrets (a
        cloud-init with a token), so it is shown as its size and hash, never its text."""
        out: dict[str, object] = {}
        if self.image:
            out["image"] = self.image
        if self.size:
            out["size"] = self.size
        if self.user_data:
            digest = hashlib.sha256(self.user_data.encode()).hexdigest()[:12]
            out["user_data"] = f"{len(self.user_data.encode())} bytes, sha256 {digest}"
        if self.command:
            out["command"] = self.command
        return out

    def words(self) -> str:
        said = ", ".join(f"{k} {v}" for k, v in self.public().items())
        return said or "the config's spec"


class Provider(Protocol):
    """Creates, lists, reboots and destroys the machines we manage (those with our tags)."""

    kind: str  # written into each inventory entry's `provider`: "digitalocean" or "local"

    async def list(self) -> list[Machine]:
        """Every machine that carries our tags, in any status."""
        ...

    async def get(self, machine_id: str) -> Machine:
        """One machine; raises MachineNotFound when it does not exist."""
        ...

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        """Ask for a new machine called `name` with our tags; returns at once (status "new").
        `spec` replaces parts of the configured one (a rollout's new image, size, command).

        Idempotent by name: when the outcome of an earlier attempt is unknown, the provider
        looks for a machine of that name with our tags before creating another.
        """
        ...

    async def destroy(self, machine_id: str) -> None:
        """Remove the machine. A machine that is already gone is not an error."""
        ...

    async def reboot(self, machine_id: str) -> None:
        """Restart the machine; returns when the provider says the restart completed."""
        ...

    async def close(self) -> None:
        """Release connections (HTTP sessions). Machines keep running."""
        ...


def new_name(prefix: str) -> str:
    """A fresh machine name: the hostname prefix and 8 random hex digits."""
    return f"{prefix}{secrets.token_hex(4)}"


def entry_for(machine: Machine, settings: Settings, provider: str) -> InventoryEntry:
    """The inventory entry of a machine: it serves at private-ip:new-host-port, as in the Go
    doproxy, and its health URL is built from new-host-health-path and new-host-health-https."""
    b = settings.backend
    host = machine.private_ip or machine.public_ip
    port = machine.port or b.new_host_port
    scheme = "https" if b.new_host_health_https else "http"
    path = b.new_host_health_path if b.new_host_health_path.startswith("/") else "/"
    return InventoryEntry(
        # Droplet ids are numbers, and the 2015 inventory wrote them as TOML integers.
        id=int(machine.id) if machine.id.isdigit() else machine.id,
        name=machine.name,
        public_ip=machine.public_ip,
        private_ip=machine.private_ip,
        server_host=f"{host}:{port}",
        health_url=f"{scheme}://{host}:{port}{path}",
        started_time=machine.created or dt.datetime.now(dt.UTC),
        provider=provider,
        tags=machine.tags,
        pid=machine.pid,
        price_hourly=machine.price_hourly,
    )


async def wait_active(
    provider: Provider,
    machine_id: str,
    timeout: float,  # noqa: ASYNC109 - polls; the error names the timeout
    interval: float = 1.0,
    progress: Callable[[Machine, float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> Machine:
    """Poll until the machine is active with a private address; ProvisionTimeout after `timeout`.

    `progress(machine, elapsed)` is called after every poll (the CLI draws its spinner from it).
    A poll that fails for a passing reason (a 5xx, a timeout, an odd answer) is tried again
    until `timeout`: the machine exists and is being paid for, so its create must not be
    abandoned (and counted out of the pool) over one bad answer.
    """
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    start = now()
    while True:
        try:
            machine = await provider.get(machine_id)
        except (MachineNotFound, ProviderRefused):
            raise
        except ProviderError as e:
            elapsed = now() - start
            if elapsed >= timeout:
                raise
            log.warning(
                "polling %s machine %s failed (will retry until the timeout; nothing to do "
                "unless it persists): %s",
                provider.kind,
                machine_id,
                e,
            )
            await asyncio.sleep(min(interval, max(0.0, timeout - elapsed)))
            continue
        elapsed = now() - start
        if progress is not None:
            progress(machine, elapsed)
        if machine.active and (machine.private_ip or machine.public_ip):
            return machine
        if elapsed >= timeout:
            raise ProvisionTimeout(
                f"{provider.kind} machine {machine.name} ({machine_id}) is still "
                f"{machine.status!r} after {timeout:.0f}s"
            )
        await asyncio.sleep(min(interval, max(0.0, timeout - elapsed)))
