"""Hot reload against a real running proxy: inventory, config, balancer, bind; broken files."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.balancers import Hash
from doproxy.inventory import load_inventory
from doproxy.runtime import Runtime
from tests.conftest import wait_for
from tests.support import Client, RawBackend, echo_handler, get, request

MakeRuntime = Callable[..., Awaitable[Runtime]]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def inventory(*ports: int) -> str:
    return "".join(
        f'[[droplet]]\nid = {p}\nname = "b{p}"\nserver-host = "127.0.0.1:{p}"\n' for p in ports
    )


def config(bind: str = "127.0.0.1:0", extra: str = "", watch: bool = True) -> str:
    return (
        f'bind = "{bind}"\nwatch-config = {str(watch).lower()}\ninventory-file = "inventory.toml"\n'
        f"{extra}\n[backend]\ndisable-health-check = true\n"
        '[admin]\nbind = "127.0.0.1:0"\n'
    )


def save_by_rename(path: Path, text: str) -> None:
    """What many editors do: write a temp file, then rename it over the original."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    made: list[Runtime] = []

    async def _make(config_text: str, inventory_text: str) -> Runtime:
        cfg = tmp_path / "doproxy.toml"
        cfg.write_text(config_text)
        (tmp_path / "inventory.toml").write_text(inventory_text)
        settings = load_settings(cfg)
        rt = Runtime(settings, load_inventory(tmp_path / "inventory.toml"), cfg)
        await rt.start()
        made.append(rt)
        return rt

    yield _make
    for rt in made:
        await rt.stop()


@pytest.fixture
async def two_backends(
    backend_factory: Callable[..., Awaitable[RawBackend]],
) -> tuple[RawBackend, RawBackend]:
    return await backend_factory(echo_handler), await backend_factory(echo_handler)


def port_of_rt(rt: Runtime) -> int:
    assert rt.server is not None
    return rt.server.addresses[0][1]


async def test_inventory_change_keeps_unchanged_backends(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    b1, b2 = two_backends
    rt = await make_runtime(config(), inventory(b1.port))
    assert rt.server is not None
    assert (await request(port_of_rt(rt), get())).status == 200
    first = rt.server.pool.backends[0]
    await wait_for(lambda: len(first.idle) == 1)
    pooled = first.idle[0]
    save_by_rename(tmp_path / "inventory.toml", inventory(b1.port, b2.port))
    await wait_for(lambda: rt.reloads == 1)
    pool = rt.server.pool
    assert [b.port for b in pool.backends] == [b1.port, b2.port]
    # The unchanged backend is the same object: its counters and pooled connection survive.
    assert pool.backends[0] is first
    assert first.requests == 1
    assert first.idle == [pooled]
    # Both take traffic now.
    for _ in range(4):
        assert (await request(port_of_rt(rt), get())).status == 200
    assert b2.connections >= 1
    # Removing b1: its idle connections close and it gets nothing new.
    save_by_rename(tmp_path / "inventory.toml", inventory(b2.port))
    await wait_for(lambda: rt.reloads == 2)
    await wait_for(lambda: pooled.closed)
    before = len(b1.all_received)
    for _ in range(3):
        assert (await request(port_of_rt(rt), get())).status == 200
    assert len(b1.all_received) == before


async def test_broken_file_keeps_the_running_config(
    make_runtime: MakeRuntime,
    two_backends: tuple[RawBackend, RawBackend],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    b1, _ = two_backends
    rt = await make_runtime(config(), inventory(b1.port))
    caplog.set_level(logging.ERROR, logger="doproxy.runtime")
    (tmp_path / "doproxy.toml").write_text(config(extra='[loadbalancing]\ntype = "fastest"'))
    await wait_for(lambda: any("loadbalancing.type" in r.getMessage() for r in caplog.records))
    assert any("doproxy.toml:" in r.getMessage() for r in caplog.records)  # file and line
    assert rt.reloads == 0
    assert (await request(port_of_rt(rt), get())).status == 200  # still serving
    # A broken inventory too (duplicate ids): with the config fixed, the inventory's error
    # is reported, and nothing changes.
    (tmp_path / "inventory.toml").write_text(inventory(b1.port) + inventory(b1.port))
    (tmp_path / "doproxy.toml").write_text(config())
    await wait_for(lambda: any("duplicate id" in r.getMessage() for r in caplog.records))
    assert rt.reloads == 0
    assert (await request(port_of_rt(rt), get())).status == 200
    # Fixing the inventory is picked up.
    (tmp_path / "inventory.toml").write_text(inventory(b1.port))
    await wait_for(lambda: rt.reloads == 1)


async def test_sighup_reloads_and_balancer_change_takes_effect(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    b1, b2 = two_backends
    rt = await make_runtime(config(watch=False), inventory(b1.port, b2.port))
    (tmp_path / "doproxy.toml").write_text(
        config(watch=False).replace("\n[backend]", '\n[loadbalancing]\ntype = "hash"\n[backend]')
    )
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: rt.reloads == 1)
    assert rt.server is not None
    assert isinstance(rt.server.pool.balancer, Hash)


async def test_bind_change_opens_new_listener_first(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    b1, _ = two_backends
    old_port, new_port = free_port(), free_port()
    rt = await make_runtime(config(f"127.0.0.1:{old_port}"), inventory(b1.port))
    kept = await Client.connect(old_port)  # an open keep-alive connection on the old listener
    await kept.send(get())
    assert (await kept.response()).status == 200
    save_by_rename(tmp_path / "doproxy.toml", config(f"127.0.0.1:{new_port}"))
    await wait_for(lambda: rt.reloads == 1)
    assert (await request(new_port, get())).status == 200
    with pytest.raises(OSError):
        await request(old_port, get())
    # The connection accepted before the change carries on.
    await kept.send(get())
    assert (await kept.response()).status == 200
    await kept.close()


async def test_unchanged_files_touched_reload_harmlessly(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    b1, _ = two_backends
    rt = await make_runtime(config(), inventory(b1.port))
    assert rt.server is not None
    first = rt.server.pool.backends[0]
    (tmp_path / "inventory.toml").write_text(inventory(b1.port))
    await wait_for(lambda: rt.reloads == 1)
    assert rt.server.pool.backends == [first]


async def test_renewed_certificate_is_served_without_restart(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    first, second = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    b1, _ = two_backends
    extra = 'https = true\ntls-cert-file = "cert.pem"\ntls-key-file = "key.pem"'
    rt = await make_runtime(config(extra=extra), inventory(b1.port))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def served_cert() -> bytes:
        c = await Client.connect(port_of_rt(rt), ssl=client_ctx, server_hostname="localhost")
        sslobj = c.writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        await c.send(get())
        assert (await c.response()).status == 200
        await c.close()
        return bytes(der)

    before = await served_cert()
    save_by_rename(cert, second.cert_chain_pems[0].bytes().decode())
    save_by_rename(key, second.private_key_pem.bytes().decode())
    await wait_for(lambda: rt.reloads >= 1)
    after = await served_cert()
    assert before != after
    assert after == ssl.PEM_cert_to_DER_cert(second.cert_chain_pems[0].bytes().decode())


@pytest.mark.timeout(30)
async def test_a_log_file_in_the_config_folder_causes_no_reload_and_no_log_flood(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    """doproxy's log file beside its config: each line written is a change in a watched folder.
    It must neither reload nor make the watcher log (which would be a change again, forever)."""
    import asyncio

    b1, _ = two_backends
    log_file = tmp_path / "doproxy.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        rt = await make_runtime(config(), inventory(b1.port))
        other = tmp_path / "access.log"
        with other.open("a") as f:
            for i in range(40):  # another writer in the folder too, for a second
                f.write(f"line {i}\n")
                f.flush()
                logging.getLogger("app").info("working %d", i)
                await asyncio.sleep(0.025)
        # A real change still reloads, exactly once: the watcher is alive and saw no other.
        (tmp_path / "inventory.toml").write_text(inventory(b1.port))
        await wait_for(lambda: rt.reloads == 1)
        await asyncio.sleep(0.5)  # time for a feedback loop to show itself, were there one
        assert rt.reloads == 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    lines = log_file.read_text().splitlines()
    assert not [line for line in lines if line.startswith("watchfiles")], lines[:5]
    assert len(lines) < 60, lines[-5:]


@pytest.mark.timeout(30)
async def test_sighups_leave_no_task_behind(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend]
) -> None:
    b1, _ = two_backends
    rt = await make_runtime(config(watch=False), inventory(b1.port))
    long_lived = len(rt._tasks)
    for i in range(50):
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda n=i + 1: rt.reloads == n)  # type: ignore[misc]
    await wait_for(lambda: not rt._pending)
    assert len(rt._tasks) == long_lived


@pytest.mark.timeout(30)
async def test_an_edited_error_page_reloads(
    make_runtime: MakeRuntime, two_backends: tuple[RawBackend, RawBackend], tmp_path: Path
) -> None:
    b1, _ = two_backends
    (tmp_path / "pages").mkdir()
    page = tmp_path / "pages" / "502.html"
    page.write_text("<p>old</p>")
    rt = await make_runtime(
        config(extra='[error-pages]\n502 = "pages/502.html"'), inventory(b1.port)
    )
    assert rt.server is not None
    save_by_rename(page, "<p>new</p>")
    await wait_for(lambda: rt.reloads == 1)
    assert rt.server.error_pages[502][1] == b"<p>new</p>"


async def test_a_reload_reads_its_files_off_the_event_loop(
    make_runtime: MakeRuntime,
    two_backends: tuple[RawBackend, RawBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading and validating the config and the inventory (thousands of entries, tens of
    milliseconds) happens in a thread, so the loop keeps serving; the loop applies it."""
    import threading

    import doproxy.runtime

    b1, b2 = two_backends
    rt = await make_runtime(config(watch=False), inventory(b1.port))
    loop_thread = threading.current_thread()
    read_in: list[threading.Thread] = []
    real_load_settings, real_load_inventory = load_settings, load_inventory

    def spy_settings(path: Path) -> object:
        read_in.append(threading.current_thread())
        return real_load_settings(path)

    def spy_inventory(path: Path) -> object:
        read_in.append(threading.current_thread())
        return real_load_inventory(path)

    monkeypatch.setattr(doproxy.runtime, "load_settings", spy_settings)
    monkeypatch.setattr(doproxy.runtime, "load_inventory", spy_inventory)
    (tmp_path / "inventory.toml").write_text(inventory(b1.port, b2.port))
    assert await rt.reload()
    assert len(read_in) == 2 and loop_thread not in read_in
    assert rt.server is not None
    assert [b.port for b in rt.server.pool.backends] == [b1.port, b2.port]
