"""Prometheus metrics, read from the running proxy's plain counters when they are scraped.

Theory of operation
-------------------
The data plane counts in plain integers as it goes (docs/metrics.md lists where each comes
from): responses per backend and status class, the listener's retries, ejections and its
request durations in fixed buckets. Nothing of prometheus_client runs per request, and the data
plane does not import it: at scrape time, `MetricsCollector.collect` reads those counters, the
pool's state, the autoscaler's counters and the event log's counts, and builds the metric
families from them. Its registry is its own (not prometheus_client's global REGISTRY), so only
doproxy's metrics are exposed and tests or a second runtime in one process do not collide.

`Metrics.exposition()` is what the admin listener's `GET /metrics` serves. It must run on the
event loop's thread (the admin API does): the counters are read without a lock, which is safe
only because the data plane changes them on that same thread.

Labels
------
`backend` is the backend's name (Backend.name: the inventory's `name`, else its server-host).
Names need not be unique in an inventory, and two series with the same labels would make the
scrape invalid: backends that share a name are labelled "name#key" (key: the inventory id, else
the address). Responses doproxy wrote itself with no backend involved (503 "no backend
available", refused requests) have backend="" (Prometheus reads an empty label as no label), so
`sum by (code_class)` is what clients saw.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from doproxy.core.cost import PoolCost
from doproxy.core.histogram import REQUEST_BOUNDS, Histogram, cumulative
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Settings
from doproxy.machines import inventory_cost
from doproxy.proxy.backend import Backend

# The classic text format. prometheus_client's CONTENT_TYPE_LATEST has meant its 1.0.0 text
# format since 0.22; our names are all plain ASCII, so 0.0.4 describes the same bytes, and
# every Prometheus (2.x included) and compatible scraper reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # index status // 100 - 1
SCALING_DIRECTIONS = ("up", "down", "replace")
RELOAD_RESULTS = ("ok", "failed")
POOL_STATES = ("active", "draining", "disabled", "provisioning")


class Listener(Protocol):
    """The listener's counters (doproxy.proxy.server.ProxyServer)."""

    @property
    def exchanges(self) -> int: ...

    @property
    def exchange_time(self) -> float: ...

    @property
    def durations(self) -> Sequence[int]:
        """Exchanges per bucket of core.histogram.REQUEST_BOUNDS, +Inf last (not cumulative)."""
        ...

    @property
    def generated(self) -> Sequence[int]:
        """doproxy's own responses with no backend involved, by status // 100."""
        ...

    @property
    def retried(self) -> int: ...

    @property
    def ejections(self) -> int: ...


class Scaler(Protocol):
    """The autoscaler's counters (doproxy.autoscaler.Autoscaler)."""

    @property
    def desired(self) -> int | None: ...

    @property
    def errors_total(self) -> int: ...

    @property
    def provision_seconds(self) -> Histogram: ...

    @property
    def rolling_out(self) -> bool:
        """Is a progressive rollout in progress (doproxy.rollout)?"""
        ...

    @property
    def creating(self) -> Sized:
        """Create tasks running now: machines being provisioned."""
        ...

    def cost(self) -> PoolCost:
        """What the pool costs per hour now, with the prices the provider reported."""
        ...


class EventCounts(Protocol):
    """doproxy.events.EventLog: events ever published, by (kind, result)."""

    @property
    def counts(self) -> Mapping[tuple[str, str], int]: ...


class Source(Protocol):
    """What the metrics read from the running proxy (doproxy.runtime.Runtime provides it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def server(self) -> Listener | None: ...

    @property
    def backends(self) -> Sequence[Backend]:
        """The backends of the pool in service now."""
        ...

    @property
    def entries(self) -> Sequence[InventoryEntry]:
        """The inventory as last applied (its "provisioning" intents are not backends)."""
        ...

    @property
    def autoscaler(self) -> Scaler | None: ...

    @property
    def events(self) -> EventCounts: ...

    @property
    def cluster(self) -> ClusterView | None: ...


class ClusterView(Protocol):
    up: bool
    leading: bool
    nodes: dict[str, Any]


def backend_labels(backends: Sequence[Backend]) -> list[tuple[Backend, str]]:
    """Each backend with its `backend` label: its name, "name#key" where names clash."""
    names = Counter(b.name for b in backends)
    labelled = [(b, b.name if names[b.name] == 1 else f"{b.name}#{b.key}") for b in backends]
    # Two backends with the same name and key (two id-less entries for one address) still
    # need two series: number the repeats.
    seen: Counter[str] = Counter()
    out = []
    for b, label in labelled:
        seen[label] += 1
        out.append((b, label if seen[label] == 1 else f"{label}#{seen[label]}"))
    return out


def _le(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it ("0.005", "10.0", "+Inf")."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _buckets(counts: Sequence[tuple[float, int]]) -> list[tuple[str, float]]:
    return [(_le(bound), float(n)) for bound, n in counts]


def _by_class(family: CounterMetricFamily, backend: str, counts: Sequence[int]) -> None:
    """One backend's response counts (indexed by status // 100) as code_class samples: every
    standard class, so rates exist from the start, and "other" for anything else seen."""
    for i, name in enumerate(CODE_CLASSES, start=1):
        family.add_metric([backend, name], counts[i])
    other = sum(counts) - sum(counts[1:6])
    if other:
        family.add_metric([backend, "other"], other)


class MetricsCollector:
    """A prometheus_client collector: builds every family from `source` at each scrape."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        src = self.source
        backends = backend_labels(src.backends)
        server = src.server
        scaler = src.autoscaler
        counts = src.events.counts

        requests = CounterMetricFamily(
            "doproxy_requests_total",
            "Responses sent to clients, by the backend that answered (or failed) and status "
            'class; backend="" for doproxy\'s own answers with no backend involved.',
            labels=["backend", "code_class"],
        )
        for b, label in backends:
            _by_class(requests, label, b.responses)
        if server is not None:
            _by_class(requests, "", server.generated)
        yield requests

        if server is not None:
            yield HistogramMetricFamily(
                "doproxy_request_duration_seconds",
                "Seconds users waited for a response head, from their request's head (retries "
                "included), for requests sent to a backend; a gateway error ends the wait too.",
                buckets=_buckets(cumulative(REQUEST_BOUNDS, server.durations)),
                sum_value=server.exchange_time,
            )
            yield CounterMetricFamily(
                "doproxy_retries_total",
                "Requests redispatched to another backend.",
                value=server.retried,
            )
            yield CounterMetricFamily(
                "doproxy_ejections_total",
                "Backends ejected by passive health (failing real requests).",
                value=server.ejections,
            )

        yield GaugeMetricFamily(
            "doproxy_in_flight",
            "Requests sent to a backend and not answered yet (open WebSocket tunnels too).",
            value=sum(b.in_flight for b, _ in backends),
        )

        up = GaugeMetricFamily(
            "doproxy_backend_up",
            "1 when the backend passes its health checks and is not ejected, else 0.",
            labels=["backend"],
        )
        for b, label in backends:
            up.add_metric([label], 1.0 if b.health.up and not b.ejected_until else 0.0)
        yield up

        states: Counter[str] = Counter(b.entry.state for b, _ in backends)
        if scaler is not None:
            # What the scaler counts toward the pool's size: its creates in progress.
            states["provisioning"] = len(scaler.creating)
        else:
            states["provisioning"] = sum(1 for e in src.entries if e.state == "provisioning")
        pool = GaugeMetricFamily(
            "doproxy_pool_backends",
            "Backends by inventory state; provisioning: machines being created.",
            labels=["state"],
        )
        for state in POOL_STATES:
            pool.add_metric([state], states[state])
        yield pool

        cost = (
            scaler.cost() if scaler is not None else inventory_cost(src.settings, list(src.entries))
        )
        yield GaugeMetricFamily(
            "doproxy_pool_cost_per_hour",
            "What the pool's machines cost per hour (US dollars), those being created and "
            "drained included; machines without a known price are not in it.",
            value=cost.per_hour,
        )
        yield GaugeMetricFamily(
            "doproxy_pool_unpriced_backends",
            "Machines of the pool whose price is not known (not in doproxy_pool_cost_per_hour).",
            value=cost.unpriced,
        )

        scaling = CounterMetricFamily(
            "doproxy_scaling_decisions_total",
            "Notable autoscaling decisions (acted on or not), by direction.",
            labels=["direction"],
        )
        for direction in SCALING_DIRECTIONS:
            scaling.add_metric([direction], counts.get(("scaling", direction), 0))
        yield scaling

        reloads = CounterMetricFamily(
            "doproxy_reloads_total",
            "Configuration reloads, by result.",
            labels=["result"],
        )
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], counts.get(("reload", result), 0))
        yield reloads

        rollouts = CounterMetricFamily(
            "doproxy_rollouts_total",
            "Progressive rollouts that ended, by result: done (every machine replaced) or "
            "rolled-back.",
            labels=["result"],
        )
        for result in ("done", "rolled-back"):
            rollouts.add_metric([result], counts.get(("rollout", result), 0))
        yield rollouts

        cluster = src.cluster
        if cluster is not None:
            yield GaugeMetricFamily(
                "doproxy_cluster_etcd_up",
                "Cluster mode: 1 while this node reaches etcd; at 0 it serves the last known "
                "inventory and no node scales.",
                value=1.0 if cluster.up else 0.0,
            )
            yield GaugeMetricFamily(
                "doproxy_cluster_leader",
                "Cluster mode: 1 on the node that leads (runs the autoscaler), else 0.",
                value=1.0 if cluster.leading else 0.0,
            )
            yield GaugeMetricFamily(
                "doproxy_cluster_nodes",
                "Cluster mode: nodes publishing their signal (this one included).",
                value=len(cluster.nodes),
            )

        if scaler is not None:
            if scaler.desired is not None:
                yield GaugeMetricFamily(
                    "doproxy_pool_desired",
                    "The pool size the autoscaler's last decision wants.",
                    value=scaler.desired,
                )
            provisioned = scaler.provision_seconds
            yield HistogramMetricFamily(
                "doproxy_provision_duration_seconds",
                "Seconds from a create's intent to its backend in the pool, per successful create.",
                buckets=_buckets(provisioned.cumulative()),
                sum_value=provisioned.sum,
            )
            yield GaugeMetricFamily(
                "doproxy_rollout_in_progress",
                "1 while a progressive rollout runs (the autoscaler holds its own decisions).",
                value=1.0 if scaler.rolling_out else 0.0,
            )
            yield CounterMetricFamily(
                "doproxy_autoscaler_errors_total",
                "Errors of the autoscaler's task (each is retried after a pause).",
                value=scaler.errors_total,
            )


class Metrics:
    """doproxy's metrics in their own registry, and their exposition for `GET /metrics`."""

    def __init__(self, source: Source) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = MetricsCollector(source)
        self.registry.register(self.collector)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE
