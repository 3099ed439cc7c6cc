"""Every error doproxy raises on purpose lives here.

Client-facing errors carry the HTTP status the client will see. Configuration errors carry every
problem found, each with its file, line (when known) and dotted key, so a user can fix them all at
once. Only the CLI turns these into exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass


class DoproxyError(Exception):
    """Base of every deliberate doproxy error."""


# --- client-facing (data plane) -------------------------------------------------------------


class ClientError(DoproxyError):
    """An error answered to the client with an HTTP status."""

    status: int = 500
    reason: str = "Internal Server Error"
    retry_after: int = 0  # seconds, for a Retry-After header (0: none)
    page: tuple[bytes, bytes] | None = None  # (content type, body) instead of the usual one

    def __init__(
        self, detail: str = "", retry_after: int = 0, page: tuple[bytes, bytes] | None = None
    ) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        if retry_after:
            self.retry_after = retry_after
        if page is not None:
            self.page = page


class BadRequest(ClientError):
    status = 400
    reason = "Bad Request"


class MethodNotAllowed(ClientError):
    status = 405
    reason = "Method Not Allowed"


class RequestTimeout(ClientError):
    status = 408
    reason = "Request Timeout"


class ExpectationFailed(ClientError):
    status = 417
    reason = "Expectation Failed"


class ContentTooLarge(ClientError):
    status = 413
    reason = "Content Too Large"


class URITooLong(ClientError):
    status = 414
    reason = "URI Too Long"


class HeaderFieldsTooLarge(ClientError):
    status = 431
    reason = "Request Header Fields Too Large"


class NotImplementedByProxy(ClientError):
    status = 501
    reason = "Not Implemented"


class BadGateway(ClientError):
    status = 502
    reason = "Bad Gateway"


class ServiceUnavailable(ClientError):
    status = 503
    reason = "Service Unavailable"


class GatewayTimeout(ClientError):
    status = 504
    reason = "Gateway Timeout"


# --- configuration and inventory ------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where, which key, and what."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(DoproxyError):
    """A config or inventory file is invalid. Carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- provisioning (DigitalOcean, local processes) --------------------------------------------


class ProviderError(DoproxyError):
    """A provider call failed. The message says what failed in words a user can act on, e.g.
    "DigitalOcean rejected the token (401)". It never contains the API token."""


class MachineNotFound(ProviderError):
    """The droplet or process does not exist (any more)."""


class ProviderRefused(ProviderError):
    """The provider refused the request outright (HTTP 4xx such as 401, 403, 422): it did
    nothing, so a refused create created no machine."""


class ProviderAuthError(ProviderRefused):
    """The provider refused our credentials (HTTP 401/403)."""


class RateLimited(ProviderError):
    """The provider kept answering 429 after we waited as it asked."""


class ProvisionTimeout(ProviderError):
    """A machine did not become active (or an action did not complete) in time."""


# --- cluster mode (etcd) ---------------------------------------------------------------------


class EtcdError(DoproxyError):
    """A call to etcd failed. The message names the endpoints and never carries the password
    or the auth token."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered (connection refused, timeout, 5xx), or a watch stream broke.
    The message names every endpoint tried and what failed at each; trying again later may
    work."""


class EtcdCompacted(EtcdUnavailable):
    """The revision a watch was to start from has been compacted away: the caller must read
    the keys again and watch from that read's revision + 1."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class EtcdAuthFailed(EtcdError):
    """etcd refused our credentials (wrong user name or password), wants credentials we were
    not given, or denied the user the operation."""


class EtcdRequestError(EtcdError):
    """etcd answered and refused the request itself (every member would answer the same):
    `code` is the gRPC status code etcd gave."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdLeaseNotFound(EtcdRequestError):
    """The lease named by a put (or a transaction's put) has expired or been revoked."""


class NotLeader(DoproxyError):
    """Cluster mode: this node is not (or no longer) the leader, so it may not act on the
    provider or write as the scaler (doproxy.cluster)."""


class RolloutRefused(DoproxyError):
    """A rollout cannot begin (or be aborted) now; the admin API answers it with this status."""

    status = 409
