"""DigitalOcean droplets as a `Provider`, on pydo's asyncio client.

Theory of operation
-------------------
pydo (`pydo.aio.Client`) is DigitalOcean's generated client on azure-core's HTTP pipeline over
aiohttp. This module is a small adapter around it that speaks our types (`Machine`) and our
errors (`ProviderError` and its subclasses), and fixes what pydo does not do for us:

* **Authentication.** pydo's own credential policy (azure-core's bearer token policy) refuses to
  send a token to a plain http:// URL. `api-url` may be http:// (the fake API in the tests, an
  on-premise mock), so we hand pydo our own `authentication_policy` that sets the header. pydo is
  given a placeholder instead of the token: the token lives in exactly one object, which never
  prints it.
* **Status codes, not pydo's return conventions.** Several pydo calls return a 404 error body as
  a plain dict instead of raising; others raise `HttpResponseError`. Every call goes through
  `_call`, which asks pydo (its `cls` hook) for the status code, body and headers of every
  answer and raises or returns by status, one way for all endpoints.
* **Retries are ours.** azure-core's retry policy retries POST on 500/503/504 (and on any status
  with Retry-After); a retried droplet create can make a duplicate droplet. The client is built
  with `retry_total=0`, so azure-core never retries, and `_call` decides instead:
  - 429 (any method: the request was not processed): wait as long as Retry-After says (at most
    `MAX_WAIT` seconds), then again; after `max_rate_limited` 429s in a row, `RateLimited`.
  - `ratelimit-remaining: 0` on any answer: the next request waits until `ratelimit-reset`
    (bounded the same way) instead of running into a 429.
  - 5xx, timeouts and connection errors: idempotent requests (GET, DELETE) are retried a few
    times with backoff. A POST is not: the outcome is *uncertain* and the caller decides.
* **Idempotent create.** Every droplet gets a unique name and our tags. When a create ends
  uncertainly (5xx, timeout, connection lost: DigitalOcean may or may not have made it), we list
  droplets by that name before trying again, and return the droplet if it is there. So a create
  that succeeded and then answered 500 (the duplicate trap) makes exactly one droplet.
* **Tags.** DigitalOcean creates a droplet's tags on the fly ("Tag names can either be existing or
  new tags"), so no separate POST /v2/tags is needed before the first create. `list()` asks for
  the first tag (the API filters by one) and keeps droplets that carry all of ours.

Every sleep goes through the injected `sleep`, so tests observe waits without waiting.
"""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pydo.aio
from azure.core.exceptions import (
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.rest import AsyncHttpResponse, HttpRequest

from doproxy.core.settings import DOProvisioner
from doproxy.errors import (
    MachineNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderRefused,
    ProvisionTimeout,
    RateLimited,
)
from doproxy.provisioning import Machine, Spec, read_user_data_file

log = logging.getLogger(__name__)

TOKEN_ENV = "DIGITALOCEAN_TOKEN"
MAX_WAIT = 60.0  # seconds: the longest we wait for a rate limit before asking again
JSON = dict[str, Any]
Sleep = Callable[[float], Awaitable[None]]


# --- configuration ---------------------------------------------------------------------------


def load_token(settings: DOProvisioner, base: Path, environ: Mapping[str, str]) -> str:
    """The API token: `token`, else the file `token-file` (relative to `base`), else the
    DIGITALOCEAN_TOKEN environment variable. The error says where it looked, never a value."""
    if settings.token.strip():
        return settings.token.strip()
    if settings.token_file:
        path = _resolve(base, settings.token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ProviderError(
                f"cannot read do-provisioner.token-file {path}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise ProviderError(f"do-provisioner.token-file {path} is empty")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    raise ProviderError(
        "no DigitalOcean API token: set do-provisioner.token or do-provisioner.token-file in "
        f"the config, or the {TOKEN_ENV} environment variable"
    )


def read_user_data(settings: DOProvisioner, base: Path) -> str:
    """The user-data file's text ("" when `user-data` is not set), as the Go version sent it."""
    if not settings.user_data:
        return ""
    return read_user_data_file(_resolve(base, settings.user_data), "do-provisioner.user-data")


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


# --- the pipeline pieces we give pydo ---------------------------------------------------------


class _BearerAuth(SansIOHTTPPolicy[HttpRequest, AsyncHttpResponse]):
    """Sets `Authorization: Bearer ...` on every request, http:// or https://.

    azure-core's BearerTokenCredentialPolicy refuses non-TLS URLs; DigitalOcean's real URL is
    https, and the fake and on-premise mocks are not. This policy runs before azure-core's HTTP
    logging policy, which redacts the header.
    """

    def __init__(self, token: str) -> None:
        self.__header = f"Bearer {token}"
        # Cluster mode: raises unless this process may still call the provider (its lease as
        # leader cannot have lapsed). Checked here, the last step of ours before the request
        # goes out, so a leader paused between its checks and the send makes no call.
        self.guard: Callable[[], None] | None = None

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        if self.guard is not None:
            self.guard()
        request.http_request.headers["Authorization"] = self.__header

    def __repr__(self) -> str:
        return "_BearerAuth(<token hidden>)"


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


def _capture(
    pipeline_response: PipelineResponse[HttpRequest, AsyncHttpResponse],
    deserialized: Any,
    _headers: Any,
) -> _Reply:
    """pydo's `cls` hook: keep the status and headers with the body, whatever the status."""
    response = pipeline_response.http_response
    return _Reply(response.status_code, deserialized, response.headers)


class UncertainOutcome(ProviderError):
    """A POST may or may not have been carried out (5xx, timeout, connection lost)."""


class _DebugLog(SansIOHTTPPolicy[HttpRequest, AsyncHttpResponse]):
    """One DEBUG line per request and answer, in place of azure-core's HTTP logging policy,
    which logs every request's headers at INFO (the token redacted, but noisy for a CLI)."""

    def on_response(
        self,
        request: PipelineRequest[HttpRequest],
        response: PipelineResponse[HttpRequest, AsyncHttpResponse],
    ) -> None:
        if log.isEnabledFor(logging.DEBUG):
            http = request.http_request
            log.debug("%s %s -> %s", http.method, http.url, response.http_response.status_code)


# --- the provider ----------------------------------------------------------------------------


class DigitalOceanProvider:
    """Droplets carrying our tags, created, listed, rebooted and destroyed through pydo."""

    kind = "digitalocean"

    def __init__(
        self,
        settings: DOProvisioner,
        token: str,
        *,
        user_data: str = "",
        sleep: Sleep = asyncio.sleep,
        per_page: int = 200,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_rate_limited: int = 5,
        attempts: int = 3,
        request_timeout: float = 30.0,
        owner_tag: str = "",
    ) -> None:
        self.settings = settings
        # This installation's own tag (doproxy.machines.owner_tag): every droplet we create
        # carries it besides `tags`, so another installation sharing `tags` never takes it.
        self.owner_tag = owner_tag
        self._create_tags = tuple(
            dict.fromkeys([*settings.tags, *([owner_tag] if owner_tag else [])])
        )
        self.api_url = settings.api_url.rstrip("/")
        self._user_data = user_data
        self._sleep = sleep
        self._per_page = per_page
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_rate_limited = max_rate_limited
        self._attempts = max(1, attempts)
        # Epoch second until which the API said we have no requests left (ratelimit-reset).
        self._blocked_until = 0.0
        self._auth = _BearerAuth(token)
        self._client = pydo.aio.Client(
            "unused",  # the token is sent by _BearerAuth only; see the module docstring
            endpoint=self.api_url,
            authentication_policy=self._auth,
            retry_total=0,  # azure-core must never retry: a retried POST can duplicate a droplet
            http_logging_policy=_DebugLog(),
            connection_timeout=request_timeout,
            read_timeout=request_timeout,
        )

    def __repr__(self) -> str:
        return f"DigitalOceanProvider(api_url={self.api_url!r}, tags={self.settings.tags!r})"

    def guard_sends(self, check: Callable[[], None]) -> None:
        """Run `check` right before every request is sent (it raises to stop the request)."""
        self._auth.guard = check

    # --- Provider ----------------------------------------------------------------------------

    async def list(self) -> builtins.list[Machine]:
        droplets = await self._list_droplets(tag_name=self.settings.tags[0])
        ours = set(self.settings.tags)
        return [_machine(d) for d in droplets if ours <= set(d.get("tags") or ())]

    async def get(self, machine_id: str) -> Machine:
        droplet_id = _droplet_id(machine_id)
        reply = await self._call(
            f"getting droplet {droplet_id}",
            self._client.droplets.get,
            droplet_id,
            not_found=f"droplet {droplet_id} not found",
        )
        return _machine(_field(reply, "droplet", f"getting droplet {droplet_id}"))

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        body = self._create_body(name, spec or Spec())
        doing = f"creating droplet {name}"
        uncertain: UncertainOutcome | None = None
        for attempt in range(1, self._attempts + 1):
            if uncertain is not None:
                # The last attempt may have made the droplet: look before making another.
                found = await self._find_ours(name)
                if found is not None:
                    log.warning(
                        "droplet %s (%s) exists although its create answered: %s; using it, "
                        "nothing to do",
                        name,
                        found.id,
                        uncertain,
                    )
                    return found
                await self._sleep(_backoff(attempt - 1))
            try:
                reply = await self._call(
                    doing, self._client.droplets.create, body=body, idempotent=False
                )
            except UncertainOutcome as exc:
                log.warning(
                    "%s (attempt %d of %d; the droplet is looked for before another try, "
                    "nothing to do)",
                    exc,
                    attempt,
                    self._attempts,
                )
                uncertain = exc
                continue
            machine = _machine(_field(reply, "droplet", doing))
            log.info("created droplet %s (%s)", machine.name, machine.id)
            return machine
        found = await self._find_ours(name)
        if found is not None:
            return found
        raise ProviderError(
            f"{doing} failed {self._attempts} times ({uncertain}); no droplet of that name exists"
        )

    async def destroy(self, machine_id: str) -> None:
        droplet_id = _droplet_id(machine_id)
        reply = await self._call(
            f"destroying droplet {droplet_id}",
            self._client.droplets.destroy,
            droplet_id,
            not_found=None,  # already gone: that is what we wanted
        )
        if reply.status == 404:
            log.info("droplet %s was already gone", droplet_id)
        else:
            log.info("destroyed droplet %s", droplet_id)

    async def reboot(self, machine_id: str) -> None:
        droplet_id = _droplet_id(machine_id)
        doing = f"rebooting droplet {droplet_id}"
        reply = await self._call(
            doing,
            self._client.droplet_actions.post,
            droplet_id,
            body={"type": "reboot"},
            idempotent=False,
            not_found=f"droplet {droplet_id} not found",
        )
        action = _field(reply, "action", doing)
        action_id = int(action["id"])
        now = self._clock or asyncio.get_running_loop().time
        deadline = now() + self.settings.create_timeout
        while action.get("status") != "completed":
            if action.get("status") == "errored":
                raise ProviderError(
                    f"DigitalOcean could not reboot droplet {droplet_id} (action {action_id} "
                    "errored)"
                )
            if now() >= deadline:
                raise ProvisionTimeout(
                    f"the reboot of droplet {droplet_id} did not complete within "
                    f"{self.settings.create_timeout:.0f}s (action {action_id} is still "
                    f"{action.get('status')!r})"
                )
            await self._sleep(min(self.settings.poll_interval, max(0.0, deadline - now())))
            reply = await self._call(
                doing,
                self._client.droplet_actions.get,
                droplet_id,
                action_id,
                not_found=f"droplet {droplet_id} or its reboot action {action_id} not found",
            )
            action = _field(reply, "action", doing)
        log.info("rebooted droplet %s", droplet_id)

    async def close(self) -> None:
        await self._client.close()

    # --- helpers -----------------------------------------------------------------------------

    def _create_body(self, name: str, spec: Spec) -> JSON:
        s = self.settings
        image = spec.image or s.image
        body: JSON = {
            "name": name,
            "region": s.region,
            "size": spec.size or s.size,
            # A custom image is referred to by its number, a public one by its slug.
            "image": int(image) if image.isdigit() else image,
            # Key ids given as strings in the config are still ids, not fingerprints.
            "ssh_keys": [
                int(k) if isinstance(k, str) and k.isdigit() else k for k in s.ssh_key_ids
            ],
            "backups": s.backups,
            "ipv6": s.ipv6,
            "monitoring": s.monitoring,
            "tags": [*self._create_tags, *(t for t in spec.tags if t not in self._create_tags)],
        }
        user_data = spec.user_data or self._user_data
        if user_data:
            body["user_data"] = user_data
        if s.vpc_uuid:
            body["vpc_uuid"] = s.vpc_uuid
        return body

    async def _find_ours(self, name: str) -> Machine | None:
        """The droplet called `name` with our tags, if one exists (the oldest if several)."""
        ours = set(self._create_tags)
        found = [
            d for d in await self._list_droplets(name=name) if ours <= set(d.get("tags") or ())
        ]
        if len(found) > 1:
            log.warning(
                "%d droplets are called %s; using the oldest. `doproxy sanitize` lists the "
                "others: destroy those you do not want",
                len(found),
                name,
            )
        found.sort(key=lambda d: int(d["id"]))
        return _machine(found[0]) if found else None

    async def _list_droplets(
        self, *, tag_name: str | None = None, name: str | None = None
    ) -> builtins.list[JSON]:
        """Every droplet matching the filters, following links.pages.next page by page."""
        droplets: builtins.list[JSON] = []
        page = 1
        while True:
            reply = await self._call(
                "listing droplets",
                self._client.droplets.list,
                per_page=self._per_page,
                page=page,
                tag_name=tag_name,
                name=name,
            )
            droplets.extend(reply.body.get("droplets") or ())
            following = _next_page(reply.body)
            if following is None or following <= page:
                return droplets
            page = following

    async def _call(
        self,
        doing: str,
        operation: Callable[..., Awaitable[Any]],
        *args: Any,
        idempotent: bool = True,
        not_found: str | None = "",
        **kwargs: Any,
    ) -> _Reply:
        """Run one pydo operation; return its 2xx reply, or raise our error for it.

        `not_found`: the MachineNotFound message for a 404; None returns the 404 reply instead
        (destroy); "" makes a 404 an ordinary refusal.
        """
        rate_limited = 0
        failures = 0
        while True:
            await self._respect_rate_limit(doing)
            try:
                reply: _Reply = await operation(*args, cls=_capture, **kwargs)
            except HttpResponseError as exc:
                reply = _error_reply(exc)
            except (ServiceRequestError, ServiceResponseError) as exc:
                # Connection refused, reset, timed out: azure-core maps every aiohttp failure
                # here, including some after the request was sent, so the outcome is unknown.
                reason = str(exc.message or exc) or type(exc).__name__
                failures += 1
                what = f"cannot reach DigitalOcean at {self.api_url}: {reason}"
                if not idempotent:
                    raise UncertainOutcome(what) from exc
                if failures >= self._attempts:
                    raise ProviderError(what) from exc
                error = ProviderError(what)
                log.warning(
                    "%s: %s; trying again (if it persists, check this machine's network and "
                    "api-url)",
                    doing,
                    error,
                )
                await self._sleep(_backoff(failures))
                continue
            self._note_rate_limit(reply.headers)
            status = reply.status
            if 200 <= status < 300:
                return reply
            message = _error_message(reply.body)
            if status == 429:
                rate_limited += 1
                if rate_limited >= self._max_rate_limited:
                    raise RateLimited(
                        f"DigitalOcean is rate-limiting this token (429, {rate_limited} times in "
                        f"a row) while {doing}; wait a few minutes, or make fewer API calls"
                    )
                wait = self._retry_after(reply.headers, rate_limited)
                log.warning(
                    "%s: rate-limited (429); waiting %.0fs. Nothing to do unless it recurs: "
                    "then make fewer API calls with this token",
                    doing,
                    wait,
                )
                await self._sleep(wait)
                continue
            if status == 401:
                raise ProviderAuthError(
                    "DigitalOcean rejected the token (401): check do-provisioner.token, "
                    f"token-file or {TOKEN_ENV}"
                )
            if status == 403:
                raise ProviderAuthError(
                    f"DigitalOcean refused the token access (403) while {doing}: {message}; "
                    "the token needs read and write scope for droplets, actions and tags"
                )
            if status == 404:
                if not_found is None:
                    return reply
                if not_found:
                    raise MachineNotFound(not_found)
            if status >= 500:
                failures += 1
                what = f"DigitalOcean failed ({status}) while {doing}: {message or 'no details'}"
                if not idempotent:
                    raise UncertainOutcome(what)
                if failures >= self._attempts:
                    raise ProviderError(what)
                error = ProviderError(what)
                log.warning(
                    "%s; trying again (if it persists, see DigitalOcean's status page)", error
                )
                await self._sleep(_backoff(failures))
                continue
            raise ProviderRefused(
                f"DigitalOcean refused the request ({status}): {message or 'no details'} "
                f"(while {doing})"
            )

    async def _respect_rate_limit(self, doing: str) -> None:
        # Not cleared here: every concurrent caller waits; the next answer with requests left
        # clears it (see _note_rate_limit).
        wait = min(self._blocked_until - self._wall_clock(), MAX_WAIT)
        if wait > 0:
            log.warning(
                "%s: no API requests left until the rate limit resets; waiting %.0fs. Nothing "
                "to do unless it recurs: then make fewer API calls with this token",
                doing,
                wait,
            )
            await self._sleep(wait)

    def _note_rate_limit(self, headers: Mapping[str, str]) -> None:
        remaining = _number(headers.get("ratelimit-remaining"))
        reset = _number(headers.get("ratelimit-reset"))
        if remaining is not None and remaining <= 0 and reset is not None:
            self._blocked_until = reset
        elif remaining is not None:
            self._blocked_until = 0.0

    def _retry_after(self, headers: Mapping[str, str], count: int) -> float:
        """How long a 429 asks us to wait: Retry-After (seconds or a date), else until
        ratelimit-reset, else an exponential guess; never more than MAX_WAIT."""
        self._blocked_until = 0.0  # the 429's own wait replaces the ratelimit-reset one
        value = headers.get("Retry-After")
        wait: float | None = None
        if value:
            wait = _number(value)
            if wait is None:
                try:
                    when = email.utils.parsedate_to_datetime(value)
                    wait = when.timestamp() - self._wall_clock()
                except (TypeError, ValueError):
                    wait = None
        if wait is None:
            reset = _number(headers.get("ratelimit-reset"))
            if reset is not None:
                wait = reset - self._wall_clock()
        if wait is None or wait <= 0:
            wait = float(2 ** (count - 1))
        return min(wait, MAX_WAIT)


# --- conversions ------------------------------------------------------------------------------


def _droplet_id(machine_id: str) -> int:
    if not machine_id.isdigit():
        raise MachineNotFound(f"droplet {machine_id} not found (droplet ids are numbers)")
    return int(machine_id)


def _machine(droplet: JSON) -> Machine:
    v4 = (droplet.get("networks") or {}).get("v4") or ()
    private = next((n["ip_address"] for n in v4 if n.get("type") == "private"), "")
    public = next((n["ip_address"] for n in v4 if n.get("type") == "public"), "")
    created: dt.datetime | None = None
    if droplet.get("created_at"):
        try:
            created = dt.datetime.fromisoformat(str(droplet["created_at"]))
        except ValueError:
            created = None
    extra = {
        key: str((droplet.get(key) or {}).get("slug") or "")
        for key in ("region", "size", "image")
        if isinstance(droplet.get(key), dict)
    }
    return Machine(
        id=str(droplet["id"]),
        name=str(droplet.get("name", "")),
        status=str(droplet.get("status", "")),
        private_ip=private,
        public_ip=public,
        tags=tuple(droplet.get("tags") or ()),
        created=created,
        price_hourly=_price(droplet.get("size")),
        extra=extra,
    )


def _price(size: Any) -> float | None:
    """A droplet's hourly price: its size's price_hourly (US dollars; the spec requires it on
    every size). None when the answer has none."""
    price = size.get("price_hourly") if isinstance(size, dict) else None
    if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
        return None
    return float(price)


def _field(reply: _Reply, key: str, doing: str) -> JSON:
    """The object under `key` of a 2xx answer; a ProviderError when the answer has none."""
    value = reply.body.get(key) if isinstance(reply.body, dict) else None
    if not isinstance(value, dict) or "id" not in value:
        raise ProviderError(
            f"DigitalOcean answered {reply.status} without a {key} while {doing}; "
            "is api-url DigitalOcean's API?"
        )
    return value


def _error_reply(exc: HttpResponseError) -> _Reply:
    response: Any = exc.response
    if response is None:
        return _Reply(int(exc.status_code or 0), None, {})
    try:
        body = response.json()
    except Exception:  # a proxy's HTML page, an empty body: no message then
        body = None
    return _Reply(response.status_code, body, response.headers)


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body.get("id") or "")
    return ""


def _next_page(body: Any) -> int | None:
    if not isinstance(body, dict):
        return None
    url = ((body.get("links") or {}).get("pages") or {}).get("next")
    if not url:
        return None
    pages = parse_qs(urlparse(str(url)).query).get("page")
    return int(pages[0]) if pages and pages[0].isdigit() else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _backoff(failures: int) -> float:
    return min(0.5 * 2.0 ** (failures - 1), 8.0)
