"""Faults a long run meets, and what is left after each: pre-emption, a hard kill, divergence, an
unwritable or full disk, a read-only checkpoint folder, an incomplete copy of the data, a rerun over
an existing run, and a second run on the output of one still going.

The runs are tiny teachers (googlenet, a few images of a synthetic CIFAR-10, on the CPU): most have 8
training images in batches of 2, so that an epoch has 4 steps and a run can stop between them.
"""

import errno
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import teacherTrain
import utils.checkpoint
import utils.data
import utils.engine
import utils.lock
import utils.networks
import utils.runs
import utils.runtime
from tests.conftest import REPO, one_error_line, write_tree
from utils.checkpoint import load_checkpoint
from utils.cli import UserError
from utils.data import DataError, load_cifar10
from utils.engine import learning_rate, warmup_steps
from utils.runs import prepare_run

STEPS = 4  # steps per epoch of `flags`: 8 training images in batches of 2
TIMING = ("images_per_s", "elapsed_s")  # the only metrics that differ between two runs of one command


class Killed(BaseException):
    """The process killed outright: nothing after it runs."""


def flags(tree, checkpoint, *extra, epochs=2, limit=8, holdout=10):
    """Every epoch saved (--save-every 0), as a run saves when minutes pass between its epochs."""
    return ["--data-dir", str(tree), "--arch", "googlenet", "--holdout", str(holdout), "--limit", str(limit),
            "--batch-size", "2", "--epochs", str(epochs), "--device", "cpu", "--checkpoint", str(checkpoint),
            "--partial-data", "--save-every", "0", *extra]


def tiny_flags(tree, checkpoint, *extra, epochs=2):
    """One step per epoch (2 training images), no hold-out split: the cheapest run."""
    return flags(tree, checkpoint, *extra, epochs=epochs, limit=2, holdout=0)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoints(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith("."))


def hidden(folder):
    """Temporary files (``.<name>.<pid>.tmp``) and probes: a finished command leaves none."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tensors(value):
    """Every tensor inside a checkpoint: weights, optimizer and EMA state, running sums."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def all_finite(path):
    return all(torch.isfinite(t).all() for t in tensors(load(path)) if t.is_floating_point())


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def assert_same_run(checkpoint, reference):
    """Bit-identical weights (best and last), and the same metrics, epoch by epoch."""
    for mine, theirs in ((checkpoint, reference), (checkpoint.with_suffix(".last.pt"),
                                                     reference.with_suffix(".last.pt"))):
        a, b = load(mine)["model"], load(theirs)["model"]
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, (mine.name, differing[:5])
    history = load(checkpoint.with_suffix(".last.pt"))["history"]
    assert without_timing(history) == without_timing(load(reference.with_suffix(".last.pt"))["history"])
    logged = [json.loads(line) for line in checkpoint.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert without_timing(logged) == without_timing(history)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tree = write_tree(tmp_path_factory.mktemp("data") / "cifar")
    load_cifar10(tree, verbose=False, allow_partial=True)  # decoded once: subprocesses read the shared cache
    return tree


@pytest.fixture(scope="module")
def uninterrupted(tree, tmp_path_factory):
    """The run every interrupted one is compared with: two epochs of 4 steps, in one go."""
    checkpoint = tmp_path_factory.mktemp("uninterrupted") / "teacher.pt"
    teacherTrain.main(flags(tree, checkpoint))
    return checkpoint


# ----------------------------------------------------------------------------- pre-emption

def signal_during_step(monkeypatch, signum, call):
    """The ``call``-th training step of the run (counted from 1) receives ``signum`` as it starts."""
    train_step, calls = utils.engine.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(utils.engine, "train_step", step)


@pytest.mark.parametrize("signum,call,extra,stopped_at", [
    (signal.SIGTERM, 2, (), (0, 2)),  # mid-epoch 1: resume at epoch 1, step 3
    (signal.SIGINT, 7, ("--force",), (1, 3)),  # mid-epoch 2, in a run started with --force
    (signal.SIGTERM, 4, (), (1, 0)),  # the last step of epoch 1: the epoch ends first
], ids=["sigterm-mid-epoch-1", "sigint-mid-epoch-2-forced", "sigterm-end-of-epoch-1"])
def test_a_signal_stops_after_the_step_and_resume_ends_like_an_uninterrupted_run(
        tree, tmp_path, monkeypatch, capsys, own_handlers, uninterrupted, signum, call, extra, stopped_at):
    handler, received = own_handlers
    checkpoint = tmp_path / "teacher.pt"
    signal_during_step(monkeypatch, signum, call)
    with pytest.raises(SystemExit) as e:
        teacherTrain.main(flags(tree, checkpoint, *extra))
    assert e.value.code == 128 + signum
    assert received == []  # the signal asked training to stop; nothing else saw it
    assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler

    out = capsys.readouterr().out
    epoch, step = stopped_at
    state = load(checkpoint.with_suffix(".last.pt"))
    assert (state["epoch"], state["step"]) == (epoch, step) and state["complete"] is False
    reference = load(uninterrupted.with_suffix(".last.pt"))["history"]
    assert without_timing(state["history"]) == without_timing(reference[:epoch])
    name = signal.Signals(signum).name
    where = f"at epoch {epoch + 1}/2, step {step}/{STEPS}" if step else f"after epoch {epoch}/2"
    assert f"{name}: stopped {where}" in out
    command = re.findall(r"continue with: (.*)$", out, re.M)[-1]
    python, script, *argv = shlex.split(command)
    assert (python, script) == ("python", "teacherTrain.py") and "--resume" in argv and "--force" not in argv

    monkeypatch.undo()
    teacherTrain.main(argv)  # the printed command, as the user would paste it
    assert signal.getsignal(signal.SIGINT) is handler and signal.getsignal(signal.SIGTERM) is handler
    final = load(checkpoint)
    assert final["complete"] is True and final["epochs_run"] == 2
    assert_same_run(checkpoint, uninterrupted)


def test_a_signal_during_the_final_test_evaluation_stops_there_and_resume_only_evaluates(
        tree, tmp_path, monkeypatch, capsys, own_handlers, uninterrupted):
    checkpoint = tmp_path / "teacher.pt"
    evaluate, calls = utils.engine.evaluate, []

    def signalled_at_the_test_split(model, loader, runtime, tta="none", metric=None, stop=None):
        if stop is not None:  # only the final test evaluation is handed the stop signal
            calls.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(model, loader, runtime, tta, metric or utils.engine.classification_metric, stop)

    monkeypatch.setattr(utils.engine, "evaluate", signalled_at_the_test_split)
    with pytest.raises(SystemExit) as e:
        teacherTrain.main(flags(tree, checkpoint))
    assert e.value.code == 128 + signal.SIGTERM and calls == [1]
    out = capsys.readouterr().out
    assert "SIGTERM: stopped during the final test evaluation (every epoch is saved); continue with: python " \
           "teacherTrain.py" in out and "--resume" in out.splitlines()[-1]
    assert load(checkpoint)["complete"] is False and load(checkpoint.with_suffix(".last.pt"))["complete"] is True

    monkeypatch.undo()
    teacherTrain.main(flags(tree, checkpoint, "--resume"))
    assert "every epoch is done, the test evaluation follows" in capsys.readouterr().out
    assert load(checkpoint)["complete"] is True
    assert_same_run(checkpoint, uninterrupted)


def test_a_signal_between_batches_of_logits_stops_with_one_line_and_the_command_that_continues(capsys,
                                                                                              own_handlers):
    from utils.runtime import Runtime, batched_logits, stoppable

    def model(x):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the first batch is computed
        return x.flatten(1)[:, :10]

    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(SystemExit) as e:
        with stoppable("labelling the selector's examples", "python trainSelector.py --name x"):
            batched_logits(model, images, Runtime(torch.device("cpu")), batch_size=2)
    assert e.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().out.strip() == ("SIGINT: stopped while labelling the selector's examples; continue "
                                               "with: python trainSelector.py --name x")
    assert own_handlers[1] == []  # the signal asked the work to stop; nothing else saw it


def test_a_signal_as_the_run_ends_stops_the_process_after_the_run_is_saved(
        tree, tmp_path, monkeypatch, capsys, own_handlers):
    checkpoint = tmp_path / "teacher.pt"
    plot_history = utils.engine.plot_history

    def signalled_while_plotting(*args, **kwargs):  # after the test evaluation, its last check of the signal
        os.kill(os.getpid(), signal.SIGINT)
        return plot_history(*args, **kwargs)

    monkeypatch.setattr(utils.engine, "plot_history", signalled_while_plotting)
    with pytest.raises(SystemExit) as e:
        teacherTrain.main(flags(tree, checkpoint))
    assert e.value.code == 128 + signal.SIGINT and own_handlers[1] == []
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"SIGINT: stopped as the run ended, complete: {checkpoint}"
    assert load(checkpoint)["complete"] is True and checkpoint.with_suffix(".curves.png").exists()


def test_a_signal_after_the_last_batch_of_logits_stops_as_the_work_ends(capsys, own_handlers):
    from utils.runtime import Runtime, batched_logits, stoppable

    def model(x):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the last batch: no batch follows to see it
        return x.flatten(1)[:, :10]

    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(SystemExit) as e:
        with stoppable("labelling the selector's examples", "python trainSelector.py --name x"):
            batched_logits(model, images, Runtime(torch.device("cpu")), batch_size=2)
        raise AssertionError("the work after the stoppable one ran")  # what would run after it, had it gone unseen
    assert e.value.code == 128 + signal.SIGTERM and own_handlers[1] == []
    assert capsys.readouterr().out.strip() == ("SIGTERM: stopped after labelling the selector's examples; continue "
                                               "with: python trainSelector.py --name x")


def test_resuming_on_other_pixels_is_refused_in_one_line(tree, tmp_path, capsys):
    checkpoint = tmp_path / "teacher.pt"
    with pytest.raises(SystemExit):
        teacherTrain.main(flags(tree, checkpoint, "--time-budget", "0"))
    other = write_tree(tmp_path / "other", per_class=(5, 2))  # another copy, other pixels
    before = checkpoint.with_suffix(".last.pt").read_bytes()
    line = one_error_line(lambda: teacherTrain.main(flags(other, checkpoint, "--resume")), capsys)
    assert "was started on other CIFAR-10 pixels" in line and "start afresh with --force" in line
    assert checkpoint.with_suffix(".last.pt").read_bytes() == before


def test_progress_in_a_log_file_is_one_plain_line_per_update(monkeypatch, capsys):
    import utils.cli

    monkeypatch.setattr(utils.cli, "LOG_SECONDS", 0.05)
    with utils.cli.progress(4, "labelling") as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("labelling:") >= 2 and all(line.startswith("labelling:")
                                                                     for line in err.splitlines())
    monkeypatch.setattr(utils.cli, "LOG_SECONDS", 20)
    with utils.cli.progress(4, "quick") as bar:  # work shorter than LOG_SECONDS shows nothing
        bar.update(4)
    assert "quick" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- hard kill

KILLER = r'''
"""Run teacherTrain.py, but on the N-th write of checkpoint NAME (KILL_AT_SAVE=NAME:N), write half
of it, then SIGKILL this process: the power cut in the middle of a save."""
import io, os, runpy, signal, sys
import torch

target, n = os.environ.get("KILL_AT_SAVE", ":0").rsplit(":", 1)
real_save, writes = torch.save, []

def save(obj, f, *args, **kwargs):
    name = os.path.basename(f)  # NAME, or the temporary .NAME.<pid>.tmp that replaces it when complete
    if target and (name == target or name.startswith(f".{target}.")):
        writes.append(f)
        if len(writes) == int(n):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(f, "wb") as out:
                out.write(buffer.getbuffer()[: buffer.tell() // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = ["teacherTrain.py", *sys.argv[1:]]
runpy.run_path("teacherTrain.py", run_name="__main__")
'''


def start(argv, log, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KILL_AT_SAVE", None)
    if kill_at:
        env["KILL_AT_SAVE"] = kill_at
    return subprocess.Popen([sys.executable, "-c", KILLER, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)


def restart_flags(checkpoint):
    """What a user does after a crash: resume if there is a resume state, else start again."""
    if checkpoint.with_suffix(".last.pt").exists():
        return ["--resume"]
    return ["--force"] if checkpoint.exists() else []


@pytest.mark.slow
def test_hard_kills_even_while_saving_leave_loadable_files_and_a_run_that_finishes(tree, tmp_path):
    checkpoint = tmp_path / "run" / "teacher.pt"
    folder = checkpoint.parent
    rng = random.Random(0)
    # "NAME:N": SIGKILL halfway through the N-th write of NAME in that process (without a hold-out
    # split, each epoch writes teacher.pt then teacher.last.pt, and the end teacher.pt again); a
    # number: SIGKILL that many seconds after training has begun.
    kills = ["teacher.pt:1", "teacher.last.pt:1", rng.uniform(0, 1.5), rng.uniform(0, 1.5), "teacher.pt:1"]
    left_behind = []
    for kill in kills:
        argv = tiny_flags(tree, checkpoint, *restart_flags(checkpoint))
        with open(tmp_path / "stderr.txt", "w") as log:
            process = start(argv, log, kill_at=kill if isinstance(kill, str) else None)
            if not isinstance(kill, str):
                for line in process.stdout:
                    if line.startswith("peak learning rate"):  # printed by fit() before the first step
                        break
                time.sleep(kill)
                process.kill()
            out = process.communicate(timeout=120)[0]
        details = (kill, argv[-1], out, (tmp_path / "stderr.txt").read_text())
        for path in checkpoints(folder):
            load_checkpoint(path, hint="", kind="teacher", arch="googlenet")
        if isinstance(kill, str):
            assert process.returncode == -signal.SIGKILL, details
            assert [p for p in hidden(folder) if p.startswith(f".{kill.split(':')[0]}.")], details
        else:
            assert process.returncode in (0, -signal.SIGKILL), details
        assert not set(left_behind) & set(hidden(folder)), details  # this start removed the last one's
        left_behind = hidden(folder)

    argv = tiny_flags(tree, checkpoint, *restart_flags(checkpoint))
    with open(tmp_path / "stderr.txt", "w") as log:
        out = start(argv, log).communicate(timeout=120)[0]
    assert "saved " in out, (out, (tmp_path / "stderr.txt").read_text())
    assert hidden(folder) == []
    assert load_checkpoint(checkpoint, hint="", kind="teacher")["complete"] is True

    reference = tmp_path / "reference" / "teacher.pt"
    teacherTrain.main(tiny_flags(tree, reference))
    assert_same_run(checkpoint, reference)


def test_an_unresumable_partial_run_is_restarted_with_force_only(tmp_path):
    """A kill while teacher.last.pt was first written leaves teacher.pt alone: --resume cannot
    continue it, so neither message may send the user to --resume."""
    checkpoint = tmp_path / "teacher.pt"
    utils.checkpoint.save_checkpoint(checkpoint, {"kind": "teacher", "model": {}, "complete": False})
    args = Namespace(checkpoint=str(checkpoint), resume=False, force=False)
    with pytest.raises(UserError) as fresh:
        prepare_run(args)
    with pytest.raises(UserError) as resumed:
        prepare_run(Namespace(**{**vars(args), "resume": True}))
    for message in (str(fresh.value), str(resumed.value)):
        assert "--force" in message and "add --resume" not in message and "without --resume" not in message
    prepare_run(Namespace(**{**vars(args), "force": True}))
    assert not checkpoint.exists()


def test_a_start_removes_the_temporary_files_that_killed_writes_of_its_run_left(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    suffixes = ("pt", "last.pt", "metrics.jsonl", "curves.png", "config.json")
    stale = [f".teacher.{suffix}.4242.tmp" for suffix in suffixes]
    others = [".student.pt.4242.tmp", ".teacher.other.4242.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"half")
    prepare_run(Namespace(checkpoint=str(checkpoint), resume=False, force=False))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(others)


def test_a_kill_while_a_replaced_run_is_deleted_never_brings_part_of_it_back(tmp_path, monkeypatch):
    checkpoint = tmp_path / "teacher.pt"
    for name, content in (("teacher.pt", b"old best"), ("teacher.last.pt", b"old state")):
        (tmp_path / name).write_bytes(content)
    args = Namespace(checkpoint=str(checkpoint), resume=False, force=True)
    files = prepare_run(args)  # the old run waits aside
    for path, content in ((files.best, b"new best"), (files.last, b"new state")):
        path.write_bytes(content)
    rmtree = shutil.rmtree

    def killed_halfway(folder, **kwargs):
        if kwargs.get("ignore_errors"):
            return rmtree(folder, **kwargs)
        (Path(folder) / "teacher.last.pt").unlink()  # one file of the old run deleted, the other not yet
        raise Killed

    monkeypatch.setattr(utils.runs.shutil, "rmtree", killed_halfway)
    with pytest.raises(Killed):
        utils.runs.run_saved(files)
    monkeypatch.setattr(utils.runs.shutil, "rmtree", rmtree)
    utils.lock.release_all()
    prepare_run(Namespace(**{**vars(args), "force": False, "resume": True}))  # the next command on these files
    assert (files.best.read_bytes(), files.last.read_bytes()) == (b"new best", b"new state")


# ----------------------------------------------------------------------------- divergence

def diverged(message, steps=STEPS):
    """(what, epoch, step, learning rate, what was kept) of a divergence message, which must have that form."""
    match = re.fullmatch(r"training diverged: non-finite ([a-z -]+) at epoch (\d+), step (\d+)/(\d+), "
                         r"learning rate ([^;]+); (.*); lower --lr .* start again with --force", message)
    assert match, message
    what, epoch, step, steps_per_epoch, lr, kept = match.groups()
    assert int(steps_per_epoch) == steps
    return what, int(epoch), int(step), float(lr), kept


@pytest.mark.parametrize("limit,holdout,found", [
    (8, 10, "loss"),  # 4 steps per epoch: the loss of a later step overflows
    (2, 0, "weights"),  # 1 step per epoch: the loss stays finite, BatchNorm's running variance does not
    (2, 10, "hold-out loss"),  # and the hold-out split sees it first
])
def test_a_huge_learning_rate_stops_the_run_before_anything_non_finite_is_saved(tree, tmp_path, limit, holdout,
                                                                               found):
    checkpoint = tmp_path / "teacher.pt"
    steps = limit // 2
    with pytest.raises(UserError) as e:
        teacherTrain.main(flags(tree, checkpoint, "--lr", "1e12", limit=limit, holdout=holdout))
    what, epoch, step, lr, kept = diverged(str(e.value), steps)
    assert what == found
    warmup = warmup_steps(2, steps, 2 * steps)
    assert lr == float(f"{learning_rate((epoch - 1) * steps + step - 1, 2 * steps, warmup, 1e12 * 2 / 512):.4g}")
    saved = checkpoints(tmp_path)
    assert kept == (f"the last good state is {checkpoint.with_suffix('.last.pt')}" if saved else "nothing was saved")
    for path in saved:
        assert all_finite(path), path


def test_a_nan_in_epoch_2_keeps_the_checkpoints_of_epoch_1(tree, tmp_path, monkeypatch):
    checkpoint = tmp_path / "teacher.pt"
    train_step, calls, epoch_1 = utils.engine.train_step, [], {}

    def step(net, optimizer, loss_fn, x, y, *args):
        calls.append(1)
        if len(calls) == STEPS + 1:
            epoch_1.update(contents(tmp_path))
        if len(calls) == STEPS + 2:  # the second step of epoch 2 sees a corrupted batch
            x = torch.full_like(x, float("nan"))
        return train_step(net, optimizer, loss_fn, x, y, *args)

    monkeypatch.setattr(utils.engine, "train_step", step)
    with pytest.raises(UserError) as e:
        teacherTrain.main(flags(tree, checkpoint))
    what, epoch, step, lr, kept = diverged(str(e.value))
    assert (what, epoch, step) == ("loss", 2, 2)
    warmup = warmup_steps(2, STEPS, 2 * STEPS)
    assert lr == float(f"{learning_rate(STEPS + 1, 2 * STEPS, warmup, 0.2 * 2 / 512):.4g}")
    assert kept == f"the last good state is {checkpoint.with_suffix('.last.pt')}"
    now = contents(tmp_path)
    for name in ("teacher.pt", "teacher.last.pt"):
        assert now[name] == epoch_1[name], name
        assert all_finite(tmp_path / name)
    assert [r["epoch"] for r in load(checkpoint.with_suffix(".last.pt"))["history"]] == [1]
    assert hidden(tmp_path) == []


def test_cli_divergence_is_one_error_line(tree, tmp_path, capsys):
    line = one_error_line(lambda: teacherTrain.main(flags(tree, tmp_path / "teacher.pt", "--lr", "1e12",
                                                          "--log-every", "1")), capsys)
    assert line.startswith("error: training diverged: ")
    diverged(line.removeprefix("error: "))


# ----------------------------------------------------------------------------- disk

def test_an_output_folder_that_cannot_be_created_is_one_line_before_any_data_is_read(
        tree, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the run's folder should be\n")
    checkpoint = blocker / "run" / "teacher.pt"

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the output folder was checked")

    monkeypatch.setattr(utils.data, "load_cifar10", no_data)
    line = one_error_line(lambda: teacherTrain.main(flags(tree, checkpoint)), capsys)
    assert f"cannot create the output folder {checkpoint.parent}" in line and "--checkpoint" in line


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    checkpoint = tmp_path / "new" / "deeper" / "teacher.pt"
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run(Namespace(checkpoint=str(checkpoint), resume=True, force=False))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only(monkeypatch):
    """Makes folders read-only: ``chmod 555``, and, since chmod does not stop root (who runs these tests in
    some containers), the writes this code makes there (a new folder, a probe file, the rename that ends a
    save) fail as they would for anyone else."""
    folders = []

    def denied(path):
        target = Path(path).absolute()
        return any(target.is_relative_to(folder) and target != folder for folder in folders)

    def refusing(real, target=0):  # target: which argument is the path written
        def call(*args, **kwargs):
            if denied(args[target]):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(args[target]))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(Path, "mkdir", refusing(Path.mkdir))
    monkeypatch.setattr(Path, "write_bytes", refusing(Path.write_bytes))
    monkeypatch.setattr(os, "replace", refusing(os.replace, target=1))

    def make(folder):
        folder.chmod(0o555)
        folders.append(folder.absolute())

    yield make
    for folder in folders:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["a file in the way", "a folder given", "a read-only folder", "a file there"])
def test_an_unwritable_evaluate_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, read_only, where):
    import evaluate

    blocker, folder = tmp_path / "file", tmp_path / "folder"
    blocker.write_text("a file\n")
    folder.mkdir()
    out, needle = {"a file in the way": (blocker / "x.json", f"{blocker} is a file"),
                   "a folder given": (folder, f"--out {folder} is a folder"),
                   "a read-only folder": (folder / "new" / "x.json", f"cannot create the output folder {folder}/new"),
                   "a file there": (blocker, f"--out {blocker} already exists; add --force to replace it")}[where]
    read_only(folder)
    before = sorted(tmp_path.rglob("*"))

    def no_work(*args, **kwargs):
        raise AssertionError("work began before --out was checked")

    monkeypatch.setattr(utils.runtime, "setup_runtime", no_work)
    line = one_error_line(lambda: evaluate.main(["teacher.pt", "--out", str(out)]), capsys)
    assert needle in line and "--out" in line, line
    assert sorted(tmp_path.rglob("*")) == before


def test_a_folder_that_cannot_be_written_is_one_line_and_left_as_it_was(tmp_path, capsys, read_only):
    folder = tmp_path / "results"
    folder.mkdir()
    read_only(folder)
    line = one_error_line(lambda: utils.runs.check_output_folder(folder, "--out"), capsys)
    assert line.startswith(f"error: cannot write in {folder} (Permission denied)") and "--out" in line, line
    assert list(folder.iterdir()) == []


def test_an_unwritable_inference_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import inference

    blocker = tmp_path / "results"
    blocker.write_text("a file where the results should go\n")
    monkeypatch.setattr(utils.runtime, "setup_runtime",
                        lambda *args, **kwargs: pytest.fail("work began before --out was checked"))
    line = one_error_line(lambda: inference.main(["--out", str(blocker / "run")]), capsys)
    assert f"cannot create the output folder {blocker / 'run'}: {blocker} is a file" in line and "--out" in line


def test_the_logits_of_a_read_only_checkpoint_are_cached_per_user(tree, uninterrupted, tmp_path, monkeypatch,
                                                                    capsys, read_only):
    import evaluate

    folder, cache = tmp_path / "read-only", tmp_path / "user-cache"
    folder.mkdir()
    checkpoint = folder / "teacher.pt"
    shutil.copy(uninterrupted, checkpoint)
    read_only(folder)
    monkeypatch.setenv("MSKD_LOGITS_CACHE", str(cache))
    argv = [str(checkpoint), "--data-dir", str(tree), "--partial-data", "--device", "cpu"]

    def table(out):
        return [line for line in out.splitlines() if line.startswith("| `")]

    evaluate.main(argv)
    out = capsys.readouterr().out
    assert f"note: cannot write {folder / 'teacher.logits.pt'}; the logits are cached in {cache}/" in out
    assert [p.name for p in folder.iterdir()] == ["teacher.pt"]
    (cached,) = cache.iterdir()
    first = table(out)

    compute = utils.networks.batched_logits
    monkeypatch.setattr(utils.networks, "batched_logits", lambda *a, **k: pytest.fail("computed again"))
    evaluate.main(argv)  # read back from the per-user cache
    assert table(capsys.readouterr().out) == first

    monkeypatch.setattr(utils.networks, "batched_logits", compute)
    cached.unlink()
    read_only(cache)  # nowhere to cache: evaluated all the same
    evaluate.main(argv)
    out = capsys.readouterr().out
    assert "the logits are not cached and will be computed again next time" in out and table(out) == first
    assert list(cache.iterdir()) == []


def test_a_damaged_logits_cache_is_computed_again_with_a_note(tree, uninterrupted, tmp_path, capsys):
    import evaluate

    checkpoint = tmp_path / "teacher.pt"
    shutil.copy(uninterrupted, checkpoint)
    argv = [str(checkpoint), "--data-dir", str(tree), "--partial-data", "--device", "cpu", "--out",
            str(tmp_path / "evaluation.json"), "--force"]
    evaluate.main(argv)
    first = json.loads((tmp_path / "evaluation.json").read_text())
    cache = tmp_path / "teacher.logits.pt"
    cached = load(cache)
    cached["test"] = torch.full_like(cached["test"], 30.0)  # same size, other values: torch.load cannot tell
    torch.save(cached, cache)
    capsys.readouterr()
    evaluate.main(argv)
    assert f"note: {cache} does not match its fingerprint (changed or damaged); the logits are computed again" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "evaluation.json").read_text()) == first
    assert not (load(cache)["test"] == 30.0).all()  # and written again


def test_a_full_disk_is_one_line_before_training(tree, tmp_path, monkeypatch, capsys):
    free = 5 * 2**20
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(utils.runs.shutil, "disk_usage", lambda path: usage._replace(free=free))

    def no_training(*args, **kwargs):
        raise AssertionError("training started on a full disk")

    monkeypatch.setattr(utils.engine, "train_step", no_training)
    line = one_error_line(lambda: teacherTrain.main(flags(tree, tmp_path / "teacher.pt")), capsys)
    assert line.startswith(f"error: only 5 MiB free in {tmp_path}, and this run's checkpoints need about ")
    assert checkpoints(tmp_path) == [] and hidden(tmp_path) == []


def test_members_trained_together_need_the_free_space_of_all_their_checkpoints(tree, tmp_path, monkeypatch, capsys):
    import StudentTrain

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(utils.runs.shutil, "disk_usage", lambda path: usage._replace(free=0))
    monkeypatch.chdir(tmp_path)

    def needed_mib(*archs):
        argv = ["--data-dir", str(tree), "--holdout", "0", "--limit", "2", "--batch-size", "2", "--epochs", "1",
                "--device", "cpu", "--partial-data", "--no-kd", "--model", *archs, "--name", "-".join(archs)]
        line = one_error_line(lambda: StudentTrain.main(argv), capsys)
        return int(re.fullmatch(r"error: only 0 MiB free in .*, and this run's checkpoints need about (\d+) MiB; .*",
                                line).group(1))

    apart = needed_mib("googlenet") + needed_mib("resnet18")
    assert apart > 0 and abs(needed_mib("googlenet", "resnet18") - apart) <= 1  # one folder: the sum, to rounding


def test_a_save_failing_on_a_full_disk_keeps_the_previous_checkpoint(tree, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "teacher.pt"
    real_save, writes, before = torch.save, [], {}

    def save(obj, f, *args, **kwargs):
        writes.append(f)
        if len(writes) < 3:  # epoch 1 saves teacher.pt and teacher.last.pt; the disk is full after that
            return real_save(obj, f, *args, **kwargs)
        before.update({p.name: p.read_bytes() for p in checkpoints(tmp_path)})
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getbuffer()[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.checkpoint.torch, "save", save)
    line = one_error_line(lambda: teacherTrain.main(tiny_flags(tree, checkpoint)), capsys)
    assert re.fullmatch(rf"error: could not write {re.escape(str(tmp_path))}/teacher(\.last)?\.pt "
                        r"\(No space left on device\); the previous file is kept", line), line
    assert sorted(before) == ["teacher.last.pt", "teacher.pt"]
    assert {p.name: p.read_bytes() for p in checkpoints(tmp_path)} == before
    assert hidden(tmp_path) == []
    assert load_checkpoint(checkpoint.with_suffix(".last.pt"), hint="", kind="teacher")["epoch"] == 1

    monkeypatch.undo()  # space freed: the run continues from its last good state
    teacherTrain.main(tiny_flags(tree, checkpoint, "--resume"))
    assert load_checkpoint(checkpoint, hint="", kind="teacher")["complete"] is True


# ----------------------------------------------------------------------------- data

def test_a_tar_cut_at_a_member_boundary_is_refused_unless_partial_data(tmp_path, monkeypatch):
    source = write_tree(tmp_path / "src")  # 40 training and 20 test images
    whole, cut = tmp_path / "whole" / "cifar.tar", tmp_path / "cut" / "cifar.tar"
    for archive in (whole, cut):
        archive.parent.mkdir()
        with tarfile.open(archive, "w") as t:
            t.add(source, arcname="cifar10")  # members in name order: test/ first, train/truck/ last
    with tarfile.open(cut) as t:
        members = t.getmembers()
    assert members[-1].name == "cifar10/train/truck/0003.png"
    with open(cut, "r+b") as f:  # a copy that stopped before the last two members
        f.truncate(members[-2].offset)
    with tarfile.open(cut) as t:  # tarfile sees a shorter archive, not a damaged one
        assert len(t.getmembers()) == len(members) - 2

    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        load_cifar10(cut, cache_dir=cache, verbose=False)
    assert f"{cut} holds 38 training and 20 test images" in str(e.value)
    assert "incomplete" in str(e.value) and "--partial-data" in str(e.value)
    partial = load_cifar10(cut, cache_dir=cache, verbose=False, allow_partial=True)
    assert len(partial.train_labels) == 38 and len(partial.test_labels) == 20

    with pytest.raises(DataError, match="--partial-data"):
        teacherTrain.main([flag for flag in flags(cut, tmp_path / "run" / "teacher.pt")
                           if flag != "--partial-data"])  # the same, through the script
    utils.lock.release_all()  # as the script's process ends: its lock on the run goes with it
    assert list((tmp_path / "run").iterdir()) == []

    monkeypatch.setattr(utils.data, "TRAIN_SIZE", 40)  # as if the synthetic copy were the official size
    monkeypatch.setattr(utils.data, "TEST_SIZE", 20)
    assert len(load_cifar10(whole, cache_dir=cache, verbose=False).train_labels) == 40
    with pytest.raises(DataError, match="not CIFAR-10's 40 and 20"):
        load_cifar10(cut, cache_dir=cache, verbose=False)


# ----------------------------------------------------------------------------- an existing run

def test_an_existing_run_is_replaced_only_with_force(tree, tmp_path, capsys):
    checkpoint = tmp_path / "teacher.pt"
    argv = tiny_flags(tree, checkpoint, epochs=1)
    teacherTrain.main(argv)
    first = contents(tmp_path)
    capsys.readouterr()

    line = one_error_line(lambda: teacherTrain.main(argv), capsys)
    assert "already holds a complete run" in line and "--resume" in line and "--force" in line
    assert contents(tmp_path) == first

    line = one_error_line(lambda: teacherTrain.main([*argv, "--resume", "--force"]), capsys)
    assert "--resume" in line and "--force" in line
    assert contents(tmp_path) == first

    teacherTrain.main([*tiny_flags(tree, checkpoint, epochs=2), "--force"])
    replaced = load(checkpoint.with_suffix(".last.pt"))
    assert [r["epoch"] for r in replaced["history"]] == [1, 2]  # a new run, not the old one extended
    assert checkpoint.with_suffix(".metrics.jsonl").read_text().count("\n") == 2
    assert load(checkpoint)["complete"] is True and load(checkpoint)["config"]["epochs"] == 2


# ----------------------------------------------------------------------------- one run per output

HOLDER = r'''
"""Hold the lock file argv[1] as a training run does, say so, then end as stdin says: return, raise or exit."""
import sys
from utils import lock

lock.acquire(sys.argv[1])
print("locked", flush=True)
ending = sys.stdin.readline().strip()
if ending == "raise":
    raise RuntimeError("the run failed")
if ending == "exit":
    sys.exit(3)
'''


@pytest.mark.parametrize("ending", ["return", "raise", "exit"])
def test_a_second_run_on_the_same_output_is_refused_until_the_first_process_ends(tree, tmp_path, monkeypatch,
                                                                                 capsys, ending):
    checkpoint = tmp_path / "teacher.pt"
    lock = tmp_path / "teacher.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = contents(tmp_path)
        monkeypatch.setattr(utils.data, "load_cifar10", lambda *a, **k: pytest.fail("data read by a second run"))
        line = one_error_line(lambda: teacherTrain.main(tiny_flags(tree, checkpoint, epochs=1)), capsys)
        assert line == (f"error: another run is writing these files: process {holder.pid} holds {lock}; wait for "
                        "it to end, or write elsewhere with --name or --checkpoint")
        assert contents(tmp_path) == before
    finally:
        holder.communicate(f"{ending}\n", timeout=60)
    assert holder.returncode == {"return": 0, "raise": 1, "exit": 3}[ending]
    assert not lock.exists()

    monkeypatch.undo()
    teacherTrain.main(tiny_flags(tree, checkpoint, epochs=1))
    assert load_checkpoint(checkpoint, hint="", kind="teacher")["complete"] is True
    assert not lock.exists()  # released when the run ended


def test_a_lock_left_by_a_process_that_no_longer_runs_is_taken_over_with_a_note(tree, tmp_path, capsys):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(ended.stdout)
    lock = tmp_path / "teacher.lock"
    lock.write_text(f"{pid} {socket.gethostname()}\n")
    teacherTrain.main(tiny_flags(tree, tmp_path / "teacher.pt", epochs=1))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {lock} was left by process {pid}, which no longer runs; taken over"]
    assert load_checkpoint(tmp_path / "teacher.pt", hint="", kind="teacher")["complete"] is True
    assert not lock.exists() and hidden(tmp_path) == []


def test_only_the_main_torchrun_process_locks(tmp_path):
    checkpoint = tmp_path / "run" / "teacher.pt"
    args = Namespace(checkpoint=str(checkpoint), resume=False, force=False)
    prepare_run(args, is_main=False)
    assert not checkpoint.parent.exists()  # neither a folder nor a lock

    checkpoint.parent.mkdir()
    lock = checkpoint.with_suffix(".lock")
    held = f"{os.getppid()} {socket.gethostname()}\n"  # this test's parent process: running
    lock.write_text(held)
    prepare_run(args, is_main=False)  # returns at once: it does not wait for the lock either
    assert lock.read_text() == held
    with pytest.raises(UserError, match=f"process {os.getppid()} holds {lock}"):
        prepare_run(args)
    assert lock.read_text() == held


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / "teacher.lock"
    lock.write_text("1 some-other-host\n")
    with pytest.raises(UserError) as e:
        prepare_run(Namespace(checkpoint=str(tmp_path / "teacher.pt"), resume=False, force=False))
    assert f"{lock} is held by process 1 on some-other-host; if no run is writing there, delete it" in str(e.value)
    assert lock.read_text() == "1 some-other-host\n"


# ----------------------------------------------------------------------------- members saved together

def test_a_kill_while_members_save_leaves_them_at_one_point_and_the_run_resumes(tree, tmp_path, monkeypatch):
    import StudentTrain

    argv = ["--data-dir", str(tree), "--holdout", "0", "--limit", "2", "--batch-size", "2", "--epochs", "2",
            "--device", "cpu", "--partial-data", "--save-every", "0", "--no-kd", "--model", "googlenet", "resnet18",
            "--name", "pair"]
    torch_save, written = torch.save, []

    def killed_at_the_second_member_s_second_state(checkpoint, path):  # a hidden temporary file's
        written.append(Path(path).name)
        if sum(".last.pt." in name for name in written) == 4:  # epoch 2's, the second member's
            raise Killed
        return torch_save(checkpoint, path)

    monkeypatch.setattr(utils.checkpoint.torch, "save", killed_at_the_second_member_s_second_state)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        StudentTrain.main(argv)
    monkeypatch.setattr(utils.checkpoint.torch, "save", torch_save)
    states = [load(f"checkpoints/pair/student_{arch}_nokd.last.pt") for arch in ("googlenet", "resnet18")]
    assert [s["epoch"] for s in states] == [1, 1]  # the first member's epoch 2 was not renamed in alone
    utils.lock.release_all()  # as the killed process's lock goes with it
    StudentTrain.main([*argv, "--resume"])
    assert all(load(f"checkpoints/pair/student_{arch}_nokd.last.pt")["complete"] for arch in ("googlenet", "resnet18"))
