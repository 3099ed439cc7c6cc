"""Reading the inventory: the 2015 [[droplet]] tables, [[backend]] tables, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy.errors import ConfigError
from doproxy.inventory import load_inventory, parse_inventory


def test_droplets_and_backends(tmp_path: Path) -> None:
    f = tmp_path / "inventory.toml"
    f.write_text(
        '[[droplet]]\nid = 1\nname = "a"\nserver-host = "10.0.0.1:8080"\n'
        'health-url = "10.0.0.1:8080/"\nstarted-time = 0001-01-01T00:00:00Z\n'
        '[[backend]]\nname = "b"\nserver-host = "127.0.0.1:9000"\nweight = 3\nstate = "draining"\n'
    )
    a, b = load_inventory(f)
    assert (a.key, a.address()) == ("1", ("10.0.0.1", 8080))
    assert (b.key, b.weight, b.state) == ("127.0.0.1:9000", 3, "draining")


def test_missing_file_is_an_empty_pool(tmp_path: Path) -> None:
    assert load_inventory(tmp_path / "nope.toml") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[droplet]]\nid = 1\nserver-host = "a:1"\n[[droplet]]\nid = 1\nserver-host = "b:2"\n',
            "duplicate id 1",
        ),
        ('[[droplet]]\nid = 1\nserver-host = "no-port"\n', "droplet[0].server-host"),
        ("[[droplet]]\nid = 1\n", "droplet[0].server-host"),
        (
            '[[droplet]]\nid = 1\nserver-host = "a:1"\ncolour = "red"\n',
            "droplet[0].colour: unknown",
        ),
        ('[[droplet]]\nid = 1\nserver-host = "a:1"\nstate = "sleeping"\n', "droplet[0].state"),
        ("[[server]]\nid = 1\n", "server: unknown table"),
        ("droplet = 3\n", "droplet: must be an array of tables"),
        ("[[droplet]\n", "TOML syntax"),
    ],
)
def test_bad_inventory_names_the_problem(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_inventory(text, "inventory.toml")
    assert expected in str(e.value)
    assert str(e.value).startswith("inventory.toml")


def test_every_problem_is_reported_at_once() -> None:
    text = (
        '[[droplet]]\nid = 1\nserver-host = "x"\n'
        '[[droplet]]\nid = 2\nweight = -1\nserver-host = "a:1"\n'
    )
    with pytest.raises(ConfigError) as e:
        parse_inventory(text, "inv.toml")
    keys = {p.key for p in e.value.problems}
    assert keys == {"droplet[0].server-host", "droplet[1].weight"}
