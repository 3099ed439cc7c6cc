"""The inventory's entries: the 2015 doproxy's `[[droplet]]` tables and plain `[[backend]]` ones."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from doproxy.core.settings import Section

_ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


class InventoryEntry(Section):
    """One backend. `server-host` ("host:port") is where requests go."""

    id: int | str = 0
    name: str = ""
    public_ip: str = ""
    private_ip: str = ""
    server_host: str = Field(min_length=1)
    health_url: str = ""
    started_time: dt.datetime = _ZERO_TIME
    # New in doproxy (Python): all optional, so 2015 files load unchanged.
    weight: int = Field(1, ge=0)
    state: Literal["active", "draining", "disabled"] = "active"
    provider: str = ""
    tags: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identity across reloads: the id when it has one, else the address."""
        return str(self.id) if self.id not in (0, "") else self.server_host

    def address(self) -> tuple[str, int]:
        host, sep, port = self.server_host.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"server-host {self.server_host!r} must be host:port")
        return host.strip("[]"), int(port)
