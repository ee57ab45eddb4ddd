"""Every flag of every command that is cheap to start, fed values a careless or adversarial user
types: each ends in a one-line error (or, for a valid value, in the next check), never a traceback.

The flags are read from the commands themselves, so a flag added later is fuzzed too. No command
gets far enough to read images or train: each runs against a dataset that is not there (or is
empty), so a value the flag accepts stops at that check, with exit code 2.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from multiscale_dali.cli.main import main

VALUES = ("0", "-1", "nan", "inf", "-inf", "1e308", "9" * 30, "garbage", "", "1,,2", "../..")
# Per command: the arguments that stop it before any data is read (filled in with tmp_path), and
# the exit codes a run may end with (2: a bad flag or no dataset; 0: scan of an empty folder;
# 1: plot of a folder that is no run).
COMMANDS: dict[str, tuple[tuple[str, ...], frozenset[int]]] = {
    "train": (("--data", "{missing}", "--out", "{tmp}/run"), frozenset({2})),
    "evaluate": (("--checkpoint", "{missing}/best.pt"), frozenset({2})),
    "predict": (("--checkpoint", "{missing}/best.pt", "{image}"), frozenset({2})),
    "benchmark": (("--data", "{empty}"), frozenset({2})),
    "scan": (("--data", "{empty}"), frozenset({0, 2})),
    "plot": (("{missing}",), frozenset({1, 2})),
}


def _options(name: str) -> list[click.Option]:
    return [p for p in main.commands[name].params if isinstance(p, click.Option) and p.name != "help"]


def _cases() -> list[tuple[str, list[str]]]:
    """(command, the flag and its value) for every option of every fuzzed command."""
    cases = []
    for name in COMMANDS:
        for option in _options(name):
            flag = max(option.opts, key=len)
            if option.is_flag:  # a switch takes no value: turn it on (and off, where it can be)
                cases += [(name, [f]) for f in (*option.opts, *option.secondary_opts) if f.startswith("--")]
            else:
                cases += [(name, [f"{flag}={value}"]) for value in VALUES]
    return cases


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "empty").mkdir()
    (tmp / "image.jpg").write_bytes(b"not decoded: the checkpoint is missing first")
    return {"tmp": str(tmp), "missing": str(tmp / "missing"), "empty": str(tmp / "empty"),
            "image": str(tmp / "image.jpg")}


def test_every_fuzzed_command_has_flags_to_fuzz():
    assert all(_options(name) for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_of_a_command_ends_in_an_exit_code_not_a_traceback(command, places, monkeypatch):
    monkeypatch.chdir(places["tmp"])  # a relative --out or --json lands in the temporary folder
    base, allowed = COMMANDS[command]
    runner = CliRunner()
    failures = []
    for name, flag in (case for case in _cases() if case[0] == command):
        args = [command, *flag, *(arg.format(**places) for arg in base)]
        result = runner.invoke(main, ["-q", *args])
        unhandled = result.exception is not None and not isinstance(result.exception, SystemExit)
        if result.exit_code not in allowed or unhandled or "Traceback" in result.output:
            failures.append(f"msdali {' '.join(args)} -> exit {result.exit_code}: "
                            f"{result.output.strip()[-300:] or repr(result.exception)}")
    assert not failures, "\n".join(failures)
