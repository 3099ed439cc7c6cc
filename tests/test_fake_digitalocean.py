"""The fake DigitalOcean API: it speaks the real API (checked against the OpenAPI spec with
openapi-core), keeps state, moves droplets and actions along in time, injects faults and, when
asked, runs a real demo backend on each droplet's loopback address.

The client here is a plain aiohttp.ClientSession, so these tests pin the fake itself down; the
provider's own tests drive it through pydo.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from doproxy.testing.fake_digitalocean import (
    SPEC_PATH,
    FakeDigitalOcean,
    load_spec,
    validate_exchange,
)

TOKEN = "fake-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RATELIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")

# Everything our provider sends on create (doproxy.providers.digitalocean).
FULL_CREATE = {
    "region": "nyc3",
    "size": "s-1vcpu-1gb",
    "image": "ubuntu-22-04-x64",
    "ssh_keys": [289794, "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"],
    "backups": False,
    "ipv6": True,
    "monitoring": True,
    "tags": ["doproxy", "web"],
    "user_data": "#cloud-config\nruncmd:\n  - touch /test.txt\n",
    "vpc_uuid": "760e09ef-dc84-11e8-981e-3cfdfeaae000",
}

MakeFake = Callable[..., Awaitable[FakeDigitalOcean]]


@pytest.fixture
async def make_fake() -> AsyncIterator[MakeFake]:
    started: list[FakeDigitalOcean] = []

    async def _make(**kw: Any) -> FakeDigitalOcean:
        fake = FakeDigitalOcean(**kw)
        await fake.start()
        started.append(fake)
        return fake

    yield _make
    for fake in started:
        await fake.close()


def session(fake: FakeDigitalOcean, token: str = TOKEN) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(fake.url, headers={"Authorization": f"Bearer {token}"})


async def call(
    s: aiohttp.ClientSession, method: str, path: str, **kw: Any
) -> tuple[int, Any, Mapping[str, str]]:
    async with s.request(method, path, **kw) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None), r.headers


async def create(s: aiohttp.ClientSession, name: str, **overrides: Any) -> dict[str, Any]:
    status, body, _ = await call(
        s, "POST", "/v2/droplets", json={"name": name, **FULL_CREATE, **overrides}
    )
    assert status == 202, body
    droplet: dict[str, Any] = body["droplet"]
    return droplet


async def poll(
    check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Poll an async condition until it holds (a deadline, not a sleep-as-readiness)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def route_of(method: str, path: str) -> str:
    """The endpoint template a request hit: ids replaced by placeholders."""
    parts = ["{id}" if p.isdigit() else p for p in path.strip("/").split("/")]
    if parts[:2] == ["v2", "tags"] and len(parts) == 3:
        parts[2] = "{name}"
    return f"{method} /{'/'.join(parts)}"


# --- the contract test ------------------------------------------------------------------------


async def test_contract_every_endpoint_and_error(make_fake: MakeFake) -> None:
    """Drive every endpoint our provider uses and every error it must handle; every request and
    every response validates against DigitalOcean's OpenAPI spec."""
    fake = await make_fake(token=TOKEN)
    async with session(fake) as s:
        # Tags: create (idempotent) and get.
        for _ in range(2):
            status, body, _ = await call(s, "POST", "/v2/tags", json={"name": "doproxy"})
            assert status == 201
            assert body["tag"]["name"] == "doproxy"
        status, body, _ = await call(s, "GET", "/v2/tags/doproxy")
        assert status == 200 and body["tag"]["resources"]["count"] == 0

        # Five droplets with the provider's full body, one of them without the "web" tag.
        made = [await create(s, f"web-{i}") for i in range(4)]
        made.append(await create(s, "db-1", tags=["doproxy", "db"]))
        assert [d["status"] for d in made] == ["new"] * 5
        assert fake.created_count == 5
        status, body, _ = await call(s, "GET", "/v2/tags/doproxy")
        assert body["tag"]["resources"]["droplets"]["count"] == 5

        # List across pages by following links.pages.next, as the provider does.
        seen: list[int] = []
        url: str | None = "/v2/droplets?per_page=2&tag_name=doproxy"
        pages = 0
        while url is not None:
            status, body, _ = await call(s, "GET", url)
            assert status == 200
            assert body["meta"]["total"] == 5
            seen += [d["id"] for d in body["droplets"]]
            pages += 1
            url = body["links"].get("pages", {}).get("next")
            if url is not None:
                assert url.startswith(fake.url + "/v2/droplets?")
        assert pages == 3
        assert seen == [d["id"] for d in made]

        # Filters: by tag and by name.
        status, body, _ = await call(s, "GET", "/v2/droplets", params={"tag_name": "web"})
        assert [d["name"] for d in body["droplets"]] == ["web-0", "web-1", "web-2", "web-3"]
        assert body["links"] == {} and body["meta"]["total"] == 4
        status, body, _ = await call(s, "GET", "/v2/droplets", params={"name": "web-2"})
        assert [d["id"] for d in body["droplets"]] == [made[2]["id"]]

        # Get one: active_after=0, so it is active and has its loopback addresses now.
        first = made[0]["id"]
        status, body, _ = await call(s, "GET", f"/v2/droplets/{first}")
        droplet = body["droplet"]
        assert status == 200 and droplet["status"] == "active"
        assert {(n["type"], n["ip_address"]) for n in droplet["networks"]["v4"]} == {
            ("private", "127.0.1.1"),
            ("public", "127.0.2.1"),
        }
        assert droplet["tags"] == ["doproxy", "web"]
        assert droplet["vpc_uuid"] == FULL_CREATE["vpc_uuid"]

        # A reboot action, then the action read both ways.
        status, body, _ = await call(
            s, "POST", f"/v2/droplets/{first}/actions", json={"type": "reboot"}
        )
        assert status == 201 and body["action"]["status"] == "in-progress"
        action_id = body["action"]["id"]
        status, body, _ = await call(s, "GET", f"/v2/actions/{action_id}")
        assert status == 200 and body["action"]["status"] == "completed"
        assert body["action"]["resource_id"] == first
        status, body, _ = await call(s, "GET", f"/v2/droplets/{first}/actions/{action_id}")
        assert status == 200 and body["action"]["id"] == action_id

        # Delete, and it is gone.
        status, body, headers = await call(s, "DELETE", f"/v2/droplets/{made[4]['id']}")
        assert status == 204 and body is None
        assert "content-type" in headers
        status, body, _ = await call(s, "GET", f"/v2/droplets/{made[4]['id']}")
        assert status == 404 and body["id"] == "not_found"

        # Errors.
        async with session(fake, token="wrong") as bad:
            status, body, _ = await call(bad, "GET", "/v2/droplets")
        assert status == 401 and body["id"] == "unauthorized" and body["message"]
        status, body, _ = await call(s, "GET", "/v2/droplets/999999")
        assert status == 404 and body["id"] == "not_found"
        status, body, _ = await call(s, "GET", f"/v2/droplets/{first}/actions/999999")
        assert status == 404
        status, body, _ = await call(s, "GET", "/v2/tags/nosuchtag")
        assert status == 404
        # A body the spec allows but DigitalOcean refuses: user_data over 64 KiB.
        status, body, _ = await call(
            s, "POST", "/v2/droplets", json={"name": "big", **FULL_CREATE, "user_data": "x" * 70000}
        )
        assert status == 422 and body["id"] == "unprocessable_entity"
        fake.fail_next("GET", "/v2/droplets", 429, retry_after=3)
        status, body, headers = await call(s, "GET", "/v2/droplets")
        assert status == 429 and body["id"] == "too_many_requests"
        assert headers["Retry-After"] == "3" and headers["ratelimit-remaining"] == "0"
        fake.fail_next("POST", "/v2/droplets", 500)
        status, body, _ = await call(s, "POST", "/v2/droplets", json={"name": "x", **FULL_CREATE})
        assert status == 500 and body["id"] == "server_error"

    assert fake.violations == [], fake.summary()
    assert fake.exchanges and all(ex.valid for ex in fake.exchanges), fake.summary()
    for ex in fake.exchanges:
        for h in RATELIMIT_HEADERS:
            assert ex.response_headers[h].isdigit(), (ex.method, ex.path, h)
    covered = {route_of(ex.method, ex.path) for ex in fake.exchanges}
    assert covered >= {
        "POST /v2/droplets",
        "GET /v2/droplets",
        "GET /v2/droplets/{id}",
        "DELETE /v2/droplets/{id}",
        "POST /v2/droplets/{id}/actions",
        "GET /v2/droplets/{id}/actions/{id}",
        "GET /v2/actions/{id}",
        "POST /v2/tags",
        "GET /v2/tags/{name}",
    }


async def test_multi_create_and_gpu_filter(make_fake: MakeFake) -> None:
    fake = await make_fake()
    async with session(fake) as s:
        status, body, _ = await call(
            s, "POST", "/v2/droplets", json={"names": ["a-1", "a-2"], **FULL_CREATE}
        )
        assert status == 202
        assert [d["name"] for d in body["droplets"]] == ["a-1", "a-2"]
        assert len(body["links"]["actions"]) == 2
        status, body, _ = await call(s, "GET", "/v2/droplets", params={"type": "gpus"})
        assert body["droplets"] == [] and body["meta"]["total"] == 0
    assert fake.violations == [], fake.summary()


async def test_pagination_links_and_limits(make_fake: MakeFake) -> None:
    fake = await make_fake()
    async with session(fake) as s:
        for i in range(5):
            await create(s, f"p-{i}")
        status, body, _ = await call(
            s, "GET", "/v2/droplets", params={"page": "2", "per_page": "2"}
        )
        pages = body["links"]["pages"]
        assert set(pages) == {"first", "prev", "next", "last"}
        assert "page=3" in pages["next"] and "page=3" in pages["last"] and "page=1" in pages["prev"]
        status, body, _ = await call(
            s, "GET", "/v2/droplets", params={"page": "3", "per_page": "2"}
        )
        assert len(body["droplets"]) == 1 and "next" not in body["links"]["pages"]
        # Past the end: an empty page, as DigitalOcean answers.
        status, body, _ = await call(
            s, "GET", "/v2/droplets", params={"page": "9", "per_page": "2"}
        )
        assert status == 200 and body["droplets"] == []
    assert fake.violations == [], fake.summary()


# --- the validation itself --------------------------------------------------------------------


async def test_validator_catches_bad_responses_and_requests(make_fake: MakeFake) -> None:
    """The checker is not a rubber stamp: a wrong response or request is reported, readably."""
    fake = await make_fake()
    async with session(fake) as s:
        example = await create(s, "example")
    headers = {h: "1" for h in RATELIMIT_HEADERS}

    def _droplet_response(**changes: Any) -> bytes:
        return json.dumps({"droplet": {**example, **changes}}).encode()

    def response_problems(status: int, body: bytes, method: str = "GET") -> list[str]:
        path = "/v2/droplets/1" if method == "GET" else "/v2/droplets"
        req, resp = validate_exchange(
            method,
            path,
            headers=AUTH,
            body=json.dumps({"name": "a", "size": "s", "image": "i"}).encode()
            if method == "POST"
            else None,
            status=status,
            response_headers=headers,
            response_body=body,
        )
        assert req == []
        return resp

    # The fake's own droplet validates ...
    assert response_problems(200, _droplet_response()) == []
    # ... and a droplet with a status DigitalOcean never reports does not.
    problems = response_problems(200, _droplet_response(status="running"))
    assert problems and "'running' is not one of" in problems[0]
    assert problems[0].count("status") >= 1
    # 'off' is in the spec's enum, so it validates.
    assert response_problems(200, _droplet_response(status="off")) == []
    # A missing required field, a wrong type, an error body without its id.
    missing = {k: v for k, v in example.items() if k != "networks"}
    problems = response_problems(200, json.dumps({"droplet": missing}).encode())
    assert any("'networks' is a required property" in p for p in problems)
    problems = response_problems(200, _droplet_response(id="1001"))
    assert any("is not of type 'integer'" in p and "droplet/id" in p for p in problems)
    problems = response_problems(404, json.dumps({"message": "gone"}).encode())
    assert any("'id' is a required property" in p for p in problems)
    # A create response must carry links.
    problems = response_problems(202, json.dumps({"droplet": example}).encode(), method="POST")
    assert problems

    # Requests: a create without size, a bad droplet name, no token, an unknown path.
    req, _ = validate_exchange(
        "POST", "/v2/droplets", headers=AUTH, body=json.dumps({"name": "a", "image": "i"}).encode()
    )
    assert req and "'size' is a required property" in req[0]
    req, _ = validate_exchange(
        "POST",
        "/v2/droplets",
        headers=AUTH,
        body=json.dumps({"name": "no spaces", "size": "s", "image": "i"}).encode(),
    )
    assert req
    req, _ = validate_exchange("GET", "/v2/droplets", headers={})
    assert req and "bearer_auth" in req[0]
    req, _ = validate_exchange("GET", "/v2/droplets", headers=AUTH, query={"per_page": "500"})
    assert req and "per_page" in req[0]
    req, _ = validate_exchange("GET", "/v2/kubernetes/clusters", headers=AUTH)
    assert req and "not found" in req[0].lower()


async def test_fake_reports_what_its_clients_get_wrong(make_fake: MakeFake) -> None:
    """Spec-invalid requests are still answered (as DigitalOcean would), and each is reported."""
    fake = await make_fake()
    async with session(fake) as s:
        status, body, _ = await call(s, "POST", "/v2/droplets", json={"name": "x", "image": "i"})
        assert status == 422 and "size" in body["message"]
        status, body, _ = await call(s, "GET", "/v2/nowhere")
        assert status == 404 and body["id"] == "not_found"
        status, body, _ = await call(s, "POST", "/v2/tags", json={"name": "has space"})
        assert status == 400 and body["root_causes"]
        # In the spec, but not used by doproxy, so not implemented: said loudly.
        status, _, _ = await call(s, "GET", "/v2/tags")
        assert status == 404
    async with aiohttp.ClientSession(fake.url) as anonymous:
        status, body, _ = await call(anonymous, "GET", "/v2/droplets")
        assert status == 401 and body["id"] == "unauthorized"
    v = fake.violations
    assert len(v) == 5, fake.summary()
    assert "POST /v2/droplets: request" in v[0] and "'size' is a required property" in v[0]
    assert "GET /v2/nowhere" in v[1] and "not found" in v[1].lower()
    assert "POST /v2/tags: request" in v[2]
    assert "not implemented by the fake" in v[3]
    assert "GET /v2/droplets: request" in v[4] and "bearer_auth" in v[4]
    assert [ex.valid for ex in fake.exchanges] == [False] * 5
    # The responses themselves were fine where the spec knows the path.
    assert all(ex.response_errors == [] for ex in fake.exchanges)


def test_bundled_spec_is_valid_openapi() -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.readers import read_from_filename

    spec, _ = read_from_filename(str(SPEC_PATH))
    validate(spec)
    assert load_spec(SPEC_PATH) is load_spec(SPEC_PATH)  # parsed once per process


# sha256 of ../shared/digitalocean/openapi-subset.yaml, the spec we were given: the bundled copy
# (CI has no ../shared) must stay byte for byte the same, or the contract test proves nothing.
SHARED_SPEC_SHA256 = "45584212b604b27f459b10fff7478e2ae56190866cc200d649c1c69ecfc7b73e"


def test_bundled_spec_is_the_shared_one() -> None:
    import hashlib

    bundled = (SPEC_PATH.parent / "digitalocean-openapi-subset.yaml").read_bytes()
    assert hashlib.sha256(bundled).hexdigest() == SHARED_SPEC_SHA256
    assert (SPEC_PATH.parent / "LICENSE-openapi").read_text().strip()


# --- time -------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
async def test_new_becomes_active_after_active_after(make_fake: MakeFake) -> None:
    fake = await make_fake(active_after=0.2)
    async with session(fake) as s:
        t0 = time.monotonic()
        droplet = await create(s, "slow")
        did = droplet["id"]
        assert droplet["networks"]["v4"] == []
        _status, body, _ = await call(s, "GET", f"/v2/droplets/{did}")
        assert body["droplet"]["status"] == "new" and body["droplet"]["networks"]["v4"] == []

        async def active() -> bool:
            _, body, _ = await call(s, "GET", f"/v2/droplets/{did}")
            return bool(body["droplet"]["status"] == "active")

        await poll(active, timeout=5)
        assert time.monotonic() - t0 >= 0.2
        assert fake.droplets[did]["networks"]["v4"][0]["ip_address"] == "127.0.1.1"
    assert fake.violations == [], fake.summary()


async def test_state_machine_on_an_injected_clock(make_fake: MakeFake) -> None:
    clock = ManualClock()
    fake = await make_fake(active_after=10, action_after=5, clock=clock)
    async with session(fake) as s:
        droplet = await create(s, "clocked")
        did = droplet["id"]
        status, body, _ = await call(s, "POST", "/v2/actions/1")  # no such route: a 404
        # A new droplet has its create action pending: no other action yet, as at DigitalOcean.
        status, body, _ = await call(
            s, "POST", f"/v2/droplets/{did}/actions", json={"type": "reboot"}
        )
        assert status == 422 and body["message"] == "Droplet already has a pending event."
        clock.now += 9.9
        assert fake.droplets[did]["status"] == "new"
        clock.now += 0.1
        assert fake.droplets[did]["status"] == "active"
        create_action = min(fake.actions)
        assert fake.actions[create_action]["type"] == "create"
        assert fake.actions[create_action]["status"] == "completed"

        status, body, _ = await call(
            s, "POST", f"/v2/droplets/{did}/actions", json={"type": "reboot"}
        )
        assert status == 201
        aid = body["action"]["id"]
        status, body, _ = await call(
            s, "POST", f"/v2/droplets/{did}/actions", json={"type": "reboot"}
        )
        assert status == 422
        clock.now += 4.9
        _, body, _ = await call(s, "GET", f"/v2/actions/{aid}")
        assert body["action"]["status"] == "in-progress" and body["action"]["completed_at"] is None
        clock.now += 0.1
        _, body, _ = await call(s, "GET", f"/v2/droplets/{did}/actions/{aid}")
        assert body["action"]["status"] == "completed" and body["action"]["completed_at"]

        # shutdown leaves it off, power_on brings it back.
        for kind, after in (("shutdown", "off"), ("power_on", "active")):
            status, body, _ = await call(
                s, "POST", f"/v2/droplets/{did}/actions", json={"type": kind}
            )
            assert status == 201
            clock.now += 5
            _, body, _ = await call(s, "GET", f"/v2/droplets/{did}")
            assert body["droplet"]["status"] == after

        status, body, _ = await call(
            s, "POST", f"/v2/droplets/{did}/actions", json={"type": "resize"}
        )
        assert status == 422
        status, body, _ = await call(s, "POST", f"/v2/droplets/{did}/actions", json={})
        assert status == 422
    # The POST to /v2/actions/1 and the empty action body are the only spec violations.
    assert len(fake.violations) == 2, fake.summary()


# --- faults -----------------------------------------------------------------------------------


async def test_fault_injection(make_fake: MakeFake) -> None:
    fake = await make_fake()
    async with session(fake) as s:
        # The duplicate trap: the droplet is made, the answer is a 500.
        fake.fail_next("POST", "/v2/droplets", 500, after_effect=True)
        status, body, _ = await call(
            s, "POST", "/v2/droplets", json={"name": "trap", **FULL_CREATE}
        )
        assert status == 500 and body == {
            "id": "server_error",
            "message": body["message"],
            "request_id": body["request_id"],
        }
        assert fake.created_count == 1 and len(fake.droplets) == 1
        _, body, _ = await call(
            s, "GET", "/v2/droplets", params={"name": "trap", "tag_name": "doproxy"}
        )
        assert [d["name"] for d in body["droplets"]] == ["trap"]
        # Without after_effect nothing happens.
        fake.fail_next("POST", "/v2/droplets", 503)
        status, _, _ = await call(s, "POST", "/v2/droplets", json={"name": "no", **FULL_CREATE})
        assert status == 503 and fake.created_count == 1

        # times, and the method must match exactly while the path matches as a prefix.
        fake.fail_next("GET", "/v2/droplets/", 500, times=2)
        did = next(iter(fake.droplets))
        assert (await call(s, "GET", "/v2/droplets"))[0] == 200  # not a prefix match
        assert (await call(s, "DELETE", "/v2/droplets/999"))[0] == 404  # another method
        assert (await call(s, "GET", f"/v2/droplets/{did}"))[0] == 500
        assert (await call(s, "GET", f"/v2/droplets/{did}/actions/1"))[0] == 500
        assert (await call(s, "GET", f"/v2/droplets/{did}"))[0] == 200

        # 429: Retry-After defaults to 1 s, ratelimit-remaining is 0.
        fake.fail_next("GET", "/v2/droplets", 429, times=2)
        for _ in range(2):
            status, body, headers = await call(s, "GET", "/v2/droplets")
            assert status == 429 and headers["Retry-After"] == "1"
            assert headers["ratelimit-remaining"] == "0"
        assert (await call(s, "GET", "/v2/droplets"))[0] == 200

        # A fault answers before the token is looked at; the token is checked after that.
        fake.set_token("rotated")
        status, body, _ = await call(s, "GET", "/v2/droplets")
        assert status == 401 and body["id"] == "unauthorized"
    async with session(fake, token="rotated") as s2:
        assert (await call(s2, "GET", "/v2/droplets"))[0] == 200
        # A deleting 500 with after effect: the droplet is gone all the same.
        fake.fail_next("DELETE", "/v2/droplets", 500, after_effect=True)
        assert (await call(s2, "DELETE", f"/v2/droplets/{did}"))[0] == 500
        assert did not in fake.droplets

    with pytest.raises(ValueError):
        fake.fail_next("GET", "/", 200)
    assert fake.violations == [], fake.summary()


async def test_ratelimit_remaining_counts_down(make_fake: MakeFake) -> None:
    fake = await make_fake()
    fake.ratelimit_remaining = 2
    async with session(fake) as s:
        seen = [(await call(s, "GET", "/v2/droplets"))[2]["ratelimit-remaining"] for _ in range(3)]
    assert seen == ["1", "0", "0"]


# --- droplets that serve ----------------------------------------------------------------------


async def _health(host: str, port: int) -> int | None:
    """The status of GET /health on host:port, or None when nothing answers there."""
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{host}:{port}/health", timeout=aiohttp.ClientTimeout(total=2)) as r,
        ):
            await r.read()
            return r.status
    except (aiohttp.ClientConnectionError, TimeoutError):
        return None


@pytest.mark.timeout(20)
async def test_serve_backends(make_fake: MakeFake) -> None:
    # Every droplet serves on the same port at its own address; reserve a free one on
    # 127.0.0.1 for the test's duration (127.0.1.N:port is a different socket address).
    with socket.socket() as reserve:
        reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
        fake = await make_fake(
            serve_backends=True, backend_port=port, active_after=0.1, action_after=0.3
        )
        async with session(fake) as s:
            droplet = await create(s, "served")
            did = droplet["id"]
            assert await _health("127.0.1.1", port) is None  # still new

            async def private_ip() -> str | None:
                _, body, _ = await call(s, "GET", f"/v2/droplets/{did}")
                d = body["droplet"]
                nets = [n["ip_address"] for n in d["networks"]["v4"] if n["type"] == "private"]
                return nets[0] if d["status"] == "active" and nets else None

            async def is_active() -> bool:
                return await private_ip() is not None

            await poll(is_active)
            ip = await private_ip()
            assert ip == "127.0.1.1"
            # Seen active means it serves: no waiting.
            assert await _health(ip, port) == 200
            assert fake.backends == {did: port}

            # A second droplet serves on its own address, same port.
            other = (await create(s, "served-2"))["id"]

            async def other_serves() -> bool:
                return await _health("127.0.1.2", port) == 200

            await poll(other_serves)  # by the timer, without anyone polling the API

            # A keep-alive connection to the first droplet, cut when it reboots.
            reader, writer = await asyncio.open_connection(ip, port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")

            status, body, _ = await call(
                s, "POST", f"/v2/droplets/{did}/actions", json={"type": "reboot"}
            )
            assert status == 201
            aid = body["action"]["id"]
            assert await _health(ip, port) is None  # down while the reboot is in progress
            async with asyncio.timeout(2):
                assert await reader.read() == b""
            writer.close()

            async def rebooted() -> bool:
                _, body, _ = await call(s, "GET", f"/v2/actions/{aid}")
                return bool(body["action"]["status"] == "completed")

            await poll(rebooted)
            assert await _health(ip, port) == 200

            assert (await call(s, "DELETE", f"/v2/droplets/{did}"))[0] == 204
            assert await _health(ip, port) is None
            assert await _health("127.0.1.2", port) == 200
            assert set(fake.backends) == {other}
        await fake.close()
        assert await _health("127.0.1.2", port) is None
    assert fake.backend_errors == []
    assert fake.violations == [], fake.summary()


# --- the runner -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_runner_prints_its_url_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy.testing.fake_digitalocean",
        "--token",
        "t0k",
        "--active-after",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            url = (await proc.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(url, headers={"Authorization": "Bearer t0k"}) as s:
            status, body, _ = await call(
                s, "POST", "/v2/droplets", json={"name": "r", **FULL_CREATE}
            )
            assert status == 202
            status, body, _ = await call(s, "GET", "/v2/droplets")
            assert [d["name"] for d in body["droplets"]] == ["r"]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "2 requests, 0 contract violations" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.timeout(20)
async def test_backends_have_limited_capacity(make_fake: MakeFake) -> None:
    """backend_capacity=1, backend_service_time=0.2: two requests at once take 0.2 s and 0.4 s
    (lower bounds only: a timer never fires early)."""
    with socket.socket() as reserve:
        reserve.bind(("127.0.0.1", 0))
        port = reserve.getsockname()[1]
        fake = await make_fake(
            serve_backends=True, backend_port=port, backend_capacity=1, backend_service_time=0.2
        )
        async with session(fake) as s:
            await create(s, "busy")
            assert (await call(s, "GET", "/v2/droplets"))[1]["droplets"][0]["status"] == "active"

        async def timed_get() -> float:
            t0 = time.monotonic()
            async with aiohttp.ClientSession() as c, c.get(f"http://127.0.1.1:{port}/x") as r:
                assert r.status == 200 and (await r.text()).startswith("busy: GET /x")
            return time.monotonic() - t0

        first, second = sorted(await asyncio.gather(timed_get(), timed_get()))
        assert first >= 0.2 and second >= 0.4
        assert await _health("127.0.1.1", port) == 200  # health skips the queue
    assert fake.violations == [], fake.summary()
