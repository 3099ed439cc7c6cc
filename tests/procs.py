"""Running doproxy as a real subprocess (`python -m doproxy --config FILE`)."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path

_LISTEN = re.compile(rb"listening on ([0-9.]+):(\d+)")


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    port: int
    log: bytearray

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> tuple[int, int]:
        """(current RSS, peak RSS) of the proxy process, in KiB, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    async def _pump(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log += line

    async def stop(self, timeout: float = 10.0) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


# Every test server binds its admin listener to a free port: tests run side by side, and a
# doproxy of the user's own may hold the default 8001.
ADMIN = '\n[admin]\nbind = "127.0.0.1:0"\n'


def write_config(tmp: Path, backend_ports: list[int], extra: str = "") -> Path:
    inv = tmp / "inventory.toml"
    inv.write_text(
        "".join(
            f'[[droplet]]\nid = {i + 1}\nname = "b{i + 1}"\nserver-host = "127.0.0.1:{p}"\n'
            for i, p in enumerate(backend_ports)
        )
    )
    cfg = tmp / "doproxy.toml"
    # Health checks would send their own requests to the tests' backends: off unless asked.
    if "[backend]" not in extra:
        extra += "\n[backend]\ndisable-health-check = true\n"
    cfg.write_text(
        f'bind = "127.0.0.1:0"\nwatch-config = false\ninventory-file = "inventory.toml"\n{extra}'
        + ("" if "[admin]" in extra else ADMIN)
    )
    return cfg


async def start_proxy_process(
    config: Path | None, timeout: float = 15.0, args: tuple[str, ...] = ()
) -> ProxyProcess:
    """Start doproxy and wait for its "listening on" log line (readiness, not a sleep)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "doproxy",
        *(("--config", str(config)) if config is not None else ()),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = await proc.stderr.readline()
                if not line:
                    raise RuntimeError(f"doproxy exited before listening:\n{log.decode()}")
                log += line
                m = _LISTEN.search(line)
                if m:
                    break
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    pp = ProxyProcess(proc, int(m.group(2)), log)
    asyncio.get_running_loop().create_task(pp._pump())
    return pp
