"""`doproxy simulate`: the policy on modelled workloads, with a virtual clock (no time passes)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from doproxy import cli
from doproxy.core.settings import Provisioning
from doproxy.errors import DoproxyError
from doproxy.simulate import (
    DEMO_POLICY,
    WORKLOADS,
    Model,
    Result,
    direction_changes,
    plot,
    simulate,
    steady_phases,
    summary,
    workload,
)

HOURS3 = 3 * 3600.0
PNG = b"\x89PNG\r\n\x1a\n"


def run(name: str, policy: Provisioning = DEMO_POLICY, seed: int = 1, **kw: float) -> Result:
    rng = random.Random(seed)
    duration = kw.pop("duration", HOURS3)
    return simulate(policy, workload(name, duration, rng), duration, rng=rng)


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    return {name: run(name) for name in WORKLOADS}


def sizes(res: Result) -> list[int]:
    return [d.size_after for d in res.actions]


def test_step_grows_then_shrinks_back(results: dict[str, Result]) -> None:
    res = results["step"]
    acts = res.actions
    ups = [d for d in acts if d.action == "up"]
    downs = [d for d in acts if d.action == "down"]
    # The step comes at 20 min and leaves at 1h30m: every scale-up is inside it, every
    # scale-down after it, and the pool ends where it began.
    assert ups and downs
    assert all(1200 < d.now < 5400 for d in ups)
    assert all(d.now > 5400 for d in downs)
    assert sizes(res) == [2, 3, 4, 3, 2, 1]
    assert res.serving[0] == 1 and res.serving[-1] == 1
    # At four backends the load (3 machines' worth) is carried: latency below 500 ms.
    settled = [x for t, x in zip(res.times, res.latency, strict=True) if 2700 < t < 5400]
    assert all(x is not None and x < 1.0 for x in settled)
    assert res.machine_seconds / 60 < 6 * 180  # far from "max-backends all the time"


def test_ramp_follows_the_load_up_and_down(results: dict[str, Result]) -> None:
    res = results["ramp"]
    assert res.peak_size >= 4
    up_then_down = [d.action for d in res.actions]
    first_down = up_then_down.index("down")
    assert set(up_then_down[:first_down]) == {"up"}
    assert set(up_then_down[first_down:]) == {"down"}


def test_a_surge_is_scaled_up_for(results: dict[str, Result]) -> None:
    res = results["spike"]
    ups = [d for d in res.actions if d.action == "up"]
    # The surge at 60 % (lasting half an hour): scaled up. The bursts of 40 to 60 s before it
    # build seconds of backlog: with the demo's 2m window their mean may cross 500 ms once
    # (the sweep below bounds what follows).
    assert any(0.6 * HOURS3 < d.now < 0.6 * HOURS3 + 1800 for d in ups)


def test_noisy_steady_load_does_not_flap(results: dict[str, Result]) -> None:
    res = results["noisy"]
    # Two backends carry it; the slow wander may justify one more for a while, no more.
    assert len(res.actions) <= 2
    assert res.serving[0] == 2 and res.peak_size <= 3
    # The noise is real: latency crosses both thresholds' neighbourhood now and then.
    seen = [x for x in res.latency if x is not None]
    assert max(seen) > 0.5 and min(seen) < 0.2


def test_every_run_stays_within_min_and_max(results: dict[str, Result]) -> None:
    for res in results.values():
        sized = [s + p for s, p in zip(res.serving, res.provisioning, strict=True)]
        assert max(sized) <= DEMO_POLICY.max_backends
        assert min(sized) >= DEMO_POLICY.min_backends


def test_a_small_max_is_respected_and_said() -> None:
    p = DEMO_POLICY.model_copy(update={"max_backends": 2})
    res = run("step", p)
    assert res.peak_size == 2
    assert any(d.kind == "at-max" for d in res.decisions)
    assert res.dropped > 0  # two backends cannot carry three machines' worth


def test_target_mode_tracks_the_load() -> None:
    p = DEMO_POLICY.model_copy(update={"mode": "target", "target_latency": 0.3, "max_step": 2})
    res = run("step", p)
    assert res.peak_size >= 4
    assert res.serving[-1] <= 2
    assert any(d.desired is not None for d in res.actions)


def test_runs_are_reproducible_and_the_seed_matters() -> None:
    a, b, c = (
        run("noisy", seed=5, duration=1800),
        run("noisy", seed=5, duration=1800),
        run("noisy", seed=6, duration=1800),
    )
    assert a.latency == b.latency and a.decisions == b.decisions
    assert a.latency != c.latency


def test_the_model_is_m_m_c() -> None:
    m = Model(service_time=0.1, concurrency=1)
    assert m.capacity == 10.0
    assert m.latency(0.0) == pytest.approx(0.1)
    assert m.latency(5.0) == pytest.approx(0.1 / (1 - 0.5))  # M/M/1: s / (1 - rho)
    # M/M/2 at 10 req/s (rho 0.5): Erlang C = 1/3, wait = C / (c mu - lambda) = 1/30 s.
    m2 = Model(service_time=0.1, concurrency=2)
    assert m2.latency(10.0) == pytest.approx(0.1 + 1 / 30)
    # Latency rises sharply near saturation, and stays finite at and above it (the backlog
    # term of the simulation carries the rest).
    assert m.latency(9.0) > 5 * m.latency(5.0)
    assert m.latency(50.0) == m.latency(10.0) < 10


def test_summary_lists_decisions_with_reasons_and_totals(results: dict[str, Result]) -> None:
    text = summary(results["step"])
    assert "0:20:05 * scale up 1→2: mean latency" in text
    assert "> 500 ms over 2m; first scale-up" in text
    assert "cooldown: next scale-up in" in text
    assert "result: 3 scale-up(s), 3 scale-down(s); max latency" in text
    assert "machine-minutes" in text


def test_plot_writes_a_png(tmp_path: Path, results: dict[str, Result]) -> None:
    one = tmp_path / "one.png"
    plot([results["step"]], one)
    assert one.read_bytes().startswith(PNG)
    grid = tmp_path / "grid.png"
    plot(list(results.values()), grid)
    assert grid.read_bytes().startswith(PNG)


def test_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, results: dict[str, Result]
) -> None:
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed"
    with pytest.raises(DoproxyError, match=r"pip install 'doproxy\[plot\]'"):
        plot([results["noisy"]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return int(e.value.code or 0)


def test_cli_with_demo_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.png"
    argv = ["--config", str(tmp_path / "none.toml"), "simulate", "--workload", "spike"]
    assert exit_code([*argv, "--duration", "1h", "--plot", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "policy: demo values (" in text and "none.toml not found)" in text
    assert "workload spike, 1h of virtual time" in text
    assert f"plot written to {out}" in text
    assert out.read_bytes().startswith(PNG)


def test_cli_uses_the_configs_provisioning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "doproxy.toml"
    config.write_text(
        '[provisioning]\nmin-backends = 2\nmax-backends = 3\nupscale-time = "1m"\n',
        encoding="utf-8",
    )
    argv = ["--config", str(config), "simulate", "--workload", "all", "--duration", "40m"]
    assert exit_code([*argv, "--concurrency", "2", "--service-time", "50ms"]) == 0
    text = capsys.readouterr().out
    assert f"policy: [provisioning] of {config} (enable = false there" in text
    assert "2..3 backends" in text
    assert text.count("workload ") == 4
    assert "2 x 50 ms per backend (40 req/s each)" in text


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    none = str(tmp_path / "none.toml")
    assert exit_code(["--config", none, "simulate", "--duration", "3 hours"]) == 1
    assert "--duration" in capsys.readouterr().err
    assert exit_code(["--config", none, "simulate", "--service-time", "0s"]) == 1
    assert "--service-time" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[provisioning]\nmin-backends = 5\nmax-backends = 2\n", encoding="utf-8")
    assert exit_code(["--config", str(bad), "simulate"]) == 1
    assert "min-backends" in capsys.readouterr().err


SWEEP = [(mode, name) for mode in ("threshold", "target") for name in WORKLOADS]


@pytest.mark.parametrize(("mode", "name"), SWEEP)
def test_at_most_one_direction_change_per_steady_phase(mode: str, name: str) -> None:
    """Issue 10, item 7: every built-in workload, five seeds, 3 virtual hours each."""
    p = DEMO_POLICY
    if mode == "target":
        p = p.model_copy(update={"mode": "target", "target_latency": 0.3, "max_step": 2})
    for seed in range(1, 6):
        rng = random.Random(f"{seed}:{name}")
        res = simulate(p, workload(name, HOURS3, rng), HOURS3, rng=rng)
        changes = direction_changes(res, steady_phases(name, HOURS3))
        assert max(changes) <= 1, (seed, changes, [d.reason for d in res.actions])
