"""The autoscaler's journal: its decisions, its state and the reconcile reports, kept in a
bounded file beside the inventory (`<inventory>.journal`) so they survive a restart.

One JSON object per line, each with `at` (ISO time) and `kind` ("decision", "state",
"reconcile"). Lines are appended; once the file holds twice `limit` lines it is rewritten
atomically (temp file, fsync, rename) with the newest `limit`, so it stays bounded and a crash
leaves the old file or the new one. A line torn by a crash mid-append is skipped when loading.
Only the server writes it (one server per inventory: doproxy.machines.hold_server_lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from doproxy.inventory import write_atomically

log = logging.getLogger(__name__)


def journal_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".journal")


class Journal:
    def __init__(self, path: Path, limit: int = 500) -> None:
        self.path = path
        self.limit = max(1, limit)
        self.records: deque[dict[str, Any]] = deque(maxlen=self.limit)
        self._lines = 0  # lines in the file now
        self._broken = False  # a write failed: said once, then the journal is memory-only

    def load(self) -> list[dict[str, Any]]:
        """Read what an earlier run kept (the newest `limit` records)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning(
                "cannot read the journal %s: %s; the scaling history starts empty (make the "
                "file readable to keep it)",
                self.path,
                e.strerror,
            )
            return []
        lines = text.splitlines()
        self._lines = len(lines)
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self.records.append(record)
        return list(self.records)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._broken:
            return
        try:
            if self._lines + 1 >= 2 * self.limit:
                text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.records)
                write_atomically(self.path, text)
                self._lines = len(self.records)
            else:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
                self._lines += 1
        except OSError as e:
            # The journal is for people looking back; scaling goes on without it.
            self._broken = True
            log.error(
                "cannot write the journal %s (kept in memory only): %s; make the inventory's "
                "folder writable and restart to keep the history",
                self.path,
                e,
            )

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]


# --- the admin API's overrides of the scaler (pause, min/max) ---------------------------------

LIMITS = ("min-backends", "max-backends")


def overrides_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".overrides")


def load_overrides(path: Path) -> dict[str, Any]:
    """The admin API's overrides of an earlier run; a damaged file is reported and ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("ignoring the autoscaler overrides in %s (%s): set them again", path, e)
        return {}
    return parse_overrides(text, str(path))


def parse_overrides(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as e:
        log.warning("ignoring the autoscaler overrides in %s (%s): set them again", where, e)
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {"paused": bool(data.get("paused", False))}
    for key in LIMITS:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
    # A rollout in progress (doproxy.rollout) and the spec the last one completed with: kept
    # with the overrides, so a restart (or a new cluster leader) resumes the one and keeps
    # making machines of the other.
    for key in ("rollout", "spec"):
        value = data.get(key)
        if isinstance(value, dict):
            out[key] = value
    return out


class Overrides(Protocol):
    """Where the admin API's overrides are kept (a file beside the inventory, or etcd)."""

    def load(self) -> dict[str, Any]: ...

    async def keep(self, overrides: dict[str, Any]) -> None:
        """Keep them; called on the event loop (each store knows whether its write blocks)."""
        ...


class OverridesFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        return load_overrides(self.path)

    def save(self, overrides: dict[str, Any]) -> None:
        write_atomically(self.path, json.dumps(overrides, sort_keys=True) + "\n")

    async def keep(self, overrides: dict[str, Any]) -> None:
        # A write and two fsyncs: in a thread, so the loop keeps serving meanwhile.
        await asyncio.to_thread(self.save, overrides)
