"""Typed, frozen configuration models.

Every key of the 2015 Go doproxy's `doproxy.toml` is accepted with the same meaning and default;
new settings use the same kebab-case style and have defaults, so a minimal file works. Durations
are Go duration strings ("250ms", "2s") and are stored as float seconds.

This module is part of the pure core: it parses values, it never reads files or the clock.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from doproxy.core.durations import parse_duration
from doproxy.core.forwarding import IPNetwork, parse_networks


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "2s" or "250ms"')
    return value  # int/float seconds are accepted as a convenience


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]


def _networks(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]  # one address or CIDR
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return parse_networks(value)  # ValueError names the bad entry
    return value


# CIDRs or plain addresses; host bits are ignored ("10.1.2.3/8" is 10.0.0.0/8).
Networks = Annotated[tuple[IPNetwork, ...], BeforeValidator(_networks)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
    )


class LoadBalancing(Section):
    type: Literal["roundrobin", "leastconn", "weighted", "random2", "leastlatency", "hash"] = (
        "roundrobin"
    )
    # What `hash` hashes: "client-ip", "header:NAME" or "cookie:NAME".
    hash_key: str = "client-ip"
    # A backend that becomes eligible (added, enabled, healthy again, back from an ejection)
    # ramps from 1/20 of its share to all of it over this long (HAProxy's slowstart); 0 = off.
    slow_start: Duration = 0.0

    @model_validator(mode="after")
    def _hash_key(self) -> LoadBalancing:
        kind, _, name = self.hash_key.partition(":")
        if self.hash_key != "client-ip" and (kind not in ("header", "cookie") or not name):
            raise ValueError(
                f'hash-key {self.hash_key!r} must be "client-ip", "header:NAME" or "cookie:NAME"'
            )
        return self


class BackendSettings(Section):
    latency_average_seconds: int = Field(30, gt=0)
    dial_timeout: PositiveDuration = 2.0
    health_check_timeout: PositiveDuration = 0.25
    new_host_port: int = Field(8080, ge=1, le=65535)
    new_host_health_path: str = "/"
    new_host_health_https: bool = False
    disable_health_check: bool = False


def _loopback(host: str) -> bool:
    """Is `host` this machine (localhost, 127.0.0.0/8, ::1)? No name is looked up."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DOProvisioner(Section):
    enable: bool = False
    token: str = Field("", repr=False)
    ssh_key_ids: list[int | str] = Field(default_factory=list)
    hostname_prefix: str = "doproxy-"
    region: str = "nyc3"
    size: str = "s-1vcpu-1gb"
    image: str = "ubuntu-22-04-x64"
    user_data: str = ""  # a file path (relative to the config file), as in the Go version
    backups: bool = False
    # New in doproxy (Python).
    tags: tuple[str, ...] = ("doproxy",)  # every droplet we create carries them; list() uses them
    vpc_uuid: str = ""
    monitoring: bool = False
    ipv6: bool = False
    token_file: str = ""  # read when `token` is empty; then the DIGITALOCEAN_TOKEN variable
    # http:// sends the token in clear text: only to this machine (a test double, a local
    # mock), unless this says the network in between is trusted. Before api-url: its validator
    # reads it.
    allow_insecure_api_url: bool = False
    api_url: str = "https://api.digitalocean.com"
    create_timeout: PositiveDuration = 300.0  # a droplet must be active within this
    poll_interval: PositiveDuration = 2.0  # between status polls while waiting

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str, info: ValidationInfo) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        if (
            url.scheme == "http"
            and not _loopback(url.hostname)
            and not info.data.get("allow_insecure_api_url", False)
        ):
            raise ValueError(
                f"{value!r} would send the API token in clear text to {url.hostname}: use "
                "https://, or set allow-insecure-api-url = true if the network is trusted "
                "(http:// to 127.0.0.1, ::1 or localhost is always allowed)"
            )
        return value

    @model_validator(mode="after")
    def _tags(self) -> DOProvisioner:
        if not self.tags:
            raise ValueError(
                "tags must name at least one tag: it is how doproxy finds its droplets"
            )
        return self


class LocalProvisioner(Section):
    """Backends as child processes on this machine. New in doproxy (Python)."""

    enable: bool = False
    # Run through the shell-less argv split (shlex); {host}, {port} and {name} are filled in.
    # A leading `python` (or `python3`) is the interpreter doproxy runs on, so a virtualenv works.
    command: str = ""
    host: str = "127.0.0.1"
    ports: str = "9100-9199"  # the range new processes get a port from
    health_path: str = "/"
    boot_timeout: PositiveDuration = 10.0  # the process must answer health-path within this
    stop_timeout: PositiveDuration = 5.0  # SIGTERM, then SIGKILL after this
    workdir: str = ""  # relative to the config file; default: the config file's folder
    # Each process's stdout and stderr go to <log-dir>/<name>.log (relative to the config
    # file); empty: discarded. Never the proxy's own streams: a backend outlives the proxy.
    log_dir: str = ""
    # Every process we start carries them (in its environment); list() finds processes by them.
    tags: tuple[str, ...] = ("doproxy",)
    # What one backend costs per hour (in the currency of max-cost-per-hour): local processes
    # cost nothing unless this says otherwise (docs/autoscaling.md, "What the pool costs").
    cost_per_hour: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> LocalProvisioner:
        if not self.tags or any(not t or "," in t for t in self.tags):
            raise ValueError(
                "tags must name at least one tag, without commas: it is how doproxy finds its "
                "processes"
            )
        low, _, high = self.ports.partition("-")
        high = high or low
        if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
            raise ValueError(f'ports {self.ports!r} must look like "9100-9199"')
        if self.enable and "{port}" not in self.command:
            raise ValueError("command must contain {port}, so each process listens on its own")
        return self

    def port_range(self) -> range:
        low, _, high = self.ports.partition("-")
        return range(int(low), int(high or low) + 1)


class Provisioning(Section):
    enable: bool = False
    min_backends: int = 1  # at least 1, checked below with a message that says why
    max_backends: int = Field(2, ge=0)
    downscale_latency: Duration = 0.150
    downscale_time: Duration = 900.0
    downscale_every: Duration = 3600.0
    upscale_latency: Duration = 0.5
    upscale_time: Duration = 180.0
    upscale_every: Duration = 900.0
    max_health_failures: int = Field(180, ge=1)
    # New in doproxy (Python); see docs/autoscaling.md.
    mode: Literal["threshold", "target"] = "threshold"
    target_latency: PositiveDuration = 0.3  # mode = "target": the latency to track
    # mode = "target": no change while the mean latency is within this fraction of the target
    # (Kubernetes' HPA tolerance).
    tolerance: float = Field(0.1, ge=0, lt=1)
    # mode = "target": scale down only to a size predicted to keep the mean latency this
    # fraction below the target (Kubernetes 1.33's per-direction tolerance); see
    # docs/autoscaling.md for why latency needs a wider band downward than upward.
    downscale_tolerance: float = Field(0.4, ge=0, lt=1)
    # Scale down only to the highest size wanted within this window; default: downscale-time.
    downscale_stabilization: Duration | None = None
    max_step: int = Field(1, ge=1)  # machines added or removed by one decision at most
    # An idle pool (below min-requests per second) has no meaningful latency. "hold" keeps its
    # size; "scale-down" treats it as fast, so it shrinks to min-backends.
    idle: Literal["hold", "scale-down"] = "hold"
    min_requests: float = Field(1.0, ge=0)  # requests per second below which the pool is idle
    dry_run: bool = False  # decide and log, never act
    drain_timeout: Duration = 30.0  # a victim's in-flight requests may finish within this
    interval: PositiveDuration = 5.0  # between decisions
    # Tagged machines that the inventory does not know, found at start: "adopt" or "destroy".
    orphans: Literal["adopt", "destroy"] = "adopt"
    # Between two reconciliations with the provider (and one follows any provider error).
    reconcile_every: PositiveDuration = 60.0
    history: int = Field(200, ge=1)  # decisions kept in memory for the admin API/status page
    # Scale to zero (docs/scale-to-zero.md): a pool with no real request for idle-after
    # retires every backend; the first request to the empty pool starts one and is held until
    # it passes its health check (up to wake-timeout), with at most wake-queue requests held.
    scale_to_zero: bool = False
    idle_after: PositiveDuration = 1800.0
    wake_timeout: PositiveDuration = 120.0
    wake_queue: int = Field(1000, ge=1)
    # A browser (Accept: text/html) gets a small page that reloads itself instead of waiting.
    wake_page: bool = False
    # Requests that neither wake the pool nor keep it awake (answered 503 while it sleeps):
    # an entry starting with "/" is a path prefix, any other a User-Agent substring
    # (case-insensitive), e.g. ["/healthz", "UptimeRobot"].
    wake_ignore: tuple[str, ...] = ()
    # Scale-ups stop where the pool would cost more than this per hour (US dollars, as
    # DigitalOcean bills droplets); 0 = no cap. See docs/autoscaling.md, "What the pool costs".
    max_cost_per_hour: float = Field(0.0, ge=0)
    # Progressive rollouts (docs/rollouts.md): the canary gets canary-weight percent of the
    # traffic for canary-time; the new machines pass while their error rate is at most
    # max-error-rate-increase percentage points above the old ones' and their mean latency at
    # most max-latency-ratio times the old ones'. Then rollout-step old machines are replaced
    # at a time, each step watched for rollout-step-time. A group with fewer than
    # rollout-min-requests requests in a window is judged on its health checks alone.
    canary_weight: float = Field(10.0, gt=0, lt=100)
    canary_time: PositiveDuration = 300.0
    max_error_rate_increase: float = Field(1.0, ge=0, le=100)
    max_latency_ratio: float = Field(1.5, ge=1)
    rollout_step: int = Field(1, ge=1)
    rollout_step_time: PositiveDuration = 60.0
    rollout_min_requests: int = Field(100, ge=0)

    @property
    def stabilization(self) -> float:
        """The downscale-stabilization window in seconds (downscale-time unless set)."""
        if self.downscale_stabilization is None:
            return self.downscale_time
        return self.downscale_stabilization

    @model_validator(mode="after")
    def _bounds(self) -> Provisioning:
        # As in the Go version: a pool of no backend serves nothing, and an autoscaler that
        # may reach zero has no latency left to tell it when to grow again.
        if self.min_backends < 0 or (self.min_backends == 0 and not self.scale_to_zero):
            raise ValueError(
                f"provisioning.min-backends ({self.min_backends}) must be at least 1: a pool "
                "without backends serves nothing and measures no latency to grow back from "
                "(0 is allowed with scale-to-zero = true, which wakes it on a request)"
            )
        if any(not p for p in self.wake_ignore):
            raise ValueError("provisioning.wake-ignore: an entry may not be empty")
        if self.min_backends > self.max_backends:
            raise ValueError(
                f"provisioning.min-backends ({self.min_backends}) must not exceed "
                f"provisioning.max-backends ({self.max_backends})"
            )
        # Equal or crossed thresholds make the threshold mode flap: every latency is "slow"
        # or "fast". Checked only when enabled, so a disabled Go file loads as it always did.
        if (
            self.enable
            and self.mode == "threshold"
            and self.downscale_latency >= self.upscale_latency
        ):
            raise ValueError(
                f"provisioning.downscale-latency ({self.downscale_latency:g}s) must be below "
                f"provisioning.upscale-latency ({self.upscale_latency:g}s)"
            )
        return self


class HealthSettings(Section):
    """Active health checks. New in doproxy (Python); the Go version checked every second."""

    interval: PositiveDuration = 1.0  # between checks of a healthy backend
    down_interval: PositiveDuration = 2.0  # between checks of a backend that is down
    # timeout: [backend] health-check-timeout (the Go key) unless set here
    timeout: PositiveDuration | None = None
    # Path probed on server-host when a backend has no health-url; default: [backend]
    # new-host-health-path (the Go key).
    path: str | None = None
    rise: int = Field(2, ge=1)  # consecutive passes that bring a backend back
    fall: int = Field(5, ge=1)  # consecutive failures that take it out
    jitter: float = Field(0.1, ge=0, le=1)  # each wait is interval * (1 +- jitter)
    # Statuses that pass; empty means anything below 500, as in the Go version.
    expect_status: tuple[int, ...] = ()
    body_match: str = ""  # when set, the body must contain this text


class PassiveHealth(Section):
    """Eject a backend that keeps failing real requests. New in doproxy (Python)."""

    consecutive_failures: int = Field(5, ge=0)  # connect failures or 5xx in a row; 0 = off
    ejection_time: PositiveDuration = 10.0  # first ejection; each repeat doubles it
    max_ejection_time: PositiveDuration = 300.0
    max_ejection_percent: float = Field(50.0, ge=0, le=100)


class Retries(Section):
    """Redispatch to a different backend. New in doproxy (Python)."""

    attempts: int = Field(2, ge=0)  # retries after the first try; 0 turns retries off
    budget_percent: float = Field(20.0, ge=0, le=100)  # of recent requests
    budget_min_per_second: float = Field(10.0, ge=0)  # retries always allowed at this rate
    on_status: tuple[int, ...] = (502, 503, 504)  # backend answers retried (idempotent only)
    # An idempotent request's body is kept for a retry up to this size; a larger one is not
    # retried once sent.
    buffer_body_bytes: int = Field(64 * 1024, ge=0)


class Timeouts(Section):
    """Data-plane timeouts. New in doproxy (Python); the Go version had only dial-timeout."""

    client_header: PositiveDuration = 10.0  # whole request head must arrive within this -> 408
    # A request body that stalls (no byte) for this long -> 408 (nginx's client_body_timeout).
    client_body: PositiveDuration = 60.0
    keep_alive: PositiveDuration = 75.0  # idle client keep-alive connection
    # The backend must start answering within this once the request was sent in full -> 504.
    response_header: PositiveDuration = 60.0
    # A response body that stalls for this long is cut (nginx's proxy_read_timeout).
    backend_read: PositiveDuration = 60.0
    # A client that reads nothing of its response for this long is closed (nginx's
    # send_timeout).
    client_write: PositiveDuration = 60.0
    # A WebSocket tunnel with no byte either way for this long is closed (HAProxy's
    # timeout tunnel).
    tunnel_idle: PositiveDuration = 3600.0
    upstream_idle: PositiveDuration = 60.0  # pooled idle backend connection is closed after this
    shutdown_grace: Duration = 30.0  # in-flight requests may finish within this on SIGTERM


class Limits(Section):
    max_header_bytes: int = Field(32 * 1024, ge=1024)  # request line + headers -> 431
    max_url_bytes: int = Field(8 * 1024, ge=64)  # request target -> 414
    # A request body larger than this -> 413; 0 = unlimited (nginx's client_max_body_size 0).
    max_body_bytes: int = Field(0, ge=0)
    # A backend's response status line and headers; a longer head is a 502 (a backend that
    # never ends its head must not make the proxy buffer without bound).
    max_response_header_bytes: int = Field(64 * 1024, ge=1024)
    max_header_count: int = Field(100, ge=1)  # request header fields -> 431
    # Pooled keep-alive connections per backend. Generous, like HAProxy's unlimited default:
    # a pool smaller than the concurrency makes connections open and close under load.
    max_idle_per_backend: int = Field(1024, ge=0)


class TlsCertificate(Section):
    """One [[tls-certificate]] table: a certificate served to clients that ask for one of its
    names (SNI). New in doproxy (Python); paths are relative to the config file."""

    cert_file: str = Field(min_length=1)  # PEM: the certificate first, then its chain
    key_file: str = Field(min_length=1)  # PEM private key


class Admin(Section):
    """The admin listener: status page, runtime API, metrics (docs/admin-api.md). New in
    doproxy (Python); it runs beside a server that owns an inventory (`doproxy serve`)."""

    enable: bool = True
    bind: str = "127.0.0.1:8001"  # port 0 picks a free one, written to <inventory>.admin.addr
    # The bearer token for mutating endpoints (and every endpoint when bound beyond loopback).
    # Unset: read token-file; unset too: one is generated at start into <inventory>.admin.token.
    token: str = Field("", repr=False)
    token_file: str = ""

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_bind(value)  # ValueError names what is wrong
        return value


class Cluster(Section):
    """[cluster]: where the inventory lives (docs/cluster.md). New in doproxy (Python).

    "file" (the default) is the inventory file, one server per inventory. "etcd" keeps the
    inventory, its owner id, the scaler's journal and overrides in etcd, shared by every node
    that names the same endpoints and prefix; one elected node (the leader) scales.
    """

    store: Literal["file", "etcd"] = "file"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/doproxy/"
    # This node's name in the cluster (unique per node); empty: the host name.
    node_name: str = ""
    # Seconds: a leader (and a node's published signal) lapses this long after its process
    # stops renewing it; leadership moves within it.
    lease_ttl: StrictInt = Field(10, ge=2, le=300)
    # Seconds each request to etcd may take before the next endpoint is tried.
    timeout: PositiveDuration = 2.0
    username: str = ""
    password: str = Field("", repr=False)
    password_file: str = ""  # relative to the config file
    ca_file: str = ""  # verify etcd's certificate with this CA (https endpoints)
    cert_file: str = ""  # client certificate, for etcd's --client-cert-auth
    key_file: str = ""

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one etcd endpoint, e.g. http://127.0.0.1:2379")
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: an endpoint is an http:// or https:// URL")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or not value.endswith("/") or len(value) < 3:
            raise ValueError('the prefix starts and ends with "/", e.g. "/doproxy/"')
        return value

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("a node name has letters, digits, '-', '_' and '.' only")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> Cluster:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert-file and key-file go together (etcd client certificate)")
        if (self.password or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self


class Settings(Section):
    bind: str = ":8000"
    https: bool = False
    # The 2015 single certificate; with https it is the default one (served without SNI).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # More certificates, picked by the name the client asks for; the first one is the default
    # when tls-cert-file is unset.
    tls_certificate: tuple[TlsCertificate, ...] = ()
    add_x_forwarded_for: bool = True
    # Who the client is (see docs/http.md). New in doproxy (Python).
    # Peers whose forwarding headers (X-Forwarded-*, X-Real-IP, Forwarded) are believed and
    # appended to, and who must send a PROXY header when proxy-protocol is on.
    trusted_proxies: Networks = ()
    forwarded_header: Literal["x-forwarded", "rfc7239", "both"] = "x-forwarded"
    allow_underscores_in_headers: bool = False  # X_Forwarded_For is X-Forwarded-For to CGI
    via: bool = False  # add "Via: 1.1 doproxy" to requests
    proxy_protocol: bool = False  # connections from trusted-proxies start with a PROXY header
    # The access log (docs/configuration.md, "Access log"). New in doproxy (Python).
    # One line per request when on; off costs the data plane nothing but one bool test.
    access_log: bool = False
    # "combined": Apache/nginx combined log format plus request time and backend; "json":
    # one JSON object per line.
    access_log_format: Literal["combined", "json"] = "combined"
    # Where the lines go: a file (relative to the config file, reopened on SIGUSR1 for
    # logrotate), or standard output when empty.
    access_log_file: str = ""
    watch_config: bool = True
    inventory_file: str = "inventory.toml"
    # Data-plane processes (docs/workers.md): 1 serves in the main process itself, as always;
    # N > 1 starts N worker processes behind the main one; "auto" one per CPU.
    workers: StrictInt | Literal["auto"] = 1
    loadbalancing: LoadBalancing = Field(default_factory=LoadBalancing)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    do_provisioner: DOProvisioner = Field(default_factory=DOProvisioner)
    provisioning: Provisioning = Field(default_factory=Provisioning)
    local_provisioner: LocalProvisioner = Field(default_factory=LocalProvisioner)
    health: HealthSettings = Field(default_factory=HealthSettings)
    retries: Retries = Field(default_factory=Retries)
    passive_health: PassiveHealth = Field(default_factory=PassiveHealth)
    # Status code -> file whose contents doproxy answers with instead of its plain text,
    # e.g. [error-pages] 503 = "errors/503.html". Paths are relative to the config file.
    error_pages: dict[int, str] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    admin: Admin = Field(default_factory=Admin)
    cluster: Cluster = Field(default_factory=Cluster)

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError('workers must be between 1 and 256, or "auto"')
        return value

    @model_validator(mode="after")
    def _error_codes(self) -> Settings:
        bad = [code for code in self.error_pages if not 400 <= code <= 599]
        if bad:
            raise ValueError(f"error-pages: {bad[0]} is not an error status (400-599)")
        return self

    @model_validator(mode="after")
    def _scale_to_zero(self) -> Settings:
        if self.provisioning.scale_to_zero and self.workers != 1:
            raise ValueError(
                "provisioning.scale-to-zero needs workers = 1: requests held while the pool "
                "wakes wait in the process that serves them (docs/scale-to-zero.md)"
            )
        return self

    @model_validator(mode="after")
    def _one_provider(self) -> Settings:
        if self.do_provisioner.enable and self.local_provisioner.enable:
            raise ValueError(
                "enable one provisioner: do-provisioner or local-provisioner, not both"
            )
        return self

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if not self.https:
            return self
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            given, missing = ("tls-cert-file", "tls-key-file")[:: 1 if self.tls_cert_file else -1]
            raise ValueError(f"https = true with {given} needs {missing} too")
        if not self.tls_cert_file and not self.tls_certificate:
            raise ValueError(
                "https = true needs a certificate: tls-cert-file and tls-key-file,"
                " or a [[tls-certificate]] table"
            )
        return self

    @model_validator(mode="after")
    def _proxy_protocol(self) -> Settings:
        if not self.proxy_protocol:
            return self
        # asyncio's TLS transport starts the handshake on the first byte: a PROXY header in
        # front of it cannot be read off first.
        if self.https:
            raise ValueError("proxy-protocol = true works only without https (see docs/http.md)")
        if not self.trusted_proxies:
            raise ValueError(
                "proxy-protocol = true needs trusted-proxies: the load balancers that send "
                "the PROXY header"
            )
        return self


def worker_count(workers: int | str, cpus: int | None) -> int:
    """How many data-plane processes `workers` asks for on a machine with `cpus` CPUs."""
    if workers == "auto":
        return max(cpus or 1, 1)
    return int(workers)


def parse_bind(bind: str) -> tuple[str | None, int]:
    """Split a Go-style listen address. ":8000" means every interface (host None)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'bind {bind!r} must look like ":8000" or "127.0.0.1:8000"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port)
