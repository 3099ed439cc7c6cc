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
from bench.report import REPO, generated_block, machine_info, table, write_doc
from bench.runner import Options, RunResult, estimated_seconds, run
from bench.servers import HAPROXY, PROXY_KEYS

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


def options(args: argparse.Namespace) -> Options:
    pin = (os.cpu_count() or 1) >= 2
    if not pin:
        print("warning: fewer than 2 CPUs, running without taskset pinning", file=sys.stderr)
    return Options(
        reps=1 if args.quick else max(1, args.reps),
        duration=2 if args.quick else max(1, args.duration),
        warmup=max(0, args.warmup),
        proxies=_proxies(args.only),
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
    return (
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
