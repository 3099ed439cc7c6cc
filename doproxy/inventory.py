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
import re
import tempfile
import threading
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


# A line that opens one entry, `[[droplet]]` or `[[backend]]` (an optional comment after it).
_HEADER = re.compile(r"^\[\[(droplet|backend)\]\][ \t]*(?:#[^\n]*)?$", re.MULTILINE)
# Any line that opens a table: anything but _HEADER's sends a file down the general path.
_ANY_HEADER = re.compile(r"^[ \t]*\[", re.MULTILINE)
# Each file's entries by the text of their table, from the last time it was read: a reload of
# an inventory that changed in a few entries (or not at all) parses and validates only those.
# Entries are frozen, so the same object may serve every read. At most _CACHED_FILES files.
_blocks: dict[str, dict[str, InventoryEntry]] = {}
_blocks_lock = threading.Lock()  # reloads, the store and the CLI read in threads
_CACHED_FILES = 8


def _parse_by_entry(text: str, file: str) -> list[InventoryEntry] | None:
    """`parse_inventory`'s result for a plain inventory, parsing and validating only the tables
    not seen in this file's last read; None when the file is not plain (then the whole text is
    parsed). Plain: nothing but `[[droplet]]`/`[[backend]]` tables and comments, no
    multi-line strings, every table valid on its own. In a valid TOML document such a header
    line is always a header (not inside a string or an array), so each table's text parses to
    exactly the row the whole file's parse would give; any problem at all falls back to the
    whole parse, which reports it as before."""
    if "'''" in text or '"""' in text:
        return None
    starts = [(m.start(), m.group(1)) for m in _HEADER.finditer(text)]
    if len(starts) != sum(1 for _ in _ANY_HEADER.finditer(text)):
        return None  # sub-tables, other tables, headers written another way
    head = text[: starts[0][0]] if starts else text
    if head.strip() and tomllib.loads(head):  # only comments may come first
        return None
    with _blocks_lock:
        old = _blocks.get(file, {})
    new: dict[str, InventoryEntry] = {}
    by_table: dict[str, list[InventoryEntry]] = {t: [] for t in TABLES}
    ends = [at for at, _ in starts[1:]] + [len(text)]
    for (at, table), end in zip(starts, ends, strict=True):
        block = text[at:end]
        entry = old.get(block)
        if entry is None:
            entry = new.get(block)
        if entry is None:
            data = tomllib.loads(block)
            rows = data.get(table)
            if len(data) != 1 or not isinstance(rows, list) or len(rows) != 1:
                return None
            entry = InventoryEntry.model_validate(rows[0])
            if entry.server_host or entry.state != "provisioning":
                entry.address()
        new[block] = entry
        by_table[table].append(entry)
    with _blocks_lock:
        _blocks.pop(file, None)
        _blocks[file] = new
        while len(_blocks) > _CACHED_FILES:
            del _blocks[next(iter(_blocks))]
    return [e for t in TABLES for e in by_table[t]]


def parse_inventory(text: str, file: str) -> list[InventoryEntry]:
    """The entries of inventory text (`file` names it in problems), or ConfigError listing
    every problem."""
    try:
        fast = _parse_by_entry(text, file)
    except (tomllib.TOMLDecodeError, ValidationError, ValueError):
        fast = None  # the whole parse says what is wrong, as it always has
    if fast is None:
        return _parse_whole(text, file)
    _check_ids(fast, text, file)
    return fast


def _parse_whole(text: str, file: str) -> list[InventoryEntry]:
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
    problems += _duplicate_ids(entries, text, file)
    if problems:
        raise ConfigError(problems)
    return entries


def _duplicate_ids(entries: list[InventoryEntry], text: str, file: str) -> list[Problem]:
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.id in (0, ""):
            continue
        k = str(entry.id)
        seen[k] = seen.get(k, 0) + 1
    return [
        Problem(file, "id", f"duplicate id {k} ({n} entries)", find_line(text, ("droplet", "id")))
        for k, n in seen.items()
        if n > 1
    ]


def _check_ids(entries: list[InventoryEntry], text: str, file: str) -> None:
    if problems := _duplicate_ids(entries, text, file):
        raise ConfigError(problems)


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
