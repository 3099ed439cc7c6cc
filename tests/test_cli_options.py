"""Global options (--config, --log-level, --version) work before and after the command."""

from __future__ import annotations

from pathlib import Path

import pytest

from doproxy import __version__
from doproxy.cli import _parser
from tests.procs import write_config
from tests.test_process import run_cli

pytestmark = pytest.mark.timeout(60)

COMMANDS = [
    ["serve"],
    ["check"],
    ["demo"],
    ["simulate"],
    ["create"],
    ["list"],
    ["add", "1"],
    ["delete", "1"],
    ["destroy", "1"],
    ["reboot", "1"],
    ["sanitize"],
    ["status"],
    ["events"],
    ["drain", "1"],
    ["enable", "1"],
    ["disable", "1"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_config_and_log_level_before_or_after_every_command(command: list[str]) -> None:
    forms = [
        ["--config", "x.toml", "--log-level", "debug", *command],
        [*command, "--config", "x.toml", "--log-level", "debug"],
        ["--log-level", "debug", *command, "--config", "x.toml"],
        ["--config", "x.toml", command[0], "--log-level", "debug", *command[1:]],
    ]
    for argv in forms:
        args = _parser().parse_args(argv)
        assert (args.config, args.log_level, args.command) == ("x.toml", "debug", command[0]), argv


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_unset_option_after_the_command_keeps_the_global_one(command: list[str]) -> None:
    args = _parser().parse_args(["--config", "x.toml", *command])
    assert (args.config, args.log_level) == ("x.toml", "info")
    args = _parser().parse_args(command)
    assert (args.config, args.log_level) == ("doproxy.toml", "info")


def test_without_a_command_the_options_still_serve() -> None:
    args = _parser().parse_args(["--config", "x.toml"])
    assert (args.config, args.command) == ("x.toml", None)


@pytest.mark.parametrize("argv", [["--version"], ["check", "--version"]])
def test_version_before_or_after_the_command(argv: list[str]) -> None:
    r = run_cli(*argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"doproxy {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        # The README's commands, as written.
        ["check", "--config", "doproxy.toml"],
        ["--config", "doproxy.toml", "check"],
        ["check"],
    ],
)
def test_the_readme_check_command_as_written(tmp_path: Path, argv: list[str]) -> None:
    write_config(tmp_path, [9001])
    r = run_cli(*argv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("doproxy.toml: ok; inventory.toml: 1 backend(s)")


def test_config_after_the_command_is_the_one_used(tmp_path: Path) -> None:
    write_config(tmp_path, [9001])
    (tmp_path / "other.toml").write_text('[loadbalancing]\ntype = "fastest"\n')
    r = run_cli("--config", "doproxy.toml", "check", "--config", "other.toml", cwd=tmp_path)
    assert r.returncode == 1
    assert "loadbalancing.type" in r.stderr
