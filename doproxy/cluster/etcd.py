"""A small asyncio etcd v3 client over etcd's gRPC-JSON gateway.

Why hand-written
----------------
There is no maintained asyncio etcd v3 client that is sound: aetcd and etcd3 are unmaintained,
and etcd3 is synchronous on grpcio. etcd itself serves its v3 API as HTTP/JSON on the client
port (the gRPC-JSON gateway, a supported API of etcd), so this module talks to that with
aiohttp, which doproxy already depends on. Only what cluster mode needs is here: range, put,
delete, transactions, leases, watch, compaction and status.

The gateway, as etcd 3.4 serves it (checked against etcd 3.4.23)
-------------------------------------------------------------------
* Every call is `POST <endpoint>/v3/<service>/<method>` with a JSON body. etcd 3.4 serves the
  same API under `/v3/` and `/v3beta/` (3.3 had `/v3beta/` only; 3.5 dropped `/v3beta/`), so
  `/v3/` is used. A path the gateway does not know answers 404 with a `text/plain` body, which
  this client reports as "not an etcd >= 3.4 gateway"; a JSON 404 is a gRPC NOT_FOUND (a lease
  that is gone).
* Keys and values are base64; int64s are JSON strings. Fields at their zero value are left out
  of answers: a PUT event has no `type`, a key without a lease no `lease`, an empty value no
  `value`, a failed transaction no `succeeded`. `/v3/maintenance/status` names its fields
  camelCase (`raftTerm`, `dbSize`) while headers use snake_case (`raft_term`). An empty key
  is refused ("key is not provided"): the whole keyspace is the range from "\\0" to "\\0".
* A refused call answers `{"error", "message", "code"}` with the gRPC code mapped to an HTTP
  status (UNAVAILABLE 503, DEADLINE_EXCEEDED 504, UNAUTHENTICATED 401, NOT_FOUND 404, ...).
* Lease revoke is `/v3/lease/revoke` (3.4 still also answers the older `/v3/kv/lease/revoke`).
  Keep-alive (`/v3/lease/keepalive`) and watch (`/v3/watch`) are gRPC streams: the answer is
  one `{"result": ...}` (or `{"error": ...}`) JSON object per line. Keep-alive sends one request
  and reads one answer; a lease that is gone answers TTL 0 (left out), not an error.
* A watch whose start revision was compacted answers `created`, then `canceled` with
  `compact_revision`. A watch refused for auth answers `created` and `canceled` together,
  with the reason in `cancel_reason`.
* Auth: `/v3/auth/authenticate` returns a token, sent as the bare `Authorization` header (no
  "Bearer"). etcd's simple tokens live in each member's memory and expire (`--auth-token-ttl`,
  300 s by default) or vanish when the member restarts: then etcd answers 401 "invalid auth
  token", and the client authenticates again, once per call.
* Progress notifications (`progress_notify`) come only every
  `--experimental-watch-progress-notify-interval` (10 minutes by default in 3.4), far too
  rarely to tell a dead watch from a quiet one. A watch therefore relies on TCP errors and EOF,
  plus an optional `idle_timeout` for a deployment that sets a shorter interval.

Failing over
------------
The client knows several endpoints (one per member). Every call tries the endpoint that last
answered first, then the others in order, and raises `EtcdUnavailable` only when all failed:
connection refused or reset, no answer within `timeout` seconds (each attempt has that
deadline), an answer that is not etcd's, or a 5xx/429/408 (etcd has no leader, is overloaded,
timed out). The message names each endpoint and what failed there. An answer in which etcd
refused the request itself (bad argument, lease not found, permission denied) is not tried
elsewhere: every member would answer the same.

A write whose attempt timed out or failed with a 5xx may still have been applied before the
next endpoint is tried, as with any client: a put or delete repeated is harmless, but a
retried transaction may answer `succeeded=False` because its first attempt succeeded. Callers
that compare a revision of the key they write should read it again on a failed comparison.

A watch picks its endpoint the same way, then streams from that one member. When the stream
breaks (the member stopped, the connection died, `idle_timeout` passed without data) the
watch raises `EtcdUnavailable`; the caller watches again from the last revision it saw + 1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from ssl import SSLContext
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from doproxy.errors import (
    EtcdAuthFailed,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdRequestError,
    EtcdUnavailable,
)

__all__ = [
    "Compare",
    "Delete",
    "EtcdAuthFailed",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdRequestError",
    "EtcdUnavailable",
    "Get",
    "KeyValue",
    "Put",
    "TxnResult",
    "WatchEvent",
]

log = logging.getLogger(__name__)

# gRPC status codes etcd answers with (in the JSON body's "code").
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
_OUT_OF_RANGE = 11
_UNAUTHENTICATED = 16

# The longest line a watch stream may send before the client gives up on it. etcd sends one
# watch response per line, bounded by its --max-request-bytes (1.5 MiB by default) unless a
# watch asks for fragments; this only stops an endpoint that is not etcd from growing a
# buffer forever.
_MAX_LINE = 64 * 1024 * 1024

_TARGET_FIELDS = {
    "VALUE": "value",
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}
_RESULTS = ("EQUAL", "NOT_EQUAL", "GREATER", "LESS")


# --- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it. `lease` is 0 when the key has no lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Compare:
    """One comparison of a transaction: `target` of `key` compared with `value` (bytes for
    VALUE, an int for the others). A key that does not exist has version, create and mod
    revision and lease 0, so `Compare(k, "CREATE", "EQUAL", 0)` means "k does not exist"."""

    key: str
    target: Literal["VALUE", "VERSION", "CREATE", "MOD", "LEASE"]
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]
    value: bytes | int

    def __post_init__(self) -> None:
        if self.target not in _TARGET_FIELDS:
            raise ValueError(f"Compare target must be one of {', '.join(_TARGET_FIELDS)}")
        if self.result not in _RESULTS:
            raise ValueError(f"Compare result must be one of {', '.join(_RESULTS)}")
        want_bytes = self.target == "VALUE"
        if isinstance(self.value, bytes) != want_bytes or isinstance(self.value, bool):
            kind = "bytes" if want_bytes else "an int"
            raise TypeError(f"Compare {self.target} takes {kind}, not {self.value!r}")


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class TxnResult:
    """`responses` has one list per operation of the branch that ran: the keys a Get found
    (sorted by key), [] for a Put or Delete. `revision` is the store's revision after it."""

    succeeded: bool
    revision: int
    responses: list[list[KeyValue]]


@dataclass(frozen=True)
class WatchEvent:
    """A key was put or deleted. For DELETE, `kv` has the key and the deleting revision
    (`mod_revision`); its value is b"" and its other numbers 0."""

    kind: Literal["PUT", "DELETE"]
    kv: KeyValue


# --- encoding -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key_bytes(key: str) -> bytes:
    # surrogateescape both ways: a key some other program wrote that is not UTF-8 reads as a
    # str and writes back as the same bytes.
    return key.encode("utf-8", "surrogateescape")


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that makes a range cover every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # all 0xff: every key from `prefix` on


def _range(key: str, prefix: bool) -> dict[str, Any]:
    raw = _key_bytes(key)
    if prefix and not raw:
        # etcd refuses an empty key ("key is not provided"); from "\0" to the end ("\0") is
        # every key, as clientv3 asks for it.
        return {"key": _b64(b"\0"), "range_end": _b64(b"\0")}
    body: dict[str, Any] = {"key": _b64(raw)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(raw))
    return body


def _int(data: dict[str, Any], name: str) -> int:
    return int(data.get(name, 0))


def _kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(data.get("key", "")).decode("utf-8", "surrogateescape"),
        value=base64.b64decode(data.get("value", "")),
        create_revision=_int(data, "create_revision"),
        mod_revision=_int(data, "mod_revision"),
        version=_int(data, "version"),
        lease=_int(data, "lease"),
    )


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header", {})
    return _int(header, "revision") if isinstance(header, dict) else 0


def _op(op: Put | Delete | Get) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(_key_bytes(op.key)), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": _range(op.key, op.prefix)}
    if isinstance(op, Get):
        return {"request_range": _range(op.key, op.prefix)}
    raise TypeError(f"a transaction takes Put, Delete and Get operations, not {op!r}")


def _compare(c: Compare) -> dict[str, Any]:
    value = _b64(c.value) if isinstance(c.value, bytes) else str(c.value)
    return {
        "key": _b64(_key_bytes(c.key)),
        "target": c.target,
        "result": c.result,
        _TARGET_FIELDS[c.target]: value,
    }


# --- failures ----------------------------------------------------------------------------------


class _EndpointFailed(Exception):
    """This endpoint did not answer usefully: try the next one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StaleConnection(_EndpointFailed):
    """The server closed the connection before answering (e.g. a pooled keep-alive connection
    it had closed): worth one more try on the same endpoint."""


@dataclass(frozen=True)
class _Refusal:
    """etcd answered with a gRPC error."""

    status: int
    code: int
    message: str

    @property
    def stale_token(self) -> bool:
        # An expired or unknown token, a token from before an auth change, or none at all
        # (auth was enabled after we looked): authenticating again may fix each.
        return self.code == _UNAUTHENTICATED or any(
            s in self.message
            for s in ("invalid auth token", "auth store is old", "user name is empty")
        )


class _Refused(Exception):
    def __init__(self, refusal: _Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _describe(exc: BaseException) -> str:
    """What went wrong with a connection, in a few words (never a header or body)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        return f"cannot connect: {os.strerror(err.errno).lower() if err.errno else err}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "broke off its answer"
    return str(exc) or type(exc).__name__


# --- the client ----------------------------------------------------------------------------------


class EtcdClient:
    """An etcd v3 client for one cluster, failing over between its members' endpoints.

    Create it anywhere; it opens its HTTP session on the first call, inside the running loop.
    Close it with `close()` (or use it as an async context manager).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 2.0,
        username: str | None = None,
        password: str | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        cleaned = []
        for url in endpoints:
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                # (the URL itself is not shown: it holds a password)
                raise ValueError(
                    "an etcd endpoint holds a user name or password: give them as "
                    "[cluster] username and password instead"
                )
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"etcd endpoint {url!r} is not an http:// or https:// URL")
            if parts.path.strip("/") or parts.query or parts.fragment:
                raise ValueError(f"etcd endpoint {url!r} must be scheme://host:port only")
            cleaned.append(f"{parts.scheme}://{parts.netloc}")
        if not cleaned:
            raise ValueError("etcd needs at least one endpoint")
        if (username is None) != (password is None):
            raise ValueError("etcd authentication needs both a user name and a password")
        if timeout <= 0:
            raise ValueError("etcd timeout must be positive")
        self.endpoints: tuple[str, ...] = tuple(cleaned)
        self.timeout = timeout
        self._username = username
        self._password = password
        self._ssl = ssl
        self._current = 0  # index of the endpoint that answered last
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def current_endpoint(self) -> str:
        """The endpoint that answered last (the first one until a call was made): the next
        call tries it first."""
        return self.endpoints[self._current]

    def __repr__(self) -> str:
        return f"EtcdClient({list(self.endpoints)!r})"

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --- key-value ---

    async def get(self, key: str, *, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The key (or every key under the prefix), sorted by key, and the store's revision
        as of the read: watch from that revision + 1 to miss nothing after it."""
        answer = await self._call("/v3/kv/range", _range(key, prefix))
        return [_kv(kv) for kv in answer.get("kvs", ())], _revision(answer)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set the key; returns the revision of the write. With `lease`, the key goes away
        with the lease (`EtcdLeaseNotFound` when that lease is already gone)."""
        body: dict[str, Any] = {"key": _b64(_key_bytes(key)), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self._call("/v3/kv/put", body))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete the key (or every key under the prefix); returns how many were deleted."""
        answer = await self._call("/v3/kv/deleterange", _range(key, prefix))
        return _int(answer, "deleted")

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Put | Delete | Get],
        failure: Sequence[Put | Delete | Get] = (),
    ) -> TxnResult:
        """If every comparison holds, run `success`, else `failure`, as one atomic step."""
        body = {
            "compare": [_compare(c) for c in compare],
            "success": [_op(op) for op in success],
            "failure": [_op(op) for op in failure],
        }
        answer = await self._call("/v3/kv/txn", body)
        responses = []
        for response in answer.get("responses", ()):
            ranged = response.get("response_range")
            kvs = ranged.get("kvs", ()) if isinstance(ranged, dict) else ()
            responses.append([_kv(kv) for kv in kvs])
        return TxnResult(bool(answer.get("succeeded", False)), _revision(answer), responses)

    async def compact(self, revision: int, *, physical: bool = False) -> None:
        """Forget the history before `revision` (watches from before it get EtcdCompacted).
        `EtcdCompacted` when that revision is already compacted."""
        await self._call("/v3/kv/compaction", {"revision": str(revision), "physical": physical})

    # --- leases ---

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds (etcd raises a TTL below its minimum, about 1.5
        election timeouts, to that minimum); returns its id."""
        answer = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdRequestError(f"etcd refused a lease of {ttl}s: {answer['error']}")
        return _int(answer, "ID")

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL in seconds from now, 0 when the lease is
        gone (expired or revoked: its keys are deleted)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)}, stream=True)
        return _int(answer, "TTL")

    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys. A lease already gone is not an error."""
        with contextlib.suppress(EtcdLeaseNotFound):
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})

    # --- cluster ---

    async def status(self) -> dict[str, Any]:
        """/v3/maintenance/status of the first endpoint that answers, as etcd gives it
        (`version`, `leader`, `raftTerm`, `dbSize`...; int64s as strings), plus `endpoint`:
        the one that answered."""
        answer = await self._call("/v3/maintenance/status", {})
        return {**answer, "endpoint": self.current_endpoint}

    # --- watch ---

    async def watch(
        self,
        key: str,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Yield each batch of changes to the key (or the keys under the prefix) from
        `start_revision` on (0: from now). Raises `EtcdCompacted` when that revision has been
        compacted, and `EtcdUnavailable` when the stream breaks or, with `idle_timeout`,
        carries nothing for that many seconds."""
        create = _range(key, prefix)
        create["progress_notify"] = True
        if start_revision:
            create["start_revision"] = str(start_revision)
        endpoint, resp, lines = await self._open_watch(key, {"create_request": create})
        try:
            while True:
                try:
                    message = await lines.next(idle_timeout)
                except TimeoutError:
                    raise EtcdUnavailable(
                        f"the watch on {key!r} at {endpoint} carried nothing for "
                        f"{idle_timeout:g}s: watch again"
                    ) from None
                except _EndpointFailed as exc:
                    raise EtcdUnavailable(
                        f"the watch on {key!r} at {endpoint} broke ({exc.reason}): "
                        f"watch again (is etcd running at {endpoint}?)"
                    ) from None
                if message is None:
                    raise EtcdUnavailable(
                        f"etcd at {endpoint} ended the watch on {key!r}: watch again"
                    )
                result = self._watch_result(endpoint, key, message)
                if result.get("canceled"):
                    raise self._watch_canceled(endpoint, key, start_revision, result)
                events = [
                    WatchEvent("DELETE" if e.get("type") == "DELETE" else "PUT", _kv(e["kv"]))
                    for e in result.get("events", ())
                ]
                if events:  # progress notifications carry none
                    yield events
        finally:
            resp.close()

    async def _open_watch(
        self, key: str, request: dict[str, Any]
    ) -> tuple[str, aiohttp.ClientResponse, _Lines]:
        """Start the watch on the first endpoint that confirms it (`created`)."""
        failures: list[tuple[str, str]] = []
        for endpoint in self._order():
            try:
                resp, lines = await self._watch_endpoint(endpoint, key, request)
            except _EndpointFailed as exc:
                failures.append((endpoint, exc.reason))
                log.debug("etcd at %s did not start a watch: %s", endpoint, self._scrub(exc.reason))
                continue
            self._answered(endpoint, failures)
            return endpoint, resp, lines
        raise EtcdUnavailable(self._unavailable("/v3/watch", failures))

    async def _watch_endpoint(
        self, endpoint: str, key: str, request: dict[str, Any]
    ) -> tuple[aiohttp.ClientResponse, _Lines]:
        reauthenticated = False
        while True:
            token = await self._token_for(endpoint)
            try:
                resp, lines, created = await self._start_watch(endpoint, request, token)
            except _Refused as exc:
                refusal = exc.refusal
            else:
                if not created.get("canceled"):
                    return resp, lines
                resp.close()
                # Refused for auth, it comes as a watch created and canceled at once.
                refusal = _Refusal(200, 0, str(created.get("cancel_reason", "")))
                if not self._can_reauthenticate(refusal, reauthenticated):
                    raise self._watch_canceled(endpoint, key, 0, created)
            if not self._can_reauthenticate(refusal, reauthenticated):
                raise self._error(endpoint, "/v3/watch", refusal)
            reauthenticated = True
            await self._reauthenticate(endpoint, token)

    async def _start_watch(
        self, endpoint: str, request: dict[str, Any], token: str | None
    ) -> tuple[aiohttp.ClientResponse, _Lines, dict[str, Any]]:
        session = self._get_session()
        headers = {"Authorization": token} if token else None
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self.timeout):
                resp = await session.post(endpoint + "/v3/watch", json=request, headers=headers)
                if resp.status != 200:
                    raise _answer_error("/v3/watch", resp.status, await resp.read())
                lines = _Lines(resp)
                first = await lines.next(None)
            if first is None:
                raise _EndpointFailed("ended the watch before confirming it")
            result = first.get("result")
            if not isinstance(result, dict) or not result.get("created"):
                raise _EndpointFailed("did not confirm the watch")
            return resp, lines, result
        except BaseException as exc:
            if resp is not None:
                resp.close()
            if isinstance(exc, TimeoutError):
                raise _EndpointFailed(f"no answer within {self.timeout:g}s") from None
            if isinstance(exc, aiohttp.ClientError):
                raise _EndpointFailed(_describe(exc)) from None
            raise

    def _watch_result(self, endpoint: str, key: str, message: dict[str, Any]) -> dict[str, Any]:
        result = message.get("result")
        if isinstance(result, dict):
            return result
        error = message.get("error")
        detail = error.get("message", "") if isinstance(error, dict) else str(message)[:200]
        raise EtcdUnavailable(
            self._scrub(f"etcd at {endpoint} broke off the watch on {key!r}: {detail}")
        )

    def _watch_canceled(
        self, endpoint: str, key: str, start_revision: int, result: dict[str, Any]
    ) -> EtcdError:
        compacted = _int(result, "compact_revision")
        if compacted:
            return EtcdCompacted(
                f"cannot watch {key!r} from revision {start_revision}: etcd has compacted "
                f"its history up to revision {compacted}; read the keys again and watch from "
                "that read's revision + 1",
                compact_revision=compacted,
            )
        reason = self._scrub(str(result.get("cancel_reason", "")) or "no reason given")
        if any(s in reason for s in ("permission denied", "user name is empty", "auth token")):
            return EtcdAuthFailed(
                f"etcd at {endpoint} refused the watch on {key!r}: {reason}. "
                "Check [cluster] username and password"
            )
        return EtcdUnavailable(f"etcd at {endpoint} canceled the watch on {key!r}: {reason}")

    # --- calls, failover and auth ---

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this EtcdClient is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    def _order(self) -> list[str]:
        """The endpoint that answered last, then the others in their configured order."""
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    def _answered(self, endpoint: str, failures: list[tuple[str, str]]) -> None:
        index = self.endpoints.index(endpoint)
        if index != self._current:
            failed = self._scrub("; ".join(f"{url}: {reason}" for url, reason in failures))
            log.warning("etcd: now using %s (%s)", endpoint, failed or "it answered first")
            self._current = index

    def _unavailable(self, path: str, failures: list[tuple[str, str]]) -> str:
        tried = "; ".join(f"{url}: {reason}" for url, reason in failures)
        return self._scrub(
            f"no etcd endpoint answered {path} ({tried}). Is etcd running at "
            f"{', '.join(self.endpoints)}? Check [cluster] endpoints"
        )

    def _scrub(self, text: str) -> str:
        """Never let the password or the token into a message, whatever etcd echoed."""
        for secret in (self._password, self._token):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def _call(
        self, path: str, body: dict[str, Any], *, stream: bool = False
    ) -> dict[str, Any]:
        """POST `body` to `path` on the endpoints in turn; the first useful answer."""
        failures: list[tuple[str, str]] = []
        for endpoint in self._order():
            try:
                answer = await self._call_endpoint(endpoint, path, body, stream)
            except _EndpointFailed as exc:
                failures.append((endpoint, exc.reason))
                log.debug("etcd at %s failed %s: %s", endpoint, path, self._scrub(exc.reason))
                continue
            self._answered(endpoint, failures)
            return answer
        raise EtcdUnavailable(self._unavailable(path, failures))

    async def _call_endpoint(
        self, endpoint: str, path: str, body: dict[str, Any], stream: bool
    ) -> dict[str, Any]:
        reauthenticated = False
        reconnected = False
        while True:
            token = await self._token_for(endpoint)
            try:
                answer = await self._post(endpoint, path, body, token)
            except _StaleConnection:
                if reconnected:
                    raise
                reconnected = True
                continue
            except _Refused as exc:
                if self._can_reauthenticate(exc.refusal, reauthenticated):
                    reauthenticated = True
                    await self._reauthenticate(endpoint, token)
                    continue
                raise self._error(endpoint, path, exc.refusal) from None
            if not stream:
                return answer
            # A gRPC stream: one {"result": ...} or {"error": ...} per line; we sent one
            # request, so the first is ours.
            result = answer.get("result")
            if isinstance(result, dict):
                return result
            error = answer.get("error")
            detail = error.get("message", "") if isinstance(error, dict) else "no result"
            raise _EndpointFailed(self._scrub(f"{path} failed: {detail}"))

    async def _post(
        self, endpoint: str, path: str, body: dict[str, Any], token: str | None
    ) -> dict[str, Any]:
        """One POST to one endpoint: its JSON answer, or _EndpointFailed, or _Refused."""
        session = self._get_session()
        headers = {"Authorization": token} if token else None
        try:
            async with asyncio.timeout(self.timeout):
                async with session.post(endpoint + path, json=body, headers=headers) as resp:
                    status, raw = resp.status, await resp.read()
        except TimeoutError:
            raise _EndpointFailed(f"no answer within {self.timeout:g}s") from None
        except aiohttp.ServerDisconnectedError as exc:
            raise _StaleConnection(_describe(exc)) from None
        except aiohttp.ClientError as exc:
            raise _EndpointFailed(_describe(exc)) from None
        if status != 200:
            raise _answer_error(path, status, raw)
        try:
            answer = json.loads(raw)
        except ValueError:
            # A stream's answer (keep-alive) is one object per line: the first is ours.
            try:
                answer = json.loads(raw.strip().split(b"\n", 1)[0])
            except ValueError:
                raise _EndpointFailed(f"answered {path} with something not JSON") from None
        if not isinstance(answer, dict):
            raise _EndpointFailed(f"answered {path} with something that is not etcd's")
        return answer

    def _can_reauthenticate(self, refusal: _Refusal, already: bool) -> bool:
        return self._username is not None and not already and refusal.stale_token

    async def _token_for(self, endpoint: str) -> str | None:
        if self._username is not None and self._token is None:
            await self._reauthenticate(endpoint, None)
        return self._token

    async def _reauthenticate(self, endpoint: str, stale: str | None) -> None:
        """Get a new token from `endpoint`, unless another call already replaced `stale`."""
        async with self._auth_lock:
            if self._token != stale:
                return
            if stale is not None:
                log.info("etcd: the auth token expired or was lost; authenticating again")
            body = {"name": self._username, "password": self._password}
            try:
                answer = await self._post(endpoint, "/v3/auth/authenticate", body, None)
            except _Refused as exc:
                if "authentication is not enabled" in exc.refusal.message:
                    self._token = ""  # nothing to send, and no need to ask again
                    return
                raise EtcdAuthFailed(
                    self._scrub(
                        f"etcd at {endpoint} refused user {self._username!r}: "
                        f"{exc.refusal.message}. Check [cluster] username and password"
                    )
                ) from None
            token = answer.get("token")
            if not isinstance(token, str) or not token:
                raise _EndpointFailed("answered /v3/auth/authenticate without a token")
            self._token = token

    def _error(self, endpoint: str, path: str, refusal: _Refusal) -> EtcdError:
        """The exception for a request etcd refused."""
        message = self._scrub(f"etcd at {endpoint} refused {path}: {refusal.message}")
        if refusal.code in (_UNAUTHENTICATED, _PERMISSION_DENIED) or refusal.stale_token:
            if self._username is None:
                return EtcdAuthFailed(
                    f"{message}. etcd has authentication enabled: "
                    "set [cluster] username and password"
                )
            return EtcdAuthFailed(f"{message}. Check [cluster] username and password")
        if refusal.code == _NOT_FOUND and "lease not found" in refusal.message:
            return EtcdLeaseNotFound(message, refusal.code)
        if refusal.code == _OUT_OF_RANGE and "compacted" in refusal.message:
            return EtcdCompacted(message)
        return EtcdRequestError(message, refusal.code)


def _answer_error(path: str, status: int, raw: bytes) -> Exception:
    """The failure for a non-200 answer: _Refused when etcd refused the request itself,
    _EndpointFailed when the endpoint should be given up for this call."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "code" not in body:
        if status == 404:
            return _EndpointFailed(
                f"HTTP 404 for {path}: not an etcd >= 3.4 gRPC gateway (it serves /v3/)"
            )
        return _EndpointFailed(f"HTTP {status} for {path}, not an answer from etcd")
    message = str(body.get("message") or body.get("error") or "")
    if status >= 500 or status in (408, 429):
        # No leader, a timeout inside etcd, too many requests: another member may do better.
        return _EndpointFailed(f"HTTP {status}: {message}")
    return _Refused(_Refusal(status, int(body.get("code", 0)), message))


class _Lines:
    """The JSON objects of a gRPC gateway stream, one per line."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self._buffer = bytearray()

    async def next(self, idle_timeout: float | None) -> dict[str, Any] | None:
        """The next object; None at the end of the stream. TimeoutError when nothing came
        for `idle_timeout` seconds; _EndpointFailed when the connection broke."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise _EndpointFailed("sent a line that is not JSON") from None
                if not isinstance(message, dict):
                    raise _EndpointFailed("sent something that is not etcd's")
                return message
            if len(self._buffer) > _MAX_LINE:
                raise _EndpointFailed(f"sent a line longer than {_MAX_LINE} bytes")
            try:
                async with asyncio.timeout(idle_timeout):
                    chunk = await self._content.readany()
            except aiohttp.ClientError as exc:
                raise _EndpointFailed(_describe(exc)) from None
            if not chunk:
                if self._buffer.strip():
                    self._buffer += b"\n"  # a last object without its newline
                    continue
                return None
            self._buffer += chunk
