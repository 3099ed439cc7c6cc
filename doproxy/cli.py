"""Command line: `doproxy [--config FILE] [COMMAND]`. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import logging
import sys

from doproxy import __version__
from doproxy.errors import ConfigError, DoproxyError, Problem


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="doproxy",
        description="A load-balancing HTTP reverse proxy. Without a command it serves, "
        "as the 2015 doproxy did.",
    )
    p.add_argument("--version", action="version", version=f"doproxy {__version__}")
    p.add_argument(
        "--config",
        default="doproxy.toml",
        metavar="FILE",
        help="config file (default: doproxy.toml in the current directory)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the proxy (the default)")
    d = sub.add_parser("demo", help="run the proxy in front of two built-in demo backends")
    d.add_argument("--bind", default="127.0.0.1:8000", help="where the proxy listens")
    d.add_argument("--backends", type=int, default=2, help="how many demo backends to start")
    sub.add_parser("check", help="validate the config and the inventory; contacts nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = _run(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        code = 1
    except DoproxyError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    from doproxy import app

    if args.command in (None, "serve"):
        app.serve(args.config)
        return 0
    if args.command == "demo":
        app.demo(args.bind, args.backends)
        return 0
    if args.command == "check":
        return _check(args.config)
    raise AssertionError(args.command)


def _check(config_file: str) -> int:
    """Validate the config, the inventory and the files they name; report every problem.

    Reads files only: it never contacts a backend or an API.
    """
    import tomllib
    from pathlib import Path

    from doproxy.config import load_settings, resolve_relative
    from doproxy.inventory import load_inventory
    from doproxy.runtime import load_error_pages, tls_context

    problems: list[Problem] = []
    settings = None
    try:
        settings = load_settings(config_file)
    except ConfigError as e:
        problems += e.problems
    inventory_name = "inventory.toml"
    if settings is not None:
        inventory_name = settings.inventory_file
    else:  # the config is broken; still check the inventory it most likely names
        try:
            raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
            inventory_name = str(raw.get("inventory-file", inventory_name))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            pass
    inventory_file = resolve_relative(config_file, inventory_name)
    entries = []
    try:
        entries = load_inventory(inventory_file)
    except ConfigError as e:
        problems += e.problems
    if settings is not None:
        base = Path(config_file).resolve().parent
        try:
            load_error_pages(settings, base)
        except ConfigError as e:
            problems += e.problems
        try:
            tls_context(settings, base)
        except (OSError, ValueError) as e:
            problems.append(Problem(config_file, "tls-cert-file", f"cannot load TLS files: {e}"))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{config_file}: ok; {inventory_file.name}: {len(entries)} backend(s)")
    return 0
