"""The error boundary: bad input is one line and status 2; bugs, exit statuses and argparse pass."""

from __future__ import annotations

import pytest

from deepsuite.errors import (
    EXIT_USER_ERROR,
    CheckpointError,
    ConfigError,
    DataError,
    DeepsuiteError,
    LaunchError,
    run_main,
)


def _raises(err: BaseException):
    def main(argv: list[str]) -> int:
        raise err

    return main


@pytest.mark.parametrize("cls", [ConfigError, DataError, CheckpointError, LaunchError])
def test_known_errors_are_one_line_and_status_2(cls, capsys, monkeypatch):
    monkeypatch.delenv("DEEPSUITE_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert issubclass(cls, DeepsuiteError) and issubclass(cls, ValueError)  # old catches hold
    assert run_main(_raises(cls("data.source: nope.jsonl not found")), [], "prog") == 2
    captured = capsys.readouterr()
    assert captured.err == "prog: error: data.source: nope.jsonl not found\n"
    assert captured.out == ""


def test_debug_shows_the_traceback_and_is_not_passed_on(capsys, monkeypatch):
    monkeypatch.delenv("DEEPSUITE_DEBUG", raising=False)
    seen: list[list[str]] = []

    def main(argv: list[str]) -> int:
        seen.append(argv)
        raise ConfigError("train.steps: expected a positive number, got 0")

    assert run_main(main, ["cfg.yaml", "--debug", "train.steps=0"], "p") == EXIT_USER_ERROR
    assert seen == [["cfg.yaml", "train.steps=0"]]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("got 0")
    monkeypatch.setenv("DEEPSUITE_DEBUG", "1")
    assert run_main(main, [], "p") == EXIT_USER_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_a_rank_prefixes_its_line(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(_raises(DataError("a\nb")), [], "p") == 2
    assert capsys.readouterr().err == "[rank 1] p: error: a\n[rank 1]   b\n"


def test_bugs_exit_statuses_and_usage_errors_pass_through():
    with pytest.raises(ZeroDivisionError):
        run_main(_raises(ZeroDivisionError("bug")), [], "p")
    with pytest.raises(SystemExit) as info:  # e.g. the trainer stopped early: status 75
        run_main(_raises(SystemExit(75)), [], "p")
    assert info.value.code == 75
    assert run_main(lambda argv: 75, [], "p") == 75
    assert run_main(lambda argv: None, [], "p") == 0
