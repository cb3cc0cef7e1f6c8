"""Every flag of every script is checked before any work: a bad value stops at once with one ``error:`` line.

One guarantee, one test: each ``utils.cli.Number`` type is tested once with its edges; a walk over
every script's ``build_parser()`` checks that each numeric flag uses one of them (a bare
``type=int`` or ``type=float`` fails here); and each script refuses one bad value as the command
line does (``utils.cli.run(main)``), in an empty folder that must stay empty.
"""

import argparse
import re

import pytest

import bench
import evaluate
import inference
import predict
import reproduce
import StudentTrain
import teacherTrain
import trainSelector
from tests.conftest import one_error_line
from utils import cli
from utils.cli import Number, run

SCRIPTS = {"teacherTrain.py": teacherTrain, "StudentTrain.py": StudentTrain, "trainSelector.py": trainSelector,
           "inference.py": inference, "predict.py": predict, "evaluate.py": evaluate, "reproduce.py": reproduce,
           "bench.py": bench}
NUMBERS = {name: value for name, value in vars(cli).items() if isinstance(value, Number)}


def options(script):
    return [action for action in SCRIPTS[script].build_parser()._actions if action.option_strings]


def flag_name(action):
    return max(action.option_strings, key=len)


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


# ----------------------------------------------------------------------------- the flag types

NUMBER_CASES = [  # (type, values inside its range and at its closed edges, values outside or at its open edges)
    ("POSITIVE_INT", ["1", "7"], ["0", "-1", "1.5", "nan", "inf", "x", ""]),
    ("NON_NEGATIVE_INT", ["0", "3"], ["-1", "0.5", "inf"]),
    ("POSITIVE", ["0.001", "1e9"], ["0", "-0.001", "nan", "inf", "-inf"]),
    ("NON_NEGATIVE", ["0", "2.5"], ["-0.001", "nan", "inf"]),
    ("PROBABILITY", ["0", "0.5", "1"], ["-0.001", "1.001", "nan"]),
    ("FRACTION", ["0.001", "0.999"], ["0", "1", "-0.5", "nan"]),
    ("UNIT_INTERVAL", ["0", "0.999"], ["1", "-0.001", "inf"]),
    ("SEED", ["0", "12345"], ["-1", "1.5", str(2**63), str(2**70)]),
]


@pytest.mark.parametrize("name, accepted, refused", NUMBER_CASES, ids=[name for name, *_ in NUMBER_CASES])
def test_each_number_type_accepts_its_range_and_names_it_when_refusing(name, accepted, refused):
    number = NUMBERS[name]
    for text in accepted:
        assert number(text) == number.kind(float(text))
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"must be {number.describe()}, not {text!r}")):
            number(text)


def test_every_number_type_is_tested():
    assert {name for name, *_ in NUMBER_CASES} == set(NUMBERS)


def test_an_experiment_name_is_a_relative_path_of_plain_names():
    for text in ["cpu", "smoke/seed0", "lr0.1_kd-T4+ema", ""]:  # "": the default, no experiment folder
        assert cli.experiment_name(text) == text
    for text in ["..", ".", "../escape", "a/../../b", "a/./b", "/abs/path", "a//b", "a/", "my run", "a\\b", "~x"]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"not {text!r}")):
            cli.experiment_name(text)


# ----------------------------------------------------------------------------- every script

@pytest.mark.parametrize("script", SCRIPTS)
def test_no_numeric_flag_goes_unvalidated(script):
    for action in options(script):
        assert action.type not in (int, float), \
            f"{script} {flag_name(action)}: use a utils.cli.Number, not {action.type.__name__}"
        numeric_default = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
        assert not numeric_default or isinstance(action.type, Number) or action.nargs == 0, \
            f"{script} {flag_name(action)} has a numeric default but no Number type"


@pytest.mark.parametrize("script", [script for script in SCRIPTS if script != "evaluate.py"])  # it has none
def test_a_bad_number_is_one_line_before_any_work(script, tmp_path, monkeypatch, capsys):
    action = next(a for a in options(script) if isinstance(a.type, Number))
    bad = "nan"
    line = refusal(SCRIPTS[script], [f"{flag_name(action)}={bad}"], tmp_path, monkeypatch, capsys)
    assert flag_name(action) in line and repr(bad) in line and action.type.describe() in line, line


@pytest.mark.parametrize("script", [script for script in SCRIPTS
                                    if any("--name" in action.option_strings for action in options(script))])
def test_every_name_flag_is_an_experiment_name(script):
    (action,) = [action for action in options(script) if "--name" in action.option_strings]
    assert action.type is cli.experiment_name, f"{script} --name: use type=utils.cli.experiment_name"


@pytest.mark.parametrize("name", ["../escape", "/elsewhere", "a/../../b"])
def test_a_name_that_leaves_the_checkpoint_folder_is_refused_before_anything_is_written(
        name, tmp_path, monkeypatch, capsys):
    name = str(tmp_path / "elsewhere") if name == "/elsewhere" else name  # absolute, but in a scratch folder
    line = refusal(teacherTrain, ["--name", name], tmp_path, monkeypatch, capsys)
    assert line.startswith("error: argument --name: must be a relative name") and repr(name) in line, line


@pytest.mark.parametrize("script", ["teacherTrain.py", "StudentTrain.py", "trainSelector.py"])
def test_a_checkpoint_path_ends_in_pt_so_that_no_other_file_is_taken_for_a_run(script, tmp_path, monkeypatch, capsys):
    line = command_line(tmp_path, monkeypatch, capsys, script, "--checkpoint", "notes.txt", "--force")
    assert line.startswith("error: argument --checkpoint: must be a path that ends in .pt, such as "
                           "checkpoints/teacher.pt, not 'notes.txt'"), line  # notes.txt was replaced with --force


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


def parsed(script, argv):
    """The flags a training script's first run goes with."""
    module = SCRIPTS[script]
    return next(iter(module.runs(module.parse_args(argv)).values()))


@pytest.mark.parametrize("script", TRAINERS)
def test_the_default_warmup_fits_any_run_and_a_given_one_must_fit_it(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert parsed(script, []).warmup_epochs == 2
    assert parsed(script, ["--epochs", "1"]).warmup_epochs == 2  # the engine keeps it to 20% of the run
    assert parsed(script, ["--epochs", "3", "--warmup-epochs", "3"]).warmup_epochs == 3
    assert parsed(script, ["--minutes", "5"]).epochs is None  # chosen by the time box
    line = refusal(SCRIPTS[script], ["--minutes", "5", "--epochs", "3"], tmp_path, monkeypatch, capsys)
    assert "give --minutes or --epochs, not both" in line


# ----------------------------------------------------------------------------- the command line itself

def command_line(tmp_path, monkeypatch, capsys, script, *argv):
    """The one error line of ``script argv`` run in ``tmp_path``, which it must leave empty."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(lambda: SCRIPTS[script].main(list(argv)), capsys)
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    return line


ISSUE_COMMANDS = [
    ("reproduce.py --seeds 0 1 0", "--seeds repeats seed 0: give each seed once"),
    ("StudentTrain.py --temperature 0", "argument --temperature: must be a number > 0, not '0'"),
    ("inference.py --batch-size 0", "argument --batch-size: must be an integer >= 1, not '0'"),
    ("teacherTrain.py --batch-size 0", "argument --batch-size: must be an integer >= 1, not '0'"),
    ("teacherTrain.py --warmup-epochs -3", "argument --warmup-epochs: must be a number >= 0, not '-3'"),
]


@pytest.mark.parametrize("command, needle", ISSUE_COMMANDS, ids=[command for command, _ in ISSUE_COMMANDS])
def test_issue_commands(command, needle, tmp_path, monkeypatch, capsys):
    line = command_line(tmp_path, monkeypatch, capsys, *command.split())
    assert needle in line and "processes" not in line, line


def test_unwritable_checkpoint_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    line = command_line(tmp_path, monkeypatch, capsys, "teacherTrain.py", "--checkpoint", "/proc/nope/t.pt",
                        "--data-dir", str(tmp_path / "no-such-data"))
    assert "output folder /proc/nope" in line and "no-such-data" not in line, line


@pytest.mark.parametrize("module", SCRIPTS.values(), ids=SCRIPTS)
def test_help_names_each_default_once_and_offers_only_flags_that_act(module):
    text = module.build_parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in text.split("\n  -")[1:]:
        assert block.count("default:") <= 1, block
    if module is inference:  # flags that once did nothing there
        for flag in ("--compile", "--seed", "--holdout", "--split-seed", "--limit"):
            assert flag not in text, flag
