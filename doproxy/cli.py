"""Command line: `doproxy [--config FILE] [COMMAND]`. The only module that calls sys.exit."""

from __future__ import annotations

import argparse
import logging
import sys

from doproxy import __version__, simulate
from doproxy.errors import ConfigError, DoproxyError, Problem


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name.

    The top-level parser gets them with their defaults; each command's parser gets them again
    with `SUPPRESS` defaults, so `doproxy --config X check` and `doproxy check --config X` both
    work, and a command's unset option does not overwrite the value given before the command.
    """

    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--version", action="version", version=f"doproxy {__version__}")
    p.add_argument(
        "--config",
        default=default("doproxy.toml"),
        metavar="FILE",
        help="config file (default: doproxy.toml in the current directory)",
    )
    p.add_argument(
        "--log-level",
        default=default("info"),
        choices=["debug", "info", "warning", "error"],
        help="the least severe log messages shown (default: info)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="doproxy",
        description="A load-balancing HTTP reverse proxy. Without a command it serves, "
        "as the 2015 doproxy did. The options below work before or after the command.",
    )
    _global_options(p, defaults=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the proxy (the default)")
    sub.add_parser(
        "upgrade",
        help="run the proxy, taking the listeners and the control plane over from the one "
        "running on this config's inventory, which then drains and exits (docs/deploy.md)",
    )
    d = sub.add_parser(
        "demo", help="run the proxy in front of autoscaling local demo backends (1 to 4)"
    )
    d.add_argument("--bind", default="127.0.0.1:8000", help="where the proxy listens")
    d.add_argument(
        "--load",
        action="store_true",
        help="also drive a bounded load (heavy, then light) so you can watch the pool scale",
    )
    d.add_argument(
        "--rollouts",
        action="store_true",
        help="under a steady load, roll out a slower release (rolled back by itself), then a "
        "good one (completed): docs/rollouts.md",
    )
    d.add_argument("--ports", default="9100-9199", help="ports for the demo backends")
    sub.add_parser("check", help="validate the config and the inventory; contacts nothing")
    _machine_commands(sub)
    _server_commands(sub)
    _inventory_commands(sub)
    simulate.add_parser(sub)
    # Every command, including those other modules define (simulate), takes them after its name.
    for command in sub.choices.values():
        _global_options(command, defaults=False)
        for action in command._actions:  # and the commands of a command (inventory push)
            if isinstance(action, argparse._SubParsersAction):
                for nested in action.choices.values():
                    _global_options(nested, defaults=False)
    return p


def _machine_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The 2015 doproxy's droplet commands. They act on the configured provider: DigitalOcean
    ([do-provisioner]), or local processes when [local-provisioner] is enabled."""
    c = sub.add_parser(
        "create",
        help="create a machine, wait until it is active, add it to the inventory",
        description="Create a droplet (or local process) with our tags, wait until it is active "
        "(showing progress; [do-provisioner] create-timeout), then add it to the inventory. "
        "The intent is recorded first, so an interrupted create is found by `sanitize`.",
    )
    c.add_argument("name", nargs="?", help="its name (default: hostname-prefix + random)")
    ls = sub.add_parser(
        "list",
        help="list the machines we manage (by tag)",
        description="List every machine that carries our tags, and whether the inventory has it.",
    )
    ls.add_argument(
        "--output",
        choices=["table", "json", "toml"],
        default="table",
        help="table (default); json for scripts; toml in the inventory's [[droplet]] format",
    )
    a = sub.add_parser(
        "add",
        help="adopt a running machine into the inventory",
        description="Add a running droplet to the inventory. Refuses one that is already there "
        "and one without a private IPv4 address.",
    )
    a.add_argument("id")
    d = sub.add_parser(
        "delete",
        help="remove a machine from the inventory only; it keeps running",
        description="Remove a backend from the inventory. The machine itself is not touched.",
    )
    d.add_argument("id")
    x = sub.add_parser(
        "destroy",
        help="drain, remove from the inventory, destroy",
        description="Drain the backend (when a server is running: no new requests, in-flight "
        "ones finish), remove it from the inventory, and destroy the machine.",
    )
    x.add_argument("id")
    x.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    r = sub.add_parser(
        "reboot",
        help="drain, reboot, wait until healthy, take traffic again",
        description="Drain the backend, reboot the machine through a droplet action, wait for "
        "the action to complete and the backend to pass its health check, then re-enable it.",
    )
    r.add_argument("id")
    z = sub.add_parser(
        "sanitize",
        help="find (and with `apply` fix) differences between inventory and provider",
        description="List inventory entries whose machine is gone, interrupted creates, and "
        "tagged machines missing from the inventory. `apply` removes the first, completes the "
        "second and asks whether to adopt or destroy each of the last.",
    )
    z.add_argument("apply", nargs="?", choices=["apply"], help="fix what was found")
    z.add_argument(
        "--orphans",
        choices=["adopt", "destroy", "keep"],
        help="what to do with tagged machines missing from the inventory, without asking",
    )


def _inventory_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser(
        "inventory",
        help="move the inventory between its file and etcd (cluster mode)",
        description="push: the inventory file and its owner id into etcd ([cluster] store = "
        '"etcd"), where every node reads it. pull: etcd\'s inventory into the file.',
    )
    isub = i.add_subparsers(dest="direction", required=True)
    push = isub.add_parser("push", help="the inventory file into etcd")
    push.add_argument(
        "--replace", action="store_true", help="overwrite an inventory already in etcd"
    )
    isub.add_parser("pull", help="etcd's inventory into the inventory file")


def _server_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Commands for a running server, through its admin API (found beside the inventory)."""
    s = sub.add_parser(
        "status",
        help="the running server: backends, autoscaler, recent events",
        description="Show the running server's backends (state, health, load, latency), its "
        "autoscaler and its recent events. Exits 1 when no server runs on the inventory.",
    )
    s.add_argument(
        "--output",
        choices=["table", "json"],
        default="table",
        help='table (default); json: one object {"status", "autoscaler", "events"} for scripts',
    )
    e = sub.add_parser(
        "events",
        help="the running server's recent events (--follow: as they happen)",
        description="Print the running server's events (health, ejections, reloads, scaling, "
        "membership), oldest first. With --follow, keep printing new ones until Ctrl-C; when "
        "the server stops, wait for one to start on the same inventory.",
    )
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.add_argument("--since", type=int, default=0, metavar="ID", help="only events after this id")
    e.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text (default); json: one JSON object per line",
    )
    ro = sub.add_parser(
        "rollout",
        help="replace the pool's machines with a new spec, a canary first (docs/rollouts.md)",
        description="Begin a progressive rollout on the running server: one machine of the new "
        "spec (the canary) gets [provisioning] canary-weight percent of the traffic for "
        "canary-time; if its errors and latency are no worse than the old machines', the old "
        "ones are replaced rollout-step at a time, else the new ones are destroyed. With no "
        "option the config's spec is rolled out. `rollout status` shows it, `rollout abort` "
        "rolls it back.",
    )
    ro.add_argument(
        "action",
        nargs="?",
        choices=["status", "abort"],
        help="status: the rollout in progress and the last ones; abort: roll it back",
    )
    ro.add_argument("--image", help="DigitalOcean: the new image (a slug or an image number)")
    ro.add_argument("--size", help="DigitalOcean: the new size slug")
    ro.add_argument(
        "--user-data", metavar="FILE", help="DigitalOcean: a file with the new user data"
    )
    ro.add_argument(
        "--command",
        dest="new_command",  # `command` is the subcommand's
        help="local provider: the new command ({host}, {port}, {name} filled in)",
    )
    ro.add_argument(
        "--wait",
        action="store_true",
        help="follow the rollout to its end; exit 1 when it rolled back",
    )
    ro.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="for status: text (default) or the admin API's JSON",
    )
    for verb, text in (
        ("drain", "stop sending new requests to a backend; wait for in-flight ones to finish"),
        ("enable", "send traffic to a backend again"),
        ("disable", "stop sending requests to a backend at once"),
    ):
        p = sub.add_parser(
            verb,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Through the running server's admin API "
            "when one answers (the pool changes at once, and the inventory with it); through "
            "the inventory when none does.",
        )
        p.add_argument("id", help="the backend's id (or its name, when unique)")


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

    if args.command in (None, "serve", "upgrade"):
        app.serve(args.config, upgrade=args.command == "upgrade")
        return 0
    if args.command == "demo":
        app.demo(args.bind, args.load, args.ports, args.rollouts)
        return 0
    if args.command == "check":
        return _check(args.config)
    if args.command == "simulate":
        return simulate.run(args)
    if args.command in _MACHINE_COMMANDS:
        return _machine(args)
    if args.command in _SERVER_COMMANDS:
        return _server(args)
    if args.command == "inventory":
        return _inventory(args)
    raise AssertionError(args.command)


_MACHINE_COMMANDS = ("create", "list", "add", "delete", "destroy", "reboot", "sanitize")
_SERVER_COMMANDS = ("status", "events", "drain", "enable", "disable", "rollout")


def _server(args: argparse.Namespace) -> int:
    import asyncio
    from collections.abc import Awaitable

    from doproxy import commands as c
    from doproxy import server_commands as s

    async def main() -> int:
        ctx = c.Context(args.config)
        work: Awaitable[int]
        if args.command == "status":
            work = s.status(ctx, args.output)
        elif args.command == "events":
            work = s.events(ctx, args.follow, args.since, args.output)
        elif args.command == "rollout":
            given = {"image": args.image, "size": args.size, "command": args.new_command}
            spec = {k: v for k, v in given.items() if v is not None}
            action = args.action or "start"
            if action != "start" and (spec or args.user_data is not None):
                raise DoproxyError(f"`rollout {action}` takes no spec option")
            if args.user_data is not None:
                from pathlib import Path

                from doproxy.provisioning import read_user_data_file

                spec["user_data"] = read_user_data_file(Path(args.user_data), "--user-data")
            work = s.rollout(ctx, action, spec, args.wait, args.output)
        else:
            work = s.backend_state(ctx, args.command, args.id)
        return await c.run(ctx, work)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        if args.command == "events" and args.follow:
            return 0  # Ctrl-C is how a follow ends: not a failure
        raise


def _machine(args: argparse.Namespace) -> int:
    import asyncio
    from collections.abc import Awaitable

    from doproxy import commands as c

    async def main() -> int:
        ctx = c.Context(args.config)
        work: Awaitable[int]
        if args.command == "create":
            work = c.create(ctx, args.name)
        elif args.command == "list":
            work = c.list_machines(ctx, args.output)
        elif args.command == "add":
            work = c.add(ctx, args.id)
        elif args.command == "delete":
            work = c.delete(ctx, args.id)
        elif args.command == "destroy":
            work = c.destroy(ctx, args.id, args.yes)
        elif args.command == "reboot":
            work = c.reboot(ctx, args.id)
        else:
            work = c.sanitize(ctx, args.apply == "apply", args.orphans)
        return await c.run(ctx, work)

    return asyncio.run(main())


def _inventory(args: argparse.Namespace) -> int:
    import asyncio

    from doproxy import commands as c

    async def main() -> int:
        ctx = c.Context(args.config)
        if args.direction == "push":
            return await c.run(ctx, c.inventory_push(ctx, args.replace), prepare=False)
        return await c.run(ctx, c.inventory_pull(ctx), prepare=False)

    return asyncio.run(main())


def _check(config_file: str) -> int:
    """Validate the config, the inventory and the files they name; report every problem.

    Reads files only: it never contacts a backend or an API.
    """
    import tomllib
    from pathlib import Path

    from doproxy.config import load_settings, resolve_relative
    from doproxy.inventory import load_inventory
    from doproxy.runtime import check_access_log, load_certificates, load_error_pages

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
            load_certificates(settings, base)
        except ConfigError as e:
            problems += e.problems
        try:
            check_access_log(settings, base)
        except ConfigError as e:
            problems += e.problems
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{config_file}: ok; {inventory_file.name}: {len(entries)} backend(s)")
    return 0
