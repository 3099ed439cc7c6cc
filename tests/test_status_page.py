"""The status page (issue 11) in a real browser: Playwright driving Debian's chromium against a
running doproxy with two real backends, its admin API over real sockets.

Every plotted point names the /api/status answer it was drawn from (data-t is that answer's
`time`), so the test records the answers the page itself received and checks each point against
its own answer exactly, rather than hoping a second request sees the same numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from doproxy.admin.server import addr_path, token_path
from doproxy.config import load_settings
from doproxy.core.inventory_model import InventoryEntry
from doproxy.inventory import load_inventory, update_inventory
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import RawBackend, RequestReader, get, request, respond

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"

# A backend name is user-controlled: the page must show it as text, never run it.
HOSTILE = '<img src=x onerror="window.pwned=1">web-<b>1</b>'
# When set, the screenshot is also written where the README shows it. Not by default: a test
# run should not rewrite a committed file (make test runs the suite twice).
SCREENSHOT_ENV = "DOPROXY_UPDATE_SCREENSHOT"
README_SCREENSHOT = Path(__file__).parent.parent / "docs" / "img" / "status-page.png"


class Flaky:
    """A keep-alive backend whose health path answers 503 while `sick` is set."""

    def __init__(self) -> None:
        self.sick = False

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: RawBackend
    ) -> None:
        rr = RequestReader(reader)
        while (req := await rr.next()) is not None:
            if req.url == b"/health" and self.sick:
                writer.write(respond(503, b"sick"))
            else:
                writer.write(respond(200, b"ok"))
            await writer.drain()


CONFIG = """\
bind = "127.0.0.1:0"
watch-config = false
inventory-file = "inventory.toml"

[health]
path = "/health"
interval = "200ms"
down-interval = "200ms"
rise = 1
fall = 1
jitter = 0
# Generous: on a busy machine a 0.25 s check of a healthy backend can time out, and the flaps
# of the healthy backends would then be marked too.
timeout = "3s"

[admin]
bind = "127.0.0.1:0"
"""


def inventory(a: int, b: int) -> str:
    # web-1 records its droplet's price; web-2 (a 2015 entry) has none, and no provisioner
    # runs to tell it.
    return "".join(
        f'[[droplet]]\nid = {p}\nname = "web-{i}"\nserver-host = "127.0.0.1:{p}"\n'
        + ("price-hourly = 0.00893\n" if i == 1 else "")
        for i, p in enumerate((a, b), 1)
    )


# The decision list as the page draws it for an autoscaler answer (rendered and read in one
# go, so the page's own polling cannot redraw in between).
DECISION_JS = """() => {
  renderScaler({enabled: true, paused: false, mode: "threshold", dry_run: false,
                "min-backends": 1, "max-backends": 4, config: {}, overrides: {},
                desired: 3, actual: 2, signal: {}, last_error: null, backoff: 0,
                cost: {per_hour: 0.01786, machines: 2, unpriced: 0, new_backend: 0.00893,
                       "max-cost-per-hour": 0.02},
                decisions: [{at: "2026-11-30T04:00:00.000000+00:00", action: "up",
                             reason: "scale up 2→3: ...", size_before: 2, size_after: 3,
                             acted: true, cost_before: 0.01786, cost_after: 0.02679}]});
  return [document.querySelector("#decisions li .kind").textContent,
          document.querySelector('#scaler dd[data-field="pool cost"]').textContent];
}"""


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    """Poll an async or sync condition until it holds (a bound, not a sleep-as-readiness)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                ok = predicate()
                if asyncio.iscoroutine(ok):
                    ok = await ok
                if ok:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def backends() -> AsyncIterator[tuple[RawBackend, RawBackend, Flaky]]:
    flaky = Flaky()
    a = await RawBackend(Flaky()).start()
    b = await RawBackend(flaky).start()
    yield a, b, flaky
    await a.close()
    await b.close()


@pytest.fixture
async def runtime(
    tmp_path: Path, backends: tuple[RawBackend, RawBackend, Flaky]
) -> AsyncIterator[Runtime]:
    a, b, _ = backends
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(CONFIG)
    (tmp_path / "inventory.toml").write_text(inventory(a.port, b.port))
    rt = Runtime(load_settings(cfg), load_inventory(tmp_path / "inventory.toml"), cfg)
    await rt.start()
    yield rt
    await rt.stop()


def value_of(series: str, answer: dict[str, Any]) -> Any:
    """What the page plots for `series`, from one /api/status answer (the autoscaler is off:
    no desired size; actual is what the inventory keeps active)."""
    listener = answer["listener"]
    return {
        "avg": lambda: listener["latency"]["average"],
        "p95": lambda: listener["latency"]["p95"],
        "rps": lambda: listener["requests_per_second"],
        "actual": lambda: sum(1 for b in answer["backends"] if b["state"] == "active"),
        "serving": lambda: sum(1 for b in answer["backends"] if b["eligible"]),
    }[series]()


POINTS_JS = """els => els.map(e => [e.dataset.series, +e.dataset.t, e.dataset.value,
                                    parseFloat(e.getAttribute('cy'))])"""
ROWS_JS = """els => els.map(tr => [tr.dataset.id,
    tr.querySelector('td[data-col=name]').textContent,
    tr.querySelector('td[data-col=state]').textContent])"""


class Watched:
    """The page in chromium, and what it did: the /api/status answers it got (by `time`), any
    request beyond its own origin, and every console error."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url
        self.answers: dict[float, dict[str, Any]] = {}
        self.foreign: list[str] = []
        self.problems: list[str] = []
        page.on("response", self._response)
        page.on("request", self._request)
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(str(e)))

    async def _response(self, resp: Any) -> None:
        if resp.url.endswith("/api/status") and resp.ok:
            body = await resp.json()
            self.answers[body["time"]] = body

    def _request(self, req: Any) -> None:
        if not req.url.startswith(self.url) and not req.url.startswith("data:"):
            self.foreign.append(req.url)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self.problems.append(msg.text)

    async def points(self) -> list[tuple[str, float, str, float]]:
        """Every plotted point: (series, data-t, data-value, cy)."""
        found = await self.page.locator("circle[data-series]").evaluate_all(POINTS_JS)
        return [(s, t, v, cy) for s, t, v, cy in found]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"no {CHROMIUM}: `make test` installs Debian's chromium when run as root "
            "(scripts/debian-deps.sh); otherwise: sudo apt-get install chromium"
        )
    pw_api = pytest.importorskip(
        "playwright.async_api", reason="playwright is in the dev extra: pip install -e '.[dev]'"
    )
    async with pw_api.async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=CHROMIUM,  # Debian's: never a browser downloaded from a CDN
            headless=True,
            # Chromium's sandbox refuses to start as root (as `make test` may run).
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def traffic(runtime: Runtime) -> AsyncIterator[None]:
    """Steady requests through the proxy, so the plots have latency and req/s to show."""
    assert runtime.server is not None
    port = runtime.server.addresses[0][1]
    stop = asyncio.Event()

    async def send() -> None:
        while not stop.is_set():
            await request(port, get("/hello"))
            await asyncio.sleep(0.01)  # pacing, not waiting for readiness

    task = asyncio.get_running_loop().create_task(send())
    yield
    stop.set()
    await task


async def check_points(watched: Watched) -> set[str]:
    """Each plotted point is the value of the /api/status answer its data-t names, exactly,
    and drawn where its value says. Returns the series seen."""
    points = await watched.points()
    await until(lambda: all(t in watched.answers for _, t, _, _ in points), "the answers")
    for s, t, v, _ in points:
        assert json.loads(v) == value_of(s, watched.answers[t]), (s, t)
    series = {s for s, *_ in points}
    for s in series:  # a larger value is never drawn lower
        mine = sorted((float(v), cy) for k, _, v, cy in points if k == s)
        assert all(c1 >= c2 for (_, c1), (_, c2) in itertools.pairwise(mine))
    return series


async def test_status_page_in_chromium(
    runtime: Runtime,
    backends: tuple[RawBackend, RawBackend, Flaky],
    browser: Any,
    traffic: None,
    tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    # Playwright's default of 5 s is short for a cold browser on a busy 2-core machine (the
    # first run after a change failed that way once): every wait here may take up to 20 s.
    expect.set_options(timeout=20_000)
    a, b, flaky = backends
    inv = runtime.inventory_path
    url = "http://" + addr_path(inv).read_text().strip()
    session = aiohttp.ClientSession()

    async def api(path: str) -> Any:
        async with session.get(url + path) as r:
            assert r.status == 200
            return await r.json()

    page = await browser.new_page(viewport={"width": 1400, "height": 700})
    watched = Watched(page, url)
    try:
        await page.goto(url)

        # The table is /api/status's backends.
        rows = page.locator("#backends tbody tr[data-id]")
        await expect(rows).to_have_count(2)
        status = await api("/api/status")
        want = [[x["id"], x["name"], x["state"]] for x in status["backends"]]
        assert await rows.evaluate_all(ROWS_JS) == want
        assert [name for _, name, _ in want] == ["web-1", "web-2"]

        # What the pool costs, and what a decision changed in it.
        await expect(page.locator('#scaler dd[data-field="pool cost"]')).to_have_text(
            "$0.0089/h for 2 machine(s) (1 without a known price, not counted)"
        )
        assert status["cost"]["per_hour"] == 0.00893
        assert await page.evaluate(DECISION_JS) == [
            "up 2→3, +$0.0089/h",
            "$0.018/h for 2 machine(s) · max-cost-per-hour $0.02/h",
        ]

        # The plotted points are the answers the page got, exactly.
        async def traffic_plotted() -> bool:
            points = await watched.points()
            rps = any(s == "rps" and float(v) > 0 for s, _, v, _ in points)
            return rps and any(s == "p95" for s, *_ in points)

        await until(traffic_plotted, "a point with traffic on the plots")
        series = await check_points(watched)
        assert {"avg", "p95", "rps", "actual", "serving"} <= series
        assert "desired" not in series  # no autoscaler, no desired size
        latest = max(watched.answers)

        async def latest_plotted() -> bool:
            return any(s == "rps" and t == latest for s, t, _, _ in await watched.points())

        await until(latest_plotted, "the latest answer on the plot")

        # Health transitions are marked on the time axis, at their events' times.
        since = (await api("/api/events"))["last_id"]

        async def transition(level: str) -> dict[str, Any] | None:
            """web-2's first health event of this level since the flaps began."""
            found = (await api(f"/api/events?since={since}"))["events"]
            return next(
                (
                    e
                    for e in found
                    if e["kind"] == "health"
                    and e["level"] == level
                    and e.get("data", {}).get("backend") == "web-2"
                ),
                None,
            )

        async def marked(cls: str, t: float) -> bool:
            times = await page.locator(f"#plot-rps line.marker.{cls}").evaluate_all(
                "els => els.map(e => +e.dataset.t)"
            )
            return t in times

        flaky.sick = True
        await until(lambda: transition("warning"), "web-2 reported down")
        went_down = await transition("warning")
        assert went_down is not None
        await until(lambda: marked("m-health-down", went_down["time"]), "the down mark")
        flaky.sick = False
        await until(lambda: transition("info"), "web-2 reported up")
        came_up = await transition("info")
        assert came_up is not None and came_up["id"] > went_down["id"]
        await until(lambda: marked("m-health-up", came_up["time"]), "the up mark")
        health = [went_down, came_up]
        for e in health:  # and listed, from the event stream
            await expect(page.locator(f'#events li[data-id="{e["id"]}"]')).to_contain_text(
                e["message"]
            )

        # Drain: refused without a token and with a wrong one (the API's 401 shown), done with
        # the right one.
        row_a = page.locator(f'#backends tr[data-id="{a.port}"]')
        drain = row_a.locator("button[data-action=drain]")
        message = page.locator("#message")
        await drain.click()
        await expect(message).to_contain_text("set the admin token first")
        await page.fill("#token", "not-the-token")
        await page.click("#token-save")
        await drain.click()
        await expect(message).to_contain_text("unauthorized: send Authorization: Bearer")
        await expect(message).to_have_class("error")
        assert load_inventory(inv)[0].state == "active"
        await page.fill("#token", token_path(inv).read_text().strip())
        await page.click("#token-save")
        await drain.click()
        await expect(message).to_have_class("ok")
        state = row_a.locator("td[data-col=state]")
        await expect(state).to_have_text(re.compile("^(draining|disabled)$"))
        now = {x["id"]: x for x in (await api("/api/status"))["backends"]}
        assert now[str(a.port)]["state"] in ("draining", "disabled")
        # Nothing in flight: the drain finishes, and the page and the API both say so.
        await expect(state).to_have_text("disabled", timeout=10_000)

        async def api_disabled() -> bool:
            found = [x["state"] for x in (await api("/api/status"))["backends"]]
            return found == ["disabled", "active"]

        await until(api_disabled, "the API to say disabled")
        await expect(row_a.locator("button[data-action=enable]")).to_be_visible()
        await expect(drain).to_be_hidden()
        await expect(page.locator("#events li[data-kind=membership]").first).to_contain_text(
            "drain (admin API)"
        )
        # The pool plot follows: one backend serving, and every point still exact.
        await until(
            lambda: page.locator("circle[data-series=serving][data-value='1']").count(),
            "the pool plot to show one backend serving",
        )
        await check_points(watched)

        shot = await page.screenshot(full_page=True)
        (tmp_path / "status-page.png").write_bytes(shot)
        if os.environ.get(SCREENSHOT_ENV):
            README_SCREENSHOT.write_bytes(shot)

        # A hostile name (names are user-controlled) is shown as text everywhere, never run:
        # rename web-2, enable web-1 and drain web-2 from the page.
        def rename(entries: list[InventoryEntry]) -> list[InventoryEntry]:
            return [
                e.model_copy(update={"name": HOSTILE}) if e.name == "web-2" else e for e in entries
            ]

        await asyncio.to_thread(update_inventory, inv, rename)
        assert await runtime.apply_inventory()
        row_b = page.locator(f'#backends tr[data-id="{b.port}"]')
        await expect(row_b.locator("td[data-col=name]")).to_have_text(HOSTILE)
        await row_a.locator("button[data-action=enable]").click()
        await expect(state).to_have_text("active")
        await row_b.locator("button[data-action=drain]").click()
        await expect(message).to_have_text(re.compile(f"^drain {re.escape(HOSTILE)}: done"))
        await expect(page.locator("#events li[data-kind=membership]").first).to_contain_text(
            f"{HOSTILE}: drain (admin API)"
        )
        assert await page.evaluate("window.pwned") is None
        assert await page.locator("body img, body b").count() == 0
    finally:
        await page.close()
        await session.close()

    # Nothing from anywhere else (it works offline), and nothing the page or its CSP complained
    # of but the one 401 the wrong token earned.
    assert watched.foreign == []
    assert watched.problems == [
        "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]


async def test_the_page_is_served_self_contained(runtime: Runtime) -> None:
    """No browser needed: the page is served with its CSP and names nothing elsewhere."""
    url = "http://" + addr_path(runtime.inventory_path).read_text().strip()
    async with aiohttp.ClientSession() as s, s.get(url + "/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        page = await r.text()
    # The only absolute URL is SVG's namespace, an identifier that is never fetched.
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]
    # Text from the API goes in as text: nothing in the script parses strings as HTML.
    assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write", page)


@pytest.mark.timeout(120)
async def test_the_page_shows_a_rollout_in_progress_and_its_canary(
    tmp_path: Path, browser: Any
) -> None:
    """A rollout with the local provider (real backend processes): the page's Rollout panel
    shows its canary phase, the machines and the window being watched, and the backends table
    marks the canary with its share; after an abort, the panel shows it rolled back."""
    from playwright.async_api import expect

    from doproxy.provisioning import Spec
    from tests.test_rollouts import BACKEND, running
    from tests.test_rollouts import config as rollout_config

    expect.set_options(timeout=20_000)  # a cold browser on a busy machine (see above)
    # A canary window long enough that a busy machine checks the page well inside it (the
    # abort ends it early, so the length costs nothing).
    async with running(rollout_config(tmp_path, canary_time="60s")) as (rt, scaler, _port):
        assert rt.admin is not None
        url = rt.admin.url()
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        watched = Watched(page, url.rstrip("/"))
        panel = page.locator("#rollout")

        def field(name: str) -> Any:
            return panel.locator(f'dd[data-field="{name}"]')

        try:
            await page.goto(url)
            await expect(field("rollout")).to_have_text("no rollout in progress")
            await expect(field("pool spec")).to_have_text("the config's spec")
            await expect(page.locator("#verdicts li.empty")).to_have_text("no rollouts yet")

            command = BACKEND + " --service-time 0.001"
            begun = await scaler.rollouts.start(Spec(command=command), "the test")
            # The canary serves and is being watched.
            await wait_for(lambda: scaler.rollouts.window is not None, timeout=30)
            await expect(panel).to_have_attribute("data-phase", "canary")
            await expect(field("rollout")).to_have_text(begun["id"])
            await expect(field("phase")).to_have_text(re.compile("^canary: "))
            await expect(field("new spec")).to_have_text(f"command {command}")
            await expect(field("machines")).to_have_text("2 old · 1 new · target 2")
            await expect(field("reason")).to_contain_text("started by the test")
            await expect(field("pool spec")).to_have_text("the config's spec")
            watching = field("watching")
            await expect(watching).to_have_text(
                re.compile(r"^canary window: (1m )?\d+s left of 1m 0s$")
            )
            await expect(page.locator("#verdicts li.empty")).to_have_text("no window judged yet")

            # The seconds left count down as the page polls.
            def left(text: str | None) -> int:
                found = re.search(r"(?:(\d+)m )?(\d+)s left", text or "")
                return int(found[1] or 0) * 60 + int(found[2]) if found else -1

            first = left(await watching.text_content())
            assert 0 < first <= 60

            async def counted_down() -> bool:
                return 0 <= left(await watching.text_content()) < first

            await until(counted_down, "the window's seconds left to count down")

            # The canary is marked in the backends table with its share; the others are not.
            canaries = [b for b in rt.backends if b.entry.canary_weight]
            assert len(canaries) == 1 and canaries[0].entry.canary_weight == 30
            await expect(page.locator("#backends tbody tr[data-id]")).to_have_count(3)
            marked = page.locator("#backends tbody tr[data-canary]")
            await expect(marked).to_have_count(1)
            await expect(marked).to_have_attribute("data-id", canaries[0].key)
            await expect(marked.locator("td[data-col=state]")).to_have_text("active canary 30%")
            await expect(marked.locator("span.canary")).to_have_text("canary 30%")

            # Aborted: rolled back, and the panel shows the one that ended.
            await scaler.rollouts.abort("the test")
            await wait_for(lambda: not scaler.rollouts.active, timeout=30)
            await expect(panel).to_have_attribute("data-phase", "none")
            await expect(field("rollout")).to_have_text("no rollout in progress")
            await expect(field("last")).to_have_text(re.compile(f"^{begun['id']}: rolled back"))
            await expect(field("last")).to_have_class("no")
            await expect(field("reason")).to_contain_text("aborted by the test")
            await expect(marked).to_have_count(0)
            await expect(page.locator("#backends tbody tr[data-id]")).to_have_count(2)
            # Its phase changes arrived as events over the stream.
            await expect(page.locator("#events li[data-kind=rollout]").first).to_contain_text(
                f"rollout {begun['id']}: rolled-back"
            )
        finally:
            await page.close()
        assert watched.foreign == []
        assert watched.problems == []
