"""Metrics: the data plane's plain counters, and their Prometheus exposition at scrape time."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from doproxy.autoscaler import Autoscaler
from doproxy.config import load_settings
from doproxy.core.histogram import REQUEST_BOUNDS, Histogram, cumulative
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.errors import ProviderError, ProviderRefused
from doproxy.inventory import load_inventory
from doproxy.machines import open_provider
from doproxy.metrics import Metrics, backend_labels
from doproxy.provisioning import Machine, Spec
from doproxy.proxy.backend import Backend, Pool
from doproxy.runtime import Runtime
from tests.conftest import StartProxy, port_of, wait_for
from tests.support import (
    RawBackend,
    RequestReader,
    answering,
    dead_port,
    get,
    request,
    respond,
)
from tests.test_autoscaler_e2e import local_config, serving

Factory = Callable[..., Awaitable[RawBackend]]

NO_EJECTION = {"passive-health": {"consecutive-failures": 0}}


def failing_on(path: bytes, name: bytes) -> Callable[..., Awaitable[None]]:
    """A keep-alive backend answering 500 "`name` failed" to `path` and 200 `name` to the rest."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        rr = RequestReader(r)
        while (req := await rr.next()) is not None:
            if req.url == path:
                w.write(respond(500, name + b" failed"))
            else:
                w.write(respond(200, name))
            await w.drain()

    return handler


def by_class(counts: list[int]) -> dict[int, int]:
    return {i: n for i, n in enumerate(counts) if n}


def test_histogram_buckets_are_prometheus_le_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    # A value equal to a bound is in that bound's bucket ("le" is <=).
    assert h.counts == [2, 2, 1]
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert h.count == 5 and h.sum == 4.65
    assert cumulative(REQUEST_BOUNDS, [0] * 15)[-1] == (float("inf"), 0)


async def test_responses_are_counted_per_backend_and_class(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    a = await backend_factory(failing_on(b"/boom", b"a"))
    b = await backend_factory(failing_on(b"/boom", b"b"))
    proxy = await start_proxy([a.port, b.port], NO_EJECTION)
    got = [(await request(port_of(proxy), get(path))).body for path in ["/", "/boom", "/"] * 4]
    # Which backend answered, and how, is in the body.
    for backend in proxy.pool.backends:
        mine = b"a" if backend.port == a.port else b"b"
        want = {2: got.count(mine), 5: got.count(mine + b" failed")}
        assert by_class(backend.responses) == {k: v for k, v in want.items() if v}
    assert sum(sum(b.responses) for b in proxy.pool.backends) == 12
    # Every exchange's wait is in the histogram; its count and sum are the listener's totals.
    assert sum(proxy.durations) == proxy.exchanges == 12
    assert 0 < proxy.exchange_time < 12 * REQUEST_BOUNDS[-1]
    assert proxy.generated == [0] * 10


async def test_generated_responses_and_gateway_errors(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    # A refused connection: the 502 is the failing backend's response.
    proxy = await start_proxy([await dead_port()])
    assert (await request(port_of(proxy), get())).status == 502
    backend = proxy.pool.backends[0]
    assert by_class(backend.responses) == {5: 1}
    assert sum(proxy.durations) == proxy.exchanges == 1
    # A malformed request: doproxy answers it, no backend involved.
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    assert (await request(port_of(proxy), bad)).status == 400
    assert by_class(proxy.generated) == {4: 1}
    # No backend at all: 503, no backend to blame, and no exchange for the autoscaler.
    empty = await start_proxy([])
    assert (await request(port_of(empty), get())).status == 503
    assert by_class(empty.generated) == {5: 1}
    assert sum(empty.durations) == empty.exchanges == 0


async def test_a_websocket_upgrade_counts_as_1xx(start_proxy: StartProxy) -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        proxy = await start_proxy([server.sockets[0].getsockname()[1]])
        async with connect(f"ws://127.0.0.1:{port_of(proxy)}/") as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
        backend: Backend = proxy.pool.backends[0]
        assert by_class(backend.responses) == {1: 1}


async def test_retries_and_ejections_are_listener_totals(
    start_proxy: StartProxy, backend_factory: Factory
) -> None:
    good = await backend_factory(answering(200, b"good"))
    proxy = await start_proxy(
        [await dead_port(), good.port],
        {"passive-health": {"consecutive-failures": 1, "max-ejection-percent": 50}},
    )
    for _ in range(2):
        assert (await request(port_of(proxy), get())).status == 200
    # The dead one failed once: retried elsewhere, and ejected at once (1 failure in a row).
    await wait_for(lambda: proxy.ejections == 1)
    assert proxy.retried == 1
    dead = proxy.pool.backends[0]
    assert dead.ejections == 1 and by_class(dead.responses) == {}
    proxy.set_pool(Pool([proxy.pool.backends[1]], proxy.pool.balancer))
    assert proxy.ejections == 1  # the ejected backend left the pool; its ejection stays


# --- the exposition, from a real Runtime ------------------------------------------------------


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Scrape:
    """Every sample of the exposition, parsed back by prometheus_client's own parser."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Scrape = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, key  # no duplicate series
            out[key] = s.value
    return out


def sample(scraped: Scrape, name: str, **labels: str) -> float:
    return scraped[name, tuple(sorted(labels.items()))]


def names(scraped: Scrape) -> set[str]:
    return {name for name, _ in scraped}


def app(name: bytes, hold: asyncio.Event | None = None) -> Callable[..., Awaitable[None]]:
    """A keep-alive backend: 500 to /boom, waits for `hold` on /hold, 200 `name` otherwise."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
        rr = RequestReader(r)
        while (req := await rr.next()) is not None:
            if req.url == b"/hold" and hold is not None:
                await hold.wait()
            status = 500 if req.url == b"/boom" else 200
            w.write(respond(status, name + (b" failed" if status == 500 else b"")))
            await w.drain()

    return handler


def write_config(tmp_path: Path, ports: list[int], extra: str = "") -> Path:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(
        f'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n{extra}\n'
    )
    (tmp_path / "inventory.toml").write_text(
        "".join(
            f'[[droplet]]\nid = {i + 1}\nname = "web-{i + 1}"\nserver-host = "127.0.0.1:{p}"\n'
            for i, p in enumerate(ports)
        )
    )
    return cfg


@pytest.fixture
async def runtimes() -> AsyncIterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    for rt in made:
        await rt.stop()


async def start_runtime(cfg: Path, made: list[Runtime]) -> Runtime:
    rt = Runtime(load_settings(cfg), load_inventory(cfg.parent / "inventory.toml"), cfg)
    made.append(rt)
    await rt.start()
    return rt


def port_of_rt(rt: Runtime) -> int:
    assert rt.server is not None
    return rt.server.addresses[0][1]


HEALTH = """
[health]
path = "/health"
interval = "100ms"
down-interval = "100ms"
rise = 1
fall = 1
[passive-health]
consecutive-failures = 0
"""


async def test_exposition_of_a_running_proxy(
    tmp_path: Path, backend_factory: Factory, runtimes: list[Runtime]
) -> None:
    hold = asyncio.Event()
    one = await backend_factory(app(b"one", hold))
    two = await backend_factory(app(b"two", hold))
    cfg = write_config(tmp_path, [one.port, two.port], HEALTH)
    rt = await start_runtime(cfg, runtimes)
    metrics = Metrics(rt)
    await wait_for(lambda: sample(scrape(metrics), "doproxy_backend_up", backend="web-2") == 1)
    port = port_of_rt(rt)
    bodies = [(await request(port, get(path))).body for path in ["/", "/boom", "/"] * 3]

    s = scrape(metrics)
    for label, name in (("web-1", b"one"), ("web-2", b"two")):
        want = {"2xx": bodies.count(name), "5xx": bodies.count(name + b" failed")}
        for code_class in ("1xx", "2xx", "3xx", "4xx", "5xx"):
            got = sample(s, "doproxy_requests_total", backend=label, code_class=code_class)
            assert got == want.get(code_class, 0), (label, code_class)
        assert sample(s, "doproxy_backend_up", backend=label) == 1
    assert sum(v for (n, _), v in s.items() if n == "doproxy_requests_total") == 9
    # The histogram holds every request, and its sum is the time they waited.
    assert sample(s, "doproxy_request_duration_seconds_count") == 9
    assert sample(s, "doproxy_request_duration_seconds_bucket", le="+Inf") == 9
    assert sample(s, "doproxy_request_duration_seconds_bucket", le="10.0") == 9
    assert 0 < sample(s, "doproxy_request_duration_seconds_sum") < 9
    assert sample(s, "doproxy_in_flight") == 0
    assert sample(s, "doproxy_pool_backends", state="active") == 2
    for state in ("draining", "disabled", "provisioning"):
        assert sample(s, "doproxy_pool_backends", state=state) == 0
    assert sample(s, "doproxy_retries_total") == 0
    assert sample(s, "doproxy_ejections_total") == 0
    # No autoscaler: no desired size, no provisioning or scaler errors to speak of.
    assert not names(s) & {
        "doproxy_pool_desired",
        "doproxy_provision_duration_seconds_count",
        "doproxy_autoscaler_errors_total",
    }
    for direction in ("up", "down", "replace"):
        assert sample(s, "doproxy_scaling_decisions_total", direction=direction) == 0

    # A request held by its backend is in flight.
    held = asyncio.ensure_future(request(port, get("/hold")))
    await wait_for(lambda: sample(scrape(metrics), "doproxy_in_flight") == 1)
    hold.set()
    assert (await held).status == 200
    await wait_for(lambda: sample(scrape(metrics), "doproxy_in_flight") == 0)

    # A backend that stops answering its health checks is down.
    await two.close()
    await wait_for(lambda: sample(scrape(metrics), "doproxy_backend_up", backend="web-2") == 0)
    assert sample(scrape(metrics), "doproxy_backend_up", backend="web-1") == 1

    # Reloads, by result.
    assert await rt.reload()
    cfg.write_text(cfg.read_text() + "\nnot = [valid toml\n")
    assert not await rt.reload()
    s = scrape(metrics)
    assert sample(s, "doproxy_reloads_total", result="ok") == 1
    assert sample(s, "doproxy_reloads_total", result="failed") == 1


async def resetting(r: asyncio.StreamReader, w: asyncio.StreamWriter, b: RawBackend) -> None:
    """Reads a whole request, then drops the connection without answering."""
    await RequestReader(r).next()
    w.transport.abort()


async def test_retries_and_ejections_are_exposed(
    tmp_path: Path, backend_factory: Factory, runtimes: list[Runtime]
) -> None:
    bad = await backend_factory(resetting)
    good = await backend_factory(answering(200, b"good"))
    extra = "[backend]\ndisable-health-check = true\n[passive-health]\nconsecutive-failures = 1\n"
    rt = await start_runtime(write_config(tmp_path, [bad.port, good.port], extra), runtimes)
    metrics = Metrics(rt)
    for _ in range(2):
        assert (await request(port_of_rt(rt), get())).body == b"good"
    s = scrape(metrics)
    # One of the two went to the resetting backend first: retried, and that backend ejected.
    assert sample(s, "doproxy_retries_total") == 1
    assert sample(s, "doproxy_ejections_total") == 1
    assert sample(s, "doproxy_backend_up", backend="web-1") == 0  # ejected
    assert sample(s, "doproxy_requests_total", backend="web-2", code_class="2xx") == 2
    assert sample(s, "doproxy_requests_total", backend="web-1", code_class="5xx") == 0
    assert sample(s, "doproxy_request_duration_seconds_count") == 2


def test_backends_sharing_a_name_get_distinct_labels() -> None:
    entries = [
        InventoryEntry(id=1, name="web", server_host="127.0.0.1:1"),
        InventoryEntry(id=2, name="web", server_host="127.0.0.1:2"),
        InventoryEntry(name="api", server_host="127.0.0.1:3"),
        InventoryEntry(name="api", server_host="127.0.0.1:3"),  # no id, same address
        InventoryEntry(server_host="127.0.0.1:4"),  # no name: its address
    ]
    labels = [label for _, label in backend_labels([Backend(e) for e in entries])]
    assert labels == [
        "web#1",
        "web#2",
        "api#127.0.0.1:3",
        "api#127.0.0.1:3#2",
        "127.0.0.1:4",
    ]


# --- the autoscaler's metrics -----------------------------------------------------------------


class DownProvider:
    """A provider whose API is down until told otherwise (I/O injected, not patched)."""

    kind = "local"

    def __init__(self) -> None:
        self.failing = True

    async def list(self) -> list[Machine]:
        if self.failing:
            raise ProviderError("provider API unreachable")
        return []

    async def get(self, machine_id: str) -> Machine:
        raise ProviderRefused("not in this test")

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        raise ProviderRefused("not in this test")

    async def destroy(self, machine_id: str) -> None:
        raise ProviderRefused("not in this test")

    async def reboot(self, machine_id: str) -> None:
        raise ProviderRefused("not in this test")

    async def close(self) -> None:
        pass


async def test_autoscaler_errors_total_never_goes_back(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [], "[provisioning]\nenable = true\ndry-run = true\n")
    rt = Runtime(load_settings(cfg), [], cfg)  # not started: only its counters are read
    provider = DownProvider()
    pauses = 0
    parked = asyncio.Event()

    async def sleep(seconds: float) -> None:
        nonlocal pauses
        pauses += 1
        if pauses == 3:
            provider.failing = False  # three errors in a row, then it works
        if pauses == 4:
            parked.set()
            await asyncio.Event().wait()  # until stop() cancels the task

    scaler = Autoscaler(rt, provider, sleep=sleep)
    rt.autoscaler = scaler
    scaler.start()
    try:
        async with asyncio.timeout(10):
            await parked.wait()
        assert scaler.errors == 0 and scaler.last_error is None  # working again
        assert scaler.errors_total == 3
        s = scrape(Metrics(rt))
        assert sample(s, "doproxy_autoscaler_errors_total") == 3
        assert sample(s, "doproxy_pool_desired") == scaler.desired
        assert sample(s, "doproxy_provision_duration_seconds_count") == 0
    finally:
        await scaler.stop()


async def test_provisioning_duration_and_desired_size(tmp_path: Path) -> None:
    tag = f"doproxy-test-{uuid.uuid4().hex[:8]}"
    cfg = local_config(tmp_path, tag)  # min-backends = 1: one create at start
    rt = Runtime(load_settings(cfg), [], cfg)
    await rt.start()
    try:
        metrics = Metrics(rt)
        await wait_for(lambda: serving(rt) == 1, timeout=20)
        await wait_for(
            lambda: sample(scrape(metrics), "doproxy_provision_duration_seconds_count") == 1
        )
        s = scrape(metrics)
        assert 0 < sample(s, "doproxy_provision_duration_seconds_sum") < 20
        assert sample(s, "doproxy_provision_duration_seconds_bucket", le="+Inf") == 1
        assert sample(s, "doproxy_pool_desired") == 1
        assert sample(s, "doproxy_pool_backends", state="active") == 1
        assert sample(s, "doproxy_pool_backends", state="provisioning") == 0
        assert sample(s, "doproxy_autoscaler_errors_total") == 0
    finally:
        await rt.stop()
        provider = open_provider(rt.settings, tmp_path)
        for m in await provider.list():
            await provider.destroy(m.id)
        await provider.close()


# --- nothing per request ----------------------------------------------------------------------


def test_the_registry_is_doproxys_own() -> None:
    rt = Runtime(Settings(), [])
    metrics = Metrics(rt)
    assert metrics.registry is not REGISTRY
    assert b"doproxy_" not in generate_latest(REGISTRY)
    assert b"doproxy_requests_total" in metrics.exposition()[0]


def test_the_data_plane_never_imports_prometheus_client() -> None:
    """The request path only adds to integers: prometheus_client is not even loaded with it
    (the statistics and health checks neither); only doproxy.metrics brings it in."""
    code = (
        "import sys\n"
        "import doproxy.proxy.server, doproxy.proxy.client, doproxy.proxy.upstream\n"
        "import doproxy.statistics, doproxy.health\n"
        "print('prometheus_client' in sys.modules)\n"
        "import doproxy.metrics\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == ["False", "True"]


# --- the Grafana dashboard --------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"


def queries(node: object) -> Iterator[str]:
    """Every PromQL text of a dashboard: panel targets, annotations, template variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def family(sample_name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", sample_name)


async def test_the_grafana_dashboard_uses_every_metric_and_only_those(
    tmp_path: Path, backend_factory: Factory, runtimes: list[Runtime]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "doproxy" and dashboard["panels"]
    used = {m for q in queries(dashboard) for m in re.findall(r"\bdoproxy_[a-z_]+", q)}
    # Everything there is to expose: a running proxy with a backend, and an autoscaler that
    # decided once (dry-run: it decides, never acts).
    backend = await backend_factory(answering(200, b"ok"))
    cfg = write_config(tmp_path, [backend.port], "[provisioning]\ndry-run = true\n")
    rt = await start_runtime(cfg, runtimes)
    rt.autoscaler = Autoscaler(rt, DownProvider())
    await rt.autoscaler.tick()
    exposed = names(scrape(Metrics(rt)))
    assert used <= exposed, used - exposed
    assert {family(n) for n in used} == {family(n) for n in exposed}
