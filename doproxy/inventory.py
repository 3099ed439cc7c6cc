"""The inventory file (`inventory-file`): reading it, and writing it safely.

Writes are atomic and serialised, so the CLI and a running server never lose each other's
changes: `update_inventory` takes an exclusive advisory lock (flock on a side file, which
survives the rename), reads the current file, applies the change, writes a temp file in the same
folder, fsyncs it, renames it over the inventory and fsyncs the folder. A reader sees the old
file or the new one, never half of one; a crash leaves the old one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomlkit
from pydantic import ValidationError

from doproxy.config import find_line
from doproxy.core.inventory_model import InventoryEntry
from doproxy.errors import ConfigError, Problem

TABLES = ("droplet", "backend")


def parse_inventory(text: str, file: str) -> list[InventoryEntry]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem(file, "", f"TOML syntax: {e}")]) from None
    problems: list[Problem] = []
    entries: list[InventoryEntry] = []
    for key in data:
        if key not in TABLES:
            problems.append(
                Problem(file, key, "unknown table (expected [[droplet]] or [[backend]])")
            )
    for table in TABLES:
        rows = data.get(table, [])
        if not isinstance(rows, list):
            problems.append(Problem(file, table, f"must be an array of tables: [[{table}]]"))
            continue
        for i, row in enumerate(rows):
            try:
                entry = InventoryEntry.model_validate(row)
            except ValidationError as e:
                for err in e.errors():
                    path = ".".join(str(p) for p in err["loc"])
                    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                    if not path and "server-host" in msg:  # the entry-level check names its key
                        path, msg = "server-host", msg.removeprefix("Value error, ")
                    problems.append(Problem(file, f"{table}[{i}].{path}", msg))
                continue
            try:
                if entry.server_host or entry.state != "provisioning":
                    entry.address()
            except ValueError as e:
                problems.append(Problem(file, f"{table}[{i}].server-host", str(e)))
                continue
            entries.append(entry)
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.id in (0, ""):
            continue
        k = str(entry.id)
        seen[k] = seen.get(k, 0) + 1
    for k, n in seen.items():
        if n > 1:
            problems.append(
                Problem(
                    file,
                    "id",
                    f"duplicate id {k} ({n} entries)",
                    find_line(text, ("droplet", "id")),
                )
            )
    if problems:
        raise ConfigError(problems)
    return entries


def load_inventory(path: str | Path) -> list[InventoryEntry]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []  # no inventory yet: an empty pool (503 until backends are added)
    except OSError as e:
        raise ConfigError([Problem(str(p), "", f"cannot read inventory: {e.strerror}")]) from None
    return parse_inventory(text, str(p))


# Keys written for every entry, in the 2015 order; new keys only when they differ from defaults.
_GO_KEYS = ("id", "name", "public-ip", "private-ip", "server-host", "health-url", "started-time")


def dump_inventory(entries: list[InventoryEntry]) -> str:
    """The inventory as TOML the 2015 doproxy can read back: [[droplet]] tables."""
    doc = tomlkit.document()
    tables = tomlkit.aot()
    for e in entries:
        data = e.model_dump(by_alias=True)
        t = tomlkit.table()
        for key in _GO_KEYS:
            value = data[key]
            if isinstance(value, dt.datetime):
                value = value.astimezone(dt.UTC)
            t.add(key, value)
        defaults = InventoryEntry(server_host="x:1").model_dump(by_alias=True)
        for key, value in data.items():
            if key not in _GO_KEYS and value != defaults[key]:
                t.add(key, list(value) if isinstance(value, tuple) else value)
        tables.append(t)
    doc.add("droplet", tables)
    return tomlkit.dumps(doc)


@contextlib.contextmanager
def inventory_lock(path: str | Path) -> Iterator[None]:
    """Hold the inventory's exclusive lock (blocking) for the duration of the block."""
    p = Path(path)
    lock_path = p.with_name(p.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_atomically(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: temp file, fsync, rename, fsync of the folder."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_inventory(
    path: str | Path, change: Callable[[list[InventoryEntry]], list[InventoryEntry]]
) -> list[InventoryEntry]:
    """Read, change and write the inventory under its lock. The change sees the latest file.

    The result is validated like a file read from disk (no duplicate ids) before anything is
    written, so a bad change leaves the file as it was.
    """
    with inventory_lock(path):
        entries = change(load_inventory(path))
        text = dump_inventory(entries)
        parse_inventory(text, str(path))  # refuse to write what we could not read back
        write_atomically(path, text)
        return entries
