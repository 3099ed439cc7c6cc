"""The DigitalOcean provider against the in-process fake DigitalOcean API.

Everything runs on 127.0.0.1: the fake listens there and hands out loopback addresses. Waits the
provider is asked to make (Retry-After, backoff, polling) go through an injected sleep that
records them and waits at most 10 ms, so the tests are fast and can assert the waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from doproxy.core.settings import DOProvisioner
from doproxy.errors import (
    MachineNotFound,
    ProviderAuthError,
    ProviderError,
    ProvisionTimeout,
    RateLimited,
)
from doproxy.providers.digitalocean import (
    DigitalOceanProvider,
    load_token,
    read_user_data,
)
from doproxy.provisioning import Spec, new_name, wait_active
from doproxy.testing.fake_digitalocean import FakeDigitalOcean

TOKEN = "dop_v1_" + "5ecret" * 10  # distinctive, so a leak anywhere is found by substring
TAGS = ["doproxy", "web"]


class Sleeps:
    """An injected sleep: records every wait, waits at most 10 ms."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(min(seconds, 0.01))


def settings_for(url: str, **override: Any) -> DOProvisioner:
    data: dict[str, Any] = {
        "api-url": url,
        "tags": TAGS,
        "ssh-key-ids": [289794, "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"],
        "poll-interval": "20ms",
        "create-timeout": "5s",
    }
    data.update(override)
    return DOProvisioner.model_validate(data)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDigitalOcean]:
    async with FakeDigitalOcean(token=TOKEN) as f:
        yield f
        # Every request the provider sent, and every answer, matched the OpenAPI spec.
        assert f.violations == [], f.summary()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def provider(fake: FakeDigitalOcean, sleeps: Sleeps) -> AsyncIterator[DigitalOceanProvider]:
    p = DigitalOceanProvider(settings_for(fake.url), TOKEN, sleep=sleeps)
    yield p
    await p.close()


# --- reading the fake's record ---------------------------------------------------------------


def _query(ex: Any) -> dict[str, str]:
    q = ex.query
    if isinstance(q, str):
        return {k: v[0] for k, v in parse_qs(q).items()}
    return {str(k): str(v) for k, v in dict(q).items()}


def _body(ex: Any) -> Any:
    body = ex.body
    if isinstance(body, bytes | str):
        return json.loads(body) if body else None
    return body


def requests(fake: FakeDigitalOcean, method: str, path: str) -> list[Any]:
    return [ex for ex in fake.exchanges if ex.method == method and ex.path == path]


def calls(fake: FakeDigitalOcean) -> list[tuple[str, str]]:
    return [(ex.method, ex.path) for ex in fake.exchanges]


# --- the life of a droplet -------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_create_wait_get_list_reboot_destroy() -> None:
    sleeps = Sleeps()
    async with FakeDigitalOcean(token=TOKEN, active_after=0.2, action_after=0.1) as fake:
        provider = DigitalOceanProvider(settings_for(fake.url), TOKEN, sleep=sleeps, per_page=2)
        # Tagged "doproxy" only: it must not be listed as ours (we carry "doproxy" and "web").
        stranger = DigitalOceanProvider(settings_for(fake.url, tags=["doproxy"]), TOKEN)
        try:
            name = new_name("doproxy-")
            created = await provider.create(name)
            assert created.name == name
            assert created.status == "new"
            assert created.id == str(int(created.id))
            assert set(created.tags) == set(TAGS)

            active = await wait_active(provider, created.id, timeout=5, interval=0.02)
            assert active.active
            assert active.private_ip.startswith("127.0.1.")
            assert active.public_ip.startswith("127.0.2.")
            assert active.created is not None
            got = await provider.get(created.id)
            assert got == active

            others = [await provider.create(new_name("doproxy-")) for _ in range(2)]
            await stranger.create(new_name("other-"))
            listed = await provider.list()
            assert sorted(m.id for m in listed) == sorted(m.id for m in [created, *others])
            # per_page=2 and three droplets tagged "doproxy": two pages, both asked for.
            pages = [_query(ex) for ex in requests(fake, "GET", "/v2/droplets")]
            assert {"tag_name": "doproxy", "per_page": "2", "page": "1"}.items() <= pages[0].items()
            assert any(q.get("page") == "2" for q in pages)

            await provider.reboot(created.id)
            posted = requests(fake, "POST", f"/v2/droplets/{created.id}/actions")
            assert [_body(ex) for ex in posted] == [{"type": "reboot"}]
            assert any(ex.method == "GET" and "/actions/" in ex.path for ex in fake.exchanges), (
                calls(fake)
            )
            assert sleeps.calls and all(s <= 0.02 for s in sleeps.calls)  # poll-interval

            await provider.destroy(created.id)
            assert int(created.id) not in fake.droplets
            await provider.destroy(created.id)  # already gone: fine
            with pytest.raises(MachineNotFound, match=f"droplet {created.id} not found"):
                await provider.get(created.id)
            assert sorted(m.id for m in await provider.list()) == sorted(m.id for m in others)
            assert fake.violations == []
        finally:
            await provider.close()
            await stranger.close()


async def test_every_droplet_carries_its_sizes_hourly_price(fake: FakeDigitalOcean) -> None:
    provider = DigitalOceanProvider(settings_for(fake.url, size="s-2vcpu-4gb"), TOKEN)
    try:
        created = await provider.create(new_name("doproxy-"))
        # The fake prices a size as DigitalOcean's list does: $24 a month, 672 hours.
        price = fake.droplets[int(created.id)]["size"]["price_hourly"]
        assert price == pytest.approx(24 / 672, abs=1e-5)
        assert created.price_hourly == price
        assert created.extra["size"] == "s-2vcpu-4gb"
        assert (await provider.get(created.id)).price_hourly == price
        assert [m.price_hourly for m in await provider.list()] == [price]
        # ...and the entry made from it records the price (written only when known).
        from doproxy.core.settings import Settings
        from doproxy.provisioning import entry_for

        assert entry_for(created, Settings(), "digitalocean").price_hourly == price
    finally:
        await provider.close()


async def test_create_sends_every_setting(fake: FakeDigitalOcean, tmp_path: Path) -> None:
    (tmp_path / "cloud-init.yaml").write_text("#cloud-config\nruncmd:\n  - touch /ok\n")
    settings = settings_for(
        fake.url,
        region="ams3",
        size="s-2vcpu-2gb",
        image="ubuntu-24-04-x64",
        backups=True,
        ipv6=True,
        monitoring=True,
        **{"vpc-uuid": "760e09ef-dc84-11e8-981e-3cfdfeaae000", "user-data": "cloud-init.yaml"},
    )
    provider = DigitalOceanProvider(
        settings, TOKEN, user_data=read_user_data(settings, tmp_path), sleep=Sleeps()
    )
    try:
        machine = await provider.create("doproxy-settings")
    finally:
        await provider.close()
    [post] = requests(fake, "POST", "/v2/droplets")
    assert _body(post) == {
        "name": "doproxy-settings",
        "region": "ams3",
        "size": "s-2vcpu-2gb",
        "image": "ubuntu-24-04-x64",
        "ssh_keys": [289794, "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"],
        "backups": True,
        "ipv6": True,
        "monitoring": True,
        "tags": TAGS,
        "user_data": "#cloud-config\nruncmd:\n  - touch /ok\n",
        "vpc_uuid": "760e09ef-dc84-11e8-981e-3cfdfeaae000",
    }
    assert machine.extra.get("region") == "ams3"
    assert fake.violations == []


async def test_create_leaves_out_unset_user_data_and_vpc(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider
) -> None:
    await provider.create("doproxy-plain")
    [post] = requests(fake, "POST", "/v2/droplets")
    assert "user_data" not in _body(post)
    assert "vpc_uuid" not in _body(post)


CLOUD_INIT = "#cloud-config\nruncmd:\n  - echo rollout > /etc/doproxy-spec\n"


def spec_settings(url: str) -> DOProvisioner:
    """A config whose every field a Spec can replace is set, so a replaced one shows."""
    return settings_for(url, region="ams3", size="s-1vcpu-1gb", image="debian-12-x64")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("image", "sent"),
    [("ubuntu-24-04-x64", "ubuntu-24-04-x64"), ("153678412", 153678412)],
    ids=["slug", "custom-image-id"],
)
async def test_create_with_a_spec_sends_its_image_size_user_data_and_tag(
    fake: FakeDigitalOcean, image: str, sent: str | int
) -> None:
    provider = DigitalOceanProvider(
        spec_settings(fake.url), TOKEN, user_data="#!/bin/sh\necho config\n", sleep=Sleeps()
    )
    spec = Spec(
        image=image,
        size="s-2vcpu-2gb",
        user_data=CLOUD_INIT,
        tags=("doproxy-rollout-0a1b2c3d",),
    )
    try:
        machine = await provider.create("doproxy-spec", spec)
    finally:
        await provider.close()
    [post] = requests(fake, "POST", "/v2/droplets")
    # Exactly the spec's values where it has them, the config's elsewhere; a custom image's
    # number goes out as a JSON number (the API's oneOf: a slug string or an integer id).
    assert _body(post) == {
        "name": "doproxy-spec",
        "region": "ams3",
        "size": "s-2vcpu-2gb",
        "image": sent,
        "ssh_keys": [289794, "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"],
        "backups": False,
        "ipv6": False,
        "monitoring": False,
        "tags": [*TAGS, "doproxy-rollout-0a1b2c3d"],
        "user_data": CLOUD_INIT,
    }
    assert post.valid, (post.request_errors, post.response_errors)
    assert fake.violations == [], fake.summary()
    droplet = fake.droplets[int(machine.id)]
    assert droplet["size_slug"] == "s-2vcpu-2gb"
    assert (droplet["image"]["slug"] if isinstance(sent, str) else droplet["image"]["id"]) == sent
    assert machine.tags == (*TAGS, "doproxy-rollout-0a1b2c3d")
    assert machine.extra["size"] == "s-2vcpu-2gb"


@pytest.mark.timeout(20)
async def test_a_spec_changes_one_create_only(fake: FakeDigitalOcean) -> None:
    """A create with no spec (or an empty one) after a create with one sends the config's
    values, as before specs existed; a spec's own tag never repeats one of ours."""
    provider = DigitalOceanProvider(
        spec_settings(fake.url), TOKEN, user_data="#!/bin/sh\necho config\n", sleep=Sleeps()
    )
    try:
        await provider.create(
            "doproxy-new",
            Spec(image="ubuntu-24-04-x64", size="s-2vcpu-2gb", tags=("web", "extra")),
        )
        await provider.create("doproxy-plain")
        await provider.create("doproxy-empty", Spec())
    finally:
        await provider.close()
    first, plain, empty = (_body(ex) for ex in requests(fake, "POST", "/v2/droplets"))
    assert first["tags"] == [*TAGS, "extra"]
    assert first["user_data"] == "#!/bin/sh\necho config\n"  # no user data in the spec
    configured = {
        "region": "ams3",
        "size": "s-1vcpu-1gb",
        "image": "debian-12-x64",
        "ssh_keys": [289794, "3b:16:e4:bf:8b:00:8b:b8:59:8c:a9:d3:f0:19:fa:45"],
        "backups": False,
        "ipv6": False,
        "monitoring": False,
        "tags": TAGS,
        "user_data": "#!/bin/sh\necho config\n",
    }
    assert plain == {"name": "doproxy-plain", **configured}
    assert empty == {"name": "doproxy-empty", **configured}
    assert fake.violations == [], fake.summary()


# --- create is idempotent: the duplicate trap ------------------------------------------------


async def test_duplicate_trap_makes_one_droplet(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider
) -> None:
    # DigitalOcean makes the droplet, then answers 500: a blind retry would make a second.
    fake.fail_next("POST", "/v2/droplets", 500, after_effect=True)
    machine = await provider.create("doproxy-trap")
    assert fake.created_count == 1
    assert len(fake.droplets) == 1
    assert machine.name == "doproxy-trap"
    assert int(machine.id) in fake.droplets
    assert len(requests(fake, "POST", "/v2/droplets")) == 1  # found by name, not re-created
    assert fake.violations == []


async def test_failed_create_is_retried_after_looking(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider
) -> None:
    fake.fail_next("POST", "/v2/droplets", 500)  # no effect: nothing was made
    machine = await provider.create("doproxy-retry")
    assert fake.created_count == 1
    assert machine.name == "doproxy-retry"
    sequence = calls(fake)
    posts = [i for i, c in enumerate(sequence) if c == ("POST", "/v2/droplets")]
    assert len(posts) == 2
    looks = [
        ex
        for ex in fake.exchanges[posts[0] + 1 : posts[1]]
        if ex.method == "GET" and ex.path == "/v2/droplets"
    ]
    assert looks and _query(looks[0]).get("name") == "doproxy-retry"
    assert fake.violations == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("made", [True, False], ids=["made-then-500", "500-nothing-made"])
async def test_an_uncertain_create_with_a_spec_is_found_or_retried_with_the_spec(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, made: bool
) -> None:
    """The duplicate trap with a rollout's spec: the droplet the first attempt made is found
    by name (it carries our tags and the rollout's); when none was made, the retry sends the
    same spec again."""
    spec = Spec(
        image="153678412",
        size="s-2vcpu-2gb",
        user_data=CLOUD_INIT,
        tags=("doproxy-rollout-0a1b2c3d",),
    )
    fake.fail_next("POST", "/v2/droplets", 500, after_effect=made)
    machine = await provider.create("doproxy-trap-spec", spec)
    assert fake.created_count == 1 and len(fake.droplets) == 1
    assert machine.name == "doproxy-trap-spec"
    assert machine.tags == (*TAGS, "doproxy-rollout-0a1b2c3d")
    assert machine.extra["size"] == "s-2vcpu-2gb"
    droplet = fake.droplets[int(machine.id)]
    assert droplet["image"]["id"] == 153678412
    posts = [_body(ex) for ex in requests(fake, "POST", "/v2/droplets")]
    assert len(posts) == (1 if made else 2)  # found by name, or made once by the retry
    assert all(
        (b["image"], b["size"], b["user_data"], b["tags"])
        == (153678412, "s-2vcpu-2gb", CLOUD_INIT, [*TAGS, "doproxy-rollout-0a1b2c3d"])
        for b in posts
    )
    looks = [_query(ex) for ex in requests(fake, "GET", "/v2/droplets")]
    assert looks and looks[0].get("name") == "doproxy-trap-spec"
    assert fake.violations == [], fake.summary()


async def test_create_gives_up_after_repeated_failures(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider
) -> None:
    fake.fail_next("POST", "/v2/droplets", 503, times=10)
    with pytest.raises(ProviderError, match="creating droplet doproxy-down failed 3 times"):
        await provider.create("doproxy-down")
    assert fake.created_count == 0
    assert len(requests(fake, "POST", "/v2/droplets")) == 3


# --- errors a user can act on ----------------------------------------------------------------


async def test_wrong_token_is_a_401_message(fake: FakeDigitalOcean) -> None:
    fake.set_token("another-token")
    provider = DigitalOceanProvider(settings_for(fake.url), TOKEN, sleep=Sleeps())
    try:
        with pytest.raises(ProviderAuthError, match=r"DigitalOcean rejected the token \(401\)"):
            await provider.list()
        with pytest.raises(ProviderAuthError, match=r"\(401\)"):
            await provider.create("doproxy-x")
    finally:
        await provider.close()
    assert fake.created_count == 0


async def test_422_carries_the_api_message(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider
) -> None:
    fake.fail_next("POST", "/v2/droplets", 422)
    with pytest.raises(ProviderError) as info:
        await provider.create("doproxy-bad")
    message = fake.exchanges[-1].response_body["message"]
    assert message
    assert f"DigitalOcean refused the request (422): {message}" in str(info.value)
    assert fake.created_count == 0
    assert len(requests(fake, "POST", "/v2/droplets")) == 1  # a refusal is not retried


async def test_403_names_the_scopes(fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
    fake.fail_next("GET", "/v2/droplets", 403)
    with pytest.raises(ProviderAuthError, match=r"refused the token access \(403\).*scope"):
        await provider.list()


async def test_not_found(fake: FakeDigitalOcean, provider: DigitalOceanProvider) -> None:
    with pytest.raises(MachineNotFound, match="droplet 999999 not found"):
        await provider.get("999999")
    with pytest.raises(MachineNotFound, match="droplet 999999 not found"):
        await provider.reboot("999999")
    await provider.destroy("999999")  # nothing to destroy: fine
    with pytest.raises(MachineNotFound):
        await provider.get("local-9101")  # not a droplet id; not even asked


async def test_server_errors_on_reads_are_retried(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, sleeps: Sleeps
) -> None:
    machine = await provider.create("doproxy-flaky")
    fake.fail_next("GET", f"/v2/droplets/{machine.id}", 500, times=2)
    assert (await provider.get(machine.id)).id == machine.id
    assert len(sleeps.calls) == 2
    fake.fail_next("GET", f"/v2/droplets/{machine.id}", 500, times=3)
    with pytest.raises(ProviderError, match=r"DigitalOcean failed \(500\)"):
        await provider.get(machine.id)


async def test_unreachable_api(sleeps: Sleeps) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    provider = DigitalOceanProvider(settings_for(url), TOKEN, sleep=sleeps)
    try:
        with pytest.raises(ProviderError, match=f"cannot reach DigitalOcean at {url}: "):
            await provider.list()
        with pytest.raises(ProviderError, match=f"cannot reach DigitalOcean at {url}: "):
            await provider.create("doproxy-nowhere")
    finally:
        await provider.close()


@pytest.mark.timeout(20)
async def test_reboot_times_out() -> None:
    async with FakeDigitalOcean(token=TOKEN, action_after=60) as fake:
        settings = settings_for(fake.url, **{"create-timeout": "0.2s"})
        provider = DigitalOceanProvider(settings, TOKEN, sleep=Sleeps())
        try:
            machine = await provider.create("doproxy-slow")
            with pytest.raises(ProvisionTimeout, match=f"reboot of droplet {machine.id}"):
                await provider.reboot(machine.id)
        finally:
            await provider.close()


# --- rate limits -----------------------------------------------------------------------------


async def test_429_waits_retry_after_then_succeeds(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, sleeps: Sleeps
) -> None:
    await provider.create("doproxy-one")
    fake.fail_next("GET", "/v2/droplets", 429, retry_after=7)
    assert [m.name for m in await provider.list()] == ["doproxy-one"]
    assert sleeps.calls == [7]


async def test_429_on_create_is_retried_without_duplicates(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, sleeps: Sleeps
) -> None:
    fake.fail_next("POST", "/v2/droplets", 429, retry_after=2)
    machine = await provider.create("doproxy-limited")
    assert machine.name == "doproxy-limited"
    assert fake.created_count == 1
    assert sleeps.calls == [2]


async def test_retry_after_is_bounded(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, sleeps: Sleeps
) -> None:
    fake.fail_next("GET", "/v2/droplets", 429, retry_after=3600)
    await provider.list()
    assert sleeps.calls == [60]


async def test_no_requests_left_waits_for_the_reset(fake: FakeDigitalOcean) -> None:
    sleeps = Sleeps()
    settings = settings_for(fake.url)
    provider = DigitalOceanProvider(settings, TOKEN, sleep=sleeps, wall_clock=lambda: 1000.0)
    try:
        fake.ratelimit_reset = 1012
        fake.ratelimit_remaining = 2  # this answer says 1 left, the next one 0
        await provider.list()
        await provider.list()
        assert sleeps.calls == []
        fake.ratelimit_remaining = 1000  # the window resets, but we were told 0 left
        await provider.list()  # so this waits until ratelimit-reset before asking
        assert sleeps.calls == [12]
        await provider.list()
        assert sleeps.calls == [12]  # the last answer had requests left: no waiting
        fake.ratelimit_reset, fake.ratelimit_remaining = 99999, 1
        await provider.list()
        await provider.list()
        assert sleeps.calls == [12, 60]  # bounded
    finally:
        await provider.close()


async def test_endless_429_is_rate_limited(
    fake: FakeDigitalOcean, provider: DigitalOceanProvider, sleeps: Sleeps
) -> None:
    fake.fail_next("GET", "/v2/droplets", 429, times=5, retry_after=1)
    with pytest.raises(RateLimited, match=r"rate-limiting .*429"):
        await provider.list()
    assert len(sleeps.calls) == 4  # five 429s in a row: four waits, then give up


# --- the token stays secret ------------------------------------------------------------------


async def test_token_never_appears(
    fake: FakeDigitalOcean, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sleeps = Sleeps()
    provider = DigitalOceanProvider(settings_for(fake.url), TOKEN, sleep=sleeps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = DigitalOceanProvider(settings_for(dead), TOKEN, sleep=sleeps)
    errors: list[BaseException] = []

    async def provoke(call: Any) -> None:
        try:
            await call
        except ProviderError as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected a ProviderError")

    try:
        machine = await provider.create("doproxy-secret")  # the token works...
        await provoke(provider.get("424242"))  # 404
        fake.fail_next("POST", "/v2/droplets", 422)
        await provoke(provider.create("doproxy-422"))
        fake.fail_next("GET", "/v2/droplets", 429, times=5, retry_after=1)
        await provoke(provider.list())
        fake.fail_next("GET", f"/v2/droplets/{machine.id}", 500, times=3)
        await provoke(provider.get(machine.id))
        fake.fail_next("POST", "/v2/droplets", 500, times=3)
        await provoke(provider.create("doproxy-500"))
        await provoke(unreachable.list())
        fake.set_token("rotated")  # ...until it is revoked
        await provoke(provider.list())
    finally:
        await provider.close()
        await unreachable.close()

    assert [type(e).__name__ for e in errors] == [
        "MachineNotFound",
        "ProviderRefused",  # a 422: nothing was created
        "RateLimited",
        "ProviderError",
        "ProviderError",
        "ProviderError",
        "ProviderAuthError",
    ]
    texts = [repr(provider), repr(unreachable), caplog.text]
    for exc in errors:
        seen: BaseException | None = exc
        while seen is not None:  # the error and everything chained to it
            texts += [str(seen), repr(seen)]
            seen = seen.__cause__ or seen.__context__
    assert caplog.records  # the logs were captured, so their absence of the token means something
    for text in texts:
        assert TOKEN not in text
        assert TOKEN[-12:] not in text


# --- token and user data -----------------------------------------------------------------------


def test_load_token_order(tmp_path: Path) -> None:
    env = {"DIGITALOCEAN_TOKEN": "from-env"}
    (tmp_path / "do.token").write_text("  from-file\n")
    assert load_token(DOProvisioner(token="from-config"), tmp_path, env) == "from-config"
    with_file = DOProvisioner.model_validate({"token-file": "do.token"})
    assert load_token(with_file, tmp_path, env) == "from-file"
    assert load_token(DOProvisioner(), tmp_path, env) == "from-env"


def test_load_token_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ProviderError) as info:
        load_token(DOProvisioner(), tmp_path, {})
    for place in ("do-provisioner.token", "token-file", "DIGITALOCEAN_TOKEN"):
        assert place in str(info.value)
    missing = DOProvisioner.model_validate({"token-file": "nope.token"})
    with pytest.raises(ProviderError, match=r"token-file .*nope\.token"):
        load_token(missing, tmp_path, {"DIGITALOCEAN_TOKEN": "from-env"})
    (tmp_path / "empty.token").write_text("\n")
    empty = DOProvisioner.model_validate({"token-file": "empty.token"})
    with pytest.raises(ProviderError, match="empty"):
        load_token(empty, tmp_path, {})


def test_read_user_data(tmp_path: Path) -> None:
    assert read_user_data(DOProvisioner(), tmp_path) == ""
    (tmp_path / "init.sh").write_text("#!/bin/sh\necho hi\n")
    settings = DOProvisioner.model_validate({"user-data": "init.sh"})
    assert read_user_data(settings, tmp_path) == "#!/bin/sh\necho hi\n"
    with pytest.raises(ProviderError, match=r"user-data .*missing\.sh"):
        read_user_data(DOProvisioner.model_validate({"user-data": "missing.sh"}), tmp_path)
    (tmp_path / "big.sh").write_text("x" * (64 * 1024 + 1))
    with pytest.raises(ProviderError, match="64 KiB"):
        read_user_data(DOProvisioner.model_validate({"user-data": "big.sh"}), tmp_path)
