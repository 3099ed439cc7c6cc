"""The inventory in etcd (cluster mode): one key per backend, shared by every node.

Layout under the configured prefix P (default "/doproxy/"):

    P + "backends/<entry key>"   one JSON object per inventory entry (intents included)
    P + "revision"               bumped by every inventory write: the one key all writes compare
    P + "owner"                  this installation's owner id (the `doproxy-owner-<id>` tag)
    P + "overrides"              the admin API's overrides of the scaler (pause, min/max)
    P + "journal/<seq>"          the scaler's journal, one key per record, bounded
    P + "leader"                 the elected node's name and session, on its lease
    P + "nodes/<node>"           each node's published signal, on its lease (doproxy.cluster.node)

Theory of operation
-------------------
A change is a function of the latest entries, as with the file: read every backend key and the
revision key in one range, apply the change, validate the result as a file would be (no
duplicate ids; what cannot be read back is not written), then write the difference in one
transaction that succeeds only if the revision key is unchanged since the read. A concurrent
writer makes the transaction fail; the change is then run again on the newer entries (a change
function must not keep state across runs). So writes from any node's admin API or CLI and the
leader's writes serialise without a lock, and a reader sees one whole revision or the next.

The leader's own writes (intents, completions, removals, journal) go through a guarded view
(`guarded`): every transaction also compares the leader key with the leader's session token.
The key lives on the leader's lease, so once that lease lapsed (the leader paused or cut off
past its TTL) the comparison fails and nothing is written: an old leader cannot act.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from doproxy.cluster.etcd import Compare, Delete, EtcdClient, Get, KeyValue, Put
from doproxy.config import read_secret_file, resolve_in
from doproxy.core.inventory_model import InventoryEntry
from doproxy.core.settings import Cluster
from doproxy.errors import ConfigError, DoproxyError, NotLeader, Problem
from doproxy.inventory import dump_inventory, parse_inventory
from doproxy.journal import Journal, parse_overrides
from doproxy.machines import _OWNER_ID, OWNER_PREFIX, Change

log = logging.getLogger(__name__)

# Conflicting writers retry this often before giving up (each retry re-reads): far more than
# a handful of nodes and CLI users ever cause.
MAX_ATTEMPTS = 50


def entry_json(e: InventoryEntry) -> bytes:
    return json.dumps(e.model_dump(by_alias=True, mode="json"), sort_keys=True).encode()


def entries_from(kvs: Sequence[KeyValue], where: str) -> list[InventoryEntry]:
    """The entries of the backend keys, in the order they were first written, validated as a
    whole like an inventory file (ConfigError names every bad key; nothing is half-applied)."""
    problems: list[Problem] = []
    entries: list[InventoryEntry] = []
    for kv in sorted(kvs, key=lambda kv: (kv.create_revision, kv.key)):
        try:
            entries.append(InventoryEntry.model_validate_json(kv.value))
        except ValidationError as e:
            for err in e.errors():
                path = ".".join(str(p) for p in err["loc"])
                problems.append(Problem(where, f"{kv.key} {path}".strip(), err["msg"]))
    if problems:
        raise ConfigError(problems)
    # The file's whole-inventory rules (no duplicate ids, addresses that parse), once.
    parse_inventory(dump_inventory(entries), where)
    return entries


class EtcdStore:
    """The InventoryStore of cluster mode (see the module's theory of operation)."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        guard: tuple[str, bytes] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.guard = guard  # (leader key, our session token): the leader's writes only
        self.journal_records: list[dict[str, Any]] = []  # read at start (load_kept)
        self.overrides_value: dict[str, Any] = {}
        self._writes: asyncio.Queue[tuple[str, bytes | None, bool]] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._journal_seq = 0

    @classmethod
    def from_settings(cls, c: Cluster, base: Path) -> EtcdStore:
        password = c.password
        if c.password_file:
            password = read_secret_file(base, c.password_file, "cluster.password-file")
        ssl_ctx = None
        if any(u.startswith("https://") for u in c.endpoints) or c.cert_file:
            import ssl

            ssl_ctx = ssl.create_default_context(
                cafile=str(resolve_in(base, c.ca_file)) if c.ca_file else None
            )
            if c.cert_file:
                ssl_ctx.load_cert_chain(
                    str(resolve_in(base, c.cert_file)), str(resolve_in(base, c.key_file))
                )
        client = EtcdClient(
            c.endpoints,
            timeout=c.timeout,
            username=c.username or None,
            password=password or None,
            ssl=ssl_ctx,
        )
        return cls(client, c.prefix)

    def guarded(self, leader_key: str, token: bytes) -> EtcdStore:
        """The same store, every write of which holds only while `leader_key` is `token`."""
        view = EtcdStore(self.client, self.prefix, (leader_key, token))
        view.journal_records = self.journal_records
        view.overrides_value = self.overrides_value
        view._journal_seq = self._journal_seq
        return view

    # --- keys ------------------------------------------------------------------------------

    @property
    def backends_prefix(self) -> str:
        return self.prefix + "backends/"

    def backend_key(self, e: InventoryEntry) -> str:
        return self.backends_prefix + quote(e.key, safe="")

    @property
    def where(self) -> str:
        return f"etcd {','.join(self.client.endpoints)} {self.prefix}"

    # --- the inventory -----------------------------------------------------------------------

    async def read(self) -> tuple[list[InventoryEntry], list[KeyValue], KeyValue | None, int]:
        """(entries, their keys, the revision key, etcd's revision) in one consistent read."""
        result = await self.client.txn(
            [], [Get(self.backends_prefix, prefix=True), Get(self.prefix + "revision")]
        )
        kvs, rev = result.responses[0], result.responses[1]
        return entries_from(kvs, self.where), kvs, (rev[0] if rev else None), result.revision

    async def load(self) -> list[InventoryEntry]:
        return (await self.read())[0]

    def _guard(self) -> list[Compare]:
        if self.guard is None:
            return []
        key, token = self.guard
        return [Compare(key, "VALUE", "EQUAL", token)]

    async def _check_guard(self) -> None:
        if self.guard is None:
            return
        kvs, _ = await self.client.get(self.guard[0])
        if not kvs or kvs[0].value != self.guard[1]:
            raise NotLeader("this node is no longer the cluster's leader; it writes nothing")

    async def update(self, change: Change) -> list[InventoryEntry]:
        for _ in range(MAX_ATTEMPTS):
            entries, kvs, rev, _ = await self.read()
            new = change(list(entries))
            # Refuse to write what we could not read back, as the file store does.
            parse_inventory(dump_inventory(new), self.where)
            old = {kv.key: kv for kv in kvs}
            wanted = {self.backend_key(e): entry_json(e) for e in new}
            ops: list[Put | Delete | Get] = [
                Put(k, v) for k, v in wanted.items() if k not in old or old[k].value != v
            ]
            ops += [Delete(k) for k in old if k not in wanted]
            compare = [
                Compare(self.prefix + "revision", "MOD", "EQUAL", rev.mod_revision)
                if rev is not None
                else Compare(self.prefix + "revision", "CREATE", "EQUAL", 0),
                *self._guard(),
            ]
            if not ops:
                await self._check_guard()  # a no-op by an old leader still says so
                return new
            ops.append(Put(self.prefix + "revision", uuid.uuid4().hex.encode()))
            result = await self.client.txn(compare, ops)
            if result.succeeded:
                return new
            await self._check_guard()
            log.debug("inventory write conflicted with another writer; running it again")
        raise DoproxyError(
            f"the inventory in {self.where} changed {MAX_ATTEMPTS} times while this change "
            "was being written; try again"
        )

    async def replace(self, entries: list[InventoryEntry]) -> None:
        """Make the inventory exactly `entries` (`doproxy inventory push`)."""
        await self.update(lambda _: entries)

    # --- the owner -------------------------------------------------------------------------

    async def owner_tag(self) -> str:
        key = self.prefix + "owner"
        made = uuid.uuid4().hex[:12]
        # Created once, by whoever comes first; everyone reads the same id afterwards.
        result = await self.client.txn(
            [Compare(key, "CREATE", "EQUAL", 0)], [Put(key, made.encode())], [Get(key)]
        )
        text = made if result.succeeded else result.responses[0][0].value.decode().strip()
        if not _OWNER_ID.fullmatch(text):
            raise ConfigError(
                [
                    Problem(
                        self.where,
                        key,
                        "must hold only an owner id (4-32 lower-case letters or digits)",
                    )
                ]
            )
        return OWNER_PREFIX + text

    async def adopt_owner(self, owner_id: str) -> None:
        """Make `owner_id` (a file inventory's) this cluster's, unless it has another one."""
        key = self.prefix + "owner"
        result = await self.client.txn(
            [Compare(key, "CREATE", "EQUAL", 0)], [Put(key, owner_id.encode())], [Get(key)]
        )
        if not result.succeeded:
            there = result.responses[0][0].value.decode().strip()
            if there != owner_id:
                raise DoproxyError(
                    f"{self.where} belongs to owner {there}, the inventory file to {owner_id}: "
                    "they are two installations; the machines of one would be strangers to "
                    "the other (use another [cluster] prefix, or remove the cluster's owner key "
                    "if it has no machines yet)"
                )

    # --- servers ---------------------------------------------------------------------------

    async def server_running(self) -> bool:
        kvs, _ = await self.client.get(self.prefix + "nodes/", prefix=True)
        return bool(kvs)

    async def nudge(self) -> None:
        pass  # every node watches the store

    # --- the scaler's kept state -------------------------------------------------------------

    async def load_kept(self, limit: int = 1000) -> None:
        """Read the journal and the overrides (before a scaler is made on this node)."""
        kvs, _ = await self.client.get(self.prefix + "journal/", prefix=True)
        records: list[dict[str, Any]] = []
        for kv in kvs[-limit:]:
            with contextlib.suppress(ValueError):
                r = json.loads(kv.value)
                if isinstance(r, dict):
                    records.append(r)
        self.journal_records[:] = records
        if kvs:
            with contextlib.suppress(ValueError):
                self._journal_seq = int(kvs[-1].key.rsplit("/", 1)[1])
        over, _ = await self.client.get(self.prefix + "overrides")
        self.overrides_value.clear()
        if over:
            self.overrides_value.update(parse_overrides(over[0].value.decode(), self.where))

    def journal(self, limit: int) -> Journal:
        return EtcdJournal(self, limit)

    def overrides(self) -> EtcdOverrides:
        return EtcdOverrides(self)

    def write_soon(self, key: str, value: bytes | None, guarded: bool = True) -> None:
        """Write (or with None delete) a key in the background, in order (journal records and
        overrides are written from synchronous code). `guarded`: only while we lead, when
        this is the leader's view."""
        if self._writes is None:
            self._writes = asyncio.Queue()
            self._writer = asyncio.get_running_loop().create_task(self._write_all())
        self._writes.put_nowait((key, value, guarded))

    async def _write_all(self) -> None:
        assert self._writes is not None
        while True:
            key, value, guarded = await self._writes.get()
            op: Put | Delete = Delete(key) if value is None else Put(key, value)
            try:
                result = await self.client.txn(self._guard() if guarded else [], [op])
                if not result.succeeded:
                    log.warning("not written to etcd (no longer the leader): %s", key)
            except DoproxyError as e:
                log.warning("cannot write %s to etcd: %s (kept in memory only)", key, e)
            finally:
                self._writes.task_done()

    async def flush(self, within: float = 2.0) -> None:
        """Wait (a while) for background writes to reach etcd."""
        if self._writes is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._writes.join()

    async def release(self) -> None:
        """Done with this view (a leader's, at the end of its leadership): what it queued is
        written (a while) or dropped, and its writer task ends. The client stays: it is the
        store's."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
            self._writes = None

    async def close(self) -> None:
        await self.release()
        await self.client.close()


class EtcdJournal(Journal):
    """The scaler's journal in etcd: one key per record (`journal/<seq>`), the oldest deleted
    beyond the limit; records are written in the background, in order."""

    def __init__(self, store: EtcdStore, limit: int) -> None:
        super().__init__(Path("/nonexistent"), limit)
        self.store = store

    def load(self) -> list[dict[str, Any]]:
        for r in self.store.journal_records[-self.limit :]:
            self.records.append(r)
        return list(self.records)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.store._journal_seq += 1
        seq = self.store._journal_seq
        prefix = self.store.prefix + "journal/"
        self.store.write_soon(
            f"{prefix}{seq:020d}", json.dumps(record, separators=(",", ":")).encode()
        )
        old = seq - 2 * self.limit
        if old > 0:
            self.store.write_soon(f"{prefix}{old:020d}", None)


class EtcdOverrides:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store

    def load(self) -> dict[str, Any]:
        return dict(self.store.overrides_value)

    async def keep(self, overrides: dict[str, Any]) -> None:
        # On the loop: the write is queued for the store's writer task, which must not be
        # touched from another thread.
        self.store.overrides_value.clear()
        self.store.overrides_value.update(overrides)
        # Any node's admin API may set them: not a leader's write.
        self.store.write_soon(
            self.store.prefix + "overrides",
            json.dumps(overrides, sort_keys=True).encode(),
            guarded=False,
        )
