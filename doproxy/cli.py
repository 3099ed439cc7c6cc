"""Command line: `doproxy [--config FILE] [COMMAND]`. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import logging
import sys

from doproxy import __version__
from doproxy.errors import ConfigError, DoproxyError


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
    from doproxy.config import load_settings, resolve_relative
    from doproxy.inventory import load_inventory

    settings = load_settings(config_file)
    inventory_file = resolve_relative(config_file, settings.inventory_file)
    entries = load_inventory(inventory_file)
    print(f"{config_file}: ok; {inventory_file.name}: {len(entries)} backend(s)")
    return 0
