"""This node's part in a cluster: membership, the watch, leadership and the shared signal.

Theory of operation
-------------------
A node runs one *session* at a time against etcd (doproxy.cluster.store has the key layout):

1. grant a lease of `lease-ttl` seconds and keep it alive (every third of the TTL);
2. publish this node's signal under `nodes/<node>` on that lease every second: its traffic
   totals, in-flight count, the draining backends it has finished, whether it leads;
3. watch the prefix: a change of the backends (any node's admin API or CLI, the leader's
   scaler) is read back whole, validated like a file and applied to the pool, all or nothing,
   and written to the local inventory file, which is the cache a restart serves from when
   etcd is down; other nodes' signals are kept as they arrive;
4. campaign every second: create the `leader` key with our session token on our lease unless
   it exists. Whoever created it leads until its lease lapses.

The leader, and only the leader, runs the autoscaler. Its writes go through a guarded store
(every transaction compares the leader key with our token) and its provider through
`LeaderOnly`, which before every call checks that our lease cannot have lapsed by our own
monotonic clock and then asks etcd (the same comparison). A leader frozen past its TTL
(SIGSTOP, a long pause) therefore finds, when it runs again, that its lease time is over before
it can call the provider, and its writes fail the comparison.

When etcd cannot be reached the session ends: the node stops leading at once (the scaler
stops; its lease would lapse anyway), keeps serving the pool it has, says so in its status and
metrics, and starts a new session with a growing pause. A new session re-reads everything, so
nothing that changed meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from doproxy.cluster.etcd import Compare, EtcdClient, Get, Put, WatchEvent
from doproxy.cluster.store import EtcdStore
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Cluster
from doproxy.core.signal_sum import SignalSum
from doproxy.errors import ConfigError, DoproxyError, EtcdUnavailable, NotLeader
from doproxy.inventory import dump_inventory, write_atomically

if TYPE_CHECKING:
    import builtins

    from doproxy.provisioning import Machine, Provider, Spec
    from doproxy.proxy.backend import Backend

log = logging.getLogger(__name__)

PUBLISH_EVERY = 1.0  # seconds between this node's signal updates (and campaign attempts)


class Served(Protocol):
    """What the node needs from the running proxy (doproxy.runtime.Runtime)."""

    @property
    def backends(self) -> list[Backend]: ...

    def local_traffic(self) -> tuple[int, float]: ...

    def local_wake_state(self) -> tuple[int, float | None, bool]: ...

    async def apply_inventory(self, entries: list[InventoryEntry] | None = None) -> bool: ...

    async def lead(self, store: EtcdStore) -> None:
        """Become the leader: start the scaler with this (guarded) store."""
        ...

    async def follow(self) -> None:
        """Stop leading: stop the scaler."""
        ...


def node_name(c: Cluster) -> str:
    return c.node_name or socket.gethostname()


class ClusterNode:
    def __init__(
        self,
        runtime: Served,
        settings: Cluster,
        store: EtcdStore,
        cache: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.store = store
        self.client: EtcdClient = store.client
        self.prefix = settings.prefix
        self.name = node_name(settings)
        self.cache = cache  # the local inventory file: what a restart serves without etcd
        self.clock = clock
        self.token = f"{self.name}/{uuid.uuid4().hex}".encode()
        self.session = uuid.uuid4().hex[:8]  # tells our own signal from a namesake's
        self._namesake_said = False
        self.leader_key = self.prefix + "leader"
        self.lease = 0
        self.lease_until = 0.0  # clock() by which our lease may have lapsed
        self.leading = False
        self.leader: str | None = None  # the leader's name, as last seen
        self.nodes: dict[str, dict[str, Any]] = {}  # node name -> its last published signal
        self.up = False  # is etcd reachable (the last session runs)
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.applied_revision = 0
        self.sum = SignalSum()
        self._drained: set[str] = set()  # draining backends this node has no request for
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    # --- life --------------------------------------------------------------------------------

    async def connect(self, within: float) -> list[InventoryEntry] | None:
        """First contact at start: the owner id, the scaler's kept state and the inventory.
        None when etcd did not answer in time (the node then serves its cache and keeps
        trying in the background)."""
        try:
            async with asyncio.timeout(within):
                entries, _, _, revision = await self.store.read()
                await self.store.load_kept()
        except (DoproxyError, TimeoutError) as e:
            self._down(e)
            return None
        self.applied_revision = revision
        self._write_cache(entries)
        return entries

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.leading:
            await self._depose("stopping")
        if self.lease:
            # Leadership and our signal go at once, not a TTL later.
            with contextlib.suppress(DoproxyError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.client.lease_revoke(self.lease)
        await self.store.close()

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (DoproxyError, TimeoutError, OSError) as e:
                self._down(e)
            except Exception as e:  # a bug must not end the node's part: logged, retried
                log.exception("cluster: unexpected error: %s", e)
                self._down(e)
            if self.leading:
                await self._depose("etcd unreachable")
            failures += 1
            await asyncio.sleep(min(0.25 * 2 ** min(failures, 5), 5.0))
            if self.up:
                failures = 0

    def _down(self, e: BaseException) -> None:
        message = str(e) or type(e).__name__
        if self.up or self.last_error != message:
            log.warning(
                "cluster: etcd unreachable (%s); serving the last known inventory, the "
                "scaler pauses until etcd answers again",
                message,
            )
        if self.down_since is None:
            self.down_since = self.clock()
        self.up = False
        self.last_error = message

    async def _session(self) -> None:
        ttl = self.settings.lease_ttl
        if self.lease:
            # The last session's lease (after a short outage it may still live, holding the
            # leader key and our signal): gone at once, so leadership moves without a wait.
            with contextlib.suppress(DoproxyError):
                await self.client.lease_revoke(self.lease)
            self.lease = 0
        sent = self.clock()
        self.lease = await self.client.lease_grant(ttl)
        self.lease_until = sent + ttl
        # Whatever happened while we were away: read it all again, then follow from there.
        entries, _, _, revision = await self.store.read()
        await self._apply(entries, revision)
        await self._read_nodes()
        if not self.up:
            if self.down_since is not None:
                log.warning("cluster: etcd answers again; the inventory is read again")
            self.up = True
            self.last_error = None
            self.down_since = None
        self._connected.set()
        # Not a TaskGroup: on Python 3.11 a group that ends with an error leaves this task a
        # pending cancellation, so a later asyncio.timeout raises CancelledError instead of
        # TimeoutError and ends the node's retry loop (seen when etcd restarted). The first
        # error ends the session; the others are cancelled.
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._keep_alive(ttl)),
            loop.create_task(self._publish_and_campaign()),
            loop.create_task(self._watch(revision + 1)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # the error that ended the session
            raise EtcdUnavailable("the watch on etcd ended")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_alive(self, ttl: int) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            sent = self.clock()
            left = await self.client.lease_keepalive(self.lease)
            if left <= 0:
                raise NotLeader("our etcd lease lapsed (this node was paused or cut off)")
            self.lease_until = sent + left

    async def _publish_and_campaign(self) -> None:
        while True:
            await self._publish()
            await self._campaign()
            await asyncio.sleep(PUBLISH_EVERY)

    # --- the signal --------------------------------------------------------------------------

    def signal(self) -> dict[str, Any]:
        n, wait = self.runtime.local_traffic()
        waiting, quiet_for, wake_failed = self.runtime.local_wake_state()
        backends = self.runtime.backends
        self._drained = {
            str(b.entry.id) for b in backends if b.entry.state == "draining" and not b.in_flight
        }
        return {
            "node": self.name,
            "session": self.session,
            "pid": os.getpid(),
            "leader": self.leading,
            "exchanges": n,
            "wait": round(wait, 6),
            "in_flight": sum(b.in_flight for b in backends),
            "backends": len(backends),
            "drained": sorted(self._drained),
            "revision": self.applied_revision,
            # Scale to zero: the leader wakes the pool for requests held on any node and
            # lets it sleep only when no node saw a real request for idle-after.
            "waiting": waiting,
            "quiet_for": None if quiet_for is None else round(quiet_for, 1),
            "wake_failed": wake_failed,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    async def _publish(self) -> None:
        mine = self.signal()
        self.nodes[self.name] = mine
        await self.client.put(
            self.prefix + "nodes/" + self.name, json.dumps(mine).encode(), lease=self.lease
        )

    async def _read_nodes(self) -> None:
        kvs, _ = await self.client.get(self.prefix + "nodes/", prefix=True)
        nodes: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            with contextlib.suppress(ValueError):
                data = json.loads(kv.value)
                if isinstance(data, dict):
                    nodes[kv.key.rsplit("/", 1)[1]] = data
        self.nodes = nodes

    def traffic(self) -> tuple[int, float]:
        """The cluster's totals for the leader's scaler: every live node's published totals,
        this node's own read now (see doproxy.core.signal_sum)."""
        readings = {
            name: (int(n.get("exchanges", 0)), float(n.get("wait", 0.0)))
            for name, n in self.nodes.items()
            if name != self.name
        }
        readings[self.name] = self.runtime.local_traffic()
        return self.sum.update(readings)

    def drained_everywhere(self, backend: Backend, timed_out: bool) -> bool:
        """May the drain of `backend` be recorded as finished? Only by the leader, and only
        once every live node reports nothing in flight to it (or the drain timeout passed)."""
        if not self.leading:
            return False
        if timed_out:
            return True
        key = str(backend.entry.id)
        # A node that has not applied the drain yet, or still has requests in flight to the
        # backend, does not list it: wait for it (its lease drops it from `nodes` if it dies).
        return all(
            key in n.get("drained", ()) for name, n in self.nodes.items() if name != self.name
        )

    # --- leadership --------------------------------------------------------------------------

    async def _campaign(self) -> None:
        result = await self.client.txn(
            [Compare(self.leader_key, "CREATE", "EQUAL", 0)],
            [Put(self.leader_key, self.token, lease=self.lease)],
            [Get(self.leader_key)],
        )
        if result.succeeded:
            holder = self.token
        else:
            kvs = result.responses[0]
            holder = kvs[0].value if kvs else b""
        self.leader = holder.decode(errors="replace").split("/", 1)[0] or None
        if holder == self.token and not self.leading:
            await self._elected()
        elif holder != self.token and self.leading:
            await self._depose(f"{self.leader or 'nobody'} leads now")

    async def _elected(self) -> None:
        log.info("cluster: %s is the leader now; it runs the autoscaler", self.name)
        await self.store.load_kept()
        await self.runtime.lead(self.store.guarded(self.leader_key, self.token))
        # Said once the scaler exists (so the status never shows a leader without one), and
        # before the scaler's task first runs: its provider calls ask ensure_leader().
        self.leading = True

    async def _depose(self, why: str) -> None:
        self.leading = False
        log.warning("cluster: %s no longer leads (%s); its autoscaler stops", self.name, why)
        await self.runtime.follow()

    def lease_valid(self) -> bool:
        # A margin for the time etcd's clock and ours may differ in measuring the TTL.
        return self.clock() < self.lease_until - 0.5

    async def ensure_leader(self) -> None:
        """Raise NotLeader unless this node still leads: by our own clock first (a node
        paused past its TTL knows it at once, without asking), then by etcd."""
        self.check_lease()
        result = await self.client.txn([Compare(self.leader_key, "VALUE", "EQUAL", self.token)], [])
        if not result.succeeded:
            raise NotLeader(f"{self.name} lost the leadership; no provider call")
        # Paused during that round trip? Its answer may predate the lease lapsing.
        self.check_lease()

    def check_lease(self) -> None:
        """Raise NotLeader unless our lease cannot have lapsed, by our own clock (no I/O: the
        provider runs it right before each request goes out)."""
        if not self.leading or not self.lease_valid():
            raise NotLeader(f"{self.name} is not the cluster's leader; no provider call")

    # --- the inventory -----------------------------------------------------------------------

    async def _watch(self, start: int) -> None:
        backends = self.store.backends_prefix
        async for batch in self.client.watch(self.prefix, prefix=True, start_revision=start):
            inventory = False
            for ev in batch:
                key = ev.kv.key
                if key.startswith(backends) or key == self.prefix + "revision":
                    inventory = True
                elif key.startswith(self.prefix + "nodes/"):
                    self._node_event(ev)
                elif key == self.prefix + "overrides":
                    self.store.overrides_value.clear()
                    if ev.kind == "PUT":
                        from doproxy.journal import parse_overrides

                        self.store.overrides_value.update(
                            parse_overrides(ev.kv.value.decode(), self.store.where)
                        )
            if inventory:
                try:
                    entries, _, _, revision = await self.store.read()
                except ConfigError as e:
                    # All or nothing, as with a file: the running pool stays.
                    log.error(
                        "cluster: the inventory in etcd is not valid, keeping the running "
                        "pool: %s; fix it (doproxy inventory push) ",
                        e,
                    )
                    continue
                await self._apply(entries, revision)

    def _node_event(self, ev: WatchEvent) -> None:
        name = ev.kv.key.rsplit("/", 1)[1]
        if ev.kind == "DELETE":
            self.nodes.pop(name, None)
            return
        with contextlib.suppress(ValueError):
            data = json.loads(ev.kv.value)
            if not isinstance(data, dict):
                return
            if name != self.name:
                self.nodes[name] = data
            elif data.get("session") != self.session and not self._namesake_said:
                # Two nodes publishing under one name would hide one's traffic from the
                # scaler (and confuse drains): said once, loudly.
                self._namesake_said = True
                log.error(
                    "cluster: another node (pid %s) also calls itself %r; give every node its "
                    "own [cluster] node-name",
                    data.get("pid"),
                    self.name,
                )

    async def _apply(self, entries: list[InventoryEntry], revision: int) -> None:
        if await self.runtime.apply_inventory(entries):
            self.applied_revision = revision
            self._write_cache(entries)

    def _write_cache(self, entries: list[InventoryEntry]) -> None:
        try:
            write_atomically(self.cache, dump_inventory(entries))
        except OSError as e:
            log.warning(
                "cluster: cannot write the local copy of the inventory %s: %s (a restart "
                "while etcd is down would start without it)",
                self.cache,
                e,
            )

    # --- what the admin API shows --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "store": "etcd",
            "node": self.name,
            "prefix": self.prefix,
            "endpoints": list(self.client.endpoints),
            "etcd_up": self.up,
            "etcd_error": self.last_error,
            "down_for": None if self.down_since is None else round(now - self.down_since, 1),
            "leader": self.leader,
            "leading": self.leading,
            "revision": self.applied_revision,
            "nodes": [
                {
                    "node": name,
                    "leader": name == self.leader,
                    "exchanges": n.get("exchanges", 0),
                    "wait": n.get("wait", 0.0),
                    "in_flight": n.get("in_flight", 0),
                    "backends": n.get("backends", 0),
                    "at": n.get("at"),
                }
                for name, n in sorted(self.nodes.items())
            ],
        }


@runtime_checkable
class GuardsSends(Protocol):
    """A provider that can check, right before each request leaves, that it still may."""

    def guard_sends(self, check: Callable[[], None]) -> None: ...


class LeaderOnly:
    """The leader's provider: every call first makes sure this node still leads, and a
    provider that can (DigitalOcean) checks the lease again as each request goes out."""

    def __init__(self, provider: Provider, node: ClusterNode) -> None:
        self.provider = provider
        self.node = node
        self.kind = provider.kind
        if isinstance(provider, GuardsSends):
            provider.guard_sends(node.check_lease)

    async def list(self) -> builtins.list[Machine]:
        await self.node.ensure_leader()
        return await self.provider.list()

    async def get(self, machine_id: str) -> Machine:
        await self.node.ensure_leader()
        return await self.provider.get(machine_id)

    async def create(self, name: str, spec: Spec | None = None) -> Machine:
        await self.node.ensure_leader()
        return await self.provider.create(name, spec)

    async def destroy(self, machine_id: str) -> None:
        await self.node.ensure_leader()
        await self.provider.destroy(machine_id)

    async def reboot(self, machine_id: str) -> None:
        await self.node.ensure_leader()
        await self.provider.reboot(machine_id)

    async def close(self) -> None:
        await self.provider.close()
