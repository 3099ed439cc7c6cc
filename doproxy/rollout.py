"""Progressive rollouts: move the pool's machines to a new spec (image, size, user data, or a
local command), a canary first, and roll back on its own when the new machines do worse.

Theory of operation
-------------------
A rollout belongs to the autoscaler (doproxy.autoscaler), which makes and retires its machines
with its own crash-safe tasks (intent, create, entry; drain, destroy, forget) and holds its own
scaling decisions while a rollout runs, so the pool keeps its size. Its state is one small
record kept with the autoscaler's overrides (beside the inventory, or in etcd): id, spec,
`target` (how many machines the pool had), phase and the last verdict. Every phase change is
written there before the next action, and journaled.

The rollout's machines carry its own tag (`doproxy-rollout-<id>`), which is how the machines of
the new spec are told from the old ones, in the inventory and at the provider. Each phase step
is computed from what the inventory holds (doproxy.core.rollout.to_create/to_retire), so a
rollout resumed after a crash, a restart or a leader change goes on from whatever the pool
looks like, never from a counter that a crash could leave wrong:

    canary        make one new machine (marked canary-weight: it gets that percent of the
                  traffic on every node and worker), wait until it serves, watch canary-time;
                  passed: unmark it, retire one old machine, go to steps
    steps         make min(rollout-step, old left) new machines, wait until they serve, watch
                  rollout-step-time, retire as many old ones; no old one left: done
    rolling-back  make old-spec machines until the old ones are `target` again, then retire
                  every new one: rolled-back

A window fails on the new machines' errors or latency against the old ones' over the same time
(doproxy.core.rollout.judge), on a new machine failing its health checks, or on a new machine
that does not come up (a bad image fails here). A failure or `doproxy rollout abort` rolls
back. A rollback never gives up: it tries again after a pause until the old spec serves
`target` machines again.

After a rollout completes, its spec is the one the autoscaler makes machines of (kept in the
overrides as `spec`) until the next rollout; `doproxy rollout` with no option rolls out the
config's spec again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.rollout import (
    ACTIVE_PHASES,
    Phase,
    Thresholds,
    Traffic,
    Verdict,
    judge,
    to_create,
    to_retire,
)
from doproxy.errors import DoproxyError, ProviderError, ProviderRefused, RolloutRefused
from doproxy.machines import managed_by, owned, provisioner
from doproxy.provisioning import Spec, new_name

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Coroutine

    from doproxy.core.settings import Provisioning, Settings
    from doproxy.events import EventLog
    from doproxy.journal import Journal
    from doproxy.machines import InventoryStore
    from doproxy.provisioning import Provider
    from doproxy.proxy.backend import Backend

log = logging.getLogger(__name__)

TAG_PREFIX = "doproxy-rollout-"
# How often a window looks at the new machines' health (a failing one ends it at once).
LOOK_EVERY = 0.25
# A rollback step that failed (a create the provider refused, a destroy that did not answer)
# is tried again after this, doubling up to RETRY_CAP.
RETRY_FIRST = 2.0
RETRY_CAP = 60.0
HISTORY = 20


class Serving(Protocol):
    """What a rollout needs from the running proxy (doproxy.runtime.Runtime)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def backends(self) -> list[Backend]: ...

    def takes_traffic(self, key: str) -> bool: ...

    async def apply_inventory(self) -> bool: ...


class Scaler(Protocol):
    """What a rollout needs from the autoscaler (doproxy.autoscaler.Autoscaler)."""

    @property
    def runtime(self) -> Serving: ...

    provider: Provider
    store: InventoryStore
    owner: str
    events: EventLog
    journal: Journal
    clock: Callable[[], float]
    wall: Callable[[], dt.datetime]
    creating: set[asyncio.Task[Any]]
    retiring: dict[str, asyncio.Task[Any]]
    reconciled: asyncio.Event

    @property
    def settings(self) -> Provisioning: ...

    @property
    def overrides(self) -> dict[str, Any]: ...

    async def change_overrides(
        self, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]: ...

    def record(self, kind: str, data: dict[str, Any]) -> None: ...

    def current_spec(self) -> Spec | None: ...

    def spawn_create(
        self,
        work: Callable[[], Coroutine[Any, Any, Any]],
        name: str,
        count_failures: bool = True,
    ) -> asyncio.Task[Any]: ...

    def spawn_retire(self, key: str) -> None: ...

    async def create(
        self, name: str, spec: Spec | None = None, mark: dict[str, object] | None = None
    ) -> InventoryEntry: ...


class Rollouts:
    """The autoscaler's rollouts: at most one at a time, driven by one task."""

    def __init__(self, scaler: Scaler) -> None:
        self.scaler = scaler
        self.clock = scaler.clock
        self.task: asyncio.Task[None] | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._abort: str | None = None  # why an abort was asked for (the admin API)
        self._wake = asyncio.Event()
        # start() and abort() check, then write: two admin calls at once must not both pass
        # the check (two rollouts), so they take turns.
        self._verbs = asyncio.Lock()
        self.window: dict[str, Any] | None = None  # the window being watched, for the API
        for r in scaler.journal.of_kind("rollout"):
            if r.get("phase") in ("done", "rolled-back"):
                self.history.append({k: v for k, v in r.items() if k != "kind"})

    # --- state --------------------------------------------------------------------------------

    @property
    def current(self) -> dict[str, Any] | None:
        r = self.scaler.overrides.get("rollout")
        return r if isinstance(r, dict) and r.get("phase") in ACTIVE_PHASES else None

    @property
    def active(self) -> bool:
        return self.current is not None

    def spec_of(self, r: dict[str, Any]) -> Spec:
        return Spec.from_json(r.get("spec"))

    async def _phase(self, r: dict[str, Any], phase: Phase, reason: str) -> None:
        """Write the rollout's new phase down (before anything of it happens), then say it."""
        r = {**r, "phase": phase, "reason": reason, "updated": self.scaler.wall().isoformat()}
        # The pool's spec from now on, when done (without the rollout's tag); the config's
        # (no "spec") when the rollout was to it.
        kept = dataclasses.replace(self.spec_of(r), tags=())

        def change(overrides: dict[str, Any]) -> dict[str, Any]:
            out = {**overrides, "rollout": r}
            if phase == "done":
                if kept != Spec():
                    out["spec"] = kept.to_json()
                else:
                    out.pop("spec", None)
            return out

        await self.scaler.change_overrides(change)
        public = self.view(r)
        self.scaler.record("rollout", public)
        level = logging.WARNING if phase in ("rolling-back", "rolled-back") else logging.INFO
        said = f"rollout {r['id']}: {phase}: {reason}"
        log.log(level, "%s", said)
        self.scaler.events.publish(
            "rollout",
            said,
            "warning" if level == logging.WARNING else "info",
            result=phase,
            rollout=r["id"],
        )
        if phase in ("done", "rolled-back"):
            self.history.append(public)

    def view(self, r: dict[str, Any] | None = None) -> dict[str, Any]:
        """A rollout for the admin API, the journal and the status page (no user data)."""
        r = r if r is not None else self.current
        if r is None:
            return {}
        return {
            "id": r.get("id"),
            "phase": r.get("phase"),
            "spec": self.spec_of(r).public(),
            "target": r.get("target"),
            "started": r.get("started"),
            "updated": r.get("updated"),
            "reason": r.get("reason", ""),
            "verdicts": list(r.get("verdicts", []))[-10:],
        }

    def status(self) -> dict[str, Any]:
        """The rollout in progress (with the pool's count of old and new machines and the
        window being watched), and the last ones that ended."""
        r = self.current
        out: dict[str, Any] = {"current": None, "history": list(self.history)[::-1]}
        if r is not None:
            view = self.view(r)
            old, new = self._groups(r, [b.entry for b in self.scaler.runtime.backends])
            view["old"] = len(old)
            view["new"] = len(new)
            if self.window is not None:
                w = self.window
                view["window"] = {
                    "kind": w["kind"],
                    "seconds": w["seconds"],
                    "left": round(max(0.0, w["ends"] - self.clock()), 1),
                }
            out["current"] = view
        return out

    # --- the admin API's verbs ---------------------------------------------------------------

    async def start(self, spec: Spec, by: str) -> dict[str, Any]:
        """Begin a rollout to `spec`; RolloutRefused (409) says why one cannot begin now."""
        async with self._verbs:
            return await self._start(spec, by)

    async def _start(self, spec: Spec, by: str) -> dict[str, Any]:
        s = self.scaler
        if self.active:
            cur = self.current or {}
            raise RolloutRefused(
                f"rollout {cur.get('id')} is in progress ({cur.get('phase')}): one at a time; "
                "wait for it, or stop it with `doproxy rollout abort`"
            )
        if s.settings.dry_run:
            raise RolloutRefused("[provisioning] dry-run = true: the autoscaler never acts")
        kind = s.provider.kind
        if kind == "local" and (spec.image or spec.size or spec.user_data):
            raise RolloutRefused(
                "the local provider makes processes: give --command, not --image, --size or "
                "--user-data"
            )
        if kind != "local" and spec.command:
            raise RolloutRefused(
                f"--command is for the local provider; {kind} takes --image, --size and --user-data"
            )
        if spec.command:
            from doproxy.providers.local import command_argv

            try:  # a command that cannot run is refused now, not found out by a canary
                command_argv(spec.command, "127.0.0.1", 1, "check")
            except ProviderError as e:
                raise RolloutRefused(f"--command: {e}") from None
        # Creates and retires of the autoscaler's own that are under way are not a reason to
        # refuse (an operator would race them): the rollout's first step waits for them
        # (_settle) and only then counts the pool's size (`target`, None until then), so a
        # machine being made counts and one retiring does not: what the pool comes to.
        rid = secrets.token_hex(4)
        spec = dataclasses.replace(spec, tags=(TAG_PREFIX + rid,))
        r: dict[str, Any] = {"id": rid, "spec": spec.to_json(), "target": None}
        old, _ = self._groups(r, await s.store.load())
        if not old and not s.creating:
            raise RolloutRefused(
                "no machine to roll out: the pool has no machine the autoscaler made "
                "(or it sleeps: wake it first)"
            )
        now = s.wall().isoformat()
        r.update(
            phase="canary",
            started=now,
            updated=now,
            reason=f"started by {by}: {spec.words()}",
            verdicts=[],
        )
        self._abort = None
        await self._phase(r, "canary", r["reason"])
        self.run()
        return self.view(r)

    async def abort(self, by: str) -> dict[str, Any]:
        r = self.current
        if r is None:
            raise RolloutRefused("no rollout is in progress")
        if r["phase"] == "rolling-back":
            return self.view(r)
        self._abort = f"aborted by {by}"
        self._wake.set()
        if self.task is None or self.task.done():
            await self._phase(r, "rolling-back", self._abort)
            self.run()
        return self.view(self.current)

    # --- the task ---------------------------------------------------------------------------

    def run(self) -> None:
        """Drive the rollout in progress, if any (at start: resume one a crash interrupted)."""
        if self.current is None or (self.task is not None and not self.task.done()):
            return
        self.task = asyncio.get_running_loop().create_task(self._drive(), name="rollout")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _drive(self) -> None:
        failures = 0
        while (r := self.current) is not None:
            try:
                await self._settle()
                if r["phase"] == "rolling-back":
                    await self._roll_back(r)
                else:
                    await self._forward(r)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                pause = min(RETRY_FIRST * 2 ** (failures - 1), RETRY_CAP)
                log.error(
                    "rollout %s (%s): %s; trying again in %.0fs",
                    r.get("id"),
                    r.get("phase"),
                    e,
                    pause,
                    exc_info=not isinstance(e, DoproxyError),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._wake.wait()
                self._wake.clear()

    async def _settle(self) -> None:
        """Wait until the autoscaler has no create or retire of its own going on (after a
        restart, reconcile adopts interrupted creates and finishes interrupted destroys)."""
        s = self.scaler
        await s.reconciled.wait()
        while s.creating or s.retiring:
            await asyncio.wait([*s.creating, *s.retiring.values()])

    def _groups(
        self, r: dict[str, Any], entries: list[InventoryEntry]
    ) -> tuple[list[InventoryEntry], list[InventoryEntry]]:
        """(old, new): our machines in the pool, made or being made, not on their way out."""
        tag = TAG_PREFIX + str(r["id"])
        s = self.scaler
        old: list[InventoryEntry] = []
        new: list[InventoryEntry] = []
        for e in entries:
            if not managed_by(e, s.provider.kind) or not owned(e, s.owner):
                continue
            if e.retiring or e.state not in ("active", "provisioning"):
                continue
            (new if tag in e.tags else old).append(e)
        return old, new

    async def _forward(self, r: dict[str, Any]) -> None:
        """One canary or step: make the new machines it needs, watch, retire old ones."""
        s = self.scaler
        p = s.settings
        phase: Phase = r["phase"]
        old, new = self._groups(r, await s.store.load())
        if r.get("target") is None:
            # The first step, the autoscaler's own work settled: the size the pool keeps.
            r = {**r, "target": len(old) + len(new)}
            counted = r
            await self.scaler.change_overrides(lambda o: {**o, "rollout": counted})
            log.info("rollout %s: %d machine(s) to replace", r["id"], r["target"])
        target = int(r["target"])
        if not old:
            await self._phase(r, "done", f"every machine runs the new spec ({len(new)})")
            return
        if self._abort:
            await self._phase(r, "rolling-back", self._abort)
            return
        weight = p.canary_weight if phase == "canary" else 0.0
        count = to_create(phase, target, len(old), len(new), p.rollout_step)
        failed = await self._make(count, self.spec_of(r), weight)
        if failed:
            await self._phase(r, "rolling-back", failed)
            return
        old, new = self._groups(r, await s.store.load())
        # The canary's mark, set again on a resume (an adopted canary carries none).
        await self._mark([e.key for e in new], weight)
        seconds = p.canary_time if phase == "canary" else p.rollout_step_time
        verdict = await self._watch(
            "canary" if phase == "canary" else "step",
            seconds,
            {e.key for e in new},
            {e.key for e in old},
        )
        if verdict is None:  # aborted while watching
            await self._phase(r, "rolling-back", self._abort or "aborted")
            return
        verdicts = [*r.get("verdicts", []), {"window": phase, **_verdict_view(verdict)}]
        r = {**r, "verdicts": verdicts[-20:]}
        if not verdict.passed:
            await self._phase(r, "rolling-back", f"{phase} failed: {verdict.reason}")
            return
        if phase == "canary":
            await self._mark([e.key for e in new], 0.0)
        await self._retire(self._victims(old, to_retire(phase, target, len(old), len(new))))
        old, new = self._groups(r, await s.store.load())
        if not old:
            await self._phase(r, "done", f"every machine runs the new spec ({len(new)})")
        else:
            await self._phase(
                r, "steps", f"{phase} passed: {verdict.reason}; {len(old)} old machine(s) left"
            )

    async def _roll_back(self, r: dict[str, Any]) -> None:
        s = self.scaler
        old, new = self._groups(r, await s.store.load())
        # Rolled back before its first step counted the pool: the old machines are its size.
        target = len(old) if r.get("target") is None else int(r["target"])
        count = to_create("rolling-back", target, len(old), len(new), 0)
        # The old spec: the one the autoscaler makes (the config's, or the last rollout's).
        failed = await self._make(count, s.current_spec() or Spec(), 0.0)
        if failed:
            raise DoproxyError(f"rolling back: {failed}")
        await self._mark([e.key for e in new], 0.0)
        await self._retire([e.key for e in new if e.state == "active"])
        old, new = self._groups(r, await s.store.load())
        if new:
            raise DoproxyError(
                f"rolling back: {len(new)} new machine(s) still in the pool ("
                + ", ".join(e.name or e.key for e in new)
                + ")"
            )
        reason = r.get("reason", "")
        await self._phase(r, "rolled-back", f"{reason}; the old spec serves {len(old)}")

    # --- the steps' parts --------------------------------------------------------------------

    async def _make(self, count: int, spec: Spec, weight: float) -> str | None:
        """Make `count` machines of `spec` at once and wait until each serves; the reason of
        the first failure (None when all serve)."""
        if count <= 0:
            return None
        s = self.scaler
        prefix = provisioner(s.runtime.settings).name_prefix
        mark: dict[str, object] | None = {"canary_weight": weight} if weight else None
        tasks = [
            s.spawn_create(
                functools.partial(s.create, name, spec, mark), name, count_failures=False
            )
            for name in (new_name(prefix) for _ in range(count))
        ]
        await asyncio.wait(tasks)
        for t in tasks:
            if t.cancelled():
                return "a create was cancelled"
            e = t.exception()
            if e is not None:
                if isinstance(e, ProviderRefused):
                    return f"{s.provider.kind} refused the new spec: {e}"
                return f"a machine of the new spec did not come up: {e}"
        made = [t.result() for t in tasks]
        return await self._serving([str(e.key) for e in made])

    async def _serving(self, keys: list[str]) -> str | None:
        """Wait until these backends take traffic (their health checks passed), within the
        provider's boot timeout."""
        within = provisioner(self.scaler.runtime.settings).boot_timeout
        deadline = self.clock() + within
        rt = self.scaler.runtime
        while True:
            waiting = [k for k in keys if not rt.takes_traffic(k)]
            if not waiting:
                return None
            if self.clock() >= deadline:
                return (
                    f"new machine(s) {', '.join(waiting)} did not pass health checks within "
                    f"{within:g}s"
                )
            await asyncio.sleep(LOOK_EVERY)

    async def _mark(self, keys: list[str], weight: float) -> None:
        """Set (or with 0 clear) the canary weight of these entries."""
        wanted = set(keys)

        def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
            return [
                e.model_copy(update={"canary_weight": weight})
                if e.key in wanted and e.canary_weight != weight
                else e
                for e in entries
            ]

        if not wanted:
            return
        await self.scaler.store.update(change)
        await self.scaler.runtime.apply_inventory()

    def _victims(self, old: list[InventoryEntry], count: int) -> list[str]:
        """The old machines to retire first: not serving, then the oldest."""
        rt = self.scaler.runtime
        active = [e for e in old if e.state == "active"]
        ordered = sorted(active, key=lambda e: (rt.takes_traffic(e.key), e.started_time))
        return [e.key for e in ordered[:count]]

    async def _retire(self, keys: list[str]) -> None:
        """Drain, destroy and forget these machines (the autoscaler's retire tasks)."""
        s = self.scaler
        tasks = []
        for key in keys:
            if key not in s.retiring:
                s.spawn_retire(key)
            tasks.append(s.retiring[key])
        if tasks:
            await asyncio.wait(tasks)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise DoproxyError(f"retiring a machine failed: {t.exception()}")

    async def _watch(
        self, kind: str, seconds: float, new: set[str], old: set[str]
    ) -> Verdict | None:
        """Watch the new machines against the old ones for `seconds`; the verdict, or None
        when an abort was asked for meanwhile. A new machine that stops serving (its health
        checks fail, or passive health ejects it) ends the window at once."""
        rt = self.scaler.runtime
        p = self.scaler.settings
        before = _traffic(rt.backends, new), _traffic(rt.backends, old)
        ends = self.clock() + seconds
        self.window = {"kind": kind, "seconds": seconds, "ends": ends}
        unhealthy: tuple[str, ...] = ()
        try:
            while self.clock() < ends:
                if self._abort:
                    return None
                unhealthy = tuple(
                    b.name for b in rt.backends if b.key in new and not rt.takes_traffic(b.key)
                )
                if unhealthy:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(LOOK_EVERY, max(0.0, ends - self.clock()))):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            self.window = None
        after = _traffic(rt.backends, new), _traffic(rt.backends, old)
        thresholds = Thresholds(
            p.max_error_rate_increase, p.max_latency_ratio, p.rollout_min_requests
        )
        return judge(after[0] - before[0], after[1] - before[1], thresholds, unhealthy)


def _traffic(backends: list[Backend], keys: set[str]) -> Traffic:
    """The counters of these backends so far. An exchange that failed at a backend is counted
    in `failures` (and, when it was answered with a gateway error rather than retried, in
    `responses` too, without a request): errors are those failures plus the backend's own
    5xx answers."""
    total = Traffic()
    for b in backends:
        if b.key not in keys:
            continue
        gateway = sum(b.responses) - b.requests  # answered by us for a failed exchange
        own_5xx = b.responses[5] - gateway
        total = total + Traffic(
            requests=b.requests + b.failures,
            errors=b.failures + max(0, own_5xx),
            answered=b.requests,
            latency_sum=b.latency_sum,
        )
    return total


def _verdict_view(v: Verdict) -> dict[str, Any]:
    return {"passed": v.passed, "reason": v.reason, "compared": v.compared}
