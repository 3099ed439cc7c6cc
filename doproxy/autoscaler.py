"""The autoscaler task: observe the pool, ask the pure decision function, act safely.

Theory of operation
-------------------
At start the scaler reconciles the inventory with the provider (doproxy.machines.survey):
entries whose machine is gone and intents whose machine never appeared are dropped, interrupted
creates are adopted, and tagged machines the inventory does not know are adopted or destroyed
as `[provisioning] orphans` says. Then, every `interval`:

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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from doproxy.core.autoscale import (
    Candidate,
    Decision,
    Observation,
    ScalerState,
    decide,
    pick_victims,
)
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Provisioning, Settings
from doproxy.errors import DoproxyError, MachineNotFound, ProvisionTimeout
from doproxy.inventory import load_inventory
from doproxy.machines import (
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
from doproxy.provisioning import Machine, Provider, new_name
from doproxy.proxy.backend import Backend


class Proxy(Protocol):
    """What the scaler needs from the running proxy (doproxy.runtime.Runtime provides it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def backends(self) -> list[Backend]: ...

    @property
    def inventory_path(self) -> Path: ...

    def traffic(self) -> tuple[int, float]:
        """Exchanges so far (finished, or failed by a backend) and the seconds users waited
        for their response heads in all: totals that never go back."""
        ...

    async def reload(self) -> bool: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One decision as the admin API and the status page show it."""

    at: dt.datetime
    action: str
    reason: str
    size_before: int
    size_after: int
    acted: bool  # False in dry-run, or when nothing needed doing


class Autoscaler:
    def __init__(
        self,
        runtime: Proxy,
        provider: Provider,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.runtime = runtime
        self.provider = provider
        self.clock = clock
        self.wall = wall
        self.state = ScalerState()
        self.history: deque[Record] = deque(maxlen=runtime.settings.provisioning.history)
        self.creating: set[asyncio.Task[Any]] = set()
        self.retiring: dict[str, asyncio.Task[Any]] = {}  # machine id -> its retire task
        self.replacing = 0  # of the creates, those that replace a failing backend
        self._last_counts: tuple[int, float] | None = None
        self._last_tick: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.reconciled = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")

    async def stop(self) -> None:
        """Stop deciding. Creates and retires in progress are cancelled: each left a record
        in the inventory (an intent, or a draining/disabled entry) that the next start
        reconciles."""
        tasks = [t for t in (self._task, *self.creating, *self.retiring.values()) if t]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.provider.close()

    @property
    def settings(self) -> Provisioning:
        return self.runtime.settings.provisioning

    async def _run(self) -> None:
        ok = await self._try_reconcile()
        self.reconciled.set()
        while True:
            await asyncio.sleep(self.settings.interval)
            # Until the provider answered once, acting would be acting blind (it is most
            # likely unreachable anyway): keep trying to reconcile instead.
            if not ok:
                ok = await self._try_reconcile()
                if not ok:
                    continue
            try:
                await self.tick()
            except DoproxyError as e:
                log.error("autoscaler: %s", e)

    async def _try_reconcile(self) -> bool:
        try:
            await self.reconcile()
        except DoproxyError as e:
            log.error(
                "autoscaler: reconciling with %s failed (will retry; no scaling until then): %s",
                self.provider.kind,
                e,
            )
            return False
        return True

    # --- reconcile ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        rt = self.runtime
        path = rt.inventory_path
        found = await survey(self.provider, await asyncio.to_thread(load_inventory, path))
        dry = self.settings.dry_run
        for e in found.gone:
            log.warning("reconcile: %s (%s) no longer exists%s", e.name, e.id, _dry(dry))
            if not dry:
                await asyncio.to_thread(remove_entry, path, str(e.id))
        for e in found.intents_lost:
            log.info("reconcile: %s was never created; dropping the intent%s", e.name, _dry(dry))
            if not dry:
                await asyncio.to_thread(drop_intent, path, e.name)
        for _e, m in found.intents_found:
            log.info("reconcile: adopting %s (%s), whose creation was interrupted", m.name, m.id)
            if not dry:
                self._spawn_create(functools.partial(self._adopt, m))
        for m in found.orphans:
            policy = self.settings.orphans
            log.warning(
                "reconcile: %s (%s) carries our tags but is not in the inventory: %s%s",
                m.name,
                m.id,
                policy,
                _dry(dry),
            )
            if dry:
                continue
            if policy == "adopt":
                self._spawn_create(functools.partial(self._adopt, m))
            else:
                with contextlib.suppress(MachineNotFound):
                    await self.provider.destroy(m.id)
        if not found.clean and not dry:
            await rt.reload()

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
        return Observation(
            now=now,
            latency=latency,
            requests_per_second=rps,
            serving=len(serving),
            provisioning=len(self.creating),
            draining=len(self.retiring),
            failing=failing,
            replacing=self.replacing,
        )

    async def tick(self) -> Decision:
        now = self.clock()
        obs = self.observe(now)
        decision, self.state = decide(obs, self.settings, self.state)
        dry = self.settings.dry_run
        acting = decision.action != "none" and not dry
        if decision.notable:
            self.history.append(
                Record(
                    at=self.wall(),
                    action=decision.action,
                    reason=decision.reason,
                    size_before=decision.size_before,
                    size_after=decision.size_after,
                    acted=acting,
                )
            )
            level = logging.INFO
            log.log(
                level, "autoscaler: %s%s", decision.reason, _dry(dry and decision.action != "none")
            )
        if acting:
            self._act(decision)
        return decision

    def _act(self, d: Decision) -> None:
        if d.action == "up":
            for _ in range(d.count):
                self._spawn_create(self._create)
        elif d.action == "down":
            for key in pick_victims(self._candidates(), d.count):
                self._spawn_retire(key)
        elif d.action == "replace":
            for key in d.replace:
                self.replacing += 1  # counted now, not when the task first runs
                self._spawn_create(functools.partial(self._replace, key))

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

    def _spawn_create(self, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        task = asyncio.get_running_loop().create_task(work())
        self.creating.add(task)
        task.add_done_callback(self._done(self.creating.discard, "create"))

    def _spawn_retire(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(key))
        self.retiring[key] = task
        task.add_done_callback(self._done(lambda t: self.retiring.pop(key, None), "retire"))

    @staticmethod
    def _done(forget: Callable[[asyncio.Task[Any]], object], what: str) -> Callable[[Any], None]:
        def done(task: asyncio.Task[Any]) -> None:
            forget(task)
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                log.error("autoscaler: %s failed: %s", what, exc)

        return done

    def _timeout(self) -> float:
        return provisioner(self.runtime.settings).boot_timeout

    async def _create(self) -> InventoryEntry:
        rt = self.runtime
        name = new_name(provisioner(rt.settings).name_prefix)
        try:
            entry = await create_machine(
                self.provider, name, rt.settings, rt.inventory_path, self._timeout()
            )
        except ProvisionTimeout:
            await self._give_up(name)
            raise
        log.info("autoscaler: %s (%s) is up at %s", entry.name, entry.id, entry.server_host)
        await rt.reload()
        return entry

    async def _give_up(self, name: str) -> None:
        """A machine that did not come up in time is destroyed and its intent dropped, so it
        neither costs money nor blocks the pool; the next decision may try again."""
        path = self.runtime.inventory_path
        intent = next(
            (
                e
                for e in await asyncio.to_thread(load_inventory, path)
                if e.state == "provisioning" and e.name == name
            ),
            None,
        )
        if intent is not None and intent.id not in (0, ""):
            with contextlib.suppress(MachineNotFound):
                await self.provider.destroy(str(intent.id))
        await asyncio.to_thread(drop_intent, path, name)
        log.error("autoscaler: %s did not come up in time; destroyed it", name)

    async def _adopt(self, machine: Machine) -> None:
        rt = self.runtime
        entry = await adopt(self.provider, machine, rt.settings, rt.inventory_path, self._timeout())
        log.info("autoscaler: adopted %s (%s) at %s", entry.name, entry.id, entry.server_host)
        await rt.reload()

    async def _replace(self, key: str) -> None:
        try:
            await self._create()  # the new one first: the pool never shrinks meanwhile
        finally:
            self.replacing -= 1
        self._spawn_retire(key)

    async def _retire(self, key: str) -> None:
        """Drain, destroy, forget: the victim takes no new requests, in-flight ones finish."""
        rt = self.runtime
        path = rt.inventory_path
        entry = find_entry(await asyncio.to_thread(load_inventory, path), key)
        if entry is None:
            return
        await asyncio.to_thread(set_state, path, key, "draining")
        await rt.reload()  # stops new requests to it now; the runtime finishes the drain
        deadline = self.clock() + self.settings.drain_timeout + 5.0
        while self.clock() < deadline:
            current = find_entry(await asyncio.to_thread(load_inventory, path), key)
            if current is None or current.state != "draining":
                break
            await asyncio.sleep(0.1)
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
        await asyncio.to_thread(remove_entry, path, key)
        log.info("autoscaler: %s (%s) destroyed", entry.name, key)
        await rt.reload()


def _dry(dry: bool) -> str:
    return " (dry-run: not acted on)" if dry else ""
