"""The CLI against the etcd store: `inventory push|pull`, and the inventory commands working
on etcd instead of the file (real etcd, the real `doproxy` command)."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy.cluster.etcd import EtcdClient
from doproxy.cluster.store import EtcdStore
from doproxy.inventory import load_inventory
from tests.etcd import EtcdCluster
from tests.test_cli_admin import cli

PREFIX = "/doproxy-cli/"
INVENTORY = """[[droplet]]
id = 1
name = "b1"
server-host = "127.0.0.1:9001"

[[droplet]]
id = 2
name = "b2"
server-host = "127.0.0.1:9002"
"""


def config(tmp: Path, urls: list[str], store: str = "etcd") -> Path:
    cfg = tmp / "doproxy.toml"
    quoted = ", ".join(f'"{u}"' for u in urls)
    cfg.write_text(
        f"""inventory-file = "inventory.toml"

[admin]
bind = "127.0.0.1:0"

[cluster]
store = "{store}"
endpoints = [{quoted}]
prefix = "{PREFIX}"
"""
    )
    return cfg


@pytest.mark.timeout(60)
async def test_push_pull_and_commands_on_the_etcd_store(tmp_path: Path, etcd: EtcdCluster) -> None:
    (tmp_path / "inventory.toml").write_text(INVENTORY)
    (tmp_path / "inventory.toml.owner").write_text("abcd1234\n")
    cfg = config(tmp_path, etcd.client_urls)
    store = EtcdStore(EtcdClient(etcd.client_urls), PREFIX)
    try:
        r = await cli(cfg, "inventory", "push")
        assert r.code == 0, r.err
        assert "pushed 2 backend(s)" in r.out and "abcd1234" in r.out
        assert [e.name for e in await store.load()] == ["b1", "b2"]
        assert await store.owner_tag() == "doproxy-owner-abcd1234"  # machines stay ours

        # A different inventory is not pushed over the one in etcd without --replace.
        (tmp_path / "inventory.toml").write_text(INVENTORY.split("\n\n")[0] + "\n")
        r = await cli(cfg, "inventory", "push")
        assert r.code == 1 and "--replace" in r.err
        assert len(await store.load()) == 2

        # The inventory commands act on etcd (no server runs: straight to the store).
        r = await cli(cfg, "disable", "1")
        assert r.code == 0, r.err
        r = await cli(cfg, "delete", "2")
        assert r.code == 0, r.err
        assert [(e.name, e.state) for e in await store.load()] == [("b1", "disabled")]
        r = await cli(cfg, "delete", "2")
        assert r.code == 1 and "not in the inventory" in r.err and PREFIX in r.err

        # pull: etcd's inventory (and owner) into the file.
        (tmp_path / "inventory.toml").unlink()
        (tmp_path / "inventory.toml.owner").unlink()
        r = await cli(cfg, "inventory", "pull")
        assert r.code == 0, r.err
        assert [(e.name, e.state) for e in load_inventory(tmp_path / "inventory.toml")] == [
            ("b1", "disabled")
        ]
        assert (tmp_path / "inventory.toml.owner").read_text().strip() == "abcd1234"

        # Another installation's owner is refused: its machines would be strangers here.
        (tmp_path / "inventory.toml.owner").write_text("ffff0000\n")
        r = await cli(cfg, "inventory", "push", "--replace")
        assert r.code == 1 and "two installations" in r.err
    finally:
        await store.close()


@pytest.mark.timeout(30)
async def test_push_with_the_file_store_and_etcd_down_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "inventory.toml").write_text(INVENTORY)
    r = await cli(config(tmp_path, ["http://127.0.0.1:9"], store="file"), "inventory", "push")
    assert r.code == 1 and 'store = "etcd"' in r.err
    r = await cli(config(tmp_path, ["http://127.0.0.1:9"]), "inventory", "push")
    assert r.code == 1 and "127.0.0.1:9" in r.err
    assert "Traceback" not in r.err


@pytest.mark.timeout(60)
async def test_the_cluster_section_reaches_etcd_over_tls_with_a_password(tmp_path: Path) -> None:
    """[cluster] ca-file and username/password-file, from the config to a real etcd."""
    (tmp_path / "inventory.toml").write_text(INVENTORY)
    async with EtcdCluster(tmp_path / "etcd", tls=True) as etcd:
        password = "correct-horse-battery"
        await etcd.etcdctl("user", "add", "root", "--interactive=false", input=password.encode())
        await etcd.etcdctl("auth", "enable")
        (tmp_path / "etcd.password").write_text(password + "\n")
        cfg = config(tmp_path, etcd.client_urls)
        ca = tmp_path / "etcd" / "tls" / "ca.pem"
        cfg.write_text(
            cfg.read_text()
            + f'ca-file = "{ca}"\nusername = "root"\npassword-file = "etcd.password"\n'
        )
        r = await cli(cfg, "inventory", "push")
        assert r.code == 0, r.err
        assert password not in r.out + r.err
        r = await cli(cfg, "disable", "2")
        assert r.code == 0, r.err
        # A wrong password is refused, and said without the password.
        (tmp_path / "etcd.password").write_text("wrong-horse\n")
        r = await cli(cfg, "disable", "1")
        assert r.code == 1 and "wrong-horse" not in r.err and "Traceback" not in r.err
        # Without the CA, etcd's certificate is not trusted.
        cfg.write_text(cfg.read_text().replace(f'ca-file = "{ca}"\n', ""))
        (tmp_path / "etcd.password").write_text(password + "\n")
        r = await cli(cfg, "disable", "1")
        assert r.code == 1 and "certificate" in r.err


@pytest.mark.timeout(60)
async def test_create_list_and_destroy_keep_their_records_in_etcd(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    """The machine commands against the etcd store and the fake DigitalOcean API: the intent,
    the entry and its removal are etcd's, with the cluster's owner tag on the droplet."""
    from doproxy.testing.fake_digitalocean import FakeDigitalOcean

    async with FakeDigitalOcean(token="dop_v1_cli", active_after=0.2) as fake:
        cfg = config(tmp_path, etcd.client_urls)
        cfg.write_text(
            cfg.read_text()
            + f"""
[do-provisioner]
token = "dop_v1_cli"
api-url = "{fake.url}"
create-timeout = "20s"
poll-interval = "50ms"
"""
        )
        store = EtcdStore(EtcdClient(etcd.client_urls), PREFIX)
        try:
            r = await cli(cfg, "create", "web-1")
            assert r.code == 0, r.err
            (e,) = await store.load()
            assert e.name == "web-1" and e.state == "active"
            owner = await store.owner_tag()
            (droplet,) = fake.droplets.values()
            assert owner in droplet["tags"]
            r = await cli(cfg, "list", "--output", "json")
            assert r.code == 0 and "web-1" in r.out
            r = await cli(cfg, "destroy", str(e.id), "--yes")
            assert r.code == 0, r.err
            assert await store.load() == [] and fake.droplets == {}
            assert not (tmp_path / "inventory.toml").exists()  # the file was never the store
            assert fake.violations == []
        finally:
            await store.close()


def test_an_empty_or_missing_password_file_is_refused_naming_its_key(tmp_path: Path) -> None:
    from doproxy.core.settings import Cluster
    from doproxy.errors import ConfigError

    settings = Cluster.model_validate({"username": "root", "password-file": "etcd.password"})
    with pytest.raises(ConfigError, match=r"cluster\.password-file.*cannot read it"):
        EtcdStore.from_settings(settings, tmp_path)
    (tmp_path / "etcd.password").write_text("\n")
    with pytest.raises(ConfigError, match=r"cluster\.password-file.*empty"):
        EtcdStore.from_settings(settings, tmp_path)
