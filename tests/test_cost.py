"""What the pool costs: prices of inventory entries, the pool's sum, and how money reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy.config import load_settings
from doproxy.core.cost import change, money, pool_cost
from doproxy.core.inventory_model import InventoryEntry
from doproxy.inventory import dump_inventory, load_inventory, update_inventory
from doproxy.machines import inventory_cost, managed_by

GO_INVENTORY = (
    '[[droplet]]\nid = 7993556\nname = "auto-nginxA3GWw3uZv6"\npublic-ip = "45.55.229.160"\n'
    'private-ip = "10.132.169.170"\nserver-host = "10.132.169.170:8080"\n'
    'health-url = "http://10.132.169.170:8080/"\nstarted-time = 2015-10-02T12:08:29Z\n'
)


def entry(key: int | str, price: float | None = None, **kw: object) -> InventoryEntry:
    return InventoryEntry.model_validate(
        {"id": key, "server-host": f"10.0.0.{hash(str(key)) % 200 + 1}:80", **kw}
        | ({"price-hourly": price} if price is not None else {})
    )


def do(e: InventoryEntry) -> bool:
    return managed_by(e, "digitalocean")


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0.0, "$0.00"),
        (0.00893, "$0.0089"),
        (0.017857, "$0.018"),
        (0.02, "$0.02"),
        (1.5, "$1.50"),
        (-0.00893, "-$0.0089"),
    ],
)
def test_money_reads_like_a_price_list(amount: float, text: str) -> None:
    assert money(amount) == text


def test_change_says_the_difference_with_its_sign() -> None:
    assert change(0.017857, 0.026786) == "+$0.0089/h"
    assert change(0.036, 0.018) == "-$0.018/h"
    assert change(0.5, 0.5) == "+$0.00/h"


def test_each_machine_is_priced_by_its_entry_then_the_provider_then_the_size() -> None:
    entries = [
        entry(1, 0.0268),  # recorded when it was created
        entry(2),  # a 2015 droplet: the provider reported its price at the last reconcile
        entry(3),  # a 2015 droplet the provider said nothing about: the configured size's
        InventoryEntry(name="web", server_host="10.9.9.9:80"),  # hand-written: not priced
    ]
    cost = pool_cost(entries, do, {"2": 0.0179}, 0.00893, creating=1)
    assert cost.per_hour == pytest.approx(0.0268 + 0.0179 + 0.00893 + 0.00893)
    assert (cost.priced, cost.unpriced, cost.machines) == (4, 1, 5)
    # Without the configured size's price, the droplet without a price is unpriced too, and
    # so is the machine being created.
    cost = pool_cost(entries, do, {"2": 0.0179}, None, creating=1)
    assert cost.per_hour == pytest.approx(0.0268 + 0.0179)
    assert (cost.priced, cost.unpriced) == (2, 3)


def test_draining_and_disabled_machines_are_still_billed() -> None:
    entries = [entry(1, 0.01), entry(2, 0.01, state="draining"), entry(3, 0.01, state="disabled")]
    assert pool_cost(entries, do, {}, None).per_hour == pytest.approx(0.03)


def test_local_backends_cost_the_configs_cost_per_hour(tmp_path: Path) -> None:
    cfg = tmp_path / "doproxy.toml"
    cfg.write_text(
        '[local-provisioner]\nenable = true\ncommand = "python -m x --port {port}"\n'
        "cost-per-hour = 0.05\n"
    )
    settings = load_settings(cfg)
    local = [
        InventoryEntry(id=f"local-{n}", server_host=f"127.0.0.1:{n}", provider="local")
        for n in (9100, 9101)
    ]
    intent = InventoryEntry(name="local-x", state="provisioning", provider="local")
    hand = InventoryEntry(server_host="127.0.0.1:9")
    cost = inventory_cost(settings, [*local, intent, hand])
    assert cost.per_hour == pytest.approx(0.15)
    assert (cost.priced, cost.unpriced, cost.new_machine) == (3, 1, 0.05)
    # The default: local backends cost nothing.
    cfg.write_text('[local-provisioner]\nenable = true\ncommand = "python -m x --port {port}"\n')
    cost = inventory_cost(load_settings(cfg), local)
    assert (cost.per_hour, cost.priced, cost.unpriced) == (0.0, 2, 0)


def test_price_hourly_is_written_only_when_known(tmp_path: Path) -> None:
    f = tmp_path / "inventory.toml"
    f.write_text(GO_INVENTORY)
    update_inventory(f, lambda entries: entries)
    assert f.read_text() == GO_INVENTORY  # a 2015 file stays as it was
    update_inventory(
        f, lambda entries: [e.model_copy(update={"price_hourly": 0.00893}) for e in entries]
    )
    assert "price-hourly = 0.00893" in f.read_text()
    assert load_inventory(f)[0].price_hourly == 0.00893
    assert "price-hourly" not in dump_inventory([entry(5)])
