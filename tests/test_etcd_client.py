"""The etcd client (doproxy/cluster/etcd.py) against real etcd clusters (tests/etcd.py): keys,
transactions, leases, watches, compaction, failover between members, and authentication."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from doproxy.cluster.etcd import (
    Compare,
    Delete,
    EtcdAuthFailed,
    EtcdClient,
    EtcdCompacted,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    Get,
    KeyValue,
    Put,
    WatchEvent,
)
from doproxy.errors import DoproxyError
from tests.etcd import EtcdCluster, needs_etcd
from tests.support import RawBackend, answering, silent

pytestmark = [needs_etcd, pytest.mark.timeout(30)]

MakeBackend = Callable[[Any], Awaitable[RawBackend]]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll an async condition until it holds, within a deadline."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def take(watch: AsyncGenerator[list[WatchEvent], None], n: int) -> list[WatchEvent]:
    """The next `n` events of a watch (batches may group them any way)."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(5):
        while len(events) < n:
            events += await anext(watch)
    return events


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes]]:
    return [(e.kind, e.kv.key, e.kv.value) for e in events]


async def test_put_get_delete_with_prefix(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        r1 = await client.put("inv/b", b"2")
        r2 = await client.put("inv/a", b"1")
        await client.put("inv/empty", b"")
        await client.put("inv/\u00fc", b"non-ASCII key")
        await client.put("inventory", b"shares the letters, not the prefix")
        assert r2 == r1 + 1

        kvs, revision = await client.get("inv/", prefix=True)
        assert [(kv.key, kv.value) for kv in kvs] == [
            ("inv/a", b"1"),
            ("inv/b", b"2"),
            ("inv/empty", b""),
            ("inv/\u00fc", b"non-ASCII key"),
        ]
        assert kvs[0] == KeyValue("inv/a", b"1", r2, r2, 1, 0)
        assert revision == r1 + 4

        r3 = await client.put("inv/a", b"one")
        (kv,), _ = await client.get("inv/a")
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"one", r2, r3, 2)
        assert await client.get("inv/missing") == ([], r3)
        assert (await client.get("inv/"))[0] == []  # without prefix=True: that exact key only

        assert await client.delete("inv/b") == 1
        assert await client.delete("inv/b") == 0
        assert await client.delete("inv/", prefix=True) == 3
        assert (await client.get("inv/", prefix=True))[0] == []
        assert [kv.key for kv in (await client.get("", prefix=True))[0]] == ["inventory"]

        status = await client.status()
        assert status["endpoint"] == etcd.client_urls[0]
        assert status["version"].startswith("3.")
        assert int(status["leader"]) and int(status["raftTerm"])


async def test_txn_runs_success_or_failure_for_each_compare_target(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        rev = await client.put("k", b"v1")
        lease = await client.lease_grant(30)
        await client.put("leased", b"x", lease=lease)
        (k,), _ = await client.get("k")
        (leased,), _ = await client.get("leased")
        assert leased.lease == lease

        # Each target: a comparison that holds, and one that does not.
        cases = [
            (Compare("k", "VALUE", "EQUAL", b"v1"), Compare("k", "VALUE", "EQUAL", b"v2")),
            (Compare("k", "VALUE", "NOT_EQUAL", b"v2"), Compare("k", "VALUE", "NOT_EQUAL", b"v1")),
            (Compare("k", "VERSION", "EQUAL", 1), Compare("k", "VERSION", "GREATER", 1)),
            (Compare("k", "CREATE", "EQUAL", rev), Compare("k", "CREATE", "LESS", rev)),
            (Compare("k", "MOD", "LESS", rev + 1), Compare("k", "MOD", "GREATER", rev)),
            (Compare("leased", "LEASE", "EQUAL", lease), Compare("leased", "LEASE", "EQUAL", 0)),
            # A key that does not exist has create revision 0.
            (Compare("absent", "CREATE", "EQUAL", 0), Compare("k", "CREATE", "EQUAL", 0)),
        ]
        for holds, fails in cases:
            ok = await client.txn([holds], [Get("k")], [Put("never", b"")])
            assert ok.succeeded, holds
            assert ok.responses == [[k]]
            bad = await client.txn([fails], [Put("never", b"")], [Get("k"), Get("absent")])
            assert not bad.succeeded, fails
            assert bad.responses == [[k], []]
        assert (await client.get("never"))[0] == []

        # Every comparison must hold; the branch's writes are one revision.
        await client.put("old/1", b"")
        await client.put("old/2", b"")
        both = [Compare("k", "VALUE", "EQUAL", b"v1"), Compare("k", "VERSION", "EQUAL", 1)]
        one_wrong = [*both, Compare("k", "MOD", "EQUAL", rev + 1)]
        assert not (await client.txn(one_wrong, [Put("never", b"")])).succeeded
        result = await client.txn(
            both,
            [
                Put("k", b"v2"),
                Put("p/1", b"a", lease=lease),
                Delete("old/", prefix=True),
                Get("p/", prefix=True),
            ],
        )
        assert result.succeeded
        assert [[kv.key for kv in r] for r in result.responses] == [[], [], [], ["p/1"]]
        (k2,), revision = await client.get("k")
        assert k2.value == b"v2" and k2.mod_revision == result.revision == revision
        (p1,), _ = await client.get("p/1")
        assert p1.lease == lease and p1.mod_revision == result.revision
        assert (await client.get("old/", prefix=True))[0] == []

    with pytest.raises(TypeError):
        Compare("k", "VERSION", "EQUAL", b"1")
    with pytest.raises(TypeError):
        Compare("k", "VALUE", "EQUAL", 1)
    with pytest.raises(ValueError):
        Compare("k", "SIZE", "EQUAL", 1)  # type: ignore[arg-type]


async def test_a_revoked_lease_takes_its_keys(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        lease = await client.lease_grant(30)
        assert 0 < await client.lease_keepalive(lease) <= 30
        await client.put("l/a", b"1", lease=lease)
        await client.put("l/b", b"2", lease=lease)
        await client.put("l/c", b"no lease")

        await client.lease_revoke(lease)
        assert [kv.key for kv in (await client.get("l/", prefix=True))[0]] == ["l/c"]
        assert await client.lease_keepalive(lease) == 0
        await client.lease_revoke(lease)  # already gone: not an error

        with pytest.raises(EtcdLeaseNotFound, match="lease not found"):
            await client.put("l/d", b"", lease=lease)
        with pytest.raises(EtcdLeaseNotFound):
            await client.txn([], [Put("l/d", b"", lease=lease)])


async def test_an_expired_lease_takes_its_keys(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        lease = await client.lease_grant(1)  # etcd's minimum here (1.5 election timeouts)
        await client.put("e/a", b"1", lease=lease)
        assert (await client.get("e/a"))[0]

        async def gone() -> bool:
            return (await client.get("e/a"))[0] == []

        await until(gone, timeout=6)
        assert await client.lease_keepalive(lease) == 0


async def test_watch_from_a_read_misses_nothing(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        await client.put("w/a", b"1")
        _, revision = await client.get("w/", prefix=True)
        # Changes after the read and before the watch starts...
        r_put = await client.put("w/b", b"2")
        await client.put("elsewhere", b"x")
        await client.delete("w/a")

        watch = client.watch("w/", prefix=True, start_revision=revision + 1)
        try:
            first = await take(watch, 2)
            assert summary(first) == [("PUT", "w/b", b"2"), ("DELETE", "w/a", b"")]
            assert first[0].kv == KeyValue("w/b", b"2", r_put, r_put, 1, 0)
            assert first[1].kv.mod_revision == r_put + 2
            # ... and those after it.
            await client.put("w/c", b"3")
            await client.put("w/b", b"22")
            assert summary(await take(watch, 2)) == [("PUT", "w/c", b"3"), ("PUT", "w/b", b"22")]
        finally:
            await watch.aclose()

        # One key, from now on.
        one = client.watch("w/c")
        try:
            pending = asyncio.ensure_future(take(one, 1))
            await asyncio.sleep(0)  # (the watch starts with its first read)
            async with asyncio.timeout(5):
                while not pending.done():
                    await client.put("w/d", b"not watched")
                    await client.put("w/c", b"watched")
                    await asyncio.sleep(0.05)
            assert summary(await pending)[0] == ("PUT", "w/c", b"watched")
        finally:
            await one.aclose()


async def test_watch_raises_compacted_after_a_compaction(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls) as client:
        r1 = await client.put("c/a", b"1")
        await client.put("c/a", b"2")
        r3 = await client.put("c/a", b"3")
        await client.compact(r3)

        with pytest.raises(EtcdCompacted, match="compacted") as raised:
            async with asyncio.timeout(5):
                async for _ in client.watch("c/", prefix=True, start_revision=r1):
                    pass
        assert raised.value.compact_revision == r3
        assert isinstance(raised.value, EtcdUnavailable)

        watch = client.watch("c/", prefix=True, start_revision=r3)  # still in history
        try:
            assert summary(await take(watch, 1)) == [("PUT", "c/a", b"3")]
        finally:
            await watch.aclose()
        with pytest.raises(EtcdCompacted):
            await client.compact(r1)


async def test_watch_raises_unavailable_when_its_stream_breaks(etcd: EtcdCluster) -> None:
    async with EtcdClient(etcd.client_urls, timeout=1) as client:
        # Nothing for idle_timeout seconds counts as a dead stream.
        with pytest.raises(EtcdUnavailable, match=r"carried nothing for 0\.3s"):
            async with asyncio.timeout(5):
                async for _ in client.watch("quiet", idle_timeout=0.3):
                    pass

        _, revision = await client.get("x")
        await client.put("x", b"1")
        watch = client.watch("x", start_revision=revision + 1)
        try:
            assert summary(await take(watch, 1)) == [("PUT", "x", b"1")]
            await etcd.kill(0)
            with pytest.raises(EtcdUnavailable, match=re.escape(etcd.client_urls[0])):
                await take(watch, 1)
        finally:
            await watch.aclose()

        with pytest.raises(EtcdUnavailable, match="Is etcd running at"):
            await anext(client.watch("x"))


async def test_a_stopped_member_fails_over_to_the_others(
    etcd3: EtcdCluster, backend_factory: MakeBackend
) -> None:
    # An HTTP server that is not etcd (404 for /v3/...) comes first: it is passed over too.
    not_etcd = await backend_factory(answering(404, b"Not Found"))
    urls = etcd3.client_urls
    async with EtcdClient([f"http://127.0.0.1:{not_etcd.port}", *urls]) as client:
        await client.put("f", b"1")
        assert client.current_endpoint == urls[0]
        lease = await client.lease_grant(30)
        await client.put("f/leased", b"", lease=lease)

        used = urls.index(client.current_endpoint)
        await etcd3.stop(used)
        (kv,), _ = await client.get("f")
        assert kv.value == b"1"
        assert client.current_endpoint not in (urls[used], f"http://127.0.0.1:{not_etcd.port}")
        assert await client.lease_keepalive(lease) > 0
        assert (
            await client.txn([Compare("f", "VALUE", "EQUAL", b"1")], [Put("f", b"2")])
        ).succeeded

        # A watch starts on a member that answers, and a restarted member rejoins.
        _, revision = await client.get("f")
        watch = client.watch("f", start_revision=revision)
        try:
            assert summary(await take(watch, 1)) == [("PUT", "f", b"2")]
        finally:
            await watch.aclose()
        await etcd3.start(used)
        async with EtcdClient([urls[used]]) as rejoined:
            assert (await rejoined.get("f"))[0][0].value == b"2"


async def test_all_members_down_raises_unavailable_in_time(
    etcd3: EtcdCluster, backend_factory: MakeBackend
) -> None:
    # One more endpoint accepts connections and never answers: its attempt runs to the timeout.
    black_hole = await backend_factory(silent)
    urls = [*etcd3.client_urls, f"http://127.0.0.1:{black_hole.port}"]
    await asyncio.gather(*(etcd3.kill(i) for i in range(3)))
    password = "s3cret-never-shown"
    async with EtcdClient(urls, timeout=0.5, username="root", password=password) as client:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable) as raised:
            await client.get("k")
        assert time.monotonic() - started < 0.5 * len(urls) + 1.0
        message = str(raised.value)
        assert password not in message
        assert all(url in message for url in urls)
        assert "cannot connect: connection refused" in message
        assert "no answer within 0.5s" in message
        assert "Check [cluster] endpoints" in message
        assert isinstance(raised.value, DoproxyError)

        with pytest.raises(EtcdUnavailable) as raised:
            await anext(client.watch("k"))
        assert password not in str(raised.value)


async def test_username_and_password(etcd: EtcdCluster, caplog: pytest.LogCaptureFixture) -> None:
    password = "correct-horse-battery"
    await etcd.etcdctl("user", "add", "root", "--interactive=false", input=password.encode())
    await etcd.etcdctl("auth", "enable")

    async with EtcdClient(etcd.client_urls, username="root", password=password) as client:
        revision = await client.put("a", b"1")
        assert (await client.get("a"))[0][0].value == b"1"
        watch = client.watch("a", start_revision=revision)
        try:
            assert summary(await take(watch, 1)) == [("PUT", "a", b"1")]
        finally:
            await watch.aclose()

        # etcd keeps its tokens in memory: a restarted member has forgotten ours.
        await etcd.stop(0)
        await etcd.start(0)
        with caplog.at_level(logging.INFO, logger="doproxy.cluster.etcd"):
            assert (await client.get("a"))[0][0].value == b"1"
        assert "authenticating again" in caplog.text

    wrong = "wrong-horse-battery"
    async with EtcdClient(etcd.client_urls, username="root", password=wrong) as client:
        with pytest.raises(EtcdAuthFailed) as raised:
            await client.get("a")
        assert "root" in str(raised.value) and "username and password" in str(raised.value)
        with pytest.raises(EtcdAuthFailed) as raised_watch:
            await anext(client.watch("a"))
    for error in (raised.value, raised_watch.value):
        shown = f"{error} {error!r} {error.__context__!r} {error.__cause__!r}"
        assert wrong not in shown and password not in shown
    assert wrong not in caplog.text and password not in caplog.text

    async with EtcdClient(etcd.client_urls) as client:
        with pytest.raises(EtcdAuthFailed, match="set \\[cluster\\] username and password"):
            await client.get("a")


async def test_https_with_an_ssl_context(tmp_path: Path) -> None:
    async with EtcdCluster(tmp_path / "etcd", tls=True) as etcd:
        assert etcd.client_urls[0].startswith("https://")
        async with EtcdClient(etcd.client_urls, ssl=etcd.client_ssl) as client:
            revision = await client.put("t", b"over TLS")
            assert (await client.get("t"))[0][0].value == b"over TLS"
            watch = client.watch("t", start_revision=revision)
            try:
                assert summary(await take(watch, 1)) == [("PUT", "t", b"over TLS")]
            finally:
                await watch.aclose()
        # The system's CAs do not know the test CA.
        async with EtcdClient(etcd.client_urls) as client:
            with pytest.raises(EtcdUnavailable, match="TLS certificate rejected"):
                await client.get("t")


def test_endpoints_are_checked() -> None:
    client = EtcdClient(["http://127.0.0.1:2379/", "https://[::1]:2379"])
    assert client.endpoints == ("http://127.0.0.1:2379", "https://[::1]:2379")
    assert client.current_endpoint == "http://127.0.0.1:2379"
    for bad in (["127.0.0.1:2379"], ["http://127.0.0.1:2379/v3"], []):
        with pytest.raises(ValueError):
            EtcdClient(bad)
    with pytest.raises(ValueError) as raised:
        EtcdClient(["http://root:pa55word@127.0.0.1:2379"])
    assert "pa55word" not in str(raised.value)
    with pytest.raises(ValueError):
        EtcdClient(["http://127.0.0.1:2379"], username="root")
