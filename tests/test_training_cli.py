"""The training commands' flags come from the config dataclasses' fields: every field has a flag, the defaults
round-trip, and a flag set on the command line reaches its field by name."""

from __future__ import annotations

import argparse
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
    args = _parser().parse_args(["--method", "coop", "--depth", "3", "--lr", "0.5", "--warmup", "0.2", "--no-augment",
                                 "--grad-clip", "1.5", "--steps", "7", "--num-groups", "2", "--threshold", "median",
                                 "--keep-checkpoints", "1"])
    assert cli.prompt_config(args) == PromptConfig(method="coop", depth=3)
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
