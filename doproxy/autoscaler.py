"""The autoscaler task: observe the pool, ask the pure decision function, act safely.

Theory of operation
-------------------
At start, every `reconcile-every` and after any error, the scaler reconciles the inventory with
the provider (doproxy.machines.survey), touching only what this installation owns (its owner
tag): entries whose machine is gone and intents whose machine never appeared are dropped,
interrupted creates are adopted, interrupted destroys (entries marked `retiring`) finished, and
machines with our owner tag that the inventory does not know are adopted or destroyed as
`[provisioning] orphans` says. Entries and machines that are not ours are reported once and left
alone. Until a due reconcile succeeded the scaler does not act. Then, every `interval`:

1. observe: the pool's request-weighted mean latency since the last tick (from the backends'
   plain counters), requests per second, how many backends serve, how many machines are being
   created (our create tasks: they count toward the pool, so a booting machine is never
   provisioned twice), how many are draining, and which backends failed `max-health-failures`
   health checks in a row;
2. decide: doproxy.core.autoscale.decide, a pure function of (observation, policy, state);
3. record every notable decision, acted on or not, in the log and in a bounded history;
4. act (unless `dry-run`): a scale-up starts one create task per machine
   (doproxy.machines.create_machine: intent first, then the provider, then the entry; a
   machine not up within create-timeout/boot-timeout is destroyed and forgotten); a
   scale-down picks victims (unhealthy first, then fewest in flight, then newest) and runs a
   retire task for each: drain through the inventory (no new requests; in-flight ones finish
   up to `drain-timeout`), destroy, then remove the entry; a replacement creates the new
   machine first and retires the failing one once the new one serves.

Decisions are taken one at a time on the event loop and tasks are counted the moment they
start, so `max-backends` holds under every interleaving of ticks, creates and reloads.

The task never ends while the server runs: any exception (a provider answering HTML, a bug) is
logged once per distinct error, kept as `last_error`, and the loop goes on after a growing
pause (interval, 2x, ... up to 10 minutes). Failed creates back off the same way: after one,
no create is started for interval, then 2x, ... up to 10 minutes; a create that succeeds resets
it. Decisions, the scaler's state and reconcile reports go to a bounded journal file beside the
inventory (doproxy.journal), loaded at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from doproxy.core.autoscale import (
    Candidate,
    Decision,
    Observation,
    ScalerState,
    decide,
    pick_victims,
)
from doproxy.core.cost import PoolCost, change, money, pool_cost, price_of
from doproxy.core.histogram import PROVISION_BOUNDS, Histogram
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Provisioning, Settings
from doproxy.errors import DoproxyError, MachineNotFound, ProvisionTimeout
from doproxy.events import EventLog
from doproxy.journal import LIMITS, Journal, load_overrides, overrides_path  # noqa: F401
from doproxy.machines import (
    InventoryStore,
    adopt,
    create_machine,
    drop_intent,
    find_entry,
    managed_by,
    provisioner,
    remove_entry,
    set_state,
    survey,
)
from doproxy.provisioning import Machine, Provider, Spec, new_name
from doproxy.proxy.backend import Backend
from doproxy.rollout import Rollouts


class Proxy(Protocol):
    """What the scaler needs from the running proxy (doproxy.runtime.Runtime provides it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def backends(self) -> list[Backend]: ...

    @property
    def store(self) -> InventoryStore: ...

    @property
    def owner(self) -> str:
        """This installation's owner tag (doproxy.machines.owner_tag), read at start."""
        ...

    def traffic(self) -> tuple[int, float]:
        """Exchanges so far (finished, or failed by a backend) and the seconds users waited
        for their response heads in all: totals that never go back."""
        ...

    async def reload(self) -> bool: ...

    async def apply_inventory(self) -> bool:
        """Apply the inventory file to the running pool (membership only, no config read)."""
        ...

    def takes_traffic(self, key: str) -> bool:
        """Is the backend `key` eligible for new requests right now?"""
        ...

    def wake_state(self) -> tuple[int, float | None, bool]:
        """Scale to zero: (requests waiting for a backend, seconds since the last real
        request or None, whether a wake failed); (0, None, False) when it is off."""
        ...

    def wake_failure_handled(self) -> None:
        """The scaler acted on a failed wake (it retires the backend that did not come up)."""
        ...


log = logging.getLogger(__name__)

BACKOFF_CAP = 600.0  # seconds: the longest pause after repeated errors or failed creates


@dataclass(frozen=True)
class Record:
    """One decision as the admin API and the status page show it."""

    at: dt.datetime
    action: str
    reason: str
    size_before: int
    size_after: int
    acted: bool  # False in dry-run, or when nothing needed doing
    # The pool's cost per hour before and after the decision (None: not known).
    cost_before: float | None = None
    cost_after: float | None = None

    def cost_words(self) -> str:
        """ "+$0.018/h ($0.036/h → $0.054/h)" for a scale-up or down whose costs are known
        and differ ("" for free local backends)."""
        if self.action not in ("up", "down"):
            return ""
        if self.cost_before is None or self.cost_after is None:
            return ""
        before, after = self.cost_before, self.cost_after
        if abs(after - before) < 1e-12:
            return ""
        return f"{change(before, after)} ({money(before)}/h → {money(after)}/h)"


def backoff(interval: float, failures: int) -> float:
    """The pause after `failures` failures in a row: interval, 2x, 4x, ... capped."""
    if failures <= 0:
        return 0.0
    return float(min(interval * 2 ** min(failures - 1, 30), max(BACKOFF_CAP, interval)))


def limits_in(overrides: dict[str, Any]) -> dict[str, Any]:
    """The min/max-backends the overrides set (a None one is the config's again)."""
    return {k: v for k, v in overrides.items() if k in LIMITS and v is not None}


class Autoscaler:
    def __init__(
        self,
        runtime: Proxy,
        provider: Provider,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        events: EventLog | None = None,
        store: InventoryStore | None = None,
    ) -> None:
        self.runtime = runtime
        self.events = events or EventLog()
        self.provider = provider
        self.clock = clock
        self.wall = wall
        self.sleep = sleep
        self.state = ScalerState()
        self.history: deque[Record] = deque(maxlen=runtime.settings.provisioning.history)
        # Who we are: only machines and entries with this tag are ours to adopt/destroy/forget.
        self.owner = runtime.owner
        # The task's health: the last error (None once it works again) and how many in a row.
        self.last_error: str | None = None
        self.errors = 0
        self.errors_total = 0  # every error ever, for the metrics (`errors` resets on success)
        # Seconds from a create's intent to its backend in the pool, for each create that
        # succeeded (replacements included; adoptions of interrupted creates are not timed).
        self.provision_seconds = Histogram(PROVISION_BOUNDS)
        # Failed creates in a row, and no create is started before create_after (clock()).
        self.create_failures = 0
        self.create_after = 0.0
        self.create_error: str | None = None
        self._held_logged = False  # "creates held back" said once per backoff
        self._reconcile_due = True
        self._next_reconcile = 0.0  # clock() of the next periodic reconcile
        self._reported: set[str] = set()  # reconcile reports already logged (once each)
        self._creating_names: set[str] = set()  # intents our own create tasks work on
        self.desired: int | None = None  # the last decision's size_after
        self._last_state: dict[str, Any] | None = None
        # Where it writes: the inventory's store (in a cluster, the leader's guarded view).
        self.store = store or runtime.store
        self.journal: Journal = self.store.journal(2 * runtime.settings.provisioning.history)
        self._restore()
        self.creating: set[asyncio.Task[Any]] = set()
        self.retiring: dict[str, asyncio.Task[Any]] = {}  # machine id -> its retire task
        self.replacing = 0  # of the creates, those that replace a failing backend
        self._last_counts: tuple[int, float] | None = None
        self._last_tick: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.reconciled = asyncio.Event()
        self._poked = asyncio.Event()  # poke(): decide now
        self.last_latency: float | None = None  # the last observation's, for the admin API
        # Prices per hour the provider reported at the last reconcile: by machine id, and by
        # droplet size (a new machine's price, when the config does not say it).
        self.machine_prices: dict[str, float] = {}
        self.size_prices: dict[str, float] = {}
        # Live overrides from the admin API (pause, min/max), kept beside the inventory (or
        # in etcd, for the whole cluster).
        self._kept_overrides = self.store.overrides()
        self._overrides = self._kept_overrides.load()
        # Pause, limits and a rollout's record are one document, kept across an await: each
        # change is made to what the last one left, one at a time (change_overrides).
        self._overrides_turn = asyncio.Lock()
        # (the config's [provisioning], it with the limits): the config object itself, not its
        # id, which a new object may reuse once a reload freed the old one.
        self._limited: tuple[Provisioning, Provisioning] | None = None
        self._bad_overrides: str | None = None
        # Progressive rollouts (doproxy.rollout): made and retired by this scaler's tasks, and
        # while one runs the scaler holds its own decisions, so the pool keeps its size.
        self.rollouts = Rollouts(self)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")
        self.rollouts.run()  # one that a crash or a restart interrupted goes on

    async def stop(self) -> None:
        """Stop deciding. Creates and retires in progress are cancelled: each left a record
        in the inventory (an intent, or a draining/disabled entry) that the next start
        reconciles."""
        await self.rollouts.stop()
        tasks = [t for t in (self._task, *self.creating, *self.retiring.values()) if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.provider.close()

    @property
    def settings(self) -> Provisioning:
        """The config's [provisioning], with the admin API's min/max overrides applied."""
        config = self.runtime.settings.provisioning
        limits = limits_in(self._overrides)
        if not limits:
            return config
        cached = self._limited
        if cached is not None and cached[0] is config:
            return cached[1]
        try:
            limited = with_limits(config, limits)
        except ValueError as e:
            # A reload made the overrides impossible (e.g. max-backends lowered below the
            # override's min): the config wins, and the operator is told once.
            if str(e) != self._bad_overrides:
                self._bad_overrides = str(e)
                log.warning(
                    "autoscaler: the admin API's limits %s no longer fit the config (%s); "
                    "using the config's: set them again (PUT /api/autoscaler)",
                    limits,
                    e,
                )
            limited = config
        self._limited = (config, limited)
        return limited

    @property
    def rolling_out(self) -> bool:
        return self.rollouts.active

    @property
    def paused(self) -> bool:
        return bool(self._overrides.get("paused"))

    @property
    def overrides(self) -> dict[str, Any]:
        """Everything kept with the overrides: pause, limits, a rollout's record and spec."""
        return self._overrides

    def overrides_view(self) -> dict[str, Any]:
        """The admin API's own overrides (pause, limits), for the API."""
        return {
            k: v
            for k, v in self._overrides.items()
            if (k == "paused" or k in LIMITS) and v is not None and v is not False
        }

    async def set_paused(self, paused: bool) -> None:
        """Pause (decide and show, never act) or resume; kept across restarts."""
        await self.change_overrides(lambda o: {**o, "paused": paused})
        log.info("autoscaler %s by the admin API", "paused" if paused else "resumed")
        self.record("state", self.status())

    async def set_limits(self, limits: dict[str, int | None]) -> None:
        """Override min-backends and max-backends (None: the config's again); kept across
        restarts. Raises ValueError, saying why, for limits the policy refuses."""

        def merged(overrides: dict[str, Any]) -> dict[str, Any]:
            out = {**overrides, **limits}
            with_limits(self.runtime.settings.provisioning, limits_in(out))  # raises if invalid
            return out

        await self.change_overrides(merged)
        chosen = limits_in(self._overrides)
        self._limited = None
        self._bad_overrides = None
        log.info("autoscaler limits overridden by the admin API: %s", chosen or "none")

    async def change_overrides(
        self, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """Apply `change` to the overrides, keep the result, then use it; returns it.

        One change at a time, each to what the last one left: the document is kept across an
        await, and two changes made from one old copy lost one of them (a pause made while a
        rollout wrote its phase). On the loop only: what the loop sees changes once the
        result is kept, never half-way through a step (a rollout's phase and its history
        change together), and etcd's store is not touched from a thread.
        """
        async with self._overrides_turn:
            overrides = change(self._overrides)
            await self._kept_overrides.keep(overrides)
            self._overrides = overrides
            return overrides

    async def _run(self) -> None:
        # Nothing may end this loop but cancellation (the server stopping): every error is
        # logged once, kept as last_error, and followed by a growing pause and a reconcile.
        first = True
        while True:
            try:
                if self._reconcile_due or self.clock() >= self._next_reconcile:
                    # Until the provider answered, acting would be acting blind: no tick.
                    await self.reconcile()
                if not first:
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(e)
            else:
                self._recovered()
            if first:
                first = False
                self.reconciled.set()
            self._note_state()
            await self._pause(backoff(self.settings.interval, max(self.errors, 1)))

    def _failed(self, e: Exception) -> None:
        self.errors += 1
        self.errors_total += 1
        self._reconcile_due = True
        if isinstance(e, DoproxyError):
            message = str(e)
        else:
            message = (
                f"unexpected {type(e).__name__} talking to {self.provider.kind}: {e}; check "
                "the provider's settings (for DigitalOcean, do-provisioner api-url and token) "
                "and its status page"
            )
        pause = backoff(self.settings.interval, self.errors)
        if message != self.last_error:
            # Once per distinct error: the same failure every few seconds would flood the log.
            log.error(
                "autoscaler: %s (retrying in %.1fs, then less often; no scaling until it works)",
                message,
                pause,
                exc_info=not isinstance(e, DoproxyError),
            )
        else:
            log.debug("autoscaler: still failing: %s", message)
        self.last_error = message

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.warning("autoscaler: working again after: %s; nothing to do", self.last_error)
        self.last_error = None
        self.errors = 0

    def status(self) -> dict[str, Any]:
        """The scaler's state, for the journal (and the admin API later)."""
        now = self.clock()
        return {
            "mode": self.settings.mode,
            "dry_run": self.settings.dry_run,
            "last_error": self.last_error,
            "create_failures": self.create_failures,
            "create_backoff": round(max(0.0, self.create_after - now), 1),
            "create_error": self.create_error,
            "desired": self.desired,
            "actual": sum(1 for b in self.runtime.backends if b.entry.state == "active")
            + len(self.creating),
        }

    def _note_state(self) -> None:
        state = self.status()
        # create_backoff counts down every tick; journal a change of anything else.
        key = {k: v for k, v in state.items() if k != "create_backoff"}
        if key != self._last_state:
            self._last_state = key
            self.record("state", state)

    def record(self, kind: str, data: dict[str, Any]) -> None:
        self.journal.add({"at": self.wall().isoformat(), "kind": kind, **data})

    def _restore(self) -> None:
        """Decisions from the journal of the last run, so the history survives a restart."""
        for r in self.journal.load():
            if r.get("kind") != "decision":
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self.history.append(
                    Record(
                        at=dt.datetime.fromisoformat(r["at"]),
                        action=str(r["action"]),
                        reason=str(r["reason"]),
                        size_before=int(r["size_before"]),
                        size_after=int(r["size_after"]),
                        acted=bool(r["acted"]),
                        cost_before=_cost(r.get("cost_before")),
                        cost_after=_cost(r.get("cost_after")),
                    )
                )

    def _report(self, key: str, level: int, message: str, *args: object) -> None:
        """A reconcile report: logged, journaled and published once, not every reconcile."""
        if key in self._reported:
            return
        self._reported.add(key)
        log.log(level, message, *args)
        self.record("reconcile", {"report": message % args})
        self.events.publish(
            "reconcile", message % args, "warning" if level >= logging.WARNING else "info"
        )

    # --- reconcile ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        rt = self.runtime
        entries = await self.store.load()
        found = await survey(self.provider, entries, self.owner)
        self._learn_prices(found.seen.values())
        self._reconcile_due = False
        self._next_reconcile = self.clock() + self.settings.reconcile_every
        dry = self.settings.dry_run
        changed = False
        for e in found.gone:
            if str(e.id) in self.retiring:
                continue  # our own retire task forgets it
            self._report(
                f"gone:{e.key}",
                logging.WARNING,
                "reconcile: %s (%s) no longer exists%s",
                e.name,
                e.id,
                _dry(dry),
            )
            if not dry:
                await remove_entry(self.store, str(e.id))
                changed = True
        for e in found.foreign_gone:
            self._report(
                f"foreign:{e.key}",
                logging.WARNING,
                "reconcile: the machine of %s (%s) no longer exists, but this installation did "
                "not create it, so its entry stays; remove it with `doproxy delete %s`",
                e.name or e.server_host,
                e.id,
                e.id,
            )
        for m in found.strangers:
            self._report(
                f"stranger:{m.id}",
                logging.INFO,
                "reconcile: %s (%s) carries our tags but not our owner tag %s: another "
                "installation's, left alone (adopt it with `doproxy add %s`)",
                m.name,
                m.id,
                self.owner,
                m.id,
            )
        for e in found.intents_lost:
            if e.name in self._creating_names:
                continue  # our create is asking the provider right now
            self._report(
                f"lost:{e.name}",
                logging.INFO,
                "reconcile: %s was never created; dropping the intent%s",
                e.name,
                _dry(dry),
            )
            if not dry:
                await drop_intent(self.store, e.name)
                changed = True
        for _e, m in found.intents_found:
            if m.name in self._creating_names:
                continue
            self._report(
                f"adopt:{m.id}",
                logging.INFO,
                "reconcile: adopting %s (%s), whose creation was interrupted",
                m.name,
                m.id,
            )
            if not dry:
                self.spawn_create(functools.partial(self._adopt, m), m.name)
        for e in found.retiring:
            key = str(e.id)
            if key in self.retiring:
                continue
            self._report(
                f"retire:{key}",
                logging.WARNING,
                "reconcile: finishing the interrupted destroy of %s (%s)%s",
                e.name,
                key,
                _dry(dry),
            )
            if not dry:
                self.spawn_retire(key)
        for m in found.orphans:
            if m.name in self._creating_names:
                continue
            policy = self.settings.orphans
            self._report(
                f"orphan:{m.id}",
                logging.WARNING,
                "reconcile: %s (%s) is ours but not in the inventory: %s%s",
                m.name,
                m.id,
                policy,
                _dry(dry),
            )
            if dry:
                continue
            if policy == "adopt":
                self.spawn_create(functools.partial(self._adopt, m), m.name)
            else:
                with contextlib.suppress(MachineNotFound):
                    await self.provider.destroy(m.id)
        if changed:
            await rt.apply_inventory()

    # --- what the pool costs ---------------------------------------------------------------------

    def _learn_prices(self, machines: Iterable[Machine]) -> None:
        """Keep the prices the provider reported: per machine, and per droplet size."""
        prices: dict[str, float] = {}
        for m in machines:
            if m.price_hourly is None:
                continue
            prices[m.id] = m.price_hourly
            size = m.extra.get("size")
            if size:
                self.size_prices[size] = m.price_hourly
        self.machine_prices = prices

    def new_price(self) -> float | None:
        """What one more machine costs per hour: the config's cost-per-hour (local), else the
        configured droplet size's price as last seen on a droplet (None before any)."""
        p = provisioner(self.runtime.settings)
        return p.price if p.price is not None else self.size_prices.get(self._size(None))

    def _size(self, spec: Spec | None) -> str:
        """The size a machine of `spec` is made of (None: the spec new machines get)."""
        spec = spec or self.current_spec()
        return (spec.size if spec else "") or provisioner(self.runtime.settings).size

    def _managed(self, e: InventoryEntry) -> bool:
        return managed_by(e, self.provider.kind)

    def cost(self) -> PoolCost:
        """The pool's cost per hour now: every machine in the pool (draining and disabled ones
        are billed too) and every machine being created (doproxy.core.cost)."""
        return pool_cost(
            (b.entry for b in self.runtime.backends),
            self._managed,
            self.machine_prices,
            self.new_price(),
            creating=len(self.creating),
        )

    def _priced(self, d: Decision, victims: list[str]) -> Decision:
        """A scale-down's cost after, from its victims' own prices (when all are known)."""
        if d.cost_before is None or not victims:
            return d
        by_key = {b.key: b.entry for b in self.runtime.backends}
        new = self.new_price()
        prices = [
            price_of(by_key[k], self._managed, self.machine_prices, new)
            for k in victims
            if k in by_key
        ]
        if len(prices) != len(victims) or any(p is None for p in prices):
            return d
        saved = sum(p for p in prices if p is not None)
        return dataclasses.replace(d, cost_after=max(d.cost_before - saved, 0.0))

    # --- one decision ----------------------------------------------------------------------------

    def observe(self, now: float) -> Observation:
        backends = self.runtime.backends
        # The listener's totals, not a sum over the backends of the moment: a backend leaving
        # the pool must not make the interval read as idle, and failed exchanges count too.
        requests, latency_sum = self.runtime.traffic()
        latency: float | None = None
        rps = 0.0
        if self._last_counts is not None and self._last_tick is not None:
            n = requests - self._last_counts[0]
            total = latency_sum - self._last_counts[1]
            elapsed = max(now - self._last_tick, 1e-9)
            if n > 0:
                latency = total / n
                rps = n / elapsed
        self._last_counts, self._last_tick = (requests, latency_sum), now
        limit = self.settings.max_health_failures
        # Every backend in rotation counts, up or down: a sick one is replaced, not added to.
        serving = [b for b in backends if b.entry.state == "active"]
        failing = tuple(
            b.key
            for b in backends
            if b.entry.state == "active"
            # Failing for max-health-failures seconds (Go checked once a second), whatever
            # the check interval.
            and b.health.failing_for(now) >= limit
            and managed_by(b.entry, self.provider.kind)
            and b.key not in self.retiring
        )
        waiting, quiet_for, wake_failed = self.runtime.wake_state()
        cost = self.cost()
        return Observation(
            now=now,
            latency=latency,
            requests_per_second=rps,
            serving=len(serving),
            provisioning=len(self.creating),
            draining=len(self.retiring),
            failing=failing,
            replacing=self.replacing,
            waiting=waiting,
            quiet_for=quiet_for,
            wake_failed=wake_failed,
            cost=cost.per_hour,
            price=cost.new_machine,
        )

    def _under_manual_action(self) -> int:
        """Our backends out of rotation but not retired by us: a `reboot` drain, a `destroy`
        by hand, a disabled entry. They count as present, so a manual action never makes the
        scaler create a machine (and later destroy one when it comes back)."""
        return sum(
            1
            for b in self.runtime.backends
            if b.entry.state in ("draining", "disabled")
            and managed_by(b.entry, self.provider.kind)
            and b.key not in self.retiring
        )

    async def tick(self) -> Decision:
        now = self.clock()
        obs = self.observe(now)
        manual = self._under_manual_action()
        if manual:
            obs = dataclasses.replace(obs, serving=obs.serving + manual)
        decision, self.state = decide(obs, self.settings, self.state)
        self.desired = decision.size_after
        self.last_latency = obs.latency
        # Paused by the admin API, or a rollout in progress: decide and show, as in dry-run,
        # but never act.
        rolling = self.rollouts.active
        dry = self.settings.dry_run or self.paused or rolling
        acting = decision.action != "none" and not dry
        creates = decision.action in ("up", "replace")
        if acting and creates and now < self.create_after:
            # Backing off after failed creates: hold, and say so once per backoff.
            acting = False
            if not self._held_logged:
                self._held_logged = True
                log.warning(
                    "autoscaler: %s: held back, creates back off after %d failure(s) "
                    "(next try in %.0fs): %s",
                    decision.reason,
                    self.create_failures,
                    self.create_after - now,
                    self.create_error,
                )
            return decision
        victims: list[str] = []
        if decision.action == "down":
            # Chosen now, so the record can say what their going saves.
            victims = pick_victims(self._candidates(), decision.count)
            decision = self._priced(decision, victims)
        if decision.notable:
            record = Record(
                at=self.wall(),
                action=decision.action,
                reason=decision.reason,
                size_before=decision.size_before,
                size_after=decision.size_after,
                acted=acting,
                cost_before=_round_cost(decision.cost_before),
                cost_after=_round_cost(decision.cost_after),
            )
            self.history.append(record)
            self.record(
                "decision",
                {
                    "action": record.action,
                    "reason": record.reason,
                    "size_before": record.size_before,
                    "size_after": record.size_after,
                    "acted": record.acted,
                    "cost_before": record.cost_before,
                    "cost_after": record.cost_after,
                },
            )
            suffix = _dry(dry and decision.action != "none", self.paused, rolling)
            costs = record.cost_words()
            said = decision.reason + (f"; {costs}" if costs else "") + suffix
            # The cost cap binding is the operator's to know: it holds capacity back.
            level = logging.WARNING if decision.kind == "at-max-cost" else logging.INFO
            log.log(level, "autoscaler: %s", said)
            self.events.publish(
                "scaling",
                said,
                "warning" if level == logging.WARNING else "info",
                result=decision.action,
                reason=decision.kind,
                acted=acting,
                size_before=decision.size_before,
                size_after=decision.size_after,
                cost_before=record.cost_before,
                cost_after=record.cost_after,
            )
        if acting:
            self._act(decision, victims)
            if decision.kind == "wake-failed":
                self.runtime.wake_failure_handled()
        return decision

    def poke(self) -> None:
        """Decide now rather than at the next interval (a request waits for a sleeping pool)."""
        self._poked.set()

    async def _pause(self, seconds: float) -> None:
        if self.sleep is not asyncio.sleep:  # a test's own sleep: its time, not ours
            await self.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._poked.wait()
        self._poked.clear()

    def _act(self, d: Decision, victims: list[str]) -> None:
        if d.action == "up":
            for _ in range(d.count):
                name = new_name(provisioner(self.runtime.settings).name_prefix)
                self.spawn_create(functools.partial(self.create, name), name)
        elif d.action == "down":
            for key in victims:
                self.spawn_retire(key)
        elif d.action == "replace":
            for key in d.replace:
                self.replacing += 1  # counted now, not when the task first runs
                name = new_name(provisioner(self.runtime.settings).name_prefix)
                self.spawn_create(functools.partial(self._replace, key, name), name)

    def _candidates(self) -> list[Candidate]:
        out = []
        for b in self.runtime.backends:
            e = b.entry
            if e.state != "active" or not managed_by(e, self.provider.kind):
                continue
            if b.key in self.retiring:
                continue
            out.append(
                Candidate(
                    key=b.key,
                    healthy=b.health.up and not b.ejected_until,
                    in_flight=b.in_flight,
                    started=e.started_time.timestamp(),
                )
            )
        return out

    # --- the tasks that act --------------------------------------------------------------------

    def spawn_create(
        self,
        work: Callable[[], Coroutine[Any, Any, Any]],
        name: str,
        count_failures: bool = True,
    ) -> asyncio.Task[Any]:
        """Start a create task, counted at once. `count_failures`: a failure backs further
        creates off (a rollout's new spec failing says nothing about the configured one)."""
        task = asyncio.get_running_loop().create_task(work())
        self.creating.add(task)
        self._creating_names.add(name)

        def forget(t: asyncio.Task[Any]) -> None:
            self.creating.discard(t)
            self._creating_names.discard(name)

        task.add_done_callback(self._done(forget, "create" if count_failures else "rollout"))
        return task

    def spawn_retire(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(key))
        self.retiring[key] = task
        task.add_done_callback(self._done(lambda t: self.retiring.pop(key, None), "retire"))

    def _done(
        self, forget: Callable[[asyncio.Task[Any]], object], what: str
    ) -> Callable[[Any], None]:
        def done(task: asyncio.Task[Any]) -> None:
            forget(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                if what == "create":
                    self._create_succeeded()
                return
            # Whatever it left (an intent, a retiring entry), the next reconcile finishes.
            self._reconcile_due = True
            if what == "create":
                self._create_failed(exc)
            elif what == "rollout":
                pass  # the rollout says what failed, and rolls back
            else:
                log.error(
                    "autoscaler: %s failed: %s; the next reconcile tries again (look into it "
                    "if this repeats)",
                    what,
                    exc,
                )

        return done

    def _create_failed(self, exc: BaseException) -> None:
        self.create_failures += 1
        pause = backoff(self.settings.interval, self.create_failures)
        self.create_after = self.clock() + pause
        self._held_logged = False
        reason = str(exc) or type(exc).__name__
        if reason != self.create_error:
            log.error(
                "autoscaler: create failed: %s; no create for %.0fs (doubling, up to %.0fs, "
                "while it fails)",
                reason,
                pause,
                BACKOFF_CAP,
            )
        else:
            log.info(
                "autoscaler: create failed again (%d in a row); no create for %.0fs",
                self.create_failures,
                pause,
            )
        self.create_error = reason

    def _create_succeeded(self) -> None:
        if self.create_failures:
            log.warning("autoscaler: a create succeeded; create backoff reset, nothing to do")
        self.create_failures = 0
        self.create_after = 0.0
        self.create_error = None

    def _timeout(self) -> float:
        return provisioner(self.runtime.settings).boot_timeout

    def current_spec(self) -> Spec | None:
        """What new machines are made of where it differs from the config: the spec of the
        last rollout that completed (doproxy.rollout); None: the config's."""
        kept = self._overrides.get("spec")
        return Spec.from_json(kept) if isinstance(kept, dict) else None

    async def create(
        self, name: str, spec: Spec | None = None, mark: dict[str, object] | None = None
    ) -> InventoryEntry:
        rt = self.runtime
        started = self.clock()
        spec = spec or self.current_spec()
        try:
            entry = await create_machine(
                self.provider,
                name,
                rt.settings,
                self.store,
                self._timeout(),
                spec=spec,
                mark=mark,
            )
        except ProvisionTimeout:
            await self._give_up(name)
            raise
        log.info("autoscaler: %s (%s) is up at %s", entry.name, entry.id, entry.server_host)
        if entry.price_hourly is not None:
            # Made with this size: now its price is known, for the cost cap.
            self.size_prices[self._size(spec)] = entry.price_hourly
            self.machine_prices[str(entry.id)] = entry.price_hourly
        await rt.apply_inventory()
        self.provision_seconds.observe(self.clock() - started)
        return entry

    async def _give_up(self, name: str) -> None:
        """A machine that did not come up in time is destroyed and its intent dropped, so it
        neither costs money nor blocks the pool; the next decision may try again."""
        intent = next(
            (e for e in await self.store.load() if e.state == "provisioning" and e.name == name),
            None,
        )
        if intent is not None and intent.id not in (0, ""):
            with contextlib.suppress(MachineNotFound):
                await self.provider.destroy(str(intent.id))
        await drop_intent(self.store, name)
        log.error(
            "autoscaler: %s did not come up in time; destroyed it. Check that new machines boot "
            "and answer their health path, or allow more time ([local-provisioner] "
            "boot-timeout, [do-provisioner] create-timeout)",
            name,
        )

    async def _adopt(self, machine: Machine) -> None:
        rt = self.runtime
        entry = await adopt(self.provider, machine, rt.settings, self.store, self._timeout())
        log.info("autoscaler: adopted %s (%s) at %s", entry.name, entry.id, entry.server_host)
        await rt.apply_inventory()

    async def _replace(self, key: str, name: str) -> None:
        try:
            await self.create(name)  # the new one first: the pool never shrinks meanwhile
        finally:
            self.replacing -= 1
        self.spawn_retire(key)

    async def _retire(self, key: str) -> None:
        """Drain, destroy, forget: the victim takes no new requests, in-flight ones finish."""
        rt = self.runtime
        entry = find_entry(await self.store.load(), key)
        if entry is None:
            return
        if entry.state == "active" or not entry.retiring:
            # Marked before anything happens: a crash from here on leaves a `retiring` entry
            # whose destroy the next reconcile finishes.
            await set_state(self.store, key, "draining", True)
        await rt.apply_inventory()  # stops new requests to it now; the runtime finishes the drain
        deadline = self.clock() + self.settings.drain_timeout + 5.0
        while self.clock() < deadline:
            current = find_entry(await self.store.load(), key)
            if current is None or current.state != "draining":
                break
            await asyncio.sleep(0.1)
        if rt.takes_traffic(key):
            # Never destroy a machine that is eligible for traffic, whatever went wrong before
            # (its drain not applied, an edit of the inventory): the entry stays draining and
            # retiring, and the next reconcile tries again.
            raise DoproxyError(
                f"{entry.name} ({key}) still takes traffic; not destroyed (the next reconcile "
                "retries once it is out of rotation)"
            )
        # Destroy before forgetting: a crash in between leaves an entry whose machine is gone,
        # which the next reconcile drops; the other order could leave an orphan to re-adopt.
        try:
            await self.provider.destroy(key)
        except MachineNotFound:
            pass
        except DoproxyError as e:
            raise DoproxyError(
                f"destroying {entry.name} ({key}) failed: {e}; it stays in the inventory, "
                f"disabled: run `doproxy destroy {key}` once {self.provider.kind} answers"
            ) from e
        await remove_entry(self.store, key)
        log.info("autoscaler: %s (%s) destroyed", entry.name, key)
        await rt.apply_inventory()


def _cost(value: Any) -> float | None:
    """A journaled cost: a number, or None (records of older versions have none)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _round_cost(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _dry(dry: bool, paused: bool = False, rolling: bool = False) -> str:
    if not dry:
        return ""
    if rolling:
        return " (rollout in progress: not acted on)"
    return " (paused: not acted on)" if paused else " (dry-run: not acted on)"


def with_limits(config: Provisioning, limits: dict[str, Any]) -> Provisioning:
    """The config with min/max replaced, validated as a config would be; ValueError says why."""
    data = config.model_dump(by_alias=True)
    data.update(limits)
    try:
        return Provisioning.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(str(first.get("msg", e)).removeprefix("Value error, ")) from None
