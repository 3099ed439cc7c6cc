"""What the pool costs per hour: pure arithmetic over the inventory's entries.

Each machine is priced, in order, by:

1. the price recorded in its inventory entry (`price-hourly`: the droplet size's price_hourly
   when doproxy created or adopted it);
2. the price its provider reports for it now (the scaler's last reconcile saw every machine);
3. for a machine the configured provider manages, the price of a new machine (local processes:
   `[local-provisioner] cost-per-hour`; droplets: the configured size's price, once a droplet
   of that size was seen);
4. else it is *unpriced*: counted, and said, but not added (a hand-written `[[backend]]`).

Machines being created count at the price of a new machine. Every entry counts, whatever its
state: a draining or disabled machine is billed until it is destroyed. Prices are per hour, in
the provider's currency (US dollars for DigitalOcean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from doproxy.core.inventory_model import InventoryEntry


@dataclass(frozen=True)
class PoolCost:
    """The pool's cost per hour, as far as it is known."""

    per_hour: float  # the sum over the priced machines
    priced: int  # machines with a known price
    unpriced: int  # machines whose price is not known: not in per_hour
    new_machine: float | None  # what one more machine would cost per hour (None: not known)

    @property
    def machines(self) -> int:
        return self.priced + self.unpriced


def price_of(
    entry: InventoryEntry,
    managed: Callable[[InventoryEntry], bool],
    known: Mapping[str, float],
    new_machine: float | None,
) -> float | None:
    """One entry's price per hour (see the module's docstring), None when not known."""
    if entry.price_hourly is not None:
        return entry.price_hourly
    if entry.key in known:
        return known[entry.key]
    if managed(entry):
        return new_machine
    return None


def pool_cost(
    entries: Iterable[InventoryEntry],
    managed: Callable[[InventoryEntry], bool],
    known: Mapping[str, float],
    new_machine: float | None,
    creating: int = 0,
) -> PoolCost:
    """The cost of `entries` plus `creating` machines being created (not among the entries)."""
    total = 0.0
    priced = unpriced = 0
    for e in entries:
        price = price_of(e, managed, known, new_machine)
        if price is None:
            unpriced += 1
        else:
            total += price
            priced += 1
    if new_machine is None:
        unpriced += creating
    else:
        total += new_machine * creating
        priced += creating
    return PoolCost(total, priced, unpriced, new_machine)


def money(amount: float) -> str:
    """$0.018, $0.0089, $0.02, $1.25: enough digits for an hourly droplet price, no more."""
    a = abs(amount)
    text = f"{a:.{2 if a >= 1 or a == 0 else 3 if a >= 0.01 else 4}f}"
    while len(text.partition(".")[2]) > 2 and text.endswith("0"):
        text = text[:-1]
    return ("-" if amount < 0 and float(text) else "") + "$" + text


def change(before: float, after: float) -> str:
    """ "+$0.018/h", "-$0.009/h", "+$0/h"."""
    delta = after - before
    sign = "-" if delta < -1e-12 else "+"
    return f"{sign}{money(abs(delta))}/h"
