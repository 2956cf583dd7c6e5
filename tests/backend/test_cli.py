"""The `pagedserve` command as a user meets it: one line per mistake, help for every flag."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.backend import cli
from pagedserve.backend.cli import EXIT_FAILURE, EXIT_INTERRUPTED, build_parser, main


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_model_directory_without_config_is_one_line_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--model", str(tmp_path), "--device", "cpu", "hi"]) == EXIT_FAILURE
    line = _one_error_line(capsys)
    assert line.startswith("pagedserve generate: error:") and "no config.json" in line
    assert "--model takes a local Hugging Face model directory" in line


def test_cuda_without_a_gpu_is_one_line_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--device", "cuda", "hi"]) == EXIT_FAILURE
    line = _one_error_line(capsys)
    assert "--device cuda" in line and "sees no CUDA GPU" in line and "--device cpu" in line


def test_ctrl_c_ends_a_command_with_130_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, "generate", interrupted))
    assert main(["generate", "hi"]) == EXIT_INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


def _with_func(
    parser: argparse.ArgumentParser, command: str, func: object
) -> argparse.ArgumentParser:
    _subparsers(parser)[command].set_defaults(func=func)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _every_parser(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for name, sub in _subparsers(parser).items():
        yield from _every_parser(sub, (*path, name))


def test_every_flag_of_every_command_has_help() -> None:
    missing = [
        (" ".join(path), action.option_strings or action.dest)
        for path, parser in _every_parser(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == []


def test_help_shows_the_defaults() -> None:
    commands = _subparsers(build_parser())
    serve = commands["serve"].format_help()
    for shown in ("(default: 8001)", "(default: 8002)", "(default: 4096)", "(default: 16)"):
        assert shown in " ".join(serve.split()), shown
    chat = " ".join(commands["chat"].format_help().split())
    assert "(default: 127.0.0.1:8001)" in chat and "(default: 1.0)" in chat
    assert "(default: None)" not in serve + chat  # what None means is in the help text


def test_the_top_level_lists_every_command() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in _subparsers(parser):
        assert f"\n    {command} " in text, command
    assert {"serve", "generate", "chat", "bench", "traces", "worker"} <= set(_subparsers(parser))
