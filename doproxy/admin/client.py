"""A client of a running server's admin API, for the CLI (status, events, drain, enable, ...).

Finding the server
------------------
A server writes the address its admin listener actually bound to `<inventory>.admin.addr`
(port 0 picks a free one) and removes it at stop; so the inventory, which the config names, is
how the CLI finds the server that serves it, whatever port it got. A server also holds the lock
on `<inventory>.server` for its whole life (doproxy.machines.running_server):

- lock free: no server runs here, whatever files a `kill -9` left behind. The address in a left
  file may belong to anything by now, so it is never used;
- lock held, address file present: that address;
- lock held, no address file (removed by hand): the configured `[admin] bind`, unless its port
  is 0 (nobody can know which port it got).

The configured bind alone is never trusted: another installation's server may listen there, and
`doproxy drain 3` must not drain that one's backend 3.

The token: `[admin] token`, else `token-file`, else the one the server generated into
`<inventory>.admin.token` (0600: only the server's user can read it). Read-only requests on
loopback need none, so a token that cannot be read is an error only when the server asks for
it. The token is sent in the Authorization header and nowhere else: it is never logged, and no
error message holds it (messages name where it came from instead).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from doproxy.admin.server import addr_path, configured_token, token_path
from doproxy.config import resolve_in
from doproxy.core.settings import Settings, parse_bind
from doproxy.errors import DoproxyError

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds for one request: every endpoint answers from memory
# An idle event stream gets a comment every 15 s (SSE_KEEPALIVE); four missed ones mean the
# connection is dead even though no FIN came (a server host that vanished).
STREAM_READ_TIMEOUT = 60.0


class NoServer(DoproxyError):
    """No server answers for this inventory. Commands that can act on the inventory instead
    (drain, enable, disable) do; the others report it."""


class TokenRefused(DoproxyError):
    """The admin API answered 401: the token is wrong or missing."""


class ApiError(DoproxyError):
    """The admin API refused a request (4xx) or failed (5xx); the message is its own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Found:
    """Where a running server's admin API is, and how to authenticate to it."""

    url: str  # "http://127.0.0.1:8001", no trailing slash
    inventory: Path
    pid: int | None  # of the server holding the inventory's lock; 0 when it did not say
    token: str = field(repr=False)  # "" when none could be read
    token_source: str  # where the token came from, or where it was looked for
    token_problem: str = ""  # why there is no token ("" when there is one)


def locate(settings: Settings, base: Path, inventory: Path) -> Found:
    """Find the admin API of the server running on `inventory`; NoServer when there is none.

    Reads files only: whether the server answers is learnt by asking it.
    """
    from doproxy.machines import running_server

    addr_file = addr_path(inventory)
    try:
        pid = running_server(inventory)
        lock_known = True
    except OSError:
        # The lock file cannot be opened (another user's server): trust the address file.
        pid, lock_known = None, False
    if lock_known and pid is None:
        raise NoServer(
            f"no doproxy server is running on inventory {inventory} ("
            + (
                f"its {addr_file.name} is left from one that did not stop cleanly)"
                if addr_file.exists()
                else f"no {addr_file.name})"
            )
        )
    try:
        address = addr_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        address = ""
    except OSError as e:
        raise DoproxyError(f"cannot read {addr_file}: {e.strerror}") from None
    if not address:
        address = _configured_address(settings.admin.bind)
        if not settings.admin.enable or not address:
            raise NoServer(
                f"no doproxy server is running on inventory {inventory} (no {addr_file.name})"
                if not lock_known
                else f"the doproxy server (pid {pid}) on inventory {inventory} has no admin "
                f"listener (no {addr_file.name}; [admin] enable = false, or its bind failed)"
            )
    token, source, problem = _token(settings, base, inventory)
    return Found(f"http://{address}", inventory, pid, token, source, problem)


def _configured_address(bind: str) -> str:
    """Where a client reaches `[admin] bind`; "" when its port is 0 (unknowable)."""
    host, port = parse_bind(bind)
    if port == 0:
        return ""
    # Bound to every interface: loopback reaches it (and needs no routing to).
    if host in (None, "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _token(settings: Settings, base: Path, inventory: Path) -> tuple[str, str, str]:
    """(token, where it came from, why there is none)."""
    admin = settings.admin
    if admin.token:
        return admin.token, "[admin] token", ""
    if admin.token_file:
        source = f"[admin] token-file {resolve_in(base, admin.token_file)}"
        # ConfigError (unreadable, empty) names the file and stops the command: the server
        # would have refused to start with it too.
        return configured_token(admin, base) or "", source, ""
    path = token_path(inventory)
    try:
        return path.read_text(encoding="utf-8").strip(), str(path), ""
    except FileNotFoundError:
        return "", str(path), f"{path} does not exist"
    except OSError as e:
        # 0600: run the command as the server's user (or configure [admin] token-file).
        return "", str(path), f"cannot read {path}: {e.strerror}"


class AdminClient:
    """One session with a running server's admin API. Use as `async with AdminClient(found)`."""

    def __init__(self, found: Found, timeout: float = TIMEOUT) -> None:
        self.found = found
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self.found.url

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        if not self.found.token:
            return {}
        return {"Authorization": f"Bearer {self.found.token}"}

    async def get(self, path: str) -> Any:
        return await self._request("GET", path)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self._session is not None, "use AdminClient in `async with`"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._session.request(
                method, self.url + path, headers=self._headers(), timeout=timeout, json=body
            ) as r:
                text = await r.text()
                status = r.status
        except aiohttp.ClientConnectorError as e:
            raise self._unreachable(e) from None
        except TimeoutError:
            raise DoproxyError(
                f"the admin API at {self.url} did not answer {method} {path} within "
                f"{self.timeout:.0f}s"
            ) from None
        except aiohttp.ClientError as e:
            raise DoproxyError(f"the admin API at {self.url} failed: {e}") from None
        return self._answer(status, text, method, path)

    def _unreachable(self, e: aiohttp.ClientConnectorError) -> NoServer:
        why = e.strerror or str(e.os_error) or "cannot connect"
        return NoServer(
            f"no doproxy server answers at {self.url} ({why}), the admin address of the "
            f"server on inventory {self.found.inventory}: is it still starting, or stopping? "
            "(`doproxy serve` starts one)"
        )

    def _answer(self, status: int, text: str, method: str, path: str) -> Any:
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        if status == 401:
            raise self._refused()
        if status >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            raise ApiError(status, str(message or f"{method} {path} answered {status}"))
        if body is None:
            raise DoproxyError(f"the admin API at {self.url} answered {method} {path} with no JSON")
        return body

    def _refused(self) -> TokenRefused:
        found = self.found
        if found.token_problem:
            return TokenRefused(
                f"the admin API needs a token and none could be read ({found.token_problem}); "
                "run this as the server's user, or configure [admin] token-file"
            )
        # Never the token itself: where it came from is enough to fix it.
        return TokenRefused(
            f"the admin API refused the token from {found.token_source}: it is not the one "
            "the running server uses (a changed [admin] token or token-file needs a reload "
            "of the server, `kill -HUP`)"
        )

    @contextlib.asynccontextmanager
    async def stream(self, since: int) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The event stream (Server-Sent Events) after event `since`, connected: entering
        returns once the server has accepted it; iterating yields each event as the API's
        JSON, and ends when the server closes the stream."""
        assert self._session is not None, "use AdminClient in `async with`"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=STREAM_READ_TIMEOUT
        )
        headers = {**self._headers(), "Last-Event-ID": str(since)}
        try:
            async with self._session.get(
                self.url + "/api/events/stream", headers=headers, timeout=timeout
            ) as r:
                if r.status != 200:
                    self._answer(r.status, await r.text(), "GET", "/api/events/stream")
                    raise DoproxyError(f"the event stream at {self.url} answered {r.status}")
                yield _events(r.content)
        except aiohttp.ClientConnectorError as e:
            raise self._unreachable(e) from None
        except TimeoutError:
            raise DoproxyError(
                f"the event stream at {self.url} was silent for {STREAM_READ_TIMEOUT:.0f}s "
                "(the server sends a keep-alive every 15 s): the connection is lost"
            ) from None
        except aiohttp.ClientPayloadError:
            return  # cut mid-event (the server stopped): the stream has ended
        except aiohttp.ClientError as e:
            raise DoproxyError(f"the event stream at {self.url} failed: {e}") from None


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Parse Server-Sent Events: `data:` lines up to a blank line make one event; comments
    (`:`), `retry:`, `id:` and `event:` lines carry nothing the event's JSON does not."""
    data: list[str] = []
    while True:
        try:
            raw = await content.readline()
        except (aiohttp.ClientPayloadError, ConnectionResetError):
            return
        if not raw:
            return  # the server closed the stream
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
            continue
        if not data:
            continue
        try:
            event = json.loads("\n".join(data))
        except ValueError:
            log.warning("skipped an event stream message that is not JSON")
        else:
            if isinstance(event, dict):
                yield event
        data = []
