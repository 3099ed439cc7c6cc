"""Loading `doproxy.toml`: Go-template env substitution, TOML parsing, validation.

Every problem is reported at once with its file, line (where it can be found) and dotted key, and
nothing is applied unless the whole file is valid.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from doproxy.core.settings import Settings, parse_bind
from doproxy.errors import ConfigError, Problem

# {{env "NAME"}} or {{ env "NAME" "default" }} - the 2015 doproxy's Go-template form.
_ENV = re.compile(r'\{\{-?\s*env\s+"([^"]*)"(?:\s+"([^"]*)")?\s*-?\}\}')
_TOML_LINE = re.compile(r"\(at line (\d+), column (\d+)\)")


def render_env(text: str, file: str, environ: Mapping[str, str]) -> str:
    """Substitute `{{env "NAME"}}`. An unset variable without a default is an error."""
    problems: list[Problem] = []

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        line = text.count("\n", 0, m.start()) + 1
        problems.append(
            Problem(
                file,
                "",
                f'environment variable {name} is not set (used as {{{{env "{name}"}}}})'
                f" and no default is given",
                line,
            )
        )
        return ""

    out = _ENV.sub(sub, text)
    if problems:
        raise ConfigError(problems)
    return out


def find_line(text: str, dotted: tuple[str | int, ...]) -> int | None:
    """Best-effort line of a dotted key in TOML text: the key inside its [table] header."""
    if not dotted:
        return None
    keys = [k for k in dotted if isinstance(k, str)]
    if not keys:
        return None
    *tables, leaf = keys
    want_table = ".".join(tables)
    current = ""
    lines = text.splitlines()
    for i, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[] ").strip()
            if tables and current == want_table and leaf == tables[-1]:
                return i
            continue
        if current == want_table:
            key = line.split("=", 1)[0].strip().strip('"')
            if "=" in line and key == leaf:
                return i
    # a whole table that is missing or wrong: point at its header
    for i, raw in enumerate(lines, start=1):
        if raw.strip().strip("[] ") == ".".join(keys):
            return i
    return None


def dotted_key(loc: tuple[str | int, ...]) -> str:
    """("tls-certificate", 1, "cert-file") -> "tls-certificate[1].cert-file", as the inventory
    names its [[droplet]] tables."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def parse_settings(text: str, file: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate config text into Settings, or raise ConfigError listing every problem."""
    rendered = render_env(text, file, os.environ if environ is None else environ)
    try:
        data: dict[str, Any] = tomllib.loads(rendered)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_LINE.search(str(e))
        raise ConfigError(
            [Problem(file, "", f"TOML syntax: {e}", int(m.group(1)) if m else None)]
        ) from None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            key = dotted_key(loc)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(Problem(file, key, msg, find_line(rendered, loc)))
        raise ConfigError(problems) from None
    try:
        parse_bind(settings.bind)
    except ValueError as e:
        raise ConfigError([Problem(file, "bind", str(e), find_line(rendered, ("bind",)))]) from None
    return settings


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem(str(p), "", f"cannot read config: {e.strerror}")]) from None
    return parse_settings(text, str(p), environ)


def resolve_in(folder: Path, path: str) -> Path:
    """A path from the config: absolute as written, else inside `folder`."""
    p = Path(path)
    return p if p.is_absolute() else folder / p


def read_secret_file(folder: Path, path: str, key: str) -> str:
    """A secret kept in a file named by the config key `key` (relative to `folder`): its text,
    stripped. A file that cannot be read or is empty is a ConfigError naming the key, never
    the value."""
    file = resolve_in(folder, path)
    try:
        secret = file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError([Problem(str(file), key, f"cannot read it: {e.strerror}")]) from None
    if not secret:
        raise ConfigError([Problem(str(file), key, "the file is empty")])
    return secret


def resolve_relative(settings_file: str | Path, path: str) -> Path:
    """Paths in the config (inventory, TLS files) are relative to the config file's folder."""
    return resolve_in(Path(settings_file).resolve().parent, path)
