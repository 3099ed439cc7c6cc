"""Reading the inventory file (`inventory-file`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

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
                    problems.append(Problem(file, f"{table}[{i}].{path}", msg))
                continue
            try:
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
