"""Short GPU slots: students trained together, time-boxed runs that choose their epochs, and the results bundle.

Every run is tiny (a synthetic tree, a few images per split, small batches) and on the CPU, which is
how these guarantees are checked: the speed they buy is measured by bench.py and by the bundles
of GPU runs, never here.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import inference
import StudentTrain
import teacherTrain
import utils.data
import utils.distill
import utils.timebox
from tests.conftest import one_error_line, write_tree
from utils.bundle import MAX_BYTES, MAX_FILE_BYTES, MAX_FILES, bundle_sizes
from utils.checkpoint import load_checkpoint
from utils.cli import UserError
from utils.timebox import choose_epochs

SPLIT = ["--holdout", "10", "--limit", "10", "--partial-data", "--device", "cpu"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("data") / "cifar", per_class=(4, 2))


@pytest.fixture(scope="module")
def teacher(tree, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    teacherTrain.main(["--data-dir", str(tree), *SPLIT, "--arch", "resnet18", "--batch-size", "5", "--epochs", "1",
                       "--checkpoint", str(checkpoint)])
    return checkpoint


def weights(path):
    return load_checkpoint(path, hint="")["model"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]


# ----------------------------------------------------------------------------- students trained together

@pytest.mark.slow
def test_students_trained_together_are_the_students_trained_alone(tree, teacher, monkeypatch):
    """One loop, one augmentation and one teacher pass per batch, yet each student (GoogLeNet's dropout too) and
    each no-KD twin ends with the very weights a run of its own gives."""
    common = ["--data-dir", str(tree), *SPLIT, "--teacher", str(teacher), "--batch-size", "5", "--epochs", "2",
              "--seed", "3"]
    load_teacher, teacher_passes = utils.distill.load_teacher, []

    def counted(*args, **kwargs):
        network = load_teacher(*args, **kwargs)
        network.model.register_forward_hook(lambda *_: teacher_passes.append(1))
        return network

    monkeypatch.setattr(utils.distill, "load_teacher", counted)
    StudentTrain.main([*common, "--model", "densenet121", "googlenet", "--with-nokd", "--name", "together"])
    assert len(teacher_passes) == 2 * (10 // 5)  # 2 epochs of 10 images in batches of 5, for all four members
    monkeypatch.setattr(utils.distill, "load_teacher", load_teacher)

    for arch, extra in [("googlenet", []), ("densenet121", ["--no-kd"])]:
        StudentTrain.main([*common, "--model", arch, *extra, "--name", "alone"])
    for stem in ("student_googlenet", "student_densenet121_nokd"):
        assert_same_weights(f"checkpoints/together/{stem}.pt", f"checkpoints/alone/{stem}.pt")
        together, by_itself = (json.loads(open(f"checkpoints/{name}/{stem}.config.json").read())["flags"]
                               for name in ("together", "alone"))
        assert {k: v for k, v in together.items() if k not in ("command", "name", "checkpoint")} == \
            {k: v for k, v in by_itself.items() if k not in ("command", "name", "checkpoint")}


@pytest.mark.slow
def test_specialists_trained_beside_the_students_are_the_specialists_trained_alone(tree, teacher):
    """mcl specialists, coupled through their assignment, beside the generalists in one loop: each ends with the very
    weights of the pair trained alone, and its log gives its share of the images assigned to it."""
    common = ["--data-dir", str(tree), *SPLIT, "--teacher", str(teacher), "--batch-size", "5", "--epochs", "2",
              "--seed", "3", "--model", "densenet121", "googlenet"]
    StudentTrain.main([*common, "--with-specialists", "mcl", "--name", "beside"])
    StudentTrain.main([*common, "--specialise", "mcl", "--name", "pair"])
    for stem in ("student_densenet121_mcl", "student_googlenet_mcl"):
        assert_same_weights(f"checkpoints/beside/{stem}.pt", f"checkpoints/pair/{stem}.pt")
    shares = [[json.loads(line)["train_assigned"] for line in open(f"checkpoints/pair/{stem}.metrics.jsonl")]
              for stem in ("student_densenet121_mcl", "student_googlenet_mcl")]
    assert [a + b for a, b in zip(*shares)] == pytest.approx([1.0, 1.0])


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_several_students_cannot_share_one_checkpoint_path(capsys):
    with pytest.raises(SystemExit) as e:
        StudentTrain.parse_args(["--model", "1", "2", "--checkpoint", "x.pt"])
    assert e.value.code == 2 and "--checkpoint names one run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- time boxes

def test_epochs_are_the_most_that_fit_what_is_left_of_the_box():
    # 10 s per epoch; 2 s per hold-out evaluation (every 5 epochs and the last 5); 3 s per save, every 2 minutes:
    # 8 epochs are 80 s of steps, 5 evaluations and 1 + 80 / 120 saves, 95 s; 9 would be 105 s
    assert choose_epochs(100, 10, 2, 3, eval_every=5, save_every=2) == 8
    assert choose_epochs(100, 10, 2, 3, eval_every=5, save_every=0) == 6  # a save every epoch: 60 + 10 + 18 s
    assert choose_epochs(100, 10, 0, 0, eval_every=5, save_every=2) == 10
    assert choose_epochs(9, 10, 2, 3, eval_every=5, save_every=2) == 0


@pytest.mark.slow
def test_a_time_boxed_run_chooses_its_epochs_records_them_and_epochs_repeat_it_exactly(tree, tmp_path, monkeypatch):
    """The time box measures steps, then puts everything back: the run that follows is the one --epochs gives."""
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 3)  # whatever the machine's speed
    argv = ["--data-dir", str(tree), *SPLIT, "--arch", "googlenet", "--batch-size", "4", "--seed", "1"]
    teacherTrain.main([*argv, "--minutes", "5", "--checkpoint", "boxed/teacher.pt"])
    boxed = load_checkpoint("boxed/teacher.pt", hint="")
    timing = boxed["timing"]
    assert boxed["epochs"] == boxed["epochs_run"] == boxed["config"]["epochs"] == 3 and boxed["complete"]
    assert timing["minutes"] == 5 and timing["epochs"] == 3 and timing["images_per_s"] > 0
    assert timing["planned_seconds"] <= 300 and 0 < timing["startup_seconds"] <= timing["wall_seconds"]
    config = json.loads(open("boxed/teacher.config.json").read())
    assert config["flags"]["epochs"] == 3 and config["timing"]["epochs"] == 3

    teacherTrain.main([*argv, "--epochs", "3", "--checkpoint", "plain/teacher.pt"])
    assert_same_weights("boxed/teacher.pt", "plain/teacher.pt")


def test_an_interrupted_time_boxed_run_resumes_with_its_chosen_epochs(tree, monkeypatch):
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 3)
    argv = ["--data-dir", str(tree), *SPLIT, "--arch", "googlenet", "--batch-size", "4", "--minutes", "5",
            "--checkpoint", "boxed/teacher.pt"]
    with pytest.raises(SystemExit) as stop:
        teacherTrain.main([*argv, "--time-budget", "0"])
    assert stop.value.code == 75
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 9)  # a new plan would differ
    teacherTrain.main([*argv, "--minutes", "1", "--resume"])  # even with another box
    final = load_checkpoint("boxed/teacher.pt", hint="")
    assert final["epochs"] == final["epochs_run"] == 3 and final["timing"]["minutes"] == 5


def test_a_box_too_small_for_one_epoch_is_refused_in_one_line_naming_the_smallest_that_fits(tree, capsys):
    line = one_error_line(lambda: teacherTrain.main(["--data-dir", str(tree), *SPLIT, "--arch", "googlenet",
                                                     "--batch-size", "4", "--minutes", "0.001"]), capsys)
    assert line.startswith("error: --minutes 0.001 is too short: one epoch takes about ")
    needed = float(line.rsplit("give --minutes ", 1)[1].split()[0])
    assert needed > 0.001 and line.endswith("or more")


# ----------------------------------------------------------------------------- the pipeline in a box, and its bundle

@pytest.fixture
def boxed_pipeline(smoke_run):
    """The session's smoke run (``tests/conftest.py``), a time-boxed pipeline: its root and its bundle."""
    root, _ = smoke_run
    return root, root / "results" / "smoke" / "bundle"


def test_every_stage_of_a_boxed_pipeline_chose_its_epochs_within_its_share(boxed_pipeline):
    root, bundle = boxed_pipeline
    results = json.loads((bundle / "results.json").read_text())
    assert results["pipeline"]["minutes"] == 3 and results["pipeline"]["total_seconds"] > 0
    for network in results["networks"]:
        timing = network["checkpoint"]["timing"]
        assert timing["minutes"] < 3 and timing["epochs"] == network["checkpoint"]["epochs"] >= 1, network["path"]
        assert timing["planned_seconds"] <= 60 * timing["minutes"]
    table = (bundle / "results.md").read_text()
    assert "## Training" in table and "| total, data decoding and start-up included |" in table


def test_the_bundle_is_small_enough_for_git_and_holds_every_networks_logits(boxed_pipeline):
    _, bundle = boxed_pipeline
    files, within = bundle_sizes(bundle)
    assert within and len(files) <= MAX_FILES
    assert all(size <= MAX_FILE_BYTES for _, size in files) and sum(size for _, size in files) <= MAX_BYTES
    assert {name for name, _ in files} == {"results.md", "results.json", "logits.npz", "metrics.jsonl",
                                           "accuracy_vs_gflops.png", "per_class_gain.png", "routed_confusion.png",
                                           "routing_share.png"}
    results = json.loads((bundle / "results.json").read_text())
    with np.load(bundle / "logits.npz") as logits:
        assert len(logits.files) == 2 + 2 * len(results["networks"])
    runs = {json.loads(line)["run"] for line in (bundle / "metrics.jsonl").read_text().splitlines()}
    assert len(runs) == len(results["networks"])  # every stage's training log


def test_a_bundle_alone_gives_the_same_tables_without_data_or_checkpoints(boxed_pipeline, tmp_path, monkeypatch):
    root, bundle = boxed_pipeline
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)  # no checkpoints beside it, and no data is read

    def no_data(*args, **kwargs):
        raise AssertionError("a bundle is analysed without the data")

    monkeypatch.setattr(utils.data, "load_cifar10", no_data)
    inference.main(["--bundle", str(copy), "--out", str(tmp_path / "again")])
    before = json.loads((bundle / "results.json").read_text())
    after = json.loads((tmp_path / "again" / "results.json").read_text())
    for key in ("accuracy", "gflops", "budgets", "curves", "comparisons", "kd_gain", "calibration", "per_class",
                "routed", "costs", "training", "provenance"):
        assert after.get(key) == before.get(key), key
    first, again = (path.read_text().splitlines()
                    for path in (bundle / "results.md", tmp_path / "again" / "results.md"))
    assert [line for line in again if "re-analysed from the bundle" not in line] == first
    assert any("re-analysed from the bundle" in line for line in again)


def test_a_bundle_reanalysed_with_another_policy_says_its_speed_was_not_measured(boxed_pipeline, tmp_path):
    _, bundle = boxed_pipeline
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("weights"))
    results = json.loads((copy / "results.json").read_text())  # as a GPU run's bundle: speeds measured
    cost = {"params": 1, "gflops": 1.0, "images_per_s": 100.0, "images_per_s_range": [90.0, 110.0]}
    results["costs"] = {"teacher": cost, "routed": {**cost, "router": "cascade"}}
    (copy / "results.json").write_text(json.dumps(results))
    inference.main(["--bundle", str(copy), "--router", "deferral", "--budget", "1.5", "--out", str(tmp_path / "r")])
    tmp_path = tmp_path / "r"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["routed"]["router"] == "deferral" and "routed (deferral)" not in results["costs"]
    (verdict,) = [line for line in (tmp_path / "results.md").read_text().splitlines()
                  if line.startswith("**Against the teacher.**")]
    assert verdict.endswith("images/s not measured (the run that wrote the bundle timed another routed system).")


@pytest.mark.parametrize("damage, needle", [
    ("no logits", "is not a results bundle"),
    ("a network missing", "lacks 'holdout_"),
    ("another split", "does not hold the split results.json describes"),
])
def test_a_damaged_or_foreign_bundle_is_refused_in_one_line(boxed_pipeline, tmp_path, damage, needle):
    _, bundle = boxed_pipeline
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if damage == "no logits":
        (copy / "logits.npz").unlink()
    else:
        with np.load(copy / "logits.npz") as f:
            arrays = dict(f)
        if damage == "a network missing":
            del arrays["holdout_1"]
        else:
            arrays["test_labels"] = arrays["test_labels"][:-1]
        np.savez(copy / "logits.npz", **arrays)
    with pytest.raises(UserError, match=needle):
        inference.main(["--bundle", str(copy), "--out", str(tmp_path / "out")])
