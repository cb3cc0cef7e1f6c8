"""Nothing lost, nothing silently wrong: results never replaced by a command that did not make them, --force that
undoes itself when refused, numbers checked where they enter, a pipeline that a kill cannot wedge, and every bad
input one line.

Each case is the smallest run that shows it: a synthetic tree, GoogLeNet for one step, the published bundle as
the bundle to damage.
"""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import inference
import reproduce
import StudentTrain
import teacherTrain
import utils.data
import utils.runs
import utils.timebox
from tests.conftest import PUBLISHED, REPO, one_error_line, write_tree
from tests.test_reliability import flags, tiny_flags
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import UserError, run
from utils.data import load_cifar10
from utils.runs import prepare_run, replaced_folder, write_folder_atomically
from utils.timebox import Costs, TimeBox, choose_epochs, plan_epochs


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("data") / "cifar")


def student_flags(tree, checkpoint, teacher, *extra):
    """``tiny_flags`` for a KD student of ``teacher``."""
    argv = tiny_flags(tree, checkpoint, *extra, epochs=1)
    at = argv.index("--arch")
    return [*argv[:at], *argv[at + 2:], "--model", "googlenet", "--teacher", str(teacher)]


@pytest.fixture(scope="module")
def complete(tree, tmp_path_factory):
    """A complete one-step teacher run and a complete KD student of it, in a folder of their own."""
    folder = tmp_path_factory.mktemp("complete")
    teacherTrain.main(tiny_flags(tree, folder / "teacher.pt", epochs=1))
    StudentTrain.main(student_flags(tree, folder / "student.pt", folder / "teacher.pt"))
    return folder


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture
def runs(complete, tmp_path):
    """A copy of ``complete`` for a test to try to replace."""
    return Path(shutil.copytree(complete, tmp_path / "runs"))


# ----------------------------------------------------------------------------- results are never replaced

def test_a_reanalysis_never_writes_into_the_bundle_it_reads(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(PUBLISHED, bundle)
    before = snapshot(bundle)
    for out in (bundle, bundle / "again"):
        line = one_error_line(lambda out=out: inference.main(["--bundle", str(bundle), "--out", str(out),
                                                                      "--force"]), capsys)
        assert "is the bundle being re-analysed, and a re-analysis never writes into the bundle it reads" in line
    assert snapshot(bundle) == before


def test_a_folder_of_bundles_is_no_bundle_and_said_so_before_its_output_folder(tmp_path, capsys, monkeypatch):
    shutil.copytree(PUBLISHED, tmp_path / "results" / "published" / "run")
    monkeypatch.chdir(tmp_path)
    line = one_error_line(lambda: inference.main(["--bundle", "results/"]), capsys)  # its --out would be inside it
    assert line == "error: results is not a results bundle (it needs results.json and logits.npz, as reproduce.py " \
                   "or inference.py write them)"


@pytest.mark.slow
def test_a_reanalysis_writes_a_folder_of_its_own_and_replaces_results_only_with_force(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    inference.main(["--bundle", str(PUBLISHED)])
    out = tmp_path / "results" / "reanalysed" / PUBLISHED.name
    assert (out / "results.md").exists() and not (tmp_path / "results" / "bundle").exists()
    capsys.readouterr()
    line = one_error_line(lambda: inference.main(["--bundle", str(PUBLISHED)]), capsys)
    assert line == f"error: {out.relative_to(tmp_path)} already holds results; add --force to replace them, or " \
                   "choose another --out"
    inference.main(["--bundle", str(PUBLISHED), "--force"])


def test_every_pipeline_run_has_a_bundle_folder_of_its_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = reproduce.parse_args(["--preset", "smoke"])
    first = reproduce.output_folder(args)
    first.mkdir(parents=True)
    second = reproduce.output_folder(args)
    assert first != second and first.parent == second.parent == Path("results") / "smoke"
    (tmp_path / "taken").mkdir()
    for name in ("results.md", "seeds.md"):  # a summary over seeds is kept beside their bundles only
        (tmp_path / "taken" / name).write_text("another run's\n")
        line = one_error_line(lambda: reproduce.main(["--preset", "smoke", "--out", "taken"]), capsys)
        assert line == "error: --out taken already holds something; a bundle is written into a new folder: " \
                       "choose another --out"
        (tmp_path / "taken" / name).unlink()


def test_results_written_into_an_experiment_s_folder_leave_its_bundles_and_weights_there(tmp_path, capsys):
    out = tmp_path / "results" / "smoke"  # inference.py --name smoke's default: reproduce.py's and publish.py's too
    kept = [out / "run-20261203-115008" / "results.md", out / "weights" / "manifest.json"]
    for path in kept:
        path.parent.mkdir(parents=True)
        path.write_text("another command's\n")
    for again in ([], ["--force"]):
        inference.main(["--bundle", str(PUBLISHED), "--out", str(out), *again])
    assert all(path.read_text() == "another command's\n" for path in kept)
    assert (out / "results.md").is_file() and (out / "logits.npz").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["smoke"]  # no temporary folder left


@pytest.mark.parametrize("before", [False, True], ids=["new folder", "results there, --force"])
def test_results_are_written_all_or_none(tmp_path, monkeypatch, capsys, before):
    out = tmp_path / "out"
    if before:
        inference.main(["--bundle", str(PUBLISHED), "--out", str(out)])
    kept = snapshot(out) if before else None

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full_disk)  # the last file of the bundle to be written
    capsys.readouterr()
    line = one_error_line(lambda: inference.main(["--bundle", str(PUBLISHED), "--out", str(out), "--force"]), capsys)
    assert "No space left on device" in line
    assert (snapshot(out) == kept) if before else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if before else [])  # no temporary folder left


def test_a_folder_whose_replacement_cannot_take_its_place_is_put_back(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "manifest.json").write_text("the old one\n")
    replace, calls = os.replace, []

    def second_fails(src, dst):  # the first moves the old folder aside, the second the new one into its place
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(UserError) as e:
        write_folder_atomically(folder, lambda tmp: (tmp / "manifest.json").write_text("the new one\n"))
    assert str(e.value) == f"could not write {folder} ({os.strerror(errno.EIO)}); the previous one is kept"
    assert (folder / "manifest.json").read_text() == "the old one\n" and [p.name for p in tmp_path.iterdir()] == [
        "weights"]


def test_what_writes_killed_outright_left_beside_a_folder_goes_but_a_replaced_folder_with_no_successor(tmp_path):
    ended = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True).stdout)
    running = os.getppid()  # this test's parent process
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in [f".weights.{ended}.tmp", f".weights.{ended}.old", f".weights.{running}.tmp", f".results.{ended}.tmp"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "student1.pt.gz").write_bytes(b"a network")
    write_folder_atomically(weights, lambda tmp: (tmp / "manifest.json").write_text("new\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # another folder's and a running process's are kept
        f".results.{ended}.tmp", f".weights.{running}.tmp", "weights"]

    weights.rename(tmp_path / f".weights.{ended}.old")  # a write killed between its two renames
    write_folder_atomically(weights, lambda tmp: (tmp / "manifest.json").write_text("newer\n"))
    assert (tmp_path / f".weights.{ended}.old" / "manifest.json").read_text() == "new\n"  # its only copy: kept
    assert (weights / "manifest.json").read_text() == "newer\n"


# ----------------------------------------------------------------------------- --force undoes itself when refused

def test_force_with_a_missing_data_dir_keeps_the_complete_run(runs, tmp_path, capsys):
    before = snapshot(runs)
    argv = tiny_flags(tmp_path / "no-data", runs / "teacher.pt", "--force", epochs=1)
    line = one_error_line(lambda: teacherTrain.main(argv), capsys)
    assert line.startswith(f"error: no CIFAR-10 found at {tmp_path / 'no-data'}")
    assert snapshot(runs) == before  # the run, byte for byte; no lock, no folder set aside


def test_force_with_a_wrong_teacher_keeps_the_complete_students(runs, tree, tmp_path, capsys):
    before = snapshot(runs)
    argv = student_flags(tree, runs / "student.pt", tmp_path / "missing.pt", "--force")
    line = one_error_line(lambda: StudentTrain.main(argv), capsys)
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'missing.pt'}")
    assert snapshot(runs) == before


def test_a_forced_run_that_fails_before_it_saves_puts_the_old_run_back(runs, tree, capsys):
    before = snapshot(runs)
    argv = flags(tree, runs / "teacher.pt", "--force", "--lr", "1e30")  # a later step of epoch 1 overflows
    line = one_error_line(lambda: teacherTrain.main(argv), capsys)
    assert line.startswith("error: training diverged") and "nothing was saved" in line
    assert snapshot(runs) == before


def test_a_forced_run_killed_before_it_saved_is_undone_by_the_next_run(runs):
    run_folder = runs
    before = snapshot(run_folder)
    args = Namespace(checkpoint=str(run_folder / "teacher.pt"), resume=False, force=True)
    files = prepare_run(args)
    assert not files.best.exists() and replaced_folder(files).is_dir()
    files.config.write_text("the killed run's start\n")
    utils.runs._UNSAVED.clear()  # the process dies here: nothing of it runs on
    utils.lock.release(files.lock)
    with pytest.raises(UserError, match="already holds a complete run"):
        prepare_run(Namespace(**{**vars(args), "force": False}))
    assert snapshot(run_folder) == before


def test_a_refused_run_leaves_no_folder_file_or_lock_behind(tree, tmp_path, capsys):
    checkpoint = tmp_path / "new" / "deeper" / "teacher.pt"
    one_error_line(lambda: teacherTrain.main(tiny_flags(tmp_path / "no-data", checkpoint, epochs=1)), capsys)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- numbers checked where they enter

def damaged_bundle(folder, damage):
    """A copy of the published bundle, damaged as ``damage`` says."""
    shutil.copytree(PUBLISHED, folder)
    logits = folder / "logits.npz"
    with np.load(logits) as f:
        arrays = dict(f)
    results = json.loads((folder / "results.json").read_text())
    if damage == "nan logits":
        arrays["test_2"][3, 4] = np.nan
    elif damage == "inf logits":
        arrays["holdout_1"][0, 0] = np.inf
    elif damage == "labels outside the classes":
        arrays["test_labels"][0] = 10
    elif damage == "another class count":
        arrays["test_0"] = arrays["test_0"][:, :9]
    elif damage == "integer logits":
        arrays["holdout_2"] = arrays["holdout_2"].astype(np.int64)
    elif damage == "results.json without its networks":
        del results["networks"]
    elif damage == "results.json of another shape":
        results = [results]
    if damage == "truncated logits":
        logits.write_bytes(logits.read_bytes()[:1000])
    elif damage == "empty logits":
        logits.write_bytes(b"")
    else:
        np.savez(logits, **arrays)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


DAMAGES = {
    "nan logits": "the test logits of checkpoints/student_googlenet.pt (test_2) hold NaN or Inf",
    "inf logits": "the holdout logits of checkpoints/student_densenet121.pt (holdout_1) hold NaN or Inf",
    "labels outside the classes": "test_labels holds labels outside the 10 classes (0 to 10)",
    "another class count": "the test logits of checkpoints/teacher.pt (test_0) have shape (10000, 9), not 10000 "
                           "images x 10 outputs",
    "integer logits": "(holdout_2) are int64, not floating-point numbers",
    "truncated logits": "logits.npz is truncated or damaged",
    "empty logits": "logits.npz is truncated or damaged",
    "results.json without its networks": "results.json: the bundle lacks 'networks'",
    "results.json of another shape": "results.json: the bundle lacks 'networks'",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_bundle_is_refused_in_one_line_naming_the_file_and_the_fault(damage, tmp_path, capsys,
                                                                               monkeypatch):
    bundle = damaged_bundle(tmp_path / "bundle", damage)
    line = one_error_line(lambda: inference.main(["--bundle", str(bundle), "--out", str(tmp_path / "o")]), capsys)
    assert str(bundle) in line and DAMAGES[damage] in line, line
    monkeypatch.setattr(teacherTrain, "main", lambda argv: pytest.fail("a stage trained on a damaged bundle"))
    line = one_error_line(lambda: reproduce.main(["--epochs-from", str(bundle), "--out", str(tmp_path / "r"),
                                                          "--data-dir", str(tmp_path)]), capsys)
    assert str(bundle) in line and DAMAGES[damage] in line, line


def test_a_bundle_s_impossible_epochs_are_blamed_on_the_bundle_not_on_a_flag(tmp_path, capsys):
    bundle = damaged_bundle(tmp_path / "bundle", "none")
    results = json.loads((bundle / "results.json").read_text())
    results["networks"][0]["checkpoint"]["epochs"] = 0
    (bundle / "results.json").write_text(json.dumps(results))
    line = one_error_line(lambda: reproduce.main(["--epochs-from", str(bundle), "--data-dir", str(tmp_path)]), capsys)
    assert line == f"error: --epochs-from {bundle}: its teacher stage ran 0 epochs, not a positive whole number; " \
                   "the bundle is damaged"


def test_a_checkpoint_with_non_finite_weights_is_refused_before_it_is_evaluated(complete, tree, tmp_path, capsys):
    checkpoint = load_checkpoint(complete / "teacher.pt", hint="")
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", checkpoint)
    line = one_error_line(lambda: evaluate.main([str(tmp_path / "nan.pt"), "--data-dir", str(tree),
                                                         "--partial-data", "--device", "cpu"]), capsys)
    assert line == f"error: {tmp_path / 'nan.pt'} holds non-finite weights (NaN or Inf in {name}): nothing it " \
                   "predicts could be trusted; run `python teacherTrain.py (or StudentTrain.py)` again"


@pytest.mark.parametrize("record, needle", [
    ({"arch": "vgg11"}, "unknown model 'vgg11'"),
    ({"model_args": {"width": 3}}, "unexpected keyword argument 'width'"),
])
def test_a_checkpoint_of_a_network_this_code_cannot_build_is_one_line(complete, tree, tmp_path, capsys, record,
                                                                      needle):
    checkpoint = {**load_checkpoint(complete / "teacher.pt", hint=""), **record}
    save_checkpoint(tmp_path / "odd.pt", checkpoint)
    line = one_error_line(lambda: evaluate.main([str(tmp_path / "odd.pt"), "--data-dir", str(tree),
                                                         "--partial-data", "--device", "cpu"]), capsys)
    assert line.startswith(f"error: {tmp_path / 'odd.pt'} describes a network this code cannot build")
    assert needle in line


def batches_folder(folder, pixel=0):
    """An official-format ``cifar-10-batches-py`` folder of 10 training and 10 test images, each image's pixels
    ``pixel``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in utils.data.BATCH_FILES:
        batch = {"data": np.full((10, 3072), pixel, dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_other_pixels_of_the_same_size_and_time_are_another_source(tmp_path):
    folder = batches_folder(tmp_path / "cifar-10-batches-py")
    cache = tmp_path / "cache"
    first = load_cifar10(folder, cache_dir=cache, verbose=False, allow_partial=True)
    stat = (folder / "test_batch").stat()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.full((10, 3072), 7, dtype=np.uint8),
                                                     "labels": list(range(10))}))
    os.utime(folder / "test_batch", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (folder / "test_batch").stat().st_size == stat.st_size
    second = load_cifar10(folder, cache_dir=cache, verbose=False, allow_partial=True)
    assert second.fingerprint != first.fingerprint and (second.test_images == 7).all()


def test_a_decode_cache_missing_arrays_is_decoded_again(tmp_path, capsys):
    folder = batches_folder(tmp_path / "cifar-10-batches-py", pixel=3)
    cache = tmp_path / "cache"
    load_cifar10(folder, cache_dir=cache, verbose=False, allow_partial=True)
    (cached,) = cache.iterdir()
    with np.load(cached) as f:
        arrays = {k: f[k] for k in f.files if k != "test_labels"}
    with open(cached, "wb") as f:
        np.savez(f, **arrays)
    data = load_cifar10(folder, cache_dir=cache, verbose=False, allow_partial=True)
    assert (data.train_images == 3).all() and len(data.test_labels) == 10
    assert "ignoring unreadable or incomplete cache" in capsys.readouterr().out


def test_an_archive_holding_two_copies_of_the_tree_is_one_line(tmp_path, capsys):
    import tarfile

    write_tree(tmp_path / "a" / "cifar", per_class=(1, 1))
    archive = tmp_path / "two.tar"
    with tarfile.open(archive, "w") as t:
        t.add(tmp_path / "a" / "cifar", arcname="cifar")
        t.add(tmp_path / "a" / "cifar", arcname="copy/cifar")
    line = one_error_line(lambda: load_cifar10(archive, cache_dir=tmp_path / "cache", verbose=False,
                                                       allow_partial=True), capsys)
    assert "holds" in line and "twice" in line and "two copies of the tree; point --data-dir at one copy" in line


def test_a_16_bit_grey_training_image_keeps_its_gradient(tmp_path):
    tree = write_tree(tmp_path / "cifar", per_class=(1, 1))
    ramp = np.linspace(0, 65535, 32).astype(np.uint16)[None].repeat(32, 0)
    Image.fromarray(ramp).save(tree / "train" / "cat" / "0000.png")
    data = load_cifar10(tree, cache_dir=tmp_path / "cache", verbose=False, allow_partial=True)
    row = data.train_images[data.train_labels.tolist().index(3), 0, 16].int()
    assert (row.diff() >= 0).all() and row[0] < 10 and row[-1] > 245, row.tolist()


def test_a_variable_set_but_empty_means_its_default(monkeypatch):
    import utils.cli
    import utils.networks

    for name in ("CIFAR10_CACHE", "MSKD_LOGITS_CACHE", "CIFAR10_DIR"):
        monkeypatch.setenv(name, "")
    assert utils.data.default_cache_dir() == Path.home() / ".cache" / "mskd-cifar10"
    assert utils.networks.user_logits_path("x.pt", "0").parent == Path.home() / ".cache" / "mskd-logits"
    assert utils.cli.default_data_dir() == "data"


def test_a_fifo_given_to_predict_is_one_line_not_a_hang(tmp_path, capsys):
    import predict

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    line = one_error_line(lambda: predict.main([str(fifo), "--device", "cpu"]), capsys)
    assert line == f"error: {fifo} is not a regular file (a folder, a pipe or a device); give image files"


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    # `python predict.py *.png | head -1`: the writer stops at its next line, without a traceback
    printing = "from utils.cli import run; run(lambda: [print('x' * 99) for _ in range(10**6)])"
    done = subprocess.run(f"{sys.executable} -c \"{printing}\" | head -c 1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="bash", cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (141, "x", "")


@pytest.mark.parametrize("script", [teacherTrain, StudentTrain, reproduce])
def test_a_seed_too_large_for_torch_is_refused_as_a_flag(script, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(lambda: script.main(["--seed", str(2**63)]), capsys)
    assert f"argument --seed: must be an integer in [0, {2**63 - 1}], not '{2**63}'" in line
    assert list(tmp_path.iterdir()) == []


def test_a_loader_seeded_near_the_top_of_the_range_draws_its_batches(tmp_path):
    loader = utils.data.DeviceLoader(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8), 4, "cpu",
                                     train=True, seed=2**63 - 1)
    assert sum(len(x) for x, _ in loader) == 8


# ----------------------------------------------------------------------------- time boxes that plan at once

def test_planning_a_huge_box_takes_a_few_dozen_evaluations(monkeypatch):
    calls = []
    cost = utils.timebox.run_seconds
    monkeypatch.setattr(utils.timebox, "run_seconds", lambda *args: calls.append(1) or cost(*args))
    epochs = choose_epochs(6e10, 2.9, 1.0, 3.0, 5, 2)  # --minutes 1e9
    assert epochs > 10**9 and len(calls) <= 2 * 64


def test_the_minutes_a_refusal_suggests_are_accepted():
    costs = Costs(step_seconds=0.5, epoch_seconds=20, eval_seconds=2, save_seconds=1, test_seconds=3,
                  images_per_step=10)
    started = time.time() - 4  # what start-up and calibration took
    with pytest.raises(UserError) as refused:
        plan_epochs(costs, TimeBox(started, 0.01 * 60), 5, 2)
    suggested = float(str(refused.value).split("give --minutes ")[1].split()[0])
    assert plan_epochs(costs, TimeBox(time.time() - 4, suggested * 60), 5, 2)["epochs"] >= 1


def test_a_stage_s_refusal_in_a_pipeline_names_the_pipeline_s_minutes():
    costs = Costs(0.5, 20, 2, 1, 3, 10)
    with utils.timebox.pipeline_share("the teacher stage's share of --minutes 0.01 (0.0038 min)", 0.38,
                                      "python reproduce.py"):
        with pytest.raises(UserError) as refused:
            plan_epochs(costs, TimeBox(time.time() - 4, 0.0038 * 60), 5, 2)
    message = str(refused.value)
    assert message.startswith("the teacher stage's share of --minutes 0.01 (0.0038 min) is too short: one epoch ")
    suggested = float(message.split("give python reproduce.py --minutes ")[1].split()[0])
    assert suggested * 60 * 0.38 > 20 + 2 + 3 + 3 + 4  # the stage's share of it fits one epoch


# ----------------------------------------------------------------------------- refusals come first

def test_a_refusal_that_the_files_decide_comes_before_the_configuration(complete, tree, capsys):
    with pytest.raises(SystemExit):
        run(lambda: teacherTrain.main(tiny_flags(tree, complete / "teacher.pt", epochs=1)))
    out, err = capsys.readouterr()
    assert "== teacherTrain.py ==" not in out and "already holds a complete run" in err


def test_folds_the_hold_out_split_cannot_fill_are_refused_before_anything_trains(tmp_path, capsys, monkeypatch):
    from tests.test_reproduce import fake_bundle

    bundle = fake_bundle(tmp_path / "bundle", {"teacher": 1, "students": 1, "selector": 1, "control": 1},
                         {"selector": [1] * 50, "control": [1] * 50})
    monkeypatch.setattr(teacherTrain, "main", lambda argv: pytest.fail("the teacher trained first"))
    line = one_error_line(lambda: reproduce.main(["--preset", "smoke", "--epochs-from", str(bundle),
                                                          "--data-dir", str(tmp_path)]), capsys)
    assert line.startswith("error: the selector stage would be refused once the students have trained")
    assert "--folds 50 needs at least 50 images of every class" in line


# ----------------------------------------------------------------------------- commands that continue

def test_a_pipeline_s_continue_command_retrains_nothing_again(capsys):
    from types import SimpleNamespace

    from utils.pipeline import run_stage
    from utils.runs import continue_pipeline_command

    assert continue_pipeline_command("python reproduce.py --force --minutes 8") == "python reproduce.py --minutes 8"
    assert continue_pipeline_command("python reproduce.py --retrain-from students --seed 1") == \
        "python reproduce.py --seed 1"
    stopped = SimpleNamespace(title="students", paths=["checkpoints/student.pt"], argv=[],
                              module=SimpleNamespace(main=lambda argv: sys.exit(75)))
    with pytest.raises(SystemExit):
        run_stage(stopped, "stale", [], continue_pipeline_command("python reproduce.py --retrain-from students"), {})
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == "stopped in the students stage; continue with: python reproduce.py"
