"""common.py: every script answers --help and -h with what it does, each option with its
type, default and the comment beside its field, and (train.py) the presets."""

from typing import NamedTuple

import pytest

import common
import eval as evaluation
import generate
import train
import transformer
import visualize
from conftest import run_script


class Example(NamedTuple):
    steps: int = 3        # how many: a comment
                          # that goes on here
    rate: float | None = None  # None: none
    name: str = "x"


def test_help_text_lists_each_field_with_type_default_and_whole_comment():
    text = common.help_text("Does a thing.\n\nAt length.", [Example()], None)
    lines = text.splitlines()
    assert lines[:3] == ["Does a thing.", "", "At length."]
    assert "  --steps=3  (int)  how many: a comment that goes on here" in lines
    assert "  --rate=None  (float | None)  None: none" in lines
    assert "  --name='x'  (str)" in lines


@pytest.mark.parametrize("script,configs,flag", [
    ("train.py", [train.CONFIG, transformer.HPARAMS], "--help"),
    ("train.py", [train.CONFIG, transformer.HPARAMS], "-h"),
    ("eval.py", [evaluation.CONFIG], "-h"), ("generate.py", [generate.CONFIG], "--help"),
    ("visualize.py", [visualize.CONFIG], "-h"), ("bench.py", [transformer.HPARAMS], "--help"),
    ("data.py", [], "-h")])
def test_every_script_answers_help_and_exits_0(script, configs, flag):
    result = run_script(script, flag, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(open(script, encoding="utf-8").read().split('"""')[1].split("\n")[0])
    for config in configs:
        comments = common.field_comments(type(config))
        for name, default in config._asdict().items():
            line = next(line for line in out.splitlines() if line.startswith(f"  --{name}="))
            assert line.startswith(f"  --{name}={default!r}  (")
            assert comments[name].split()[0] in line
    if script == "train.py":
        for name in train.PRESETS:
            assert f"\n  {name}: " in out
