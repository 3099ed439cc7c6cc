"""The inventory's entries: the 2015 doproxy's `[[droplet]]` tables and plain `[[backend]]` ones."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, model_validator

from doproxy.core.settings import Section

_ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


class InventoryEntry(Section):
    """One backend. `server-host` ("host:port") is where requests go."""

    id: int | str = 0
    name: str = ""
    public_ip: str = ""
    private_ip: str = ""
    # Required, except on an entry in state "provisioning": the intent to create a machine, which
    # is recorded before the provider is asked, so a crash cannot forget it.
    server_host: str = ""
    health_url: str = ""
    started_time: dt.datetime = _ZERO_TIME
    # New in doproxy (Python): all optional, so 2015 files load unchanged.
    weight: int = Field(1, ge=0)
    # active: takes traffic. draining: no new requests, in-flight ones finish; a running server
    # turns it into "disabled" once nothing is in flight. disabled: no traffic. provisioning: a
    # machine is being created (name chosen, maybe no address yet); never takes traffic.
    state: Literal["active", "draining", "disabled", "provisioning"] = "active"
    provider: str = ""  # "digitalocean", "local", or "" for a hand-written entry
    tags: tuple[str, ...] = ()
    pid: int = Field(0, ge=0)  # local provider: the backend's process id
    # Set (with state "draining") before a machine is drained and destroyed, by the scaler or
    # `doproxy destroy`: a reconcile finishes a destroy that a crash or a stop interrupted, and
    # tells such an entry from one disabled for a reboot.
    retiring: bool = False
    # What the machine costs per hour, as its provider reported it when it was created or
    # adopted (a droplet's size.price_hourly). Unset (and then not written) for entries that
    # predate it and for local processes, whose price is the config's cost-per-hour.
    price_hourly: float | None = Field(None, ge=0)
    # A rollout's canary (doproxy.rollout): while set, the backends that carry it together get
    # this percent of the traffic, whatever their number and the balancer. Kept in the
    # inventory, so every worker and every cluster node weighs the canary the same, and a
    # restart in the middle of a rollout does not hand the canary a full share.
    canary_weight: float = Field(0.0, ge=0, lt=100)

    @model_validator(mode="after")
    def _needs_address(self) -> InventoryEntry:
        if not self.server_host and self.state != "provisioning":
            raise ValueError("server-host is required (host:port)")
        return self

    @property
    def key(self) -> str:
        """Identity across reloads: the id when it has one, else the address."""
        if self.id not in (0, ""):
            return str(self.id)
        return self.server_host or f"name:{self.name}"

    def address(self) -> tuple[str, int]:
        host, sep, port = self.server_host.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"server-host {self.server_host!r} must be host:port")
        return host.strip("[]"), int(port)
