"""A stateful fake of DigitalOcean's API v2: the droplet, action and tag endpoints doproxy uses.

It is an aiohttp.web server on 127.0.0.1:0 that keeps droplets, actions and tags in memory and
answers the way DigitalOcean does (shapes, status codes, error bodies, ratelimit headers). With
validate=True every request it receives and every response it gives is checked against
DigitalOcean's OpenAPI spec (a subset of it ships next to this file) with openapi-core; each
problem becomes a readable line in `violations`, and the request is still served, so a test sees
both what the client did and what was wrong with it.

Theory of operation
-------------------
Time-driven state is computed lazily, from the clock, whenever the state is read (every request
and every read of `droplets` / `actions`), so no background task drives it:

- A droplet is created with status "new" and no addresses, and a "create" action in progress.
  At created + active_after it becomes "active", gets its addresses in networks.v4 (private
  127.0.1.N, public 127.0.2.N; N counts droplets from 1, loopback only, see `_addresses`), and
  its create action completes.
- A droplet action (reboot, power_cycle, shutdown, power_off, power_on) is "in-progress" until
  started + action_after, then "completed". shutdown/power_off leave the droplet "off",
  power_on makes it "active" again. While an action is in progress the droplet refuses another
  one with 422 "Droplet already has a pending event.", as DigitalOcean does; that includes the
  create action, so a droplet takes actions only once it is active.
- DELETE removes a droplet at once.

With serve_backends=True each droplet that is "active" and has no power action in progress
runs one demo backend (doproxy.demo_backend, with backend_capacity workers of
backend_service_time seconds each) on private_ip:backend_port. The set of running
backends is brought in line with the state after every request, before the response is sent
(so a client that *sees* "active" can connect at once), and by a timer when a droplet is due to
become active or an action is due to complete (so a droplet serves even if nobody polls it).
Stopping a backend closes its listener and aborts its open connections, as a destroyed or
rebooting machine would.

Every request passes through, in order: fault injection (`fail_next`; a plain fault answers
before authentication is looked at), the bearer token check (401), routing (unknown paths 404),
the endpoint. A fault with after_effect=True lets the endpoint run first and then replaces its
answer: the create that succeeds and answers 500, the trap that makes naive clients create
duplicates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import math
import re
import signal
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

from aiohttp import web

from doproxy.demo_backend import DemoBackendProtocol, Service

if TYPE_CHECKING:
    from openapi_core import OpenAPI

log = logging.getLogger(__name__)

SPEC_PATH = Path(__file__).with_name("digitalocean-openapi-subset.yaml")
# Requests are validated as if they had been sent to the spec's own server: the fake's address
# changes with every run, the paths and bodies are what the contract is about.
SPEC_SERVER = "https://api.digitalocean.com"

RATELIMIT_LIMIT = 5000  # DigitalOcean's: 5,000 requests an hour per token
MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 20
MAX_USER_DATA = 64 * 1024

# DigitalOcean's own words for each error status.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "The request could not be understood."),
    401: ("unauthorized", "Unable to authenticate you"),
    403: ("forbidden", "You do not have access for the attempted action."),
    404: ("not_found", "The resource you were accessing could not be found."),
    409: ("conflict", "The request conflicts with the current state of the resource."),
    422: ("unprocessable_entity", "The request could not be processed."),
    429: ("too_many_requests", "API Rate limit exceeded."),
    500: ("server_error", "Server was unable to give you a response."),
    502: ("bad_gateway", "The server received an invalid response."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
    504: ("gateway_timeout", "The server did not answer in time."),
}

REGION_NAMES = {
    "ams2": "Amsterdam 2",
    "ams3": "Amsterdam 3",
    "blr1": "Bangalore 1",
    "fra1": "Frankfurt 1",
    "lon1": "London 1",
    "nyc1": "New York 1",
    "nyc2": "New York 2",
    "nyc3": "New York 3",
    "sfo1": "San Francisco 1",
    "sfo2": "San Francisco 2",
    "sfo3": "San Francisco 3",
    "sgp1": "Singapore 1",
    "syd1": "Sydney 1",
    "tor1": "Toronto 1",
}
SIZES = ["s-1vcpu-1gb", "s-1vcpu-2gb", "s-2vcpu-2gb", "s-2vcpu-4gb", "s-4vcpu-8gb"]
DISTRIBUTIONS = {
    "ubuntu": "Ubuntu",
    "debian": "Debian",
    "fedora": "Fedora",
    "centos": "CentOS",
    "rockylinux": "Rocky Linux",
    "freebsd": "FreeBSD",
}
DROPLET_NAME = re.compile(r"^[a-zA-Z0-9]?[a-z0-9A-Z.\-]*[a-z0-9A-Z]$")
TAG_NAME = re.compile(r"^[a-zA-Z0-9_\-\:]+$")
# Power actions the fake carries out; each stops the droplet's backend while in progress.
POWER_ACTIONS = ("reboot", "power_cycle", "shutdown", "power_off", "power_on")


# --- validation against the OpenAPI spec -----------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_spec(path: Path = SPEC_PATH) -> OpenAPI:
    """The parsed spec, once per process and path (parsing takes a while; validating is quick).

    The spec itself is DigitalOcean's and is not re-validated here (that alone costs 0.25 s);
    tests/test_fake_digitalocean.py checks it once.
    """
    from openapi_core import Config, OpenAPI

    return OpenAPI.from_file_path(str(path), config=Config(spec_validator_cls=None))


def _describe(exc: BaseException) -> str:
    """One readable line for an openapi-core error: what failed, then each schema complaint."""
    head = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is None:
        return head
    details = []
    for err in getattr(cause, "schema_errors", None) or ():
        where = "/".join(str(p) for p in getattr(err, "absolute_path", ()))
        msg = str(getattr(err, "message", err))
        # oneOf/anyOf failures say only "not valid under any of the given schemas"; the
        # deepest complaint of the sub-schemas is the most specific one.
        context = list(getattr(err, "context", None) or ())
        if context:
            best = max(context, key=lambda c: len(getattr(c, "absolute_path", ())))
            inner = "/".join(str(p) for p in getattr(best, "absolute_path", ()))
            msg += f" (closest: {getattr(best, 'message', best)}"
            msg += f"{' at ' + inner if inner else ''})"
        details.append(f"{msg}{' at ' + where if where else ''}")
    if not details:
        details.append(str(cause) or type(cause).__name__)
    # Some errors repeat their cause's text (a tuple of reprs) in their own; the details above
    # say it better.
    head = head.replace(f": {cause}", "")
    return f"{head}: {'; '.join(details)}"


def in_spec(method: str, path: str, spec_path: Path | None = None) -> bool:
    """True when the spec documents `method` on `path` (e.g. GET /v2/droplets/12)."""
    from openapi_core.templating.paths.exceptions import PathError
    from openapi_core.testing import MockRequest

    spec = load_spec(spec_path or SPEC_PATH)
    errors = spec.iter_request_errors(MockRequest(SPEC_SERVER, method, path))
    return not any(isinstance(e, PathError) for e in errors)


def validate_exchange(
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    status: int | None = None,
    response_headers: dict[str, str] | None = None,
    response_body: bytes | None = None,
    response_content_type: str = "application/json",
    spec_path: Path | None = None,
) -> tuple[list[str], list[str]]:
    """Check one request (and its response, when `status` is given) against the spec.

    Returns (request problems, response problems), readable strings, empty when all is well.
    """
    from openapi_core.templating.paths.exceptions import PathError
    from openapi_core.testing import MockRequest, MockResponse

    spec = load_spec(spec_path or SPEC_PATH)
    request = MockRequest(
        SPEC_SERVER,
        method,
        path,
        args=query or {},
        headers=headers or {},
        data=body or None,
        content_type=content_type,
    )
    # iter_*_errors validate without unmarshalling (building Python values from the data):
    # twenty times faster on droplet lists, and every problem is reported, not only the first.
    req_errors = list(spec.iter_request_errors(request))
    req_problems = [_describe(e) for e in req_errors]
    if status is None or any(isinstance(e, PathError) for e in req_errors):
        # A request the spec does not know has no documented response to compare with.
        return req_problems, []
    response = MockResponse(
        response_body or b"",
        status_code=status,
        headers=response_headers or {},
        content_type=response_content_type,
    )
    return req_problems, [_describe(e) for e in spec.iter_response_errors(request, response)]


# --- the fake -------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the fake received and the response it gave."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # the request body parsed as JSON; the raw text when it is not JSON; None if empty
    status: int
    response_body: Any  # parsed JSON, None for an empty body
    response_headers: dict[str, str]
    request_errors: list[str] = field(default_factory=list)
    response_errors: list[str] = field(default_factory=list)
    validated: bool = False  # False when the fake runs with validate=False
    arrived: float = 0.0  # clock() when the request arrived (exchanges are listed as answered)

    @property
    def valid(self) -> bool:
        """Checked against the spec, and both the request and the response passed."""
        return self.validated and not self.request_errors and not self.response_errors


@dataclass
class _Fault:
    method: str
    path: str
    status: int
    times: int
    after_effect: bool
    retry_after: int | None


@dataclass
class _DropletState:
    """What the fake knows about a droplet beyond its JSON."""

    index: int  # N in 127.0.1.N
    private_ip: str
    public_ip: str
    active_at: float  # clock time the create completes
    pending_active: bool = True


@dataclass
class _ActionState:
    droplet_id: int | None
    done_at: float


class _ApiError(Exception):
    """Raised by an endpoint to answer with DigitalOcean's error body."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _TrackedBackend(DemoBackendProtocol):
    """A demo backend connection that the fake can cut when its droplet goes away."""

    def __init__(self, name: str, service: Service, live: set[asyncio.Transport]) -> None:
        super().__init__(name, service)
        self._live = live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:
            self._live.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self._live.discard(self.transport)
        super().connection_lost(exc)


@dataclass
class _Backend:
    server: asyncio.Server
    connections: set[asyncio.Transport]


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _addresses(n: int) -> tuple[str, str]:
    """Private and public IPv4 of the n-th droplet: loopback only, never a routable address.

    1..254 get 127.0.1.N and 127.0.2.N; later ones 127.1.x.y and 127.2.x.y (Linux answers on
    all of 127.0.0.0/8, so each can still run a backend on its own address).
    """
    if 1 <= n <= 254:
        return f"127.0.1.{n}", f"127.0.2.{n}"
    hi, lo = divmod(n, 256)
    if hi > 255:
        raise RuntimeError("the fake hands out at most 65535 droplet addresses")
    return f"127.1.{hi}.{lo}", f"127.2.{hi}.{lo}"


def _region(slug: str) -> dict[str, Any]:
    return {
        "name": REGION_NAMES.get(slug, slug.upper()),
        "slug": slug,
        "features": ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"],
        "available": True,
        "sizes": list(SIZES),
    }


def _size(slug: str) -> dict[str, Any]:
    m = re.search(r"(\d+)vcpu-(\d+)gb", slug)
    vcpus, gib = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
    disk = {1: 25, 2: 50, 4: 80, 8: 160, 16: 320}.get(gib, 25 * gib)
    monthly = 6 * gib
    return {
        "slug": slug,
        "memory": 1024 * gib,
        "vcpus": vcpus,
        "disk": disk,
        "transfer": float(max(1, gib)),
        "price_monthly": float(monthly),
        "price_hourly": round(monthly / 672, 5),
        "regions": sorted(REGION_NAMES),
        "available": True,
        "description": "Basic",
        "disk_info": [{"type": "local", "size": {"amount": disk, "unit": "gib"}}],
    }


def _image(image: str | int) -> dict[str, Any]:
    if isinstance(image, int):
        # A number names a snapshot or custom image of the account.
        return {
            "id": image,
            "name": f"snapshot-{image}",
            "distribution": "Unknown",
            "slug": None,
            "public": False,
            "regions": sorted(REGION_NAMES),
            "created_at": "2024-01-01T00:00:00Z",
            "type": "snapshot",
            "min_disk_size": 25,
            "size_gigabytes": 2.5,
            "description": "",
            "tags": [],
            "status": "available",
            "error_message": "",
        }
    distro = DISTRIBUTIONS.get(image.split("-", 1)[0], "Unknown")
    return {
        "id": zlib.crc32(image.encode()) % 100_000_000 + 1,  # stable per slug
        "name": image,
        "distribution": distro,
        "slug": image,
        "public": True,
        "regions": sorted(REGION_NAMES),
        "created_at": "2024-01-01T00:00:00Z",
        "type": "base",
        "min_disk_size": 15,
        "size_gigabytes": 2.36,
        "description": f"{distro} {image}",
        "tags": [],
        "status": "available",
        "error_message": "",
    }


def _check_create(body: Any) -> list[str]:
    """The names to create, or _ApiError(422) with DigitalOcean-like words for the first problem."""
    if not isinstance(body, dict):
        raise _ApiError(422, "The request body must be a JSON object.")
    if "names" in body:
        names = body["names"]
        if not isinstance(names, list) or not 1 <= len(names) <= 10:
            raise _ApiError(422, "names must be a list of 1 to 10 Droplet names.")
    elif "name" in body:
        names = [body["name"]]
    else:
        raise _ApiError(422, "You must specify a name for the Droplet.")
    for name in names:
        if not isinstance(name, str) or len(name) > 255 or not DROPLET_NAME.match(name):
            raise _ApiError(
                422, f"Name {name!r} is invalid: only a-z, A-Z, 0-9, . and - are allowed."
            )
    if not isinstance(body.get("size"), str) or not body["size"]:
        raise _ApiError(422, "You specified an invalid size for Droplet creation.")
    image = body.get("image")
    if isinstance(image, bool) or not isinstance(image, str | int) or image == "":
        raise _ApiError(422, "You specified an invalid image for Droplet creation.")
    if "region" in body and (not isinstance(body["region"], str) or not body["region"]):
        raise _ApiError(422, "You specified an invalid region for Droplet creation.")
    for key in ("backups", "ipv6", "monitoring", "private_networking", "with_droplet_agent"):
        if key in body and not isinstance(body[key], bool):
            raise _ApiError(422, f"{key} must be true or false.")
    keys = body.get("ssh_keys", [])
    if not isinstance(keys, list) or not all(
        isinstance(k, str | int) and not isinstance(k, bool) for k in keys
    ):
        raise _ApiError(422, "ssh_keys must be a list of key ids or fingerprints.")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(
        isinstance(t, str) and len(t) <= 255 and TAG_NAME.match(t) for t in tags
    ):
        raise _ApiError(422, "tags must be names made of letters, digits, '_', '-' and ':'.")
    user_data = body.get("user_data", "")
    if not isinstance(user_data, str):
        raise _ApiError(422, "user_data must be a string.")
    if len(user_data.encode()) > MAX_USER_DATA:
        raise _ApiError(422, "user_data must be 64 KiB or smaller.")
    if "vpc_uuid" in body and not isinstance(body["vpc_uuid"], str):
        raise _ApiError(422, "vpc_uuid must be a string.")
    return cast(list[str], names)


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _ApiError(400, f"{name} must be a whole number.") from None
    if value < 1:
        raise _ApiError(400, f"{name} must be 1 or more.")
    return value


class FakeDigitalOcean:
    """The fake API server. Use `async with FakeDigitalOcean(...) as fake:` or start()/close()."""

    def __init__(
        self,
        *,
        token: str = "fake-token",
        active_after: float = 0.0,
        action_after: float = 0.0,
        serve_backends: bool = False,
        backend_port: int = 8080,
        validate: bool = True,
        spec_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        backend_capacity: int = 0,
        backend_service_time: float = 0.0,
    ) -> None:
        self.token = token
        # More tokens it accepts (several clients told apart by their token, e.g. the nodes
        # of a cluster): each exchange records the Authorization it came with.
        self.more_tokens: set[str] = set()
        self.active_after = active_after
        self.action_after = action_after
        self.serve_backends = serve_backends
        self.backend_port = backend_port
        # Each droplet's backend has its own workers (doproxy.demo_backend.Service): at most
        # backend_capacity requests in service (0: any), each for backend_service_time seconds.
        self.backend_capacity = backend_capacity
        self.backend_service_time = backend_service_time
        self.validate = validate
        self.spec_path = spec_path or SPEC_PATH
        self.clock = clock
        self.url = ""
        self.created_count = 0
        self.exchanges: list[Exchange] = []
        self.violations: list[str] = []
        # Problems starting a droplet's backend (e.g. its port is taken): not the API's fault,
        # so not violations, but a test that expects traffic wants to know.
        self.backend_errors: list[str] = []
        self.ratelimit_limit = RATELIMIT_LIMIT
        self.ratelimit_remaining = RATELIMIT_LIMIT  # tests may lower it; it never goes below 0
        self.ratelimit_reset = int(time.time()) + 3600
        self._droplets: dict[int, dict[str, Any]] = {}
        self._state: dict[int, _DropletState] = {}
        self._actions: dict[int, dict[str, Any]] = {}
        self._action_state: dict[int, _ActionState] = {}
        self._tags: dict[str, None] = {}  # names, in creation order
        self._faults: list[_Fault] = []
        self._next_droplet_id = 1001
        self._next_index = 1
        self._next_action_id = 7001
        self._backends: dict[int, _Backend] = {}
        self._backend_lock = asyncio.Lock()
        self._timers: list[asyncio.TimerHandle] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        if validate:
            load_spec(self.spec_path)  # fail early (and off the request path) if it is missing

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        log.debug("fake DigitalOcean API at %s", self.url)
        return self.url

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        async with self._backend_lock:
            for droplet_id in list(self._backends):
                await self._stop_backend(droplet_id)

    async def __aenter__(self) -> FakeDigitalOcean:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what tests look at and steer -----------------------------------------------------

    @property
    def droplets(self) -> dict[int, dict[str, Any]]:
        """Live droplets by id, as the API shows them (brought up to date on every read).

        Tests may change or delete entries, e.g. to make a droplet vanish behind our back.
        """
        self._refresh()
        return self._droplets

    @property
    def actions(self) -> dict[int, dict[str, Any]]:
        """Every action by id, as the API shows it."""
        self._refresh()
        return self._actions

    @property
    def tags(self) -> list[str]:
        return list(self._tags)

    @property
    def backends(self) -> dict[int, int]:
        """Droplet id -> port, for the droplets whose demo backend is running now."""
        return {i: b.server.sockets[0].getsockname()[1] for i, b in self._backends.items()}

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        after_effect: bool = False,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `times` requests of `method` on a path starting with `path` with
        `status` and DigitalOcean's error body. after_effect=True carries each request out
        first. 429s carry Retry-After (retry_after, default 1 s) and ratelimit-remaining 0."""
        if status < 400:
            raise ValueError(f"fail_next wants an error status, not {status}")
        if times < 1:
            raise ValueError("times must be 1 or more")
        self._faults.append(_Fault(method.upper(), path, status, times, after_effect, retry_after))

    def set_token(self, token: str) -> None:
        self.token = token

    def summary(self) -> str:
        """Every exchange on one line each, violations last: for assertion messages."""
        lines = [f"{e.method} {e.path} -> {e.status}" for e in self.exchanges]
        return "\n".join(lines + [f"VIOLATION {v}" for v in self.violations])

    # --- state ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Apply whatever the clock says has happened since the last look."""
        now = self.clock()
        for action_id, action in self._actions.items():
            st = self._action_state[action_id]
            if action["status"] != "in-progress" or now < st.done_at:
                continue
            action["status"] = "completed"
            action["completed_at"] = _now_iso()
            droplet = self._droplets.get(st.droplet_id) if st.droplet_id is not None else None
            if droplet is not None:
                if action["type"] in ("shutdown", "power_off"):
                    droplet["status"] = "off"
                elif action["type"] in ("power_on", "power_cycle", "reboot"):
                    droplet["status"] = "active"
        for droplet_id, droplet in self._droplets.items():
            ds = self._state.get(droplet_id)
            if ds is None or not ds.pending_active or now < ds.active_at:
                continue
            ds.pending_active = False
            droplet["status"] = "active"
            droplet["networks"]["v4"] = [
                {
                    "ip_address": ds.private_ip,
                    "netmask": "255.255.0.0",
                    "gateway": "127.0.0.1",
                    "type": "private",
                },
                {
                    "ip_address": ds.public_ip,
                    "netmask": "255.255.255.0",
                    "gateway": "127.0.0.1",
                    "type": "public",
                },
            ]

    def _busy(self, droplet_id: int) -> bool:
        """True while an action on the droplet is in progress."""
        return any(
            st.droplet_id == droplet_id and self._actions[aid]["status"] == "in-progress"
            for aid, st in self._action_state.items()
        )

    def _new_action(self, kind: str, droplet: dict[str, Any], done_at: float) -> dict[str, Any]:
        action_id = self._next_action_id
        self._next_action_id += 1
        action = {
            "id": action_id,
            "status": "in-progress",
            "type": kind,
            "started_at": _now_iso(),
            "completed_at": None,
            "resource_id": droplet["id"],
            "resource_type": "droplet",
            "region": droplet["region"],
            "region_slug": droplet["region"]["slug"],
        }
        self._actions[action_id] = action
        self._action_state[action_id] = _ActionState(droplet["id"], done_at)
        self._wake_at(done_at)
        return action

    def _new_droplet(self, name: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        droplet_id = self._next_droplet_id
        self._next_droplet_id += 1
        index = self._next_index
        self._next_index += 1
        private_ip, public_ip = _addresses(index)
        region = body.get("region") or "nyc3"
        size = _size(body["size"])
        tags = list(dict.fromkeys(body.get("tags") or []))
        for tag in tags:
            self._tags.setdefault(tag, None)
        features = ["private_networking"]
        features += [f for f in ("backups", "ipv6", "monitoring") if body.get(f)]
        droplet: dict[str, Any] = {
            "id": droplet_id,
            "name": name,
            "memory": size["memory"],
            "vcpus": size["vcpus"],
            "disk": size["disk"],
            "disk_info": size["disk_info"],
            "locked": False,
            "status": "new",
            "kernel": None,
            "created_at": _now_iso(),
            "features": features,
            "backup_ids": [],
            "next_backup_window": None,
            "snapshot_ids": [],
            "image": _image(body["image"]),
            "volume_ids": [],
            "size": size,
            "size_slug": size["slug"],
            # Addresses arrive when the droplet becomes active, as they do at DigitalOcean. No
            # IPv6 even when asked for: the fake hands out loopback IPv4 addresses only.
            "networks": {"v4": [], "v6": []},
            "region": _region(region),
            "tags": tags,
            "vpc_uuid": body.get("vpc_uuid")
            or str(uuid.uuid5(uuid.NAMESPACE_URL, f"fake-digitalocean/vpc/{region}")),
        }
        active_at = self.clock() + max(0.0, self.active_after)
        self._droplets[droplet_id] = droplet
        self._state[droplet_id] = _DropletState(index, private_ip, public_ip, active_at)
        self.created_count += 1
        action = self._new_action("create", droplet, active_at)
        log.debug("created droplet %s (%s)", droplet_id, name)
        return droplet, action["id"]

    # --- backends ---------------------------------------------------------------------------

    def _wake_at(self, when: float) -> None:
        """Sync the backends once the clock reaches `when` (real time; see the module doc)."""
        if not self.serve_backends:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self.clock()) + 0.001
        self._timers = [t for t in self._timers if not t.cancelled()]
        self._timers.append(loop.call_later(delay, self._spawn_sync))

    def _spawn_sync(self) -> None:
        task = asyncio.get_running_loop().create_task(self._sync_backends())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync_backends(self) -> None:
        """Run a backend for exactly the droplets that are active and not mid-action."""
        if not self.serve_backends:
            return
        async with self._backend_lock:
            self._refresh()
            want = {
                droplet_id: droplet["name"]
                for droplet_id, droplet in self._droplets.items()
                if droplet.get("status") == "active"
                and droplet_id in self._state
                and not self._busy(droplet_id)
            }
            for droplet_id in list(self._backends):
                if droplet_id not in want:
                    await self._stop_backend(droplet_id)
            for droplet_id, name in want.items():
                if droplet_id not in self._backends:
                    await self._start_backend(droplet_id, name)

    async def _start_backend(self, droplet_id: int, name: str) -> None:
        host = self._state[droplet_id].private_ip
        live: set[asyncio.Transport] = set()
        service = Service(self.backend_capacity, self.backend_service_time)
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: _TrackedBackend(name, service, live), host, self.backend_port
            )
        except OSError as e:
            msg = f"droplet {droplet_id}: backend on {host}:{self.backend_port}: {e}"
            if msg not in self.backend_errors:
                log.warning("fake DigitalOcean: %s", msg)
                self.backend_errors.append(msg)
            return
        self._backends[droplet_id] = _Backend(server, live)
        log.debug("droplet %s serves on %s:%s", droplet_id, host, self.backend_port)

    async def _stop_backend(self, droplet_id: int) -> None:
        backend = self._backends.pop(droplet_id, None)
        if backend is None:
            return
        backend.server.close()
        # A destroyed or rebooting machine drops its connections too, keep-alive ones included.
        for transport in list(backend.connections):
            transport.abort()
        # Newer Pythons wait here for the connections to finish closing; aborted, they do at
        # once, but a stuck close must not hang the fake.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await backend.server.wait_closed()
        log.debug("droplet %s stopped serving", droplet_id)

    # --- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = self.clock()
        raw = await request.read()
        method = request.method.upper()
        path = request.path
        query = {k: v for k, v in request.query.items()}
        headers = {k: v for k, v in request.headers.items()}
        self._refresh()
        auth = request.headers.get("Authorization", "")
        notes: list[str] = []  # problems found while routing: not-implemented, fake bugs
        status, payload, extra = self._dispatch(method, path, query, auth, raw, notes)
        await self._sync_backends()

        self.ratelimit_remaining = max(0, self.ratelimit_remaining - 1)
        out_headers = {
            "ratelimit-limit": str(self.ratelimit_limit),
            "ratelimit-remaining": str(self.ratelimit_remaining),
            "ratelimit-reset": str(self.ratelimit_reset),
            "content-type": "application/json; charset=utf-8",
        }
        out_headers.update(extra)
        data = b"" if payload is None else json.dumps(payload).encode()
        exchange = Exchange(
            arrived=arrived,
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=_parse(raw),
            status=status,
            response_body=payload,
            response_headers=out_headers,
        )
        for note in notes:
            exchange.request_errors.append(note)
            self._violation(f"{method} {path}: {note}")
        if self.validate:
            self._check(exchange, raw, data, request.headers.get("Content-Type"))
        self.exchanges.append(exchange)
        log.debug("%s %s -> %s", method, path, status)
        return web.Response(status=status, body=data or None, headers=out_headers)

    def _check(self, ex: Exchange, raw: bytes, data: bytes, content_type: str | None) -> None:
        req_errors, resp_errors = validate_exchange(
            ex.method,
            ex.path,
            query=ex.query,
            headers=ex.headers,
            body=raw or None,
            content_type=content_type or "application/json",
            status=ex.status,
            response_headers=ex.response_headers,
            response_body=data or None,
            response_content_type=ex.response_headers["content-type"],
            spec_path=self.spec_path,
        )
        ex.request_errors.extend(req_errors)
        ex.response_errors.extend(resp_errors)
        ex.validated = True
        for problem in req_errors:
            self._violation(f"{ex.method} {ex.path}: request: {problem}")
        for problem in resp_errors:
            self._violation(f"{ex.method} {ex.path} -> {ex.status}: response: {problem}")

    def _violation(self, message: str) -> None:
        log.warning("fake DigitalOcean: contract violation: %s", message)
        self.violations.append(message)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method and path.startswith(fault.path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _dispatch(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        auth: str,
        raw: bytes,
        notes: list[str],
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON payload or None, extra headers) for one request; problems that are
        not the client's fault go to `notes`."""
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after_effect:
            return self._fault_answer(fault)
        try:
            if auth not in {f"Bearer {t}" for t in (self.token, *self.more_tokens)}:
                raise _ApiError(401)
            status, payload = self._route(method, path, query, raw, notes)
            result: tuple[int, Any, dict[str, str]] = (status, payload, {})
        except _TagBadRequest as e:
            result = self._tag_error(str(e))
        except _ApiError as e:
            result = self._error(e.status, e.message)
        except Exception as e:  # a bug in the fake: say so loudly, answer like the API would
            log.exception("fake DigitalOcean failed on %s %s", method, path)
            notes.append(f"the fake itself failed: {e!r}")
            result = self._error(500)
        if fault is not None:
            log.debug("fault after effect: %s %s -> %s", method, path, fault.status)
            return self._fault_answer(fault)
        return result

    def _fault_answer(self, fault: _Fault) -> tuple[int, Any, dict[str, str]]:
        status, payload, extra = self._error(fault.status)
        if fault.status == 429:
            wait = 1 if fault.retry_after is None else fault.retry_after
            extra["Retry-After"] = str(wait)
            extra["ratelimit-remaining"] = "0"
            extra["ratelimit-reset"] = str(int(time.time()) + wait)
        return status, payload, extra

    @staticmethod
    def _error(status: int, message: str | None = None) -> tuple[int, Any, dict[str, str]]:
        ident, default = ERRORS.get(status, ("error", "The request failed."))
        body = {"id": ident, "message": message or default, "request_id": str(uuid.uuid4())}
        return status, body, {}

    @staticmethod
    def _tag_error(problem: str) -> tuple[int, Any, dict[str, str]]:
        """Tag creation's 400 has its own shape in the spec (error_with_root_causes). The usual
        id and message are there too, so a client that reads only those still understands."""
        body = {
            "id": "bad_request",
            "message": problem,
            "error": problem,
            "messages": None,
            "root_causes": [problem],
        }
        return 400, body, {"x-request-id": str(uuid.uuid4())}

    def _route(
        self, method: str, path: str, query: dict[str, str], raw: bytes, notes: list[str]
    ) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if parts[:1] != ["v2"]:
            raise _ApiError(404)
        rest = parts[1:]
        match (method, rest):
            case ("POST", ["droplets"]):
                return self._create(_json_body(raw))
            case ("GET", ["droplets"]):
                return self._list(query)
            case ("GET", ["droplets", did]):
                return 200, {"droplet": self._droplet(did)}
            case ("DELETE", ["droplets", did]):
                droplet = self._droplet(did)
                del self._droplets[droplet["id"]]
                return 204, None
            case ("POST", ["droplets", did, "actions"]):
                return self._droplet_action(self._droplet(did), _json_body(raw))
            case ("GET", ["droplets", did, "actions", aid]):
                droplet = self._droplet(did)
                action = self._action(aid)
                if action["resource_id"] != droplet["id"]:
                    raise _ApiError(404)
                return 200, {"action": action}
            case ("GET", ["actions", aid]):
                return 200, {"action": self._action(aid)}
            case ("POST", ["tags"]):
                return self._create_tag(_json_body(raw))
            case ("GET", ["tags", name]):
                if name not in self._tags:
                    raise _ApiError(404)
                return 200, {"tag": self._tag(name)}
        if self.validate and in_spec(method, path, self.spec_path):
            notes.append("in the spec but not implemented by the fake")
        raise _ApiError(404)

    # --- endpoints ------------------------------------------------------------------------

    def _droplet(self, raw_id: str) -> dict[str, Any]:
        droplet_id = int(raw_id) if raw_id.isdigit() else -1
        droplet = self._droplets.get(droplet_id)
        if droplet is None:
            raise _ApiError(404)
        return droplet

    def _action(self, raw_id: str) -> dict[str, Any]:
        action = self._actions.get(int(raw_id) if raw_id.isdigit() else -1)
        if action is None:
            raise _ApiError(404)
        return action

    def _create(self, body: Any) -> tuple[int, Any]:
        names = _check_create(body)
        created = [self._new_droplet(name, body) for name in names]
        links = {
            "actions": [
                {"id": aid, "rel": "create", "href": f"{self.url}/v2/actions/{aid}"}
                for _, aid in created
            ]
        }
        if "names" in body:
            return 202, {"droplets": [d for d, _ in created], "links": links}
        return 202, {"droplet": created[0][0], "links": links}

    def _list(self, query: dict[str, str]) -> tuple[int, Any]:
        page = _int_param(query, "page", 1)
        per_page = min(MAX_PER_PAGE, _int_param(query, "per_page", DEFAULT_PER_PAGE))
        found = [
            d
            for _, d in sorted(self._droplets.items())
            if ("tag_name" not in query or query["tag_name"] in d.get("tags", ()))
            and ("name" not in query or d.get("name") == query["name"])
            and query.get("type") != "gpus"  # the fake has no GPU droplets
        ]
        total = len(found)
        last = max(1, math.ceil(total / per_page))

        def link(n: int) -> str:
            return f"{self.url}/v2/droplets?{urlencode({**query, 'page': n, 'per_page': per_page})}"

        pages: dict[str, str] = {}
        if page > 1:
            pages["first"] = link(1)
            pages["prev"] = link(min(page - 1, last))
        if page < last:
            pages["last"] = link(last)
            pages["next"] = link(page + 1)
        start = (page - 1) * per_page
        return 200, {
            "droplets": found[start : start + per_page],
            "links": {"pages": pages} if pages else {},
            "meta": {"total": total},
        }

    def _droplet_action(self, droplet: dict[str, Any], body: Any) -> tuple[int, Any]:
        kind = body.get("type") if isinstance(body, dict) else None
        if not isinstance(kind, str) or not kind:
            raise _ApiError(422, "You must specify an action type.")
        if kind not in POWER_ACTIONS:
            raise _ApiError(
                422, f"The fake does not carry out {kind!r} actions; it knows {POWER_ACTIONS}."
            )
        if self._busy(droplet["id"]):
            raise _ApiError(422, "Droplet already has a pending event.")
        action = self._new_action(kind, droplet, self.clock() + max(0.0, self.action_after))
        return 201, {"action": action}

    def _create_tag(self, body: Any) -> tuple[int, Any]:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or len(name) > 255 or not TAG_NAME.match(name):
            # The spec gives tag creation its own error shape (error_with_root_causes).
            problem = "tag name must be 1-255 letters, digits, '_', '-' or ':'"
            raise _TagBadRequest(problem)
        self._tags.setdefault(name, None)
        return 201, {"tag": self._tag(name)}

    def _tag(self, name: str) -> dict[str, Any]:
        ids = [i for i, d in sorted(self._droplets.items()) if name in d.get("tags", ())]
        droplets: dict[str, Any] = {"count": len(ids)}
        if ids:
            droplets["last_tagged_uri"] = f"{self.url}/v2/droplets/{ids[-1]}"
        resources: dict[str, Any] = {
            **droplets,
            "droplets": droplets,
            "images": {"count": 0},
            "volumes": {"count": 0},
            "volume_snapshots": {"count": 0},
            "databases": {"count": 0},
        }
        return {"name": name, "resources": resources}


class _TagBadRequest(_ApiError):
    def __init__(self, problem: str) -> None:
        super().__init__(400, problem)


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise _ApiError(400, "The request body is not valid JSON.") from None


# --- python -m doproxy.testing.fake_digitalocean ---------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeDigitalOcean(
        token=args.token,
        active_after=args.active_after,
        action_after=args.action_after,
        serve_backends=args.serve_backends,
        backend_port=args.backend_port,
        validate=not args.no_validate,
        backend_capacity=args.backend_capacity,
        backend_service_time=args.backend_service_time,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await fake.start()
    print(fake.url, flush=True)
    try:
        await stop.wait()
    finally:
        await fake.close()
        log.info(
            "fake DigitalOcean: %d requests, %d contract violations",
            len(fake.exchanges),
            len(fake.violations),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m doproxy.testing.fake_digitalocean",
        description="Run the fake DigitalOcean API on 127.0.0.1 (a free port); print its URL, "
        "serve until SIGTERM or SIGINT. Contract violations are logged to stderr.",
    )
    parser.add_argument("--token", default="fake-token", help="the bearer token it accepts")
    parser.add_argument(
        "--active-after", type=float, default=0.0, help="seconds from new to active"
    )
    parser.add_argument(
        "--action-after", type=float, default=0.0, help="seconds an action stays in progress"
    )
    parser.add_argument(
        "--serve-backends",
        action="store_true",
        help="run a demo backend on each active droplet's private address",
    )
    parser.add_argument("--backend-port", type=int, default=8080, help="the backends' port")
    parser.add_argument(
        "--backend-capacity", type=int, default=0, help="requests each backend serves at once"
    )
    parser.add_argument(
        "--backend-service-time", type=float, default=0.0, help="seconds per backend request"
    )
    parser.add_argument(
        "--no-validate", action="store_true", help="skip checking traffic against the spec"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
