"""Reading the inventory: the 2015 [[droplet]] tables, [[backend]] tables, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy.core.inventory_model import InventoryEntry
from doproxy.errors import ConfigError
from doproxy.inventory import load_inventory, parse_inventory, update_inventory


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


def test_write_then_read_back_keeps_every_field(tmp_path: Path) -> None:
    f = tmp_path / "inventory.toml"
    f.write_text(
        '[[droplet]]\nid = 7993556\nname = "auto-nginxA3GWw3uZv6"\npublic-ip = "45.55.229.160"\n'
        'private-ip = "10.132.169.170"\nserver-host = "10.132.169.170:8080"\n'
        'health-url = "http://10.132.169.170:8080/"\nstarted-time = 2015-10-02T12:08:29Z\n'
        '[[backend]]\nname = "local"\nserver-host = "127.0.0.1:9"\nweight = 3\ntags = ["a"]\n'
    )
    before = load_inventory(f)
    update_inventory(f, lambda entries: entries)
    assert load_inventory(f) == before
    text = f.read_text()
    assert "[[droplet]]" in text and "started-time = 2015-10-02T12:08:29Z" in text
    assert not list(tmp_path.glob(".inventory.toml.*.tmp"))  # no temp file left behind


def test_a_bad_change_writes_nothing(tmp_path: Path) -> None:
    f = tmp_path / "inventory.toml"
    f.write_text('[[droplet]]\nid = 1\nserver-host = "127.0.0.1:1"\n')
    before = f.read_text()
    with pytest.raises(ConfigError):
        update_inventory(f, lambda entries: [*entries, entries[0]])  # a duplicate id
    assert f.read_text() == before


def _add_many(path: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        update_inventory(
            path,
            lambda entries, i=i: [  # type: ignore[misc]
                *entries,
                InventoryEntry(id=i, name=f"w{i}", server_host=f"127.0.0.1:{1000 + i}"),
            ],
        )


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    # Four processes (as the CLI and a server would be) each add 25 entries at once.
    import multiprocessing

    f = tmp_path / "inventory.toml"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(f), k * 100, 25)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = sorted(int(e.id) for e in load_inventory(f))
    assert ids == sorted(k * 100 + i for k in range(4) for i in range(25))


PLAIN = "".join(
    f'[[droplet]]\nid = {i}\nname = "b{i}"\nserver-host = "10.0.0.{i}:80"\nweight = {i}\n\n'
    for i in range(1, 6)
)

SAME_AS_A_WHOLE_PARSE = [
    "",
    "# nothing yet\n\n",
    PLAIN,
    "# the pool\n" + PLAIN + '[[backend]]\nserver-host = "127.0.0.1:9000"\n',
    # interleaved tables: every droplet first, then every backend, as a whole parse gives
    '[[backend]]\nserver-host = "b:1"\n[[droplet]]  # one\nid = 7\nserver-host = "d:1"\n'
    '[[backend]]\nserver-host = "b:2"\ntags = ["x", "y"]\n',
    # not plain, read whole: a multi-line string, a sub-table, an indented header, CRLF
    '[[droplet]]\nid = 1\nserver-host = "a:1"\nname = """\n[[droplet]]\nid = 2\n"""\n',
    '[[droplet]]\nid = 1\nserver-host = "a:1"\n[droplet.x]\n',
    '  [[droplet]]\nid = 1\nserver-host = "a:1"\n',
    '[[droplet]]\r\nid = 1\r\nserver-host = "a:1"\r\n',
    'id = 5\n[[droplet]]\nserver-host = "a:1"\n',
]


@pytest.mark.parametrize("text", SAME_AS_A_WHOLE_PARSE)
def test_reading_entry_by_entry_agrees_with_a_whole_parse(text: str) -> None:
    from doproxy.inventory import _parse_whole

    try:
        whole: list[InventoryEntry] | str = _parse_whole(text, "inv.toml")
    except ConfigError as e:
        whole = str(e)
    for _ in range(2):  # the first read, then one from the per-entry cache
        try:
            got: list[InventoryEntry] | str = parse_inventory(text, "inv.toml")
        except ConfigError as e:
            got = str(e)
        assert got == whole


def test_a_reread_parses_only_the_entries_that_changed() -> None:
    first = parse_inventory(PLAIN, "reread.toml")
    changed = PLAIN.replace("weight = 3\n", "weight = 30\n")
    second = parse_inventory(changed, "reread.toml")
    assert [e.weight for e in second] == [1, 2, 30, 4, 5]
    assert [a is b for a, b in zip(first, second, strict=True)] == [1, 1, 0, 1, 1]
    # A broken entry is reported as before, cache or not.
    with pytest.raises(ConfigError, match=r"droplet\[2\]\.weight"):
        parse_inventory(changed.replace("weight = 30", "weight = -1"), "reread.toml")
    with pytest.raises(ConfigError, match="duplicate id 1"):
        parse_inventory(changed.replace("id = 2\n", "id = 1\n"), "reread.toml")
