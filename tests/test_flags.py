"""Every flag of every script is checked before any work: a bad value stops at once with one ``error:`` line.

The numeric flags are discovered from each script's ``build_parser()``: a flag typed by a
``utils.cli.Number`` has its invalid values derived from the bounds it declares, so a flag
added later is covered without editing this file, and a bare ``type=int`` or ``type=float``
fails here. Every refusal runs the script's real entry point as the command line does
(``utils.cli.run(main)``) in an empty folder, which must stay empty.
"""

import os
import subprocess
import sys

import pytest

import bench
import evaluate
import inference
import reproduce
import StudentTrain
import teacherTrain
import trainSelector
from tests.conftest import REPO
from utils.cli import Number, run

SCRIPTS = {"teacherTrain.py": teacherTrain, "StudentTrain.py": StudentTrain, "trainSelector.py": trainSelector,
           "inference.py": inference, "reproduce.py": reproduce, "bench.py": bench}


def options(script):
    return [action for action in SCRIPTS[script].build_parser()._actions if action.option_strings]


def flag_name(action):
    return max(action.option_strings, key=len)


def numeric_flags():
    """``(script, flag, Number)`` of every numeric flag of every script."""
    return [(script, flag_name(action), action.type)
            for script in SCRIPTS for action in options(script) if isinstance(action.type, Number)]


def _text(value):
    return format(value, "g")


def invalid_values(number):
    """At and beyond each open bound, beyond each closed one, non-finite values and, for integers, a fraction."""
    step = 1 if number.kind is int else 0.001
    values = []
    if number.low is not None:
        values += [number.low] if number.low_open else []
        values += [number.low - step, number.low - 1]
    if number.high is not None:
        values += [number.high] if number.high_open else []
        values += [number.high + step, number.high + 1]
    texts = [_text(v) for v in values] + ["nan", "inf", "-inf"] + (["1.5"] if number.kind is int else [])
    return list(dict.fromkeys(texts))


def edge_values(number):
    """Each closed bound, and the value just inside each open one."""
    step = 1 if number.kind is int else 0.001
    values = []
    if number.low is not None:
        values.append(number.low + step if number.low_open else number.low)
    if number.high is not None:
        values.append(number.high - step if number.high_open else number.high)
    return list(dict.fromkeys(_text(v) for v in values))


# The edge values the issue names, on top of every Number's bounds.
ISSUE_EDGE_VALUES = [("teacherTrain.py", "--holdout", "0"), ("teacherTrain.py", "--ema", "0"),
                     ("teacherTrain.py", "--label-smoothing", "0"), ("StudentTrain.py", "--alpha", "0"),
                     ("StudentTrain.py", "--alpha", "1")]

INVALID = [pytest.param(script, flag, value, id=f"{script} {flag}={value}")
           for script, flag, number in numeric_flags() for value in invalid_values(number)]
EDGES = [pytest.param(script, flag, value, id=f"{script} {flag}={value}")
         for script, flag, value in dict.fromkeys(
             [(script, flag, value) for script, flag, number in numeric_flags() for value in edge_values(number)]
             + ISSUE_EDGE_VALUES)]


def refusal(module, argv, tmp_path, monkeypatch, capsys):
    """The one stderr line of ``module.main(argv)`` run as on the command line, which must exit 2 and write nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run(lambda: module.main(argv))
    out, err = capsys.readouterr()
    assert stop.value.code == 2, err
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    return lines[0]


# ----------------------------------------------------------------------------- discovered flags

def test_every_script_has_numeric_flags():
    found = {script for script, _, _ in numeric_flags()}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_numeric_flag_goes_unvalidated(script):
    for action in options(script):
        assert action.type not in (int, float), \
            f"{script} {flag_name(action)}: use a utils.cli.Number, not {action.type.__name__}"
        numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        assert not numeric_default or isinstance(action.type, Number) or action.nargs == 0, \
            f"{script} {flag_name(action)} has a numeric default but no Number type"


@pytest.mark.parametrize("script, flag, value", INVALID)
def test_invalid_value_is_refused_in_one_line(script, flag, value, tmp_path, monkeypatch, capsys):
    line = refusal(SCRIPTS[script], [f"{flag}={value}"], tmp_path, monkeypatch, capsys)
    assert flag in line and repr(value) in line, line


@pytest.mark.parametrize("script, flag, value", EDGES)
def test_edge_value_is_accepted(script, flag, value):
    action = next(a for a in options(script) if flag in a.option_strings)
    args = SCRIPTS[script].build_parser().parse_args([f"{flag}={value}"])
    parsed = getattr(args, action.dest)
    assert (parsed[0] if action.nargs == "+" else parsed) == action.type.kind(float(value))


@pytest.mark.parametrize("script, flag, value", ISSUE_EDGE_VALUES, ids=lambda v: v)
def test_issue_edge_values_pass_every_check(script, flag, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SCRIPTS[script].parse_args([flag, value])
    assert getattr(args, flag[2:].replace("-", "_")) == float(value)
    assert list(tmp_path.iterdir()) == []


def test_derived_values():
    assert invalid_values(Number(int, 1)) == ["0", "nan", "inf", "-inf", "1.5"]
    assert invalid_values(Number(float, 0, 1, low_open=True, high_open=True)) == \
        ["0", "-0.001", "-1", "1", "1.001", "2", "nan", "inf", "-inf"]
    assert edge_values(Number(float, 0, 1, high_open=True)) == ["0", "0.999"]
    assert edge_values(Number(float, 0, 1)) == ["0", "1"]


# ----------------------------------------------------------------------------- checks across flags

TRAINERS = ["teacherTrain.py", "StudentTrain.py"]


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("argv, needle", [
    (["--warmup-epochs", "5", "--epochs", "3"], "--warmup-epochs 5 is longer than the run"),
    (["--resume", "--force"], "--resume continues a run and --force replaces it"),
    (["--limit", "100", "--batch-size", "512"], "--batch-size 512 is larger than the training split (100 images)"),
    (["--holdout", "50000"], "--holdout 50000 leaves no training images"),
], ids=["warmup-longer-than-run", "resume-and-force", "batch-larger-than-split", "holdout-takes-all"])
def test_flags_that_contradict_each_other_are_refused(script, argv, needle, tmp_path, monkeypatch, capsys):
    assert needle in refusal(SCRIPTS[script], argv, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("argv, needle", [
    (["--limit", "100", "--batch-size", "512"], "--batch-size 512"),
    (["--limit", "100", "--batch-size", "64", "--ref-batch-size", "128"], "--ref-batch-size 128"),
    (["--limit", "100", "--batch-size", "64", "--ref-batch-size", "64"], "--infer-batch-size 1024"),
    (["--holdout", "50000"], "--holdout 50000 leaves no training images"),
], ids=["batch", "ref-batch", "infer-batch", "holdout"])
def test_bench_refuses_batches_larger_than_the_split_before_decoding(argv, needle, tmp_path, monkeypatch, capsys):
    line = refusal(bench, ["--data-dir", str(tmp_path / "missing"), *argv], tmp_path, monkeypatch, capsys)
    assert needle in line, line


@pytest.mark.parametrize("script", TRAINERS)
def test_default_warmup_is_capped_by_a_short_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SCRIPTS[script].parse_args([]).warmup_epochs == 2
    assert SCRIPTS[script].parse_args(["--epochs", "1"]).warmup_epochs == 1
    assert SCRIPTS[script].parse_args(["--epochs", "3", "--warmup-epochs", "3"]).warmup_epochs == 3


# ----------------------------------------------------------------------------- the command line itself

def command_line(tmp_path, script, *argv):
    result = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    return lines[0]


ISSUE_COMMANDS = [
    ("StudentTrain.py --temperature 0", "argument --temperature: must be a number > 0, not '0'"),
    ("inference.py --batch-size 0", "argument --batch-size: must be an integer >= 1, not '0'"),
    ("teacherTrain.py --batch-size 0", "argument --batch-size: must be an integer >= 1, not '0'"),
    ("teacherTrain.py --warmup-epochs -3", "argument --warmup-epochs: must be a number >= 0, not '-3'"),
]


@pytest.mark.parametrize("command, needle", ISSUE_COMMANDS, ids=[command for command, _ in ISSUE_COMMANDS])
def test_issue_commands(command, needle, tmp_path):
    line = command_line(tmp_path, *command.split())
    assert needle in line and "processes" not in line, line


def test_unwritable_checkpoint_is_refused_before_the_data_is_read(tmp_path):
    line = command_line(tmp_path, "teacherTrain.py", "--checkpoint", "/proc/nope/t.pt",
                        "--data-dir", str(tmp_path / "no-such-data"))
    assert "output folder /proc/nope" in line and "no-such-data" not in line, line


@pytest.mark.parametrize("module", [*SCRIPTS.values(), evaluate], ids=[*SCRIPTS, "evaluate.py"])
def test_help_names_each_default_once_and_offers_only_flags_that_act(module):
    text = module.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in text.split("\n  -")[1:]:
        assert block.count("default:") <= 1, block
    if module is inference:  # flags that once did nothing there
        for flag in ("--compile", "--seed", "--holdout", "--split-seed", "--limit"):
            assert flag not in text, flag
