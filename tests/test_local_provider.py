"""The local-process provider with real processes on 127.0.0.1.

Every test gets its own tag, so test files running in parallel never see each other's
processes, and a fixture destroys every process carrying that tag at teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from doproxy.core.settings import LocalProvisioner
from doproxy.errors import MachineNotFound, ProviderError, ProvisionTimeout
from doproxy.providers import local
from doproxy.providers.local import LocalProvider, command_argv, read_proc, signal_if_ours
from doproxy.provisioning import Machine, Provider, Spec, wait_active
from tests.support import request

COMMAND = "python -m doproxy.demo_backend --host {host} --port {port} --name {name}"

# Serves "/" (a directory listing) and ignores SIGTERM: only SIGKILL stops it.
STUBBORN = (
    'python -c "import signal, http.server as h; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
    "h.HTTPServer(('{host}', {port}), h.SimpleHTTPRequestHandler).serve_forever()\""
)

MakeProvider = Callable[..., LocalProvider]


def port_range(width: int = 20) -> tuple[int, str]:
    """A range of ports below the kernel's ephemeral range (32768-60999): there, an outgoing
    connection of any parallel test could take a port between the provider's bind check and
    its process's bind. Random, so parallel runs rarely share one; the provider skips ports
    in use either way."""
    low = random.randrange(20000, 32768 - width)
    return low, f"{low}-{low + width - 1}"


@pytest.fixture
def tag() -> str:
    return f"doproxy-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ports() -> tuple[int, str]:
    return port_range()


@pytest.fixture
async def make_provider(
    tmp_path: Path, tag: str, ports: tuple[int, str]
) -> AsyncIterator[MakeProvider]:
    """Providers for this test's tag and ports; at teardown every process with the tag goes."""
    made: list[LocalProvider] = []

    def make(**overrides: Any) -> LocalProvider:
        environ = overrides.pop("environ", None)
        probe = overrides.pop("probe", None)
        data: dict[str, Any] = {
            "enable": True,
            "command": COMMAND,
            "host": "127.0.0.1",
            "ports": ports[1],
            "health-path": "/health",
            "boot-timeout": "10s",
            "stop-timeout": "5s",
            "tags": [tag],
            "log-dir": "logs",  # what a process said before it died, for a failing test
        }
        data.update(overrides)
        provider = LocalProvider(
            LocalProvisioner.model_validate(data),
            tmp_path,
            environ=environ,
            probe=probe,
            poll_interval=0.02,
        )
        made.append(provider)
        return provider

    yield make
    cleaner = make(**{"stop-timeout": "1s"})
    for m in await cleaner.list():
        await cleaner.destroy(m.id)
    assert await cleaner.list() == []
    for p in made:
        await p.close()


async def active(provider: Provider, name: str) -> Machine:
    return await wait_active(provider, name, timeout=10.0, interval=0.02)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition until it holds (a readiness wait with a deadline, no sleep)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


# --- the command template -------------------------------------------------------------------


def test_command_is_split_without_a_shell_and_filled_per_word() -> None:
    argv = command_argv("python -c 'print({port})' --name={name} {host}", "127.0.0.2", 9100, "a b")
    assert argv == [sys.executable, "-c", "print(9100)", "--name=a b", "127.0.0.2"]
    assert command_argv("python3 -V", "h", 1, "n")[0] == sys.executable
    assert command_argv("/usr/bin/env python -V", "h", 1, "n")[:2] == ["/usr/bin/env", "python"]
    assert command_argv("x {other} {port}", "h", 1, "n") == ["x", "{other}", "1"]
    with pytest.raises(ProviderError, match="empty"):
        command_argv("  ", "h", 1, "n")
    with pytest.raises(ProviderError, match="quotation"):
        command_argv("python -c 'unclosed", "h", 1, "n")


def test_tags_are_required_and_comma_free() -> None:
    with pytest.raises(ValueError, match="tags"):
        LocalProvisioner.model_validate({"tags": []})
    with pytest.raises(ValueError, match="commas"):
        LocalProvisioner.model_validate({"tags": ["a,b"]})
    assert LocalProvisioner.model_validate({"log-dir": "logs"}).log_dir == "logs"


# --- the life of a machine ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_create_serve_list_reboot_destroy(
    make_provider: MakeProvider, tmp_path: Path, ports: tuple[int, str], tag: str, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="doproxy.providers.local")
    # A stale marker in the proxy's own environment must not reach its machines.
    environ = dict(os.environ, DOPROXY_TAGS="stale", DOPROXY_MACHINE="stale", MY_SETTING="42")
    provider = make_provider(environ=environ)
    assert provider.kind == "local"

    created = await provider.create("web-1")
    assert created.id == created.name == "web-1"
    assert created.status == "new"
    assert created.private_ip == "127.0.0.1"
    assert created.port is not None and created.port in range(ports[0], ports[0] + 20)
    assert created.pid > 0 and created.tags == (tag,)
    env = environ_of(created.pid)
    assert env["DOPROXY_MACHINE"] == "web-1" and env["DOPROXY_TAGS"] == tag
    assert env["DOPROXY_PORT"] == str(created.port) and env["MY_SETTING"] == "42"
    # Its own session: a kill of the proxy's process group does not reach it.
    assert os.getsid(created.pid) == created.pid != os.getsid(0)
    assert os.readlink(f"/proc/{created.pid}/fd/0") == "/dev/null"

    m = await active(provider, "web-1")
    assert (m.pid, m.port, m.status) == (created.pid, created.port, "active")
    r = await request(m.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200 and r.body == b"web-1: GET /hello (0 bytes in)\n"
    assert "listening on" in (tmp_path / "logs" / "web-1.log").read_text()
    assert m.extra["log"] == str(tmp_path / "logs" / "web-1.log")

    assert await provider.create("web-1") == m  # idempotent by name: no second process
    [listed] = await provider.list()
    assert (listed.id, listed.pid, listed.port, listed.status) == ("web-1", m.pid, m.port, "active")

    await provider.reboot("web-1")
    rebooted = await provider.get("web-1")
    assert rebooted.status == "active" and rebooted.port == m.port and rebooted.pid != m.pid
    assert read_proc(m.pid) is None  # the old process is gone
    r = await request(m.port, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.body == b"web-1: GET /again (0 bytes in)\n"

    start = time.monotonic()
    await provider.destroy("web-1")
    assert time.monotonic() - start < 5.0  # it left on SIGTERM, well before stop-timeout
    assert "SIGKILL" not in caplog.text
    assert read_proc(rebooted.pid) is None
    assert rebooted.pid not in local._children  # our child is reaped, not left a zombie
    assert bindable(m.port)
    with pytest.raises(OSError):
        await request(m.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    await provider.destroy("web-1")  # already gone: fine
    with pytest.raises(MachineNotFound):
        await provider.get("web-1")
    with pytest.raises(MachineNotFound):
        await provider.reboot("web-1")
    assert await provider.list() == []


@pytest.mark.timeout(30)
async def test_new_until_the_health_path_answers(make_provider: MakeProvider) -> None:
    provider = make_provider(command=COMMAND + " --boot-delay 0.5")
    await provider.create("slow-1")
    # It cannot listen for 0.5 s, so it is certainly still "new" now.
    assert (await provider.get("slow-1")).status == "new"
    assert [m.status for m in await provider.list()] == ["new"]
    assert (await active(provider, "slow-1")).status == "active"


@pytest.mark.timeout(30)
async def test_status_comes_from_the_injected_probe(make_provider: MakeProvider) -> None:
    calls: list[tuple[str, int, str]] = []
    healthy = False

    async def probe(host: str, port: int, path: str) -> bool:
        calls.append((host, port, path))
        return healthy

    provider = make_provider(probe=probe, **{"health-path": "ready"})
    m = await provider.create("probed-1")
    assert (await provider.get("probed-1")).status == "new"
    assert calls[-1] == ("127.0.0.1", m.port, "/ready")
    with pytest.raises(ProvisionTimeout):
        await wait_active(provider, "probed-1", timeout=0.1, interval=0.02)
    healthy = True
    assert (await provider.get("probed-1")).status == "active"


@pytest.mark.timeout(30)
async def test_a_process_ignoring_sigterm_is_killed_after_stop_timeout(
    make_provider: MakeProvider, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="doproxy.providers.local")
    provider = make_provider(command=STUBBORN, **{"health-path": "/", "stop-timeout": "500ms"})
    await provider.create("stubborn-1")
    m = await active(provider, "stubborn-1")  # serving: its SIGTERM trap is in place
    start = time.monotonic()
    await provider.destroy("stubborn-1")
    assert time.monotonic() - start >= 0.5
    assert read_proc(m.pid) is None
    assert "ignored SIGTERM" in caplog.text and "SIGKILL" in caplog.text
    assert await provider.list() == []


@pytest.mark.timeout(30)
async def test_a_dead_process_is_not_listed(make_provider: MakeProvider) -> None:
    provider = make_provider()
    await provider.create("dies-1")
    m = await active(provider, "dies-1")
    os.kill(m.pid, signal.SIGKILL)  # we started it: a crash of the backend

    async def gone_and_reaped() -> bool:
        # An exiting process loses its marker a moment before it can be reaped.
        return await provider.list() == [] and m.pid not in local._children

    await eventually(gone_and_reaped)
    with pytest.raises(MachineNotFound):
        await provider.get("dies-1")


@pytest.mark.timeout(30)
async def test_a_command_that_exits_at_once_is_not_found(make_provider: MakeProvider) -> None:
    provider = make_provider(command="python -c 'import sys; sys.exit(3)' {port}")
    await provider.create("quits-1")
    with pytest.raises(MachineNotFound):
        await active(provider, "quits-1")


async def test_a_command_that_cannot_start_is_a_provider_error(
    make_provider: MakeProvider,
) -> None:
    provider = make_provider(command="./no-such-program-here --port {port}")
    with pytest.raises(ProviderError, match="cannot start local machine nope-1"):
        await provider.create("nope-1")
    with pytest.raises(ProviderError, match="not a valid machine name"):
        await provider.create("bad name; rm -rf")
    assert await provider.list() == []


@pytest.mark.timeout(30)
async def test_two_creates_at_once_get_different_free_ports(make_provider: MakeProvider) -> None:
    # Someone else listens on the first port of the range: it is skipped.
    with socket.socket() as taken:
        while True:
            low, ports = port_range()
            try:
                taken.bind(("127.0.0.1", low))
                break
            except OSError:
                continue  # in use (by a listener or a TIME_WAIT): try another range
        taken.listen()
        provider = make_provider(ports=ports)
        a, b = await asyncio.gather(provider.create("pair-a"), provider.create("pair-b"))
        assert a.port != b.port
        assert low not in (a.port, b.port)
        for m in (a, b):
            await active(provider, m.id)
            assert m.port is not None
            r = await request(m.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert r.body.startswith(m.name.encode() + b":")
        assert {m.name for m in await provider.list()} == {"pair-a", "pair-b"}


# --- restarts and adoption ------------------------------------------------------------------

CREATOR = """
import asyncio, sys
from pathlib import Path
from doproxy.core.settings import LocalProvisioner
from doproxy.providers.local import LocalProvider

async def main() -> None:
    settings = LocalProvisioner.model_validate_json(sys.argv[1])
    m = await LocalProvider(settings, Path(sys.argv[2])).create(sys.argv[3])
    print(m.pid, m.port, flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


@pytest.mark.timeout(30)
async def test_a_restarted_proxy_adopts_and_destroys_what_a_killed_one_started(
    make_provider: MakeProvider, tmp_path: Path
) -> None:
    provider = make_provider()
    # A proxy (here a small script) creates a machine, and then it is kill -9'd.
    creator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CREATOR,
        provider.settings.model_dump_json(by_alias=True),
        str(tmp_path),
        "orphan-1",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert creator.stdout is not None and creator.stderr is not None
        async with asyncio.timeout(15):
            line = await creator.stdout.readline()
        pid, port = (int(x) for x in line.split())
    finally:
        creator.kill()
        await creator.wait()
    # The backend holds none of the dead proxy's pipes: a harness reading them gets EOF.
    async with asyncio.timeout(5):
        assert await creator.stdout.read() == b""
        assert await creator.stderr.read() == b""

    # The restarted proxy (a fresh provider) finds it by tag, serving, though not its child.
    m = await active(provider, "orphan-1")
    assert (m.pid, m.port) == (pid, port)
    assert [x.id for x in await provider.list()] == ["orphan-1"]
    r = await request(port, b"GET /adopted HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.body == b"orphan-1: GET /adopted (0 bytes in)\n"
    await provider.destroy("orphan-1")  # no waitpid possible: it polls /proc
    assert read_proc(pid) is None
    assert bindable(port)
    assert await provider.list() == []


@pytest.mark.timeout(30)
async def test_a_second_provider_instance_lists_and_destroys_the_first_ones(
    make_provider: MakeProvider,
) -> None:
    first, second = make_provider(), make_provider()
    await first.create("shared-1")
    m = await active(first, "shared-1")
    await first.close()
    assert [(x.id, x.pid) for x in await second.list()] == [("shared-1", m.pid)]
    await second.destroy("shared-1")
    assert read_proc(m.pid) is None
    assert await first.list() == []


# --- never signal a process that is not ours ------------------------------------------------


@pytest.mark.timeout(30)
async def test_unmarked_and_foreign_processes_are_never_signalled(
    make_provider: MakeProvider, tag: str
) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOPROXY_")}
    unmarked = subprocess.Popen(sleeper, env=base)  # noqa: ASYNC220 - a test's setup
    # Another doproxy's machine of the same name (its tags do not include ours).
    foreign = subprocess.Popen(  # noqa: ASYNC220
        sleeper,
        env=dict(base, DOPROXY_MACHINE="same-1", DOPROXY_TAGS="someone-else", DOPROXY_PORT="1"),
    )
    try:
        provider = make_provider()
        # As if a machine's pid had been reused by an unrelated process: no marker, no signal.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            assert not signal_if_ours(unmarked.pid, "same-1", (tag,), sig)
            assert not signal_if_ours(foreign.pid, "same-1", (tag,), sig)
        assert not signal_if_ours(foreign.pid, "other-name", ("someone-else",), signal.SIGTERM)

        async def marked() -> bool:  # the child has exec'd with its environment
            return read_proc(foreign.pid) is not None

        await eventually(marked)
        assert await provider.list() == []
        with pytest.raises(MachineNotFound):
            await provider.get("same-1")
        await provider.destroy("same-1")  # not ours: nothing to do
        assert unmarked.poll() is None and foreign.poll() is None
        # The other doproxy's tag sees it, and the same name is free for our own machine.
        assert signal_if_ours(foreign.pid, "same-1", ("someone-else",), 0)  # 0: probe only
        ours = await provider.create("same-1")
        assert ours.pid != foreign.pid
        await provider.destroy("same-1")
        assert foreign.poll() is None and unmarked.poll() is None
    finally:
        for p in (unmarked, foreign):
            p.kill()
            p.wait()


@pytest.mark.timeout(30)
async def test_proc_scans_run_in_a_thread_not_on_the_event_loop(
    make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanning /proc blocks (milliseconds per few hundred processes): never on the loop."""
    import threading

    real_scan = local.scan
    threads: list[threading.Thread] = []

    def recording_scan() -> list[local.Proc]:
        threads.append(threading.current_thread())
        return real_scan()

    monkeypatch.setattr(local, "scan", recording_scan)
    provider = make_provider()
    await provider.create("scanned-1")
    await active(provider, "scanned-1")
    assert [m.name for m in await provider.list()] == ["scanned-1"]
    await provider.reboot("scanned-1")
    await provider.destroy("scanned-1")
    with pytest.raises(MachineNotFound):
        await provider.get("scanned-1")
    assert len(threads) >= 6
    assert threading.main_thread() not in threads


@pytest.mark.timeout(30)
async def test_a_spec_command_and_tags_survive_a_reboot(
    make_provider: MakeProvider, tag: str
) -> None:
    """A rollout's machine runs its spec's command with the rollout's tag, and `reboot` starts
    that command again, not the configured one."""
    provider = make_provider()
    spec = Spec(command=COMMAND + " --error-rate 1", tags=("doproxy-rollout-abc",))
    created = await provider.create("web-2", spec)
    assert created.tags == (tag, "doproxy-rollout-abc")
    m = await active(provider, "web-2")
    assert m.tags == (tag, "doproxy-rollout-abc")
    r = await request(m.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 500  # the spec's program, not the configured one
    await provider.reboot("web-2")
    rebooted = await provider.get("web-2")
    assert rebooted.pid != m.pid and rebooted.tags == m.tags
    r = await request(m.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 500
    # A machine of the configured command carries no spec marker: a reboot runs the config's.
    plain = await provider.create("web-3")
    assert "DOPROXY_COMMAND" not in environ_of(plain.pid)
