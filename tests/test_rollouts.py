"""Progressive rollouts (issue 14, part 2): the pure verdict, the canary's share in every
balancer, and whole rollouts with the local provider: real backend processes, a real listener,
real load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from doproxy.admin.server import rollouts_view
from doproxy.autoscaler import Autoscaler
from doproxy.config import load_settings
from doproxy.core.balancers import BALANCERS, SHARE_SCALE, canary_shares, make_balancer
from doproxy.core.rollout import Thresholds, Traffic, judge, to_create, to_retire
from doproxy.errors import RolloutRefused
from doproxy.inventory import load_inventory
from doproxy.loadgen import LoadResult, run_load
from doproxy.machines import open_provider
from doproxy.provisioning import Spec
from doproxy.proxy.backend import Backend, Pool
from doproxy.rollout import TAG_PREFIX
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.procs import start_proxy_process
from tests.test_autoscaler_e2e import destroy_all, port_range

BACKEND = "python -m doproxy.demo_backend --host {host} --port {port} --name {name}"

CONFIG = """bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[backend]
new-host-health-path = "/health"

[health]
interval = "200ms"
down-interval = "200ms"
rise = 1

[provisioning]
enable = true
min-backends = 2
max-backends = 2
interval = "250ms"
drain-timeout = "1s"
canary-weight = 30
canary-time = "{canary_time}"
rollout-step-time = "1s"
rollout-min-requests = 20
max-latency-ratio = 1.5
max-error-rate-increase = 1

[local-provisioner]
enable = true
command = "{backend}"
ports = "{ports}"
boot-timeout = "10s"
stop-timeout = "2s"
tags = ["{tag}"]
"""


def config(tmp: Path, canary_time: str = "2s") -> Path:
    cfg = tmp / "doproxy.toml"
    cfg.write_text(
        CONFIG.format(
            canary_time=canary_time,
            backend=BACKEND,
            ports=port_range(),
            # Random, not from the test folder's name: two test runs at once (a developer's and
            # make test) shared a tag, and one's teardown destroyed the other's machines.
            tag=f"ro-{uuid.uuid4().hex[:12]}",
        )
    )
    return cfg


# --- the pure parts -------------------------------------------------------------------------

T = Thresholds(max_error_rate_increase=1.0, max_latency_ratio=1.5, min_requests=20)


def test_the_verdict_compares_errors_and_latency_with_the_old_machines() -> None:
    old = Traffic(requests=1000, errors=5, answered=1000, latency_sum=1000 * 0.020)
    same = Traffic(requests=100, errors=1, answered=100, latency_sum=100 * 0.022)
    assert judge(same, old, T).passed
    buggy = Traffic(requests=100, errors=5, answered=100, latency_sum=100 * 0.020)
    v = judge(buggy, old, T)
    assert not v.passed and "max-error-rate-increase" in v.reason
    slow = Traffic(requests=100, errors=0, answered=100, latency_sum=100 * 0.040)
    v = judge(slow, old, T)
    assert not v.passed and "max-latency-ratio" in v.reason and "2.00x" in v.reason
    # Sub-millisecond noise is not a slower release: both count as the 5 ms floor.
    fast_old = Traffic(requests=1000, errors=0, answered=1000, latency_sum=1000 * 0.0002)
    fast_new = Traffic(requests=100, errors=0, answered=100, latency_sum=100 * 0.0009)
    assert judge(fast_new, fast_old, T).passed
    # Too little traffic to compare: health decides.
    v = judge(Traffic(requests=3, errors=3, answered=3), old, T)
    assert v.passed and not v.compared
    v = judge(same, old, T, unhealthy=("web-1",))
    assert not v.passed and "web-1" in v.reason
    # Too little traffic to the old ones: errors are held to the increase alone.
    v = judge(buggy, Traffic(requests=2, errors=0, answered=2), T)
    assert not v.passed


def test_each_step_makes_and_retires_what_the_pool_needs() -> None:
    # Three machines, steps of one: canary (4), retire one; then +1 -1 twice; then done.
    assert to_create("canary", 3, 3, 0, 1) == 1
    assert to_retire("canary", 3, 3, 1) == 1
    assert to_create("steps", 3, 2, 1, 1) == 1
    assert to_retire("steps", 3, 2, 2) == 1
    # Resumed after a crash that came after the creates: nothing made twice.
    assert to_create("steps", 3, 2, 2, 1) == 0
    assert to_create("canary", 3, 3, 1, 1) == 0
    # Steps of two on five: never more than two above the target.
    assert to_create("steps", 5, 4, 1, 2) == 2
    assert to_retire("steps", 5, 4, 3) == 2
    assert to_create("steps", 5, 1, 4, 2) == 1  # the last old one: one more
    # Rolling back: the old spec up to the target again.
    assert to_create("rolling-back", 3, 1, 3, 1) == 2
    assert to_create("rolling-back", 3, 3, 1, 1) == 0


def test_the_canary_share_is_its_percent_whatever_the_pool() -> None:
    for n in (1, 3, 10, 40):
        for percent in (5.0, 10.0, 30.0, 50.0):
            shares = canary_shares([percent] + [0.0] * n)
            assert shares is not None and max(shares) == SHARE_SCALE
            got = shares[0] / sum(shares)
            assert abs(got - percent / 100) < 0.005, (n, percent, got)
    assert canary_shares([0.0, 0.0]) is None
    assert canary_shares([10.0]) is None  # only the canary: it takes everything


@pytest.mark.parametrize("kind", BALANCERS)
def test_every_balancer_gives_the_canary_its_share(kind: str) -> None:
    from doproxy.core.inventory_model import InventoryEntry

    entries = [
        InventoryEntry(id=f"m{i}", server_host=f"127.0.0.1:{9000 + i}", canary_weight=w)
        for i, w in enumerate([20.0, 0.0, 0.0, 0.0])
    ]
    backends = [Backend(e) for e in entries]
    rng = random.Random(7)
    balancer = make_balancer(kind, clock=lambda: 0.0, rng=rng)
    pool = Pool(backends, balancer, warm=True, clock=lambda: 0.0)
    picks: Counter[str] = Counter()
    for i in range(20000):
        key = f"client-{i}".encode() if kind == "hash" else None
        b = balancer.pick(pool.eligible, key)
        assert b is not None
        picks[b.key] += 1
    share = picks["m0"] / 20000
    assert 0.15 < share < 0.25, (kind, share, picks)


# --- whole rollouts -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(cfg: Path) -> AsyncIterator[tuple[Runtime, Autoscaler, int]]:
    """A runtime on `cfg` whose pool of two serves; stopped, its machines destroyed."""
    rt = Runtime(load_settings(cfg), [], cfg)
    server = await rt.start()
    try:
        scaler = rt.autoscaler
        assert scaler is not None
        await asyncio.wait_for(scaler.reconciled.wait(), 10)
        await wait_for(lambda: len(server.pool.eligible) == 2, timeout=20)
        yield rt, scaler, server.addresses[0][1]
    finally:
        await rt.stop()
        await destroy_all(rt.settings, cfg.parent)


async def machines(rt: Runtime) -> dict[str, tuple[str, ...]]:
    provider = open_provider(rt.settings, rt.base)
    try:
        return {m.id: m.tags for m in await provider.list()}
    finally:
        await provider.close()


async def rollout_to_end(
    rt: Runtime, scaler: Autoscaler, port: int, spec: Spec, within: float = 60
) -> tuple[dict[str, Any], LoadResult]:
    """Start a rollout under steady load; its end (the history's record) and the load."""
    stop = asyncio.Event()
    load = LoadResult()
    task = asyncio.create_task(run_load("127.0.0.1", port, 4, within, stop=stop, result=load))
    try:
        await asyncio.sleep(0.5)  # the load is flowing before the rollout begins
        begun = await scaler.rollouts.start(spec, "the test")
        await wait_for(lambda: not scaler.rollouts.active, timeout=within)
    finally:
        stop.set()
        await task
    ended = next(h for h in scaler.rollouts.history if h["id"] == begun["id"])
    return ended, load


@pytest.mark.timeout(120)
async def test_a_good_rollout_replaces_every_machine_with_no_failed_request(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path)) as (rt, scaler, port):
        before = set(await machines(rt))
        spec = Spec(command=BACKEND + " --service-time 0.001")
        ended, load = await rollout_to_end(rt, scaler, port, spec)
        assert ended["phase"] == "done", ended
        assert load.failed == 0, load.errors
        assert load.ok > 200
        # Every machine is new, none of the old is left, and nothing leaked.
        tag = TAG_PREFIX + ended["id"]
        now = await machines(rt)
        assert len(now) == 2 and not set(now) & before
        assert all(tag in tags for tags in now.values())
        entries = load_inventory(tmp_path / "inventory.toml")
        assert {str(e.id) for e in entries} == set(now)
        assert all(e.canary_weight == 0 for e in entries)
        # The canary was compared on real traffic, and every window passed.
        verdicts = ended["verdicts"]
        assert verdicts[0]["window"] == "canary" and verdicts[0]["compared"]
        assert all(v["passed"] for v in verdicts)
        # New machines are made of the new spec from now on.
        assert scaler.current_spec() == Spec(command=spec.command)
        text = rt.metrics.exposition()[0].decode()
        assert 'doproxy_rollouts_total{result="done"} 1.0' in text
        assert "doproxy_rollout_in_progress 0.0" in text
        assert rollouts_view(rt)["spec"] == {"command": spec.command}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("flaw", "why"),
    [("--service-time 0.05", "max-latency-ratio"), ("--error-rate 0.05", "errors")],
)
async def test_a_bad_rollout_rolls_back_with_the_old_pool_intact(
    tmp_path: Path, flaw: str, why: str
) -> None:
    async with running(config(tmp_path, canary_time="3s")) as (rt, scaler, port):
        before = await machines(rt)
        ended, load = await rollout_to_end(rt, scaler, port, Spec(command=f"{BACKEND} {flaw}"))
        assert ended["phase"] == "rolled-back", ended
        assert "canary failed" in ended["reason"] and why in ended["reason"]
        assert await machines(rt) == before
        entries = load_inventory(tmp_path / "inventory.toml")
        assert {str(e.id) for e in entries} == set(before)
        assert scaler.current_spec() is None
        if "error" in flaw:
            # Only the canary's own 500s reached users: about 5 % of its share.
            assert load.failed < 0.05 * load.ok
        else:
            assert load.failed == 0, load.errors


@pytest.mark.timeout(120)
async def test_one_rollout_at_a_time_and_an_abort_rolls_back(tmp_path: Path) -> None:
    async with running(config(tmp_path, canary_time="30s")) as (rt, scaler, _port):
        before = await machines(rt)
        with pytest.raises(RolloutRefused, match="--command"):
            await scaler.rollouts.start(Spec(image="ubuntu-24-04-x64"), "the test")
        begun = await scaler.rollouts.start(Spec(command=BACKEND), "the test")
        with pytest.raises(RolloutRefused, match="in progress"):
            await scaler.rollouts.start(Spec(command=BACKEND), "the test")
        # The canary serves, marked with its share, and the status says so.
        await wait_for(lambda: (scaler.rollouts.status()["current"] or {}).get("new") == 1, 20)
        await wait_for(lambda: scaler.rollouts.window is not None, 20)
        current = rollouts_view(rt)["current"]
        assert current["phase"] == "canary" and current["old"] == 2
        assert current["window"]["kind"] == "canary"
        canaries = [b for b in rt.backends if b.entry.canary_weight]
        assert len(canaries) == 1 and canaries[0].entry.canary_weight == 30
        await scaler.rollouts.abort("the test")
        await wait_for(lambda: not scaler.rollouts.active, timeout=30)
        ended = scaler.rollouts.history[-1]
        assert ended["id"] == begun["id"] and ended["phase"] == "rolled-back"
        assert "aborted by the test" in ended["reason"]
        assert await machines(rt) == before
        with pytest.raises(RolloutRefused, match="no rollout"):
            await scaler.rollouts.abort("the test")


# --- a crash in the middle ------------------------------------------------------------------


async def cli(cfg: Path, *args: str) -> tuple[int, str]:
    """`python -m doproxy --config cfg ARGS`, as a user types it; (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        "--config",
        str(cfg),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def rollouts(cfg: Path) -> dict[str, Any]:
    code, out = await cli(cfg, "rollout", "status", "--output", "json")
    assert code == 0, out
    view: dict[str, Any] = json.loads(out)
    return view


async def until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.1)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["canary", "steps"])
async def test_kill_9_in_the_middle_then_start_finishes_or_rolls_back_with_nothing_leaked(
    tmp_path: Path, when: str
) -> None:
    cfg = config(tmp_path, canary_time="3s")
    settings = load_settings(cfg)
    proc = await start_proxy_process(cfg)
    second = None
    try:
        await until(lambda: _serving(cfg, 2), 30)
        code, out = await cli(cfg, "rollout", "--command", BACKEND + " --service-time 0.001")
        assert code == 0 and "begun" in out, out
        rid = out.split("rollout ", 1)[1].split(" ", 1)[0]

        async def reached() -> bool:
            cur = (await rollouts(cfg))["current"]
            if when == "canary":
                return bool(cur) and cur["phase"] == "canary" and cur["new"] == 1
            return bool(cur) and cur["phase"] == "steps"

        await until(reached, 60)
        proc.proc.kill()  # kill -9: no handler runs, nothing is tidied
        await proc.proc.wait()

        second = await start_proxy_process(cfg)

        async def ended() -> bool:
            view = await rollouts(cfg)
            return view["current"] is None and any(h["id"] == rid for h in view["history"])

        await until(ended, 90)
        record = next(h for h in (await rollouts(cfg))["history"] if h["id"] == rid)
        assert record["phase"] in ("done", "rolled-back"), record
        await until(lambda: _serving(cfg, 2), 30)
        # Nothing leaked, nothing forgotten, and one spec for the whole pool.
        provider = open_provider(settings, tmp_path)
        try:
            found = {m.id: m.tags for m in await provider.list()}
        finally:
            await provider.close()
        entries = load_inventory(tmp_path / "inventory.toml")
        assert {str(e.id) for e in entries} == set(found), (entries, found)
        assert len(found) == 2
        tagged = {TAG_PREFIX + rid in tags for tags in found.values()}
        assert tagged == {record["phase"] == "done"}
        assert all(e.canary_weight == 0 and e.state == "active" for e in entries)
    finally:
        for p in (proc, second):
            if p is not None and p.proc.returncode is None:
                await p.stop()
        await destroy_all(settings, tmp_path)


async def _serving(cfg: Path, n: int) -> bool:
    code, out = await cli(cfg, "status", "--output", "json")
    if code != 0:
        return False
    backends = json.loads(out)["status"]["backends"]
    return sum(1 for b in backends if b["eligible"]) == n


@pytest.mark.timeout(60)
async def test_two_starts_at_once_make_one_rollout_and_a_bad_command_is_refused(
    tmp_path: Path,
) -> None:
    async with running(config(tmp_path, canary_time="30s")) as (_rt, scaler, _port):
        with pytest.raises(RolloutRefused, match="--command"):
            await scaler.rollouts.start(Spec(command="python 'unclosed"), "the test")
        outcomes = await asyncio.gather(
            scaler.rollouts.start(Spec(command=BACKEND), "one"),
            scaler.rollouts.start(Spec(command=BACKEND), "two"),
            return_exceptions=True,
        )
        begun = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, RolloutRefused)]
        assert len(begun) == 1 and len(refused) == 1, outcomes
        await scaler.rollouts.abort("the test")
        await wait_for(lambda: not scaler.rollouts.active, timeout=30)
        assert scaler.rollouts.history[-1]["id"] == begun[0]["id"]


@pytest.mark.timeout(120)
async def test_the_cli_as_documented(tmp_path: Path) -> None:
    """`doproxy rollout --command ... --wait`, `rollout status`, `rollout abort`, as the docs
    show them: exit 0 for a rollout that completed, 1 for one that rolled back."""
    cfg = config(tmp_path)
    settings = load_settings(cfg)
    proc = await start_proxy_process(cfg)
    try:
        await until(lambda: _serving(cfg, 2), 30)
        code, out = await cli(cfg, "rollout", "status")
        assert code == 0 and "no rollout in progress" in out, out
        code, out = await cli(cfg, "rollout", "abort")
        assert code == 1 and "no rollout is in progress" in out, out
        code, out = await cli(cfg, "rollout", "status", "--image", "x")
        assert code == 1 and "takes no spec option" in out, out
        code, out = await cli(cfg, "rollout", "--image", "ubuntu-24-04-x64")
        assert code == 1 and "--command" in out, out  # the local provider's option
        code, out = await cli(cfg, "rollout", "--user-data", str(tmp_path / "missing.yaml"))
        assert code == 1 and "cannot read --user-data" in out, out
        (tmp_path / "big.yaml").write_text("#" * (64 * 1024 + 1))
        code, out = await cli(cfg, "rollout", "--user-data", str(tmp_path / "big.yaml"))
        assert code == 1 and "larger than DigitalOcean's limit" in out, out
        good = BACKEND + " --service-time 0.001"
        code, out = await cli(cfg, "rollout", "--command", good, "--wait")
        assert code == 0 and "done: every machine runs the new spec" in out, out
        code, out = await cli(cfg, "rollout", "status")
        assert "spec of new machines: command " + good in out and "earlier:" in out, out
        # No traffic reaches this one: judged on health, and it never becomes healthy.
        code, out = await cli(cfg, "rollout", "--command", BACKEND + " --boot-delay 30", "--wait")
        assert code == 1 and "rolled-back" in out and "did not" in out, out
    finally:
        await proc.stop()
        await destroy_all(settings, tmp_path)


@pytest.mark.timeout(120)
async def test_a_rollout_asked_for_during_a_scale_up_waits_for_it(tmp_path: Path) -> None:
    """The autoscaler is making a machine when the rollout is asked for: accepted (not
    refused as busy), its size counts the machine being made, and it begins once that one
    is made; every machine ends new."""
    async with running(config(tmp_path)) as (rt, scaler, _port):
        await scaler.set_limits({"min-backends": 3, "max-backends": 3})
        await wait_for(lambda: bool(scaler.creating), timeout=10)
        begun = await scaler.rollouts.start(Spec(command=BACKEND), "the test")
        assert begun["target"] is None  # counted once the scale-up is done
        await wait_for(lambda: not scaler.rollouts.active, timeout=60)
        ended = scaler.rollouts.history[-1]
        assert ended["id"] == begun["id"] and ended["phase"] == "done", ended
        assert ended["target"] == 3
        now = await machines(rt)
        assert len(now) == 3
        assert all(TAG_PREFIX + begun["id"] in tags for tags in now.values())


@pytest.mark.timeout(60)
async def test_overrides_changed_at_once_all_stay(tmp_path: Path) -> None:
    """Pause, limits and a rollout's record share one overrides document, kept across an
    await (a file write in a thread, or etcd): changes made at the same time each apply to
    what the others left, in memory and in what is kept; none is lost."""
    from doproxy.journal import load_overrides, overrides_path

    async with running(config(tmp_path, canary_time="30s")) as (_rt, scaler, _port):
        begun, *_ = await asyncio.gather(
            scaler.rollouts.start(Spec(command=BACKEND), "the test"),
            scaler.set_paused(True),
            scaler.set_limits({"max-backends": 3}),
        )
        kept = load_overrides(overrides_path(tmp_path / "inventory.toml"))
        for overrides in (scaler.overrides, kept):
            assert overrides["paused"] is True
            assert overrides["max-backends"] == 3
            assert overrides["rollout"]["id"] == begun["id"]
        await scaler.rollouts.abort("the test")
        await wait_for(lambda: not scaler.rollouts.active, timeout=30)
        assert scaler.overrides["paused"] is True and scaler.overrides["max-backends"] == 3
