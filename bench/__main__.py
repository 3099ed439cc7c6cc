"""Entry point: `python -m bench` (what `make bench` runs). `--help` lists the options."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from bench.procs import BenchError
from bench.report import (
    REPO,
    generated_block,
    machine_info,
    paired_table,
    pool_table,
    table,
    write_doc,
)
from bench.runner import Options, RunResult, estimated_seconds, run
from bench.servers import (
    DOPROXY,
    HAPROXY,
    LOG,
    NONE,
    PROXY_KEYS,
    logs,
    parse_key,
    set_workers,
    variant_key,
)
from bench.wrk import WORKLOADS, Workload
from doproxy.core.balancers import BALANCERS

RESULTS = Path(__file__).resolve().parent / "results"  # gitignored
DOCS = REPO / "docs" / "benchmarks.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="doproxy vs HAProxy vs nginx (and no proxy) with wrk, in one run. "
        "Writes bench/results/latest.md; --write-docs also updates docs/benchmarks.md.",
    )
    p.add_argument("--duration", type=int, default=5, help="whole seconds per wrk run (5)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (3)")
    p.add_argument(
        "--warmup", type=int, default=1, help="warm-up seconds per proxy, 0 for none (1)"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repetition of 2 s runs")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    p.add_argument(
        "--only",
        metavar="PROXY[,PROXY]",
        help=f"measure only these of {', '.join(PROXY_KEYS)}; "
        "haproxy is always kept as the reference for the ratios",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="before each run, wait up to this many seconds for unrelated CPU load to stop (5)",
    )
    p.add_argument(
        "--pool-sizes",
        metavar="N[,N]",
        help="the pool-size dimension (issue 12), e.g. 2,20,200: every proxy balances over N "
        "inventory entries (the two backend ports repeated), doproxy once per --balancers, "
        "health checks off, the 2 B c50 workload only; adds a table of doproxy's CPU per "
        "request by balancer and size",
    )
    p.add_argument(
        "--balancers",
        default="all",
        metavar="NAME[,NAME]",
        help=f"with --pool-sizes: doproxy's balancers to measure, or all ({', '.join(BALANCERS)})",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="also measure every proxy with an access log line written for every request "
        "(doproxy access-log-file, HAProxy option httplog to its standard output in a file, "
        "nginx access_log buffered as doproxy's): rows of their own, ratios to HAProxy with "
        "its log on",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes (doproxy workers, nginx worker_processes) or threads (HAProxy "
        "nbthread) of every proxy (1); with 2, give them both CPUs: --proxy-cpu 0,1 "
        "--load-cpu 0,1",
    )
    p.add_argument(
        "--workloads",
        metavar="N[,N]",
        help="only these of the main table's workloads, by number: "
        + ", ".join(f"{i} {w.label}" for i, w in enumerate(WORKLOADS, 1)),
    )
    p.add_argument("--proxy-cpu", default="0", help="taskset CPU list for the proxy (0)")
    p.add_argument("--load-cpu", default="1", help="taskset CPU list for wrk + backends (1)")
    return p


def _proxies(only: str | None) -> tuple[str, ...]:
    if not only:
        return PROXY_KEYS
    wanted = {name.strip().lower() for name in only.split(",") if name.strip()}
    unknown = wanted - set(PROXY_KEYS)
    if unknown:
        raise SystemExit(f"--only: unknown proxy {', '.join(sorted(unknown))}")
    wanted.add(HAPROXY)
    return tuple(k for k in PROXY_KEYS if k in wanted)


def _sizes(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        sizes = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    except ValueError:
        raise SystemExit(f"--pool-sizes: {text!r} is not a list of numbers") from None
    if not sizes or sizes[0] < 1:
        raise SystemExit("--pool-sizes: sizes must be at least 1")
    return sizes


def _balancers(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return BALANCERS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BALANCERS]
    if unknown or not names:
        raise SystemExit(f"--balancers: unknown {', '.join(unknown) or 'empty list'}")
    return names


def _pool_proxies(
    base: tuple[str, ...], sizes: tuple[int, ...], balancers: tuple[str, ...]
) -> tuple[str, ...]:
    """Every proxy at every size (no "no proxy": it has no pool), doproxy once per balancer."""
    keys: list[str] = []
    for size in sizes:
        for proxy in base:
            if proxy == DOPROXY:
                keys += [variant_key(DOPROXY, b, size) for b in balancers]
            elif proxy != NONE:
                keys.append(variant_key(proxy, "", size))
    return tuple(keys)


def options(args: argparse.Namespace) -> Options:
    set_workers(args.workers)
    pin = (os.cpu_count() or 1) >= 2
    if not pin:
        print("warning: fewer than 2 CPUs, running without taskset pinning", file=sys.stderr)
    proxies = _proxies(args.only)
    workloads: tuple[Workload, ...] = WORKLOADS
    if args.workloads:
        try:
            picked = [int(n) for n in args.workloads.split(",") if n.strip()]
            workloads = tuple(WORKLOADS[n - 1] for n in picked if n >= 1)
        except (ValueError, IndexError):
            raise SystemExit(f"--workloads: numbers 1..{len(WORKLOADS)}") from None
    sizes = _sizes(args.pool_sizes)
    if sizes:
        proxies = _pool_proxies(proxies, sizes, _balancers(args.balancers))
        workloads = (WORKLOADS[0],)  # 2 B, c50: where a proxy's own cost shows most
    if args.access_log:
        if sizes:
            raise SystemExit("--access-log and --pool-sizes: one dimension at a time")
        proxies = tuple(k for key in proxies for k in ((key,) if key == NONE else (key, key + LOG)))
    return Options(
        reps=1 if args.quick else max(1, args.reps),
        duration=2 if args.quick else max(1, args.duration),
        warmup=max(0, args.warmup),
        proxies=proxies,
        workloads=workloads,
        proxy_cpus=args.proxy_cpu if pin else None,
        load_cpus=args.load_cpu if pin else None,
        quiet_wait=max(0.0, args.quiet_wait),
    )


def _method(opts: Options) -> str:
    pinning = (
        f"proxy pinned to CPU {opts.proxy_cpus}, wrk and both backends to CPU {opts.load_cpus}"
        if opts.proxy_cpus
        else "no CPU pinning"
    )
    pools = ""
    if any(parse_key(k)[2] is not None for k in opts.proxies):
        pools = (
            "pool-size dimension: each proxy's inventory repeats the two backend ports to the "
            "pool size (HAProxy `server` lines, nginx `upstream` servers, doproxy "
            "`[[droplet]]` entries), doproxy with health checks off; ratios are to HAProxy "
            "with the same pool size; "
        )
    if any(logs(k) for k in opts.proxies):
        pools += (
            "rows marked access log: every request logged to a file in the temporary run "
            "folder (doproxy `access-log-file`, combined format, its 64 KiB buffer flushed "
            "within a second; HAProxy `option httplog` with `log stdout format raw`, its "
            "standard output a file; nginx `access_log ... combined buffer=64k flush=1s`), "
            "the file counted and emptied between runs; ratios to HAProxy with its log on; "
        )
    return pools + (
        f"`wrk -t1 --latency`, {opts.reps} run{'s' if opts.reps > 1 else ''} of "
        f"{opts.duration} s per (proxy, workload), "
        f"interleaved, medians reported; {pinning}; two nginx backends on 127.0.0.1 with "
        "keep-alive from every proxy; proxy CPU = utime + stime of all its processes "
        "from /proc, divided by the requests wrk completed; errors = wrk socket errors + "
        "responses ≥ 400, summed over the repetitions; noisy = runs during which other processes "
        "used more than 10 % of a CPU (their req/s and latency are suspect)"
    )


def _save(result: RunResult, block: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text("# Latest benchmark run\n\n" + block)
    raw = [
        {
            "proxy": s.proxy,
            "workload": s.workload.label,
            "rep": s.rep,
            **asdict(s.wrk),
            "rps": s.wrk.rps,
            "user_us_per_req": s.user_us,
            "sys_us_per_req": s.sys_us,
            "other_load_pct": s.other_load_pct,
        }
        for s in result.samples
    ]
    (RESULTS / "latest.json").write_text(json.dumps(raw, indent=1) + "\n")


def _command(argv: list[str] | None) -> str:
    """How this run was started, as a command to paste from the repository root."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return f".venv/bin/python -m bench {args}".strip()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the cleanup that stops our processes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    opts = options(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    info = machine_info()  # before the run: the doproxy commit that is measured
    minutes = estimated_seconds(opts) / 60
    print(
        f"benchmark: about {minutes:.1f} minutes, longer if other CPU load delays runs",
        file=sys.stderr,
    )
    try:
        result = run(opts, lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    body = table(result.samples, opts.proxies, opts.workloads)
    if paired := paired_table(result.samples, opts.proxies, opts.workloads):
        body += (
            "\n\nThe same ratios repetition by repetition (each repetition runs every proxy back "
            "to back, so these are less affected by the machine's slow drift than the ratios of "
            "medians above):\n\n" + paired
        )
    if pools := pool_table(result.samples, opts.proxies, opts.workloads[0]):
        body += "\n\ndoproxy by balancer and pool size:\n\n" + pools
    block = generated_block(body, info, _command(argv), _method(opts), result.problems)
    _save(result, block)
    print(block)
    if args.write_docs:
        write_doc(DOCS, block)
        print(f"updated {DOCS.relative_to(REPO)}", file=sys.stderr)
    if result.failed:
        print(f"failed: {', '.join(result.failed)}", file=sys.stderr)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
