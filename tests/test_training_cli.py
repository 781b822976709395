"""The training commands' flags come from the config dataclasses' fields: every field has a flag, the defaults
round-trip, and a flag set on the command line reaches its field by name."""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import fields

import pytest

from mmap_model import PromptConfig
from training import cli
from training.configs import GroupingConfig
from training.data import SplitConfig
from training.trainer import TrainConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.add_data_args(parser, required=False)
    cli.add_prompt_args(parser)
    cli.add_train_args(parser)
    cli.add_grouping_args(parser, count_flag="--num-groups")
    return parser


@pytest.mark.parametrize("cls, build", [(PromptConfig, cli.prompt_config), (TrainConfig, cli.train_config),
                                        (GroupingConfig, cli.grouping_config), (SplitConfig, cli.split_config)])
def test_every_field_has_a_flag_and_the_defaults_round_trip(cls, build):
    args = _parser().parse_args([])
    prefix = cli.GROUPING if cls is GroupingConfig else ""
    assert all(hasattr(args, prefix + f.name) for f in fields(cls)), [f.name for f in fields(cls)]
    assert build(args) == cls()


def test_flags_reach_their_fields_by_name():
    args = _parser().parse_args(["--method", "maple", "--depth", "3", "--lr", "0.5", "--warmup", "0.2", "--no-augment",
                                 "--grad-clip", "1.5", "--steps", "7", "--num-groups", "2", "--threshold", "median",
                                 "--keep-checkpoints", "1"])
    assert cli.prompt_config(args) == PromptConfig(method="maple", depth=3)
    assert cli.train_config(args) == TrainConfig(lr=0.5, warmup_fraction=0.2, augment=False, grad_clip=1.5, steps=7,
                                                 keep_checkpoints=1)
    assert cli.grouping_config(args) == GroupingConfig(groups=2, threshold="median")
    assert cli.grouping_config(_parser().parse_args(["--threshold", "0.1"])).threshold == 0.1
    assert cli.split_config(_parser().parse_args(["--shots", "4", "--split-seed", "3"])) == SplitConfig(shots=4,
                                                                                                         split_seed=3)
    with pytest.raises(SystemExit):  # --shots and --fraction are one choice
        _parser().parse_args(["--shots", "4", "--fraction", "0.5"])


def test_configs_are_built_by_keyword_only():
    with pytest.raises(TypeError):
        PromptConfig("mmap")  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig(10)  # type: ignore[misc]


COMMANDS = ["fit", "group", "publish", "bench", "frontier", "fewshot", "pretrain", "data", "evaluate", "synthetic"]


def _help_entries(text: str) -> dict[str, str]:
    """{first option string: its whole help entry, lines joined} of a --help text."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"  (-\S+?)[,\s]", line + " ")
        if start:
            current = start.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it_in_help(command, monkeypatch, capsys):
    parsers: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"training.{command}").main(["--help"])
    assert done.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    (parser,) = parsers
    takes_value = [a for a in parser._actions if a.option_strings and a.nargs != 0 and a.default is not None]
    assert takes_value
    missing = [a.option_strings[0] for a in takes_value if "default" not in entries[a.option_strings[0]]]
    assert not missing, f"python -m training.{command} --help shows no default for {missing}"


@pytest.mark.parametrize("command", ["fit", "group", "bench"])
def test_a_setting_the_method_does_not_use_is_a_usage_error(command, capsys):
    """Refused while parsing, before any data is read: argparse's usage line and one error line, no traceback."""
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(f"training.{command}").main(["--data", "missing", "--out", "missing",
                                                             "--method", "maple", "--rank", "3"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.startswith("usage:") and "Traceback" not in err
    assert err.rstrip().endswith("error: rank applies only to method mmap; maple does not use it")


def test_the_parameter_count_command_refuses_it_too(capsys):
    from mmap_model import params

    with pytest.raises(SystemExit) as refused:
        params.main(["--method", "coop", "--source-dim", "16"])
    assert refused.value.code == 2 and "source_dim applies only to method mmap; coop does not use it" in \
        capsys.readouterr().err
