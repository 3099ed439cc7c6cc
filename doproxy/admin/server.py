"""The admin listener: a JSON API, Prometheus metrics and the status page, beside the proxy.

Theory of operation
-------------------
It runs on the proxy's own event loop (a small HTTP/1.1 server on httptools, as the data plane:
doproxy/admin/http.py, which says why it is not aiohttp's and what it bounds), on its own address
(`[admin] bind`, loopback port 8001 by default). It costs the data plane nothing while nobody
asks: every answer is built from counters and state the proxy keeps anyway, when it is asked for.

Who may do what:
- a token always exists: `[admin] token`, else `token-file`, else one generated at start and
  written beside the inventory (`<inventory>.admin.token`, mode 0600), where the CLI finds it;
- read-only endpoints (GET) need no token while the listener is bound to loopback (anyone who
  can reach it runs on this machine); bound beyond loopback, every endpoint needs it;
- every mutating endpoint (POST, PUT) always needs `Authorization: Bearer <token>`;
- a wrong token and a missing one get the same 401 with the same words; tokens are compared in
  constant time (hmac.compare_digest) and never logged, echoed or shown (`/api/config` redacts
  every secret).

The address actually bound (port 0 picks a free one) is logged and written to
`<inventory>.admin.addr` for the CLI; both files are removed at stop.

Membership changes (drain, enable, disable, weight) are written to the inventory under its
lock and applied to the running pool in-process (Runtime.apply_inventory), exactly as the CLI's
are: the inventory stays the one record, and a config that is invalid at that moment does not
matter. The autoscaler's live overrides (pause, min/max) are kept beside the inventory by the
autoscaler itself, so they survive a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from doproxy import __version__
from doproxy.admin import http as web  # aiohttp.web's names for what the handlers use
from doproxy.config import read_secret_file
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Admin, Settings, parse_bind
from doproxy.errors import ConfigError, DoproxyError
from doproxy.events import EventLog
from doproxy.inventory import write_atomically
from doproxy.provisioning import USER_DATA_LIMIT, Spec

if TYPE_CHECKING:
    from doproxy.autoscaler import Autoscaler
    from doproxy.cluster.node import ClusterNode
    from doproxy.machines import InventoryStore
    from doproxy.proxy.backend import Backend
    from doproxy.proxy.server import ProxyServer
    from doproxy.statistics import StatsCollector

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_KEEPALIVE = 15.0  # seconds between comments on an idle event stream (proxies time out)
DECISIONS_SHOWN = 50
MAX_STREAMS = 64  # event streams open at once: each holds a connection and a task


class Served(Protocol):
    """What the admin listener needs from the running proxy (doproxy.runtime.Runtime)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def server(self) -> ProxyServer | None: ...

    @property
    def stats(self) -> StatsCollector | None: ...

    @property
    def autoscaler(self) -> Autoscaler | None: ...

    @property
    def events(self) -> EventLog: ...

    @property
    def reloads(self) -> int: ...

    @property
    def last_reload_error(self) -> str | None: ...

    @property
    def backends(self) -> list[Backend]: ...

    @property
    def entries(self) -> list[InventoryEntry]:
        """The inventory as last applied (its "provisioning" intents too)."""
        ...

    @property
    def inventory_path(self) -> Path: ...

    @property
    def store(self) -> InventoryStore: ...

    @property
    def cluster(self) -> ClusterNode | None: ...

    def wake_state(self) -> tuple[int, float | None, bool]: ...

    @property
    def base(self) -> Path: ...

    async def reload(self) -> bool: ...

    async def apply_inventory(self) -> bool: ...

    def workers_status(self) -> list[dict[str, Any]]:
        """Each worker process (workers > 1): pid, generation, restarts, counts."""
        ...


def token_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".admin.token")


def addr_path(inventory: Path) -> Path:
    return inventory.with_name(inventory.name + ".admin.addr")


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False  # ":8001" is every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _loopback_host(host: str) -> bool:
    """Is a Host header a loopback name or address (with or without a port)?"""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return is_loopback(name.lower()) if name else False


def configured_token(admin: Admin, base: Path) -> str | None:
    """The token the config gives (token, else token-file), or None: one is generated."""
    if admin.token:
        return admin.token
    if admin.token_file:
        return read_secret_file(base, admin.token_file, "admin.token-file")
    return None


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AdminServer:
    def __init__(
        self, runtime: Served, metrics: Callable[[], tuple[bytes, str]] | None = None
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.settings = runtime.settings.admin
        self.token = ""
        self.generated = False  # the token was made here and written beside the inventory
        self.address: tuple[str, int] | None = None
        self.started = time.time()
        self._runner: web.Server | None = None
        self._closing = asyncio.Event()
        self._streams = 0  # open event streams, bounded by MAX_STREAMS

    @property
    def loopback(self) -> bool:
        return is_loopback(parse_bind(self.settings.bind)[0])

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        inventory = self.runtime.inventory_path
        token = configured_token(self.settings, self.runtime.base)
        runner = web.Server(self._app())
        host, port = parse_bind(self.settings.bind)
        try:
            await runner.start(host, port)
        except OSError as e:
            raise DoproxyError(
                f"admin listener: cannot listen on {self.settings.bind}: {e.strerror}; "
                "choose another [admin] bind (port 0 picks a free one) or enable = false"
            ) from None
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        if token is None:
            token = secrets.token_urlsafe(32)
            self.generated = True
            # write_atomically's temp file is created 0600 (mkstemp) and renamed: the token
            # is never readable by others, not even for an instant.
            write_atomically(token_path(inventory), token + "\n")
        self.token = token
        write_atomically(addr_path(inventory), self._host_port() + "\n")
        log.info(
            "admin listener on %s (status page, API, metrics)%s",
            self.url(),
            "" if self.loopback else "; every endpoint needs the token",
        )

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.stop(grace=1.0)
            self._runner = None
        inventory = self.runtime.inventory_path
        with contextlib.suppress(OSError):
            addr_path(inventory).unlink()
        if self.generated:
            with contextlib.suppress(OSError):
                token_path(inventory).unlink()

    def _host_port(self) -> str:
        """ "127.0.0.1:8001", or "[::1]:8001": how a client names the bound address."""
        assert self.address is not None
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def url(self) -> str:
        return f"http://{self._host_port()}/"

    # --- the app ----------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.status_page)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/api/openapi.json", self.openapi)
        r.add_get("/api/status", self.status)
        r.add_get("/api/autoscaler", self.autoscaler)
        r.add_put("/api/autoscaler", self.autoscaler_limits)
        r.add_post("/api/autoscaler/{verb:pause|resume}", self.autoscaler_pause)
        r.add_get("/api/events", self.events)
        r.add_get("/api/events/stream", self.event_stream)
        r.add_post("/api/backends/{id}/{verb:drain|enable|disable}", self.backend_state)
        r.add_put("/api/backends/{id}/weight", self.backend_weight)
        r.add_get("/api/rollouts", self.rollouts)
        r.add_post("/api/rollouts", self.rollout_start)
        r.add_post("/api/rollouts/abort", self.rollout_abort)
        r.add_post("/api/reload", self.reload)
        r.add_get("/api/config", self.config)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as {"error": "..."}; nothing the client sent is echoed but the path."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            given = e.text or ""
            custom = bool(given) and not given.startswith(str(e.status))
            text = given if custom else e.reason
            # The router's own 404 and 405 (with no text) are said in our words;
            # a handler's (e.g. "no backend 7") keep theirs: they say what was not found.
            if e.status == 404 and not custom:
                text = f"no such endpoint: {request.method} {request.path}"
            elif e.status == 405 and not custom:
                text = f"{request.method} is not allowed on {request.path}"
            return _json_error(e.status, text or e.reason)
        except DoproxyError as e:
            return _json_error(getattr(e, "status", 500), str(e))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback and not _loopback_host(request.host):
            # DNS rebinding: a web page on another origin whose name now resolves to
            # 127.0.0.1 would otherwise read the token-free GET endpoints from the browser.
            # A loopback listener answers only requests addressed to a loopback name.
            return _json_error(
                421,
                "this admin listener serves loopback names only (127.0.0.1, [::1], "
                "localhost); bind it beyond loopback, with the token, to reach it by another",
            )
        mutating = request.method not in ("GET", "HEAD", "OPTIONS")
        needs_token = mutating or not self.loopback
        if needs_token and not self._authorized(request.headers.get("Authorization", "")):
            # The page itself asks a browser for the token as a Basic password (the browser
            # then sends it with every request of the page, the event stream included); the
            # API's own 401s do not, or a wrong token typed into the page would pop a dialog.
            challenge = 'Basic realm="doproxy admin", charset="UTF-8"'
            if request.path != "/":
                challenge = 'Bearer realm="doproxy"'
            return web.json_response(
                {
                    "error": "unauthorized: send Authorization: Bearer <token> (the "
                    "[admin] token, or the one in <inventory>.admin.token)"
                },
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        return await handler(request)

    def _authorized(self, header: str) -> bool:
        """`Bearer <token>`, or `Basic` with the token as the password (any user name): what a
        browser sends for the status page beyond loopback."""
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        # Compared in constant time, and compared even when the scheme is wrong, so a wrong
        # token and a missing one take the same path.
        ok = hmac.compare_digest(given.encode(), self.token.encode())
        return ok and scheme.lower() in ("bearer", "basic") and bool(self.token)

    # --- read-only ----------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        server = self.runtime.server
        if server is None or server.draining:
            return web.json_response({"status": "stopping"}, status=503)
        return web.json_response({"status": "serving"})

    async def prometheus(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return _json_error(404, "metrics are not available in this build")
        body, content_type = self.metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        from doproxy.admin.openapi import SPEC

        return web.json_response(SPEC)

    async def status_page(self, request: web.Request) -> web.Response:
        page = Path(__file__).with_name("status.html")
        try:
            body = page.read_bytes()
        except OSError:
            return _json_error(404, "the status page is not installed; the API is at /api/")
        return web.Response(
            body=body,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                # The page loads nothing from anywhere else (no CDN: it works offline).
                "Content-Security-Policy": "default-src 'self'; style-src 'self' "
                "'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:",
                "Cache-Control": "no-store",
            },
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status_view(self.runtime, self.started))

    async def autoscaler(self, request: web.Request) -> web.Response:
        return web.json_response(autoscaler_view(self.runtime))

    async def events(self, request: web.Request) -> web.Response:
        since = _int_query(request, "since", 0)
        limit = _int_query(request, "limit", 0)
        log_ = self.runtime.events
        found = log_.since(since, limit or None)
        return web.json_response(
            {"last_id": log_.last_id, "events": [e.to_json() for e in found]},
        )

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every event as `id:`/`event:`/`data:`; resumes after
        Last-Event-ID (or ?since=); a comment every 15 s keeps idle connections open."""
        header = request.headers.get("Last-Event-ID", "")
        since = int(header) if header.isdigit() else _int_query(request, "since", 0)
        if self._streams >= MAX_STREAMS:
            return _json_error(
                503, f"{MAX_STREAMS} event streams are open already; poll /api/events instead"
            )
        self._streams += 1
        try:
            return await self._stream(request, since)
        finally:
            self._streams -= 1

    async def _stream(self, request: web.Request, since: int) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        log_ = self.runtime.events
        closing = asyncio.ensure_future(self._closing.wait())
        waiting: asyncio.Future[Any] | None = None
        try:
            await resp.write(b"retry: 2000\n\n")
            while not self._closing.is_set():
                found: list[Any] = []
                waiting = asyncio.ensure_future(log_.wait(since))
                done, _ = await asyncio.wait(
                    {waiting, closing}, timeout=SSE_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
                if waiting in done:
                    found = waiting.result()
                else:
                    waiting.cancel()
                if not found:
                    await resp.write(b": keep-alive\n\n")
                    continue
                chunk = bytearray()
                for e in found:
                    data = json.dumps(e.to_json(), separators=(",", ":"))
                    chunk += f"id: {e.id}\nevent: {e.kind}\ndata: {data}\n\n".encode()
                    since = e.id
                await resp.write(bytes(chunk))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            closing.cancel()
            if waiting is not None:
                # Cancelled while waiting (the client left): no waiter stays in the event log.
                waiting.cancel()
        return resp

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(redacted(self.runtime.settings))

    # --- mutating ----------------------------------------------------------------------------

    async def reload(self, request: web.Request) -> web.Response:
        ok = await self.runtime.reload()
        if not ok:
            error = self.runtime.last_reload_error or "reload failed"
            return _json_error(422, f"reload failed, the running configuration stays: {error}")
        return web.json_response({"reloaded": True, "generation": self.runtime.reloads})

    async def backend_state(self, request: web.Request) -> web.Response:
        verb = request.match_info["verb"]
        backend = self._backend(request.match_info["id"])
        entry = backend.entry
        if entry.retiring:
            return _json_error(
                409, f"backend {backend.name} is being retired (drained and destroyed)"
            )
        state = {"drain": "draining", "enable": "active", "disable": "disabled"}[verb]
        if verb == "drain" and entry.state != "active":
            return _json_error(409, f"backend {backend.name} is {entry.state}, not active")
        await self._change(backend, {"state": state}, f"{verb}d" if verb != "drain" else "drain")
        return web.json_response(backend_view(self.runtime, backend))

    async def backend_weight(self, request: web.Request) -> web.Response:
        backend = self._backend(request.match_info["id"])
        body = await _json_body(request)
        weight = body.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
            return _json_error(400, 'body must be {"weight": N} with N an integer 0..1000')
        await self._change(backend, {"weight": weight}, f"weight {weight}")
        return web.json_response(backend_view(self.runtime, backend))

    async def autoscaler_pause(self, request: web.Request) -> web.Response:
        scaler = self._scaler()
        verb = request.match_info["verb"]
        await scaler.set_paused(verb == "pause")
        self.runtime.events.publish(
            "autoscaler", f"autoscaler {'paused' if verb == 'pause' else 'resumed'} (admin API)"
        )
        return web.json_response(autoscaler_view(self.runtime))

    async def autoscaler_limits(self, request: web.Request) -> web.Response:
        scaler = self._scaler()
        body = await _json_body(request)
        unknown = sorted(set(body) - {"min-backends", "max-backends"})
        if unknown or not body:
            return _json_error(
                400, 'body must be {"min-backends": N, "max-backends": M} (either or both)'
            )
        limits: dict[str, int | None] = {}
        for key, value in body.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                return _json_error(400, f"{key} must be an integer (or null: the config's)")
            limits[key] = value
        try:
            await scaler.set_limits(limits)
        except ValueError as e:
            return _json_error(400, str(e))
        p = scaler.settings
        self.runtime.events.publish(
            "autoscaler",
            f"autoscaler limits set to {p.min_backends}..{p.max_backends} (admin API)",
        )
        return web.json_response(autoscaler_view(self.runtime))

    async def rollouts(self, request: web.Request) -> web.Response:
        return web.json_response(rollouts_view(self.runtime))

    async def rollout_start(self, request: web.Request) -> web.Response:
        """Begin a rollout: {"image", "size", "user_data", "command"} (any; none: roll the
        config's spec out again). 202 with the rollout; 409 when one cannot begin now."""
        body = await _json_body(request)
        fields = ("image", "size", "user_data", "command")
        unknown = sorted(set(body) - set(fields))
        if unknown:
            return _json_error(
                400, f"unknown field(s) {', '.join(unknown)}: the body takes {', '.join(fields)}"
            )
        values: dict[str, str] = {}
        for key in fields:
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                return _json_error(400, f"{key} must be a string")
            if key == "user_data" and len(value.encode()) > USER_DATA_LIMIT:
                return _json_error(
                    400, f"user_data is larger than DigitalOcean's {USER_DATA_LIMIT} bytes"
                )
            if key != "user_data" and (len(value) > 1024 or "\0" in value):
                return _json_error(400, f"{key} must be at most 1024 characters, without NUL")
            values[key] = value
        if "command" in values and not self.loopback:
            # A command is a program this machine runs: chosen only by someone on it (the
            # token alone does not allow that from afar).
            return _json_error(
                403,
                "command is taken only by an admin listener bound to loopback (a program to "
                "run on this machine is not chosen from afar); run `doproxy rollout` there",
            )
        scaler = self._scaler()
        spec = Spec(
            image=values.get("image", ""),
            size=values.get("size", ""),
            user_data=values.get("user_data", ""),
            command=values.get("command", ""),
        )
        view = await scaler.rollouts.start(spec, "the admin API")
        return web.json_response(view, status=202)

    async def rollout_abort(self, request: web.Request) -> web.Response:
        scaler = self._scaler()
        view = await scaler.rollouts.abort("the admin API")
        return web.json_response(view, status=202)

    # --- helpers ----------------------------------------------------------------------------

    def _backend(self, ident: str) -> Backend:
        """By machine id (the inventory key), else by name."""
        backends = self.runtime.backends
        for b in backends:
            if b.key == ident:
                return b
        named = [b for b in backends if b.name == ident]
        if len(named) == 1:
            return named[0]
        if named:
            raise web.HTTPConflict(text=f"{len(named)} backends are named {ident}: use the id")
        raise web.HTTPNotFound(text=f"no backend {ident}")

    def _scaler(self) -> Autoscaler:
        scaler = self.runtime.autoscaler
        cluster = self.runtime.cluster
        if scaler is None and cluster is not None and not cluster.leading:
            raise web.HTTPConflict(
                text=f"this node ({cluster.name}) does not lead the cluster, so it runs no "
                f"autoscaler; the leader is {cluster.leader or 'not elected yet'}: use its "
                "admin API"
            )
        if scaler is None:
            raise web.HTTPConflict(text="the autoscaler is off ([provisioning] enable = false)")
        return scaler

    async def _change(self, backend: Backend, update: dict[str, object], what: str) -> None:
        """Write the change to the inventory (under its lock) and apply it to the pool."""
        key = backend.key
        found = False

        def change(entries: list[InventoryEntry]) -> list[InventoryEntry]:
            nonlocal found
            out = []
            for e in entries:
                if e.key == key:
                    found = True
                    e = e.model_copy(update=update)
                out.append(e)
            return out

        try:
            await self.runtime.store.update(change)
        except (OSError, ConfigError) as e:
            raise web.HTTPInternalServerError(
                text=f"the inventory could not be changed, nothing applied: {e}"
            ) from None
        except DoproxyError as e:  # etcd unreachable (cluster mode): retry when it answers
            raise web.HTTPServiceUnavailable(
                text=f"the inventory could not be changed, nothing applied: {e}"
            ) from None
        if not found:
            raise web.HTTPConflict(text=f"backend {backend.name} is no longer in the inventory")
        await self.runtime.apply_inventory()
        self.runtime.events.publish(
            "membership", f"{backend.name}: {what} (admin API)", backend=backend.name
        )


def _int_query(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise web.HTTPBadRequest(text=f"{name} must be a non-negative integer")
    return int(value)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


# --- views: what the API shows ------------------------------------------------------------------


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


def backend_view(runtime: Served, b: Backend) -> dict[str, Any]:
    from doproxy.machines import owned

    server = runtime.server
    eligible = server is not None and b in server.pool.eligible
    st = runtime.stats.stats.get(b) if runtime.stats is not None else None
    e = b.entry
    started = e.started_time
    age = None
    if started.year > 1:
        age = max(time.time() - started.timestamp(), 0.0)
    scaler = runtime.autoscaler
    if scaler is not None and owned(e, scaler.owner):
        owner = "this installation"
    elif e.provider:
        owner = "another installation" if e.tags else "unknown"
    else:
        owner = "hand-written"
    health = b.health
    return {
        "id": b.key,
        "name": b.name,
        "address": e.server_host,
        "state": e.state,
        "health": "up" if health.up else "down",
        "ejected": bool(b.ejected_until),
        "eligible": eligible,
        "weight": e.weight,
        # A rollout's canary takes this percent of the pool's traffic; 0 for every other.
        "canary_weight": float(e.canary_weight),
        "in_flight": b.in_flight,
        "requests": b.requests,
        "failures": b.failures,
        "requests_per_second": _round(st.requests_per_second if st is not None else None, 3),
        "error_rate": _round(b.failure_rate, 4),
        "latency": {
            # None until the backend has answered a request: 0 would read as "instant".
            "average": _round(st.latency.value if st is not None and st.requests else None),
            "p95": _round(st.p95 if st is not None and st.requests else None),
        },
        "age": _round(age, 0),
        "owner": owner,
        "provider": e.provider or None,
    }


def status_view(runtime: Served, started: float) -> dict[str, Any]:
    server = runtime.server
    settings = runtime.settings
    sig = runtime.stats.signal if runtime.stats is not None else None
    measured = server is not None and server.exchanges > 0  # else "0 ms" would mislead
    workers = runtime.workers_status()
    listener: dict[str, Any] = {
        "addresses": [f"{h}:{p}" for h, p in server.addresses] if server else [],
        "https": settings.https,
        "connections": (len(server.connections) if server else 0)
        + sum(w["connections"] for w in workers),
        "in_flight": sum(b.in_flight for b in runtime.backends),
        "requests": server.exchanges if server else 0,
        "requests_per_second": _round(sig.requests_per_second if sig else None, 3),
        "latency": {
            "average": _round(sig.latency.value if sig and measured else None),
            "p95": _round(sig.p95 if sig and measured else None),
        },
        "balancing": settings.loadbalancing.type,
    }
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime": round(time.time() - started, 1),
        "time": time.time(),
        "config_generation": runtime.reloads,
        "listener": listener,
        # The worker processes and the configuration generation each serves (docs/workers.md);
        # empty when this process serves itself (workers = 1).
        "workers": workers,
        "backends": [backend_view(runtime, b) for b in runtime.backends],
        "cost": cost_view(runtime),
        # Cluster mode (docs/cluster.md): this node, the leader, each node's signal; null with
        # the file store.
        "cluster": runtime.cluster.status() if runtime.cluster is not None else None,
    }


def cost_view(runtime: Served) -> dict[str, Any]:
    """What the pool costs per hour now (docs/autoscaling.md, "What the pool costs")."""
    from doproxy.machines import inventory_cost

    scaler = runtime.autoscaler
    cost = (
        scaler.cost() if scaler is not None else inventory_cost(runtime.settings, runtime.entries)
    )
    cap = runtime.settings.provisioning.max_cost_per_hour
    return {
        "per_hour": round(cost.per_hour, 6),
        "machines": cost.machines,
        # Machines whose price is not known (not in per_hour): hand-written entries, say.
        "unpriced": cost.unpriced,
        "new_backend": _round(cost.new_machine),
        "max-cost-per-hour": cap or None,
    }


def autoscaler_view(runtime: Served) -> dict[str, Any]:
    scaler = runtime.autoscaler
    config = runtime.settings.provisioning
    base: dict[str, Any] = {
        "enabled": scaler is not None,
        "config": {"min-backends": config.min_backends, "max-backends": config.max_backends},
        "cost": cost_view(runtime),
    }
    if scaler is None:
        return {**base, "paused": False, "decisions": []}
    p = scaler.settings
    status = scaler.status()
    sig = runtime.stats.signal if runtime.stats is not None else None
    decisions = [
        {
            "at": r.at.isoformat(),
            "action": r.action,
            "reason": r.reason,
            "size_before": r.size_before,
            "size_after": r.size_after,
            "acted": r.acted,
            "cost_before": r.cost_before,
            "cost_after": r.cost_after,
        }
        for r in list(scaler.history)[-DECISIONS_SHOWN:]
    ]
    return {
        **base,
        "paused": scaler.paused,
        "mode": p.mode,
        "dry_run": p.dry_run,
        "min-backends": p.min_backends,
        "max-backends": p.max_backends,
        "overrides": scaler.overrides_view(),
        "desired": status["desired"],
        "actual": status["actual"],
        "signal": {
            "latency": _round(scaler.last_latency),
            "requests_per_second": _round(sig.requests_per_second if sig else None, 3),
            "p95": _round(sig.p95 if sig else None),
            "upscale-latency": p.upscale_latency if p.mode == "threshold" else None,
            "downscale-latency": p.downscale_latency if p.mode == "threshold" else None,
            "target-latency": p.target_latency if p.mode == "target" else None,
        },
        "last_error": status["last_error"],
        "backoff": status["create_backoff"],
        "create_error": status["create_error"],
        "scale_to_zero": _sleep_view(runtime, p) if p.scale_to_zero else None,
        "decisions": decisions,
    }


def rollouts_view(runtime: Served) -> dict[str, Any]:
    """The rollout in progress (None) and the last ones that ended, newest first."""
    scaler = runtime.autoscaler
    if scaler is None:
        return {"enabled": False, "current": None, "history": []}
    p = scaler.settings
    return {
        "enabled": True,
        **scaler.rollouts.status(),
        "settings": {
            "canary-weight": p.canary_weight,
            "canary-time": p.canary_time,
            "max-error-rate-increase": p.max_error_rate_increase,
            "max-latency-ratio": p.max_latency_ratio,
            "rollout-step": p.rollout_step,
            "rollout-step-time": p.rollout_step_time,
            "rollout-min-requests": p.rollout_min_requests,
        },
        "spec": (scaler.current_spec() or Spec()).public(),
    }


def _sleep_view(runtime: Served, p: Any) -> dict[str, Any]:
    """Scale to zero: asleep or awake, requests held, and when it sleeps next."""
    waiting, quiet, _ = runtime.wake_state()
    asleep = not runtime.backends and waiting == 0
    return {
        "asleep": asleep,
        "waking": waiting > 0,
        "waiting": waiting,
        "quiet_for": _round(quiet, 1),
        "idle_after": p.idle_after,
        "sleeps_in": None if asleep or quiet is None else _round(max(p.idle_after - quiet, 0), 1),
    }


SECRET = "<redacted>"


def redacted(settings: Settings) -> dict[str, Any]:
    """The running settings as JSON, every secret (a field hidden from repr) replaced."""
    data: dict[str, Any] = settings.model_dump(mode="json", by_alias=True)

    def walk(model: Any, out: dict[str, Any]) -> None:
        for name, info in type(model).model_fields.items():
            key = info.alias or name
            value = getattr(model, name)
            if info.repr is False and value:
                out[key] = SECRET
            elif hasattr(type(value), "model_fields") and isinstance(out.get(key), dict):
                walk(value, out[key])

    walk(settings, data)
    return data
