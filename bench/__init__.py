"""doproxy vs HAProxy vs nginx, side by side in one run on one machine.

What is measured
----------------
`wrk -t1 --latency` drives each configuration with the same workloads: a 2 B and a 16 KiB body at
50 and 200 keep-alive connections, plus a `Connection: close` run (2 B, 50 connections). The
configurations are: no proxy (wrk straight at one backend: the ceiling), HAProxy with
`nbthread 1`, nginx with one worker, and doproxy. All proxies balance over the same two nginx
backends (one separate nginx instance serving static files on two 127.0.0.1 ports) and keep
their backend connections alive. The proxy under test is pinned to one CPU (`taskset -c 0`);
wrk and the backends share the other one, so the proxy's own cost decides its throughput.

Every (configuration, workload) pair runs `--reps` times (3 by default), interleaved so that slow
drift of the machine hits every proxy alike, and the table reports medians. A second table gives
each proxy's ratios to HAProxy repetition by repetition and their median: the runs of one
repetition are back to back, so their ratio is less exposed to drift than the ratio of medians.

Why CPU time per request
------------------------
Throughput alone is noisy on small cloud machines (about ±25 % between runs), and a proxy that is
the bottleneck serves about 1,000,000 / (its CPU µs per request) requests per second. So for each
run we also read utime + stime from /proc/PID/stat for *all* of the proxy's processes (nginx master
and worker, haproxy, doproxy and any children) before and after wrk, and divide the difference by
the number of requests wrk completed. User and system time are reported separately: the kernel's
loopback path costs every proxy about the same system time, and what a proxy adds in user space is
what tells them apart. Ratios to HAProxy measured in the same run are the numbers to compare
across machines and days, not the absolute values.

Because other work on a shared machine skews all of this, every run also measures the CPU that
unrelated processes used meanwhile (/proc/stat minus our own processes and wrk). Before each run
the harness waits (up to `--quiet-wait` seconds) for the machine to go idle, and the table counts
the runs that were still disturbed ("noisy") for every row.

Run it with `make bench` or `.venv/bin/python -m bench` (`--help` for the options).
"""
