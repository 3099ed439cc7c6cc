"""Which store holds the inventory: the file (doproxy.machines.FileStore) or etcd
(doproxy.cluster.store.EtcdStore), as `[cluster] store` says. Its own module: the etcd store
builds on doproxy.machines, so machines cannot name it without a circle."""

from __future__ import annotations

from pathlib import Path

from doproxy.config import resolve_in
from doproxy.core.settings import Settings
from doproxy.machines import FileStore, InventoryStore


def open_store(settings: Settings, base: Path) -> InventoryStore:
    """The configured store: the inventory file, or etcd in cluster mode (`[cluster] store`).
    `base` is the config file's folder (relative paths start there)."""
    if settings.cluster.store == "etcd":
        from doproxy.cluster.store import EtcdStore

        return EtcdStore.from_settings(settings.cluster, base)
    return FileStore(resolve_in(base, settings.inventory_file), watched=settings.watch_config)
