"""The commands that talk to a running server: status, events, drain, enable and disable.

They use the server's admin API (doproxy.admin.client finds it from the config's inventory).
`status` and `events` need a running server and say so when there is none. `drain`, `enable`
and `disable` go through the API when a server answers, so the pool changes at once and the
drain is watched as it happens; when none does they change the inventory instead, as `destroy`
and `reboot` do, and say which path they took. Either way the inventory is the record: the API
writes it too.

Each returns an exit code; the CLI (doproxy.cli) parses the arguments and turns our errors into
messages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.table import Table
from rich.text import Text

from doproxy.admin.client import AdminClient, ApiError, Found, NoServer, TokenRefused, locate
from doproxy.commands import Context, Waiting
from doproxy.core.cost import change, money
from doproxy.core.inventory_model import InventoryEntry
from doproxy.errors import DoproxyError
from doproxy.machines import drain, set_state

EVENTS_SHOWN = 10  # in `status`
DECISIONS_SHOWN = 5
DRAIN_MARGIN = 10.0  # seconds beyond the drain timeout before we stop waiting for the server
POLL = 0.2  # seconds between looks at a draining backend
RECONNECT = 2.0  # seconds between attempts to reach a server again (the stream's retry hint)
WIDE = 200  # columns for tables when the output is not a terminal (nothing to fit them to)


def _locate(ctx: Context) -> Found:
    return locate(ctx.settings, ctx.base, ctx.inventory)


# --- status -------------------------------------------------------------------------------------


async def status(ctx: Context, output: str) -> int:
    async with AdminClient(_locate(ctx)) as client:
        st = await client.get("/api/status")
        scaler = await client.get("/api/autoscaler")
        recent = await client.get(f"/api/events?limit={EVENTS_SHOWN}")
    if output == "json":
        doc = {"status": st, "autoscaler": scaler, "events": recent["events"]}
        ctx.out.file.write(json.dumps(doc, indent=2) + "\n")
        return 0
    out = ctx.out
    if not out.is_terminal:
        # Nothing to fit the tables to (a pipe, a file): wide enough that no cell is cut.
        out = Console(file=ctx.out.file, highlight=False, width=WIDE)
    for line in _summary(st):
        out.print(line, markup=False)
    out.print(_backends_table(st["backends"]))
    for renderable in _autoscaler(scaler):
        out.print(renderable)
    out.print(_events_table(recent["events"]))
    return 0


def _summary(st: dict[str, Any]) -> list[str]:
    lst = st["listener"]
    addresses = ", ".join(lst["addresses"]) or "nothing"
    uptime = _duration(st.get("uptime"))
    lines = [
        f"doproxy {st['version']} (pid {st.get('pid', '?')}), up {uptime}; listening on "
        f"{addresses} ({'https' if lst['https'] else 'http'}), balancing "
        f"{lst.get('balancing', '?')}; config generation {st['config_generation']}",
        f"{lst['in_flight']} request(s) in flight, {_num(lst.get('requests_per_second'))} req/s, "
        f"latency avg {_ms(lst['latency']['average'])}, p95 {_ms(lst['latency']['p95'])}",
    ]
    return lines


def _backends_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"backends ({len(rows)})", title_justify="left")
    for col in ("name", "id", "address", "state", "health", "eligible", "weight"):
        table.add_column(col)
    for col in ("in flight", "req/s", "errors", "avg", "p95", "age"):
        table.add_column(col, justify="right")
    table.add_column("owner")
    for b in rows:
        health = b["health"] + (" (ejected)" if b.get("ejected") else "")
        table.add_row(
            *(
                Text(str(v))
                for v in (
                    b["name"] or "-",
                    b["id"],
                    b["address"],
                    b["state"],
                    health,
                    "yes" if b["eligible"] else "no",
                    b["weight"],
                    b["in_flight"],
                    _num(b["requests_per_second"]),
                    _percent(b["error_rate"]),
                    _ms(b["latency"]["average"]),
                    _ms(b["latency"]["p95"]),
                    _duration(b["age"]),
                    b["owner"],
                )
            )
        )
    return table


def _autoscaler(a: dict[str, Any]) -> list[Table | Text]:
    if not a["enabled"]:
        return [Text("autoscaler: off ([provisioning] enable = false)")]
    grid = Table(title="autoscaler", title_justify="left", show_header=False)
    grid.add_column("what")
    grid.add_column("value")
    overrides = a.get("overrides") or {}
    config = a.get("config") or {}

    def limit(key: str) -> str:
        value = str(a.get(key))
        if key in overrides:
            # An override set through the API (kept beside the inventory) beats the config.
            value += f" (override; config {config.get(key)})"
        return value

    state = "paused: decides, does not act" if a["paused"] else "running"
    if a.get("dry_run"):
        state += " (dry run)"
    rows = [
        ("state", state),
        ("mode", str(a.get("mode"))),
        ("backends", f"{limit('min-backends')} .. {limit('max-backends')}"),
        ("desired / actual", f"{_or_dash(a.get('desired'))} / {a.get('actual')}"),
        ("cost", _cost(a.get("cost"))),
        ("latency", _ms((a.get("signal") or {}).get("latency"))),
        ("last error", a.get("last_error") or "-"),
    ]
    if a.get("backoff"):
        rows.append(("create backoff", f"{a['backoff']:.0f}s ({a.get('create_error') or '-'})"))
    for what, value in rows:
        grid.add_row(what, Text(value))
    out: list[Table | Text] = [grid]
    decisions = a["decisions"][-DECISIONS_SHOWN:]
    if decisions:
        table = Table(title="last decisions", title_justify="left")
        for col in ("at", "action", "size", "acted", "reason"):
            table.add_column(col)
        for d in decisions:
            table.add_row(
                Text(_at(d["at"])),
                Text(d["action"]),
                Text(f"{d['size_before']} -> {d['size_after']}{_cost_change(d)}"),
                Text("yes" if d["acted"] else "no"),
                Text(d["reason"]),
            )
        out.append(table)
    return out


def _cost(c: dict[str, Any] | None) -> str:
    """ "$0.027/h (3 machines; 1 without a known price); max $0.05/h"."""
    if not c:
        return "-"
    text = f"{money(c['per_hour'])}/h ({c['machines']} machine(s)"
    text += f"; {c['unpriced']} without a known price)" if c.get("unpriced") else ")"
    if c.get("max-cost-per-hour"):
        text += f"; max-cost-per-hour {money(c['max-cost-per-hour'])}/h"
    return text


def _cost_change(d: dict[str, Any]) -> str:
    """ ", +$0.0089/h" for a scale-up or down whose costs are known."""
    before, after = d.get("cost_before"), d.get("cost_after")
    if d["action"] not in ("up", "down") or before is None or after is None:
        return ""
    if abs(after - before) < 1e-12:
        return ""  # free backends: nothing to say
    return f", {change(before, after)}"


def _events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title="recent events", title_justify="left")
    for col in ("id", "time", "level", "kind", "message"):
        table.add_column(col)
    for e in events:
        table.add_row(
            Text(str(e["id"])),
            Text(_time(e["time"])),
            Text(e["level"]),
            Text(e["kind"]),
            Text(e["message"]),
        )
    return table


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def _or_dash(x: object) -> str:
    return "-" if x is None else str(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _time(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _at(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


# --- events -------------------------------------------------------------------------------------


async def events(ctx: Context, follow: bool, since: int, output: str) -> int:
    def show(e: dict[str, Any]) -> None:
        if output == "json":
            line = json.dumps(e, separators=(",", ":"))
        else:
            line = f"{_time(e['time'])}  {e['level']:<7}  {e['kind']:<10}  {e['message']}"
        # Flushed per event: a pipe (`| grep`) sees each one as it happens.
        ctx.out.file.write(line + "\n")
        ctx.out.file.flush()

    if not follow:
        async with AdminClient(_locate(ctx)) as client:
            found = await client.get(f"/api/events?since={since}")
        for e in found["events"]:
            show(e)
        return 0
    await _follow(ctx, since, show)
    return 0


async def _follow(ctx: Context, since: int, show: Callable[[dict[str, Any]], None]) -> None:
    """Stream events until interrupted. When the stream ends (the server stops or restarts),
    keep trying to reach the server on this inventory again, as `tail -F` does with a file;
    a restarted server numbers its events from 1 again, so then everything it has is new."""
    pid: int | None = None
    connected_once = False
    while True:
        try:
            found = _locate(ctx)
            async with AdminClient(found) as client:
                st = await client.get("/api/status")
                recent = await client.get("/api/events?limit=1")
                restarted = pid is not None and (st.get("pid") != pid or recent["last_id"] < since)
                if restarted:
                    since = 0
                pid = st.get("pid")
                async with client.stream(since) as stream:
                    if connected_once:
                        ctx.say(
                            f"reconnected to {client.url}"
                            + (" (a restarted server: all its events)" if restarted else "")
                        )
                    else:
                        ctx.say(f"following events at {client.url} (Ctrl-C to stop)")
                    connected_once = True
                    async for e in stream:
                        show(e)
                        since = max(since, int(e["id"]))
            ctx.say(
                "the event stream ended (the server stopped or restarted); waiting for a "
                "server on this inventory (Ctrl-C to stop)"
            )
        except (TokenRefused, ApiError):
            raise  # the server answers and says no: asking again changes nothing
        except DoproxyError:
            # No server, a refused connection, a connection cut while it restarts: the
            # first time it means there is nothing to follow; later, one is awaited.
            if not connected_once:
                raise
        await asyncio.sleep(RECONNECT)


# --- drain, enable, disable ---------------------------------------------------------------------


async def backend_state(ctx: Context, verb: str, ident: str) -> int:
    """`verb` is drain, enable or disable; `ident` a backend's id, or its name when unique."""
    try:
        found = _locate(ctx)
    except NoServer as e:
        ctx.say(f"{e}: changing the inventory instead")
        return await _through_inventory(ctx, verb, ident)
    async with AdminClient(found) as client:
        try:
            row = await client.post(f"/api/backends/{quote(ident, safe='')}/{verb}")
        except NoServer as e:
            # Its lock is held but it does not answer (starting, stopping, or its admin
            # listener failed at a reload): the inventory is the way that always works. Only
            # for this first call: once the server took the change, it is the server's.
            ctx.say(f"{e}: changing the inventory instead")
        else:
            return await _through_api(ctx, client, verb, row)
    return await _through_inventory(ctx, verb, ident)


def _label(name: str, ident: object) -> str:
    return f"{name} ({ident})" if name and name != str(ident) else str(ident)


async def _through_api(ctx: Context, client: AdminClient, verb: str, row: dict[str, Any]) -> int:
    label = _label(row["name"], row["id"])
    by = f"the running server (pid {client.found.pid})" if client.found.pid else client.url
    if verb != "drain":
        ctx.out.print(f"{verb}d {label} through {by}; it is now {row['state']}", markup=False)
        return 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    # The server ends a drain by the drain timeout whatever is still in flight; beyond it (and
    # a margin) it is not answering for the drain any more.
    deadline = start + ctx.settings.provisioning.drain_timeout + DRAIN_MARGIN
    with Waiting(ctx.err, f"draining {label}") as waiting:
        while row["state"] == "draining":
            elapsed = loop.time() - start
            if loop.time() > deadline:
                raise DoproxyError(
                    f"{label} is still draining after {elapsed:.0f}s ({row['in_flight']} "
                    "request(s) in flight); the server has not ended the drain"
                )
            waiting.update("", elapsed, f"{row['in_flight']} request(s) in flight")
            await asyncio.sleep(POLL)
            st = await client.get("/api/status")
            now = next((b for b in st["backends"] if b["id"] == row["id"]), None)
            if now is None:
                raise DoproxyError(f"{label} left the pool while draining")
            row = now
        # The line left on a terminal shows how it ended, not the last look before.
        waiting.update("", loop.time() - start, f"{row['in_flight']} request(s) in flight")
    left = row["in_flight"]
    ctx.out.print(
        f"drained {label} through {by}: "
        + (
            f"the drain timeout ended it with {left} request(s) in flight"
            if left
            else "no request in flight"
        )
        + f"; it is now {row['state']}",
        markup=False,
    )
    return 0


async def _entry(ctx: Context, ident: str) -> InventoryEntry:
    """The inventory entry with this id, else the one with this name (as the API finds one)."""
    entries = await ctx.store.load()
    for e in entries:
        if e.id not in (0, "") and str(e.id) == ident:
            return e
    named = [e for e in entries if e.name == ident]
    if len(named) > 1:
        raise DoproxyError(f"{len(named)} backends are named {ident}: use the id")
    if not named:
        raise DoproxyError(f"{ident} is not in the inventory ({ctx.store.where})")
    if named[0].id in (0, ""):
        raise DoproxyError(
            f"{ident} has no id in the inventory; only a running server can change it"
        )
    return named[0]


async def _through_inventory(ctx: Context, verb: str, ident: str) -> int:
    e = await _entry(ctx, ident)
    machine_id = str(e.id)
    label = _label(e.name, machine_id)
    if e.retiring:
        raise DoproxyError(f"{label} is being retired (drained and destroyed)")
    if verb == "drain":
        if e.state != "active":
            raise DoproxyError(f"{label} is {e.state}, not active")
        with Waiting(ctx.err, f"draining {label}") as waiting:

            def show(elapsed: float) -> None:
                waiting.update("waiting for the server to finish it", elapsed)

            outcome = await drain(ctx.store, machine_id, ctx.settings, progress=show)
        said = {
            "no server running": f"no server running: marked {label} disabled in the inventory "
            "(nothing was in flight)",
            "drained": f"drained {label} through the inventory: the server on it finished the "
            "drain; it is now disabled",
            "drain timed out": f"the server did not finish draining {label} in time: marked "
            "disabled in the inventory",
        }
        ctx.out.print(said.get(outcome, f"{label}: {outcome}"), markup=False)
        return 0
    state = "active" if verb == "enable" else "disabled"
    if not await set_state(ctx.store, machine_id, state):
        raise DoproxyError(f"{ident} is not in the inventory ({ctx.store.where})")
    await ctx.store.nudge()
    who = (
        "a running server picks it up from there"
        if await ctx.store.server_running()
        else "no server is running"
    )
    ctx.out.print(f"{verb}d {label} in the inventory ({who}); it is now {state}", markup=False)
    return 0


# --- rollout ------------------------------------------------------------------------------------


ROLLOUT_POLL = 1.0  # seconds between looks at a rollout being waited for


async def rollout(
    ctx: Context,
    action: str,
    spec: dict[str, str],
    wait: bool,
    output: str,
) -> int:
    """`action` is start, status or abort (docs/rollouts.md). Start and abort return at once
    unless `wait`: then they follow the rollout to its end (exit 1 when it rolled back)."""
    async with AdminClient(_locate(ctx)) as client:
        if action == "status":
            view = await client.get("/api/rollouts")
            if output == "json":
                ctx.out.file.write(json.dumps(view, indent=2) + "\n")
            else:
                for line in _rollout_lines(view):
                    ctx.out.print(line, markup=False)
            return 0
        if action == "abort":
            r = await client.post("/api/rollouts/abort")
            ctx.out.print(f"rollout {r['id']}: rolling back ({r['reason']})", markup=False)
        else:
            r = await client.post("/api/rollouts", dict(spec))
            ctx.out.print(f"rollout {r['id']} begun: {r['reason']}", markup=False)
        if not wait:
            ctx.out.print("follow it with `doproxy rollout status`", markup=False)
            return 0
        return await _follow_rollout(ctx, client, str(r["id"]))


async def _follow_rollout(ctx: Context, client: AdminClient, rid: str) -> int:
    said = ""
    while True:
        view = await client.get("/api/rollouts")
        cur = view.get("current")
        if cur is None or cur.get("id") != rid:
            ended = next((h for h in view.get("history", []) if h.get("id") == rid), None)
            if ended is None:
                raise DoproxyError(f"rollout {rid} is no longer known to the server")
            ctx.out.print(f"rollout {rid}: {ended['phase']}: {ended['reason']}", markup=False)
            return 0 if ended["phase"] == "done" else 1
        line = f"rollout {rid}: {cur['phase']}, {cur['old']} old and {cur['new']} new machine(s)"
        if line != said:
            ctx.out.print(line, markup=False)
            said = line
        await asyncio.sleep(ROLLOUT_POLL)


def _rollout_lines(view: dict[str, Any]) -> list[str]:
    if not view.get("enabled"):
        return ["the autoscaler is off ([provisioning] enable = false): no rollouts"]
    lines = []
    spec = view.get("spec") or {}
    lines.append(
        "spec of new machines: "
        + (", ".join(f"{k} {v}" for k, v in spec.items()) or "the config's")
    )
    cur = view.get("current")
    if cur is None:
        lines.append("no rollout in progress")
    else:
        target = "counted at its first step" if cur["target"] is None else cur["target"]
        lines.append(
            f"rollout {cur['id']}: {cur['phase']} ({cur['old']} old, {cur['new']} new, "
            f"target {target}), started {_at(cur['started'])}"
        )
        window = cur.get("window")
        if window:
            lines.append(
                f"  watching the {window['kind']}: {window['left']:.0f}s of "
                f"{window['seconds']:.0f}s left"
            )
        lines.append(f"  {cur['reason']}")
        for v in cur.get("verdicts", []):
            lines.append(f"  {v['window']}: {'passed' if v['passed'] else 'failed'}: {v['reason']}")
    for h in view.get("history", [])[:5]:
        lines.append(f"earlier: {h['id']} {h['phase']} {_at(h['updated'])}: {h['reason']}")
    return lines
