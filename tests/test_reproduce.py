"""reproduce.py: flags passed on to the right stages, stale stages found and retrained, --seeds summarised.

The staleness tests train a real googlenet teacher and KD student with the scripts themselves on a
tiny synthetic tree (two images per split, one step per epoch); the pipeline-level
tests replace only the plan and the inference stage, so no full pipeline runs here.
"""

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

import inference
import publish
import reproduce
import StudentTrain
import teacherTrain
import trainSelector
import utils.pipeline as pipeline
from models import build_model
from tests.conftest import PUBLISHED, write_tree
from utils.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from utils.cli import UserError
from utils.data import load_cifar10
from utils.runs import continue_command, default_checkpoint, final_command, final_path

NAME = "exp"
BUNDLE = Path("results") / NAME / "bundle"  # where run_pipeline writes its results in these tests


def tiny(tree, *extra):
    return ["--data-dir", str(tree), "--partial-data", "--limit", "2", "--holdout", "2", "--batch-size", "1",
            "--epochs", "1", "--device", "cpu", *extra]  # 2 steps: the last step's learning rate is 0


def teacher_argv(tree, *extra, name=NAME):
    return tiny(tree, "--name", name, "--arch", "googlenet", *extra)


def student_argv(tree, *extra, name=NAME):
    return tiny(tree, "--name", name, "--model", "googlenet", *extra)


TEACHER = f"checkpoints/{NAME}/teacher.pt"
STUDENT = f"checkpoints/{NAME}/student_googlenet.pt"


def sha(path):
    return load_checkpoint(path, hint="")["weights_sha256"]


def value(argv, flag):
    """The value argparse keeps: the last one given."""
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


# ----------------------------------------------------------------------------- pass-through

USER_FLAGS = ["--preset", "smoke", "--seed", "3", "--epochs", "2", "--device", "cpu", "--kd-loss", "mse",
              "--name", "mine", "--data-dir", "/data/c10", "--time-budget", "1.5", "--partial-data", "--download",
              "--with-nokd"]


def test_a_data_dir_without_cifar10_is_refused_in_one_line_before_the_configuration_is_shown(tmp_path, capsys):
    from utils.cli import run

    with pytest.raises(SystemExit) as refused:
        run(lambda: reproduce.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]))
    out, err = capsys.readouterr()
    assert refused.value.code == 2 and out == ""
    assert err.startswith(f"error: no CIFAR-10 found at {tmp_path / 'nowhere'}") and err.count("\n") == 1


def test_user_flags_reach_every_training_stage_and_win_over_the_preset():
    args = reproduce.parse_args(USER_FLAGS)
    plan, common = reproduce.stages(args, "mine", 3)
    assert [stage.title for stage in plan] == ["teacher", "students", "selector", "selector, shuffled-label control"]
    for stage in plan:
        parsed = stage.module.build_parser().parse_args(stage.argv)
        assert (parsed.seed, parsed.epochs, parsed.device, parsed.time_budget) == (3, 2, "cpu", 1.5), stage.title
        assert (parsed.name, parsed.data_dir, parsed.partial_data, parsed.download) == ("mine", "/data/c10", True, True)
        assert stage.argv.count("--epochs") == 1, stage.title  # the user's, not the preset's as well
        assert all(str(path).startswith(os.path.join("checkpoints", "mine", "")) for path in stage.paths)
    parsed = inference.build_parser().parse_args(common)
    assert (parsed.name, parsed.device, parsed.data_dir, parsed.partial_data, parsed.download) == (
        "mine", "cpu", "/data/c10", True, True)


def test_each_flag_goes_only_to_the_stages_that_use_it():
    plan, _ = reproduce.stages(reproduce.parse_args(USER_FLAGS), "mine", 3)
    by_title = {stage.title: stage.argv for stage in plan}
    for title, argv in by_title.items():
        assert ("--kd-loss" in argv) == ("--with-nokd" in argv) == (title == "students"), title
        split = not title.startswith("selector")  # the selector reads its split from the students' checkpoints
        assert ("--limit" in argv and "--holdout" in argv) == split, title
        if split:
            assert (value(argv, "--limit"), value(argv, "--holdout")) == ("20", "100"), title
    assert value(by_title["students"], "--kd-loss") == "mse"
    students = by_title["students"]
    assert students[students.index("--model") + 1:students.index("--model") + 3] == ["1", "2"]  # one loop
    assert value(by_title["selector"], "--views") == "1"
    assert "--shuffle-labels" in by_title["selector, shuffled-label control"]
    assert "--shuffle-labels" not in by_title["selector"]


def test_scripts_write_the_checkpoints_the_plan_inspects():
    plan, _ = reproduce.stages(reproduce.parse_args(USER_FLAGS), "mine", 3)
    for stage in plan:
        if stage.module is trainSelector:  # its parse_args reads the students' checkpoints
            parsed = stage.module.build_parser().parse_args(stage.argv)
            written = [default_checkpoint(parsed.name, "selector_shuffled" if parsed.shuffle_labels else "selector")]
        else:
            written = list(stage.module.runs(stage.module.parse_args(stage.argv)))
        assert written == list(map(str, stage.paths)), stage.title
    assert [path.name for path in plan[1].paths] == ["student_densenet121.pt", "student_densenet121_nokd.pt",
                                                     "student_googlenet.pt", "student_googlenet_nokd.pt"]


def test_presets_alone_fill_in_device_and_epochs():
    smoke, _ = reproduce.stages(reproduce.parse_args(["--preset", "smoke"]), "smoke", 0)
    for stage in smoke:
        parsed = stage.module.build_parser().parse_args(stage.argv)
        assert (parsed.epochs, parsed.device, parsed.seed, parsed.time_budget) == (1, "cpu", 0, None), stage.title
    full, common = reproduce.stages(reproduce.parse_args(["--preset", "full"]), "", 0)
    for stage in full:
        parsed = stage.module.build_parser().parse_args(stage.argv)
        assert not parsed.compile and parsed.device == "auto" and "--epochs" not in stage.argv, stage.title
        assert not {"--limit", "--holdout"} & set(stage.argv), stage.title  # every script's own split
        assert all(path.parent.name == "checkpoints" for path in stage.paths)
    assert len(full) == 4 and inference.build_parser().parse_args(common).name == ""


def test_a_time_box_leaves_the_epochs_to_each_stage():
    plan, _ = reproduce.stages(reproduce.parse_args(["--preset", "smoke", "--minutes", "8"]), "smoke", 0)
    assert all("--epochs" not in stage.argv for stage in plan)  # --minutes is added when each stage starts
    assert reproduce.parse_args(["--minutes", "8"]).minutes == 8


def test_epochs_from_a_bundle_give_each_stage_the_epochs_that_run_chose(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle", {"teacher": 23, "students": 11, "selector": 9, "control": 7},
                         fold_epochs={"selector": [12, 10, 11], "control": [8, 6, 7]})
    for preset in ("full", "smoke"):  # the bundle's 3 folds, not the smoke preset's 2
        args = reproduce.parse_args(["--epochs-from", str(bundle), "--with-nokd", "--preset", preset])
        plan, _ = reproduce.stages(args, "again", 0)
        assert {stage.title: value(stage.argv, "--epochs") for stage in plan} == {
            "teacher": "23", "students": "11", "selector": "9", "selector, shuffled-label control": "7"}
        selectors = {stage.title: stage.module.build_parser().parse_args(stage.argv) for stage in plan[2:]}
        assert selectors["selector"].fold_epochs == [12, 10, 11] and selectors["selector"].folds == 3
        assert selectors["selector, shuffled-label control"].fold_epochs == [8, 6, 7]


def fake_bundle(folder, epochs, fold_epochs=None):
    """A results bundle with one network per role, of the given epochs (and, for the selectors, their folds'):
    what --epochs-from reads."""
    import numpy as np

    folder.mkdir(parents=True)
    roles = ["teacher", "students", "students", "selector", "control"]
    networks = [{"role": role, "path": f"{role}.pt", "params": 1, "flops": 1,
                 "checkpoint": {"kind": role, "arch": "googlenet", "num_classes": 10, "epochs": epochs[role],
                                "epoch": 1,
                                "split": {"holdout": 2, "split_seed": 0, "limit": 2},
                                **({"cross_fit": {"epochs": fold_epochs[role]}} if role in (fold_epochs or {})
                                   else {})}} for role in roles]
    layout = {"teacher": 0, "students": [1, 2], "twins": [], "selector": 3, "control": 4}
    (folder / "results.json").write_text(json.dumps({"networks": networks, "layout": layout, "test_images": 2,
                                                     "split": networks[0]["checkpoint"]["split"]}))
    arrays = {f"{split}_labels": np.zeros(2, dtype=np.int64) for split in ("holdout", "test")}
    arrays.update({f"{split}_{k}": np.zeros((2, 10), dtype=np.float32) for split in ("holdout", "test")
                   for k in range(len(roles))})
    np.savez(folder / "logits.npz", **arrays)
    return folder


# ----------------------------------------------------------------------------- staleness

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder holding a one-epoch googlenet teacher and its KD student (experiment NAME), trained by the scripts."""
    root = tmp_path_factory.mktemp("reproduce")
    tree = write_tree(root / "cifar")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        teacherTrain.main(teacher_argv(tree))
        StudentTrain.main(student_argv(tree))
    finally:
        os.chdir(cwd)
    return root, tree, load_cifar10(tree, allow_partial=True, verbose=False).fingerprint


@pytest.fixture
def copy_of(trained, tmp_path, monkeypatch):
    """The trained experiment in a folder of its own, as the working directory: free to change."""
    root, tree, fingerprint = trained
    shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    return tree, fingerprint


def teacher_stage(tree, *extra, name=NAME):
    return reproduce.Stage("teacher", teacherTrain, [Path(f"checkpoints/{name}/teacher.pt")],
                           teacher_argv(tree, *extra, name=name), "teacher")


def student_stage(tree, *extra, name=NAME):
    return reproduce.Stage("student", StudentTrain, [Path(f"checkpoints/{name}/student_googlenet.pt")],
                           student_argv(tree, *extra, name=name), "students")


def test_stages_trained_as_asked_are_complete(trained, monkeypatch):
    root, tree, fingerprint = trained
    monkeypatch.chdir(root)
    assert pipeline.stage_state(teacher_stage(tree), fingerprint) == ("complete", "")
    assert pipeline.stage_state(student_stage(tree), fingerprint) == ("complete", "")
    # flags that do not change the result (time budget, logging, saving, device, data location) leave it current
    control = student_stage(tree, "--time-budget", "5", "--log-every", "7", "--save-every", "0", "--data-dir",
                            str(root / "copy"))
    assert pipeline.stage_state(control, fingerprint) == ("complete", "")


def test_other_flags_make_a_stage_stale(trained, monkeypatch):
    root, tree, fingerprint = trained
    monkeypatch.chdir(root)
    state, why = pipeline.stage_state(student_stage(tree, "--epochs", "2"), fingerprint)
    assert state == "stale" and why.startswith("trained with other flags: --epochs")
    state, why = pipeline.stage_state(student_stage(tree, "--kd-loss", "mse", "--seed", "4"), fingerprint)
    assert state == "stale" and "--kd-loss" in why and "--seed" in why


def test_other_data_makes_every_stage_stale(trained, tmp_path, monkeypatch):
    root, tree, fingerprint = trained
    other = load_cifar10(write_tree(tmp_path / "other", per_class=(5, 2)), allow_partial=True, verbose=False)
    assert other.fingerprint != fingerprint
    monkeypatch.chdir(root)
    assert pipeline.stage_state(teacher_stage(tree), other.fingerprint) == ("stale", "trained on other data")
    assert pipeline.stage_state(student_stage(tree), other.fingerprint) == ("stale", "trained on other data")


def test_nothing_trained_is_missing(trained, monkeypatch):
    root, tree, fingerprint = trained
    monkeypatch.chdir(root)
    assert pipeline.stage_state(teacher_stage(tree, name="never"), fingerprint) == ("missing", "")


def test_a_stage_of_several_checkpoints_some_complete_and_some_missing_is_stale(trained, monkeypatch):
    root, tree, fingerprint = trained
    monkeypatch.chdir(root)
    both = reproduce.Stage("students", StudentTrain, [Path(STUDENT), Path(STUDENT.replace(".pt", "_nokd.pt"))],
                           student_argv(tree, "--with-nokd"))
    state, why = pipeline.stage_state(both, fingerprint)
    assert state == "stale" and f"{STUDENT} complete" in why and "_nokd.pt missing" in why


def test_a_student_of_a_vanished_teacher_is_stale(copy_of):
    tree, fingerprint = copy_of
    os.remove(TEACHER)
    assert pipeline.stage_state(student_stage(tree), fingerprint) == ("stale", "its teacher changed since")


def plan_of(monkeypatch, *plan):
    """Make ``run_pipeline`` train these stages, and record the inference stage instead of running it (and skip
    publishing the weights)."""
    monkeypatch.setattr(reproduce, "stages", lambda args, name, seed: (list(plan), ["--name", name]))
    monkeypatch.setattr(pipeline, "finish_bundle", lambda *args: None)
    calls = []
    monkeypatch.setattr(inference, "main", calls.append)
    monkeypatch.setattr(publish, "main", lambda argv: None)
    return calls


def pipeline_args(*argv):
    return reproduce.parse_args(["--name", NAME, *argv])


def test_a_stale_stage_stops_the_pipeline_and_deletes_nothing_without_force(copy_of, monkeypatch, capsys):
    tree, fingerprint = copy_of
    old_teacher, old_student = sha(TEACHER), sha(STUDENT)
    teacherTrain.main(teacher_argv(tree, "--seed", "1", "--force"))
    assert sha(TEACHER) != old_teacher
    teacher_bytes, student_bytes = open(TEACHER, "rb").read(), open(STUDENT, "rb").read()
    calls = plan_of(monkeypatch, teacher_stage(tree, "--seed", "1"), student_stage(tree))

    with pytest.raises(UserError) as e:
        reproduce.run_pipeline(pipeline_args(), NAME, 0, fingerprint, BUNDLE)
    assert str(e.value) == (f"the student stage of experiment '{NAME}' is stale (its teacher changed since); nothing "
                            "was deleted: retrain it and the stages after it with --retrain-from students, or write "
                            "this run elsewhere with --name")
    assert open(TEACHER, "rb").read() == teacher_bytes and open(STUDENT, "rb").read() == student_bytes
    assert calls == []

    wall = reproduce.run_pipeline(pipeline_args("--force"), NAME, 0, fingerprint, BUNDLE)
    student = load_checkpoint(STUDENT, hint="")
    assert student["weights_sha256"] != old_student and student["teacher"]["weights_sha256"] == sha(TEACHER)
    assert pipeline.stage_state(student_stage(tree), fingerprint) == ("complete", "")
    assert set(wall) == {"teacher", "student", "inference", "published weights"}
    assert calls == [["--name", NAME, "--specialists", "none", "--out", str(pipeline.unfinished(BUNDLE))]]


def test_a_stale_stage_is_retrained_with_the_stages_after_it_and_none_before(copy_of, monkeypatch):
    tree, fingerprint = copy_of
    teacherTrain.main(teacher_argv(tree, "--seed", "1", "--force"))  # the student's teacher changes
    teacher_bytes, old_student = open(TEACHER, "rb").read(), sha(STUDENT)
    plan_of(monkeypatch, teacher_stage(tree, "--seed", "1"), student_stage(tree))
    reproduce.run_pipeline(pipeline_args("--retrain-from", "students"), NAME, 0, fingerprint, BUNDLE)
    assert open(TEACHER, "rb").read() == teacher_bytes  # the complete earlier stage, untouched
    assert sha(STUDENT) != old_student and load_checkpoint(STUDENT, hint="")["teacher"]["weights_sha256"] == \
        sha(TEACHER)


def first_save_only(path):
    """``path``'s run as a kill between its first save of best weights and of its resume state leaves it."""
    save_checkpoint(path, {**load_checkpoint(path, hint=""), "complete": False})
    os.remove(path.replace(".pt", ".last.pt"))


def test_a_stage_killed_between_its_first_two_saves_starts_again_when_the_command_is_run_again(copy_of,
                                                                                               monkeypatch):
    tree, fingerprint = copy_of
    first_save_only(TEACHER)
    for path in Path("checkpoints", NAME).glob("student_googlenet.*"):  # the pipeline had not reached them
        path.unlink()
    assert pipeline.stage_state(teacher_stage(tree), fingerprint) == ("missing", "")
    calls = plan_of(monkeypatch, teacher_stage(tree), student_stage(tree))
    reproduce.run_pipeline(pipeline_args(), NAME, 0, fingerprint, BUNDLE)
    assert load_checkpoint(TEACHER, hint="")["complete"] and load_checkpoint(STUDENT, hint="")["complete"]
    assert len(calls) == 1


def test_a_stage_of_several_runs_none_complete_and_one_unresumable_starts_again(copy_of):
    tree, fingerprint = copy_of
    twin = STUDENT.replace(".pt", "_nokd.pt")
    student = load_checkpoint(STUDENT, hint="")
    for path, kd in ((STUDENT, True), (twin, False)):
        record = {**student, "complete": False, "kd": kd, "config": {**student["config"], "no_kd": not kd,
                                                                      "checkpoint": path}}
        save_checkpoint(path, record)
        save_checkpoint(path.replace(".pt", ".last.pt"), record)
    os.remove(twin.replace(".pt", ".last.pt"))  # the twin was killed between its first two saves
    both = reproduce.Stage("students", StudentTrain, [Path(STUDENT), Path(twin)], student_argv(tree, "--with-nokd"),
                           "students")
    assert pipeline.stage_state(both, fingerprint) == ("missing", "")


def test_another_seed_on_an_existing_experiment_is_refused(copy_of, monkeypatch):
    tree, fingerprint = copy_of
    plan_of(monkeypatch, teacher_stage(tree, "--seed", "5"), student_stage(tree, "--seed", "5"))
    with pytest.raises(UserError, match="the teacher stage .* is stale \\(trained with other flags: --seed\\)"):
        reproduce.run_pipeline(pipeline_args(), NAME, 5, fingerprint, BUNDLE)


def test_inference_and_publishing_stopped_in_a_pipeline_advise_the_pipeline_again(copy_of, monkeypatch):
    tree, fingerprint = copy_of
    plan_of(monkeypatch, teacher_stage(tree), student_stage(tree))  # both complete: skipped
    advised = []
    monkeypatch.setattr(inference, "main", lambda argv: advised.append(continue_command("python inference.py")))
    monkeypatch.setattr(publish, "main", lambda argv: advised.append(continue_command("python publish.py")))
    args = pipeline_args()
    reproduce.run_pipeline(args, NAME, 0, fingerprint, BUNDLE)
    assert advised == [args.command, args.command]


def test_inference_and_publishing_in_a_pipeline_record_and_print_the_bundle_s_own_folder(copy_of, monkeypatch):
    tree, fingerprint = copy_of
    plan_of(monkeypatch, teacher_stage(tree), student_stage(tree))  # both complete: skipped
    shown = []

    def recorded(script):
        return lambda argv: shown.append((final_command(shlex.join(["python", script, *argv])),
                                          final_path(value(argv, "--out"))))

    monkeypatch.setattr(inference, "main", recorded("inference.py"))
    monkeypatch.setattr(publish, "main", recorded("publish.py"))
    reproduce.run_pipeline(pipeline_args(), NAME, 0, fingerprint, BUNDLE)
    (inference_command, inference_out), (publish_command, publish_out) = shown
    assert inference_out == BUNDLE and publish_out == BUNDLE / "weights"
    assert inference_command.endswith(f"--out {BUNDLE}")
    assert f"--out {BUNDLE / 'weights'} --force" in publish_command
    assert final_path(pipeline.unfinished(BUNDLE)) == pipeline.unfinished(BUNDLE)  # outside the pipeline: as it is


def test_a_pipeline_stopped_as_it_publishes_leaves_its_out_empty_for_its_command_to_finish_the_bundle_there(
        copy_of, monkeypatch):
    tree, fingerprint = copy_of
    finish_bundle = pipeline.finish_bundle
    plan_of(monkeypatch, teacher_stage(tree), student_stage(tree))  # both complete: skipped
    monkeypatch.setattr(pipeline, "finish_bundle", finish_bundle)

    def bundle(argv):  # what inference.py writes
        out = Path(value(argv, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(PUBLISHED / "results.json", out)

    monkeypatch.setattr(inference, "main", bundle)
    monkeypatch.setattr(publish, "main", lambda argv: sys.exit(143))  # as a SIGTERM while publishing
    args = pipeline_args("--out", str(BUNDLE))
    with pytest.raises(SystemExit):
        reproduce.run_pipeline(args, NAME, 0, fingerprint, BUNDLE)
    assert not BUNDLE.exists()
    (pipeline.unfinished(BUNDLE) / "a_stopped_run_s.png").write_bytes(b"")
    again = reproduce.parse_args(shlex.split(args.command)[2:])  # the command it printed
    assert reproduce.output_folder(again) == BUNDLE

    monkeypatch.setattr(publish, "main", lambda argv: None)
    reproduce.run_pipeline(again, NAME, 0, fingerprint, BUNDLE)
    assert sorted(p.name for p in BUNDLE.iterdir()) == ["metrics.jsonl", "results.json", "results.md"]
    assert json.loads((BUNDLE / "results.json").read_text())["pipeline"]["command"] == args.command
    assert not pipeline.unfinished(BUNDLE).exists()


def test_a_pipeline_stopped_by_its_time_budget_exits_75_and_goes_on_when_run_again(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    _, tree, fingerprint = trained
    monkeypatch.chdir(tmp_path)
    teacher, student = "checkpoints/cut/teacher.pt", "checkpoints/cut/student_googlenet.pt"
    budget = ["--time-budget", "0"]  # every stage stops after its first epoch
    calls = plan_of(monkeypatch, teacher_stage(tree, "--epochs", "2", *budget, name="cut"),
                    student_stage(tree, *budget, name="cut"))
    args = pipeline_args()

    with pytest.raises(SystemExit) as stop:
        reproduce.run_pipeline(args, "cut", 0, fingerprint, BUNDLE)
    assert stop.value.code == 75
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"stopped in the teacher stage; continue with: {args.command}")
    assert calls == [] and not os.path.exists(student)
    assert pipeline.stage_state(teacher_stage(tree, "--epochs", "2", name="cut"), fingerprint) == ("partial", "")
    first_epoch = load_checkpoint(teacher.replace(".pt", ".last.pt"), hint="")["history"]

    assert reproduce.run_pipeline(args, "cut", 0, fingerprint, BUNDLE) is not None

    out = capsys.readouterr().out
    assert f"== teacher -> {teacher} (resuming)" in out and f"== student -> {student}\n" in out
    done = load_checkpoint(teacher.replace(".pt", ".last.pt"), hint="")
    assert done["complete"] and done["history"][:1] == first_epoch and len(done["history"]) == 2
    assert load_checkpoint(student, hint="")["complete"] and len(calls) == 1


def random_student(path, seed):
    """A googlenet student checkpoint with untrained weights on the tiny split: enough for a selector."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("googlenet")
    save_checkpoint(path, {"kind": "student", "arch": "googlenet", "num_classes": 10, "model": clean_state_dict(model),
                           "split": {"holdout": 20, "split_seed": 0, "limit": 0}, "complete": True,
                           "config": {"translate": 4, "padding": "reflect", "tta": "none"}})


def test_a_selector_of_a_changed_student_is_stale(trained, tmp_path):
    _, tree, fingerprint = trained
    students = [str(tmp_path / "s1.pt"), str(tmp_path / "s2.pt")]
    for seed, path in enumerate(students):
        random_student(path, seed)
    argv = ["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu", "--views", "0",
            "--folds", "2", "--epochs", "1", "--batch-size", "3", "--checkpoint", str(tmp_path / "selector.pt")]
    trainSelector.main(argv)
    stage = reproduce.Stage("selector", trainSelector, [tmp_path / "selector.pt"], argv)
    assert pipeline.stage_state(stage, fingerprint) == ("complete", "")
    random_student(students[1], seed=7)
    assert pipeline.stage_state(stage, fingerprint) == ("stale", "its student 2 changed since")


# ----------------------------------------------------------------------------- --seeds

def fake_results(folder, accuracy, kd_gain, command="python reproduce.py"):
    """A bundle's results.json: ``accuracy`` by label (the label is the identifier here), ``kd_gain`` by arch, as
    ``command`` wrote it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(
        {"accuracy": accuracy, "labels": {"systems": {k: k for k in accuracy}},
         "kd_gain": {arch: {"difference": d, "low": d - 1, "high": d + 1} for arch, d in kd_gain.items()},
         "pipeline": {"command": command}}))


def test_summary_is_mean_and_sample_std_per_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / NAME
    fake_results(out / "seed0", {"Teacher": 0.90, "Student googlenet": 0.80}, {"googlenet": 0.02})
    fake_results(out / "seed1", {"Teacher": 0.92, "Student googlenet": 0.83}, {"googlenet": 0.04})

    pipeline.summarise(out, {0: out / "seed0", 1: out / "seed1"})

    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    rows = summary["rows"]
    assert list(rows) == ["Teacher", "Student googlenet", "kd_gain:googlenet"]
    assert [row["label"] for row in rows.values()] == ["Teacher", "Student googlenet", "KD gain: googlenet"]
    expected = {"Teacher": (91.0, 2 ** 0.5), "Student googlenet": (81.5, 4.5 ** 0.5),
                "kd_gain:googlenet": (3.0, 2 ** 0.5)}
    for row, (mean, std) in expected.items():  # the sample std of two values d apart is d / sqrt(2), not d / 2
        assert rows[row]["mean"] == pytest.approx(mean) and rows[row]["std"] == pytest.approx(std), row
    assert rows["Teacher"]["values"] == pytest.approx([90.0, 92.0])
    lines = (out / "seeds.md").read_text().splitlines()
    assert lines[0] == "# Results over seeds 0, 1"
    table = lines[lines.index("| Row | Mean ± std | seed 0 | seed 1 |"):]
    assert table[1:] == ["|---|---|---|---|",
                         "| Teacher | 91.00 ± 1.41 | 90.00 | 92.00 |",
                         "| Student googlenet | 81.50 ± 2.12 | 80.00 | 83.00 |",
                         "| KD gain: googlenet | 3.00 ± 1.41 | 2.00 | 4.00 |"]


def test_a_row_that_one_seed_lacks_stands_under_the_seeds_that_have_it(tmp_path):
    out = tmp_path / "results" / NAME
    fake_results(out / "seed0", {"Teacher": 0.90}, {})
    fake_results(out / "seed1", {"Teacher": 0.92, "Routed": 0.85}, {})
    fake_results(out / "seed2", {"Teacher": 0.94, "Routed": 0.87}, {})

    pipeline.summarise(out, {0: out / "seed0", 1: out / "seed1", 2: out / "seed2"})

    rows = json.loads((out / "seeds.json").read_text())["rows"]
    assert rows["Routed"]["values"] == [None, pytest.approx(85.0), pytest.approx(87.0)]
    assert rows["Routed"]["mean"] == pytest.approx(86.0) and rows["Routed"]["std"] == pytest.approx(2 ** 0.5)
    assert "| Routed | 86.00 ± 1.41 | — | 85.00 | 87.00 |" in (out / "seeds.md").read_text()


@pytest.fixture
def seeds_run(tmp_path, monkeypatch):
    """``reproduce.main`` with ``run_pipeline`` replaced by a recorder that writes fake results for each seed."""
    tree = write_tree(tmp_path / "cifar", per_class=(1, 1))
    monkeypatch.chdir(tmp_path)
    calls, stop_at = [], []

    def fake_pipeline(args, name, seed, fingerprint, out, started=None):
        plan, _ = reproduce.stages(args, name, seed)
        calls.append((name, seed, {value(stage.argv, "--seed") for stage in plan}, fingerprint, str(out),
                      args.command))
        if seed in stop_at:
            raise SystemExit(143)  # a stage stopped by SIGTERM
        fake_results(out, {"Teacher": 0.5 + seed / 100}, {}, args.command)
        return {}

    monkeypatch.setattr(reproduce, "run_pipeline", fake_pipeline)
    return tree, calls, stop_at


def test_seeds_run_one_pipeline_per_seed_then_summarise(seeds_run, tmp_path):
    tree, calls, _ = seeds_run
    reproduce.main(["--preset", "smoke", "--seeds", "0", "1", "--data-dir", str(tree), "--partial-data"])
    fingerprint = load_cifar10(tree, allow_partial=True, verbose=False).fingerprint
    (out,) = (tmp_path / "results" / "smoke").glob("run-*")  # a folder of its own
    out = out.relative_to(tmp_path)
    assert [call[:-1] for call in calls] == [
        (os.path.join("smoke", "seed0"), 0, {"0"}, fingerprint, str(out / "seed0")),
        (os.path.join("smoke", "seed1"), 1, {"1"}, fingerprint, str(out / "seed1"))]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["rows"]["Teacher"]["values"] == pytest.approx([50.0, 51.0])
    assert "| Teacher | 50.50 ± 0.71 | 50.00 | 51.00 |" in (out / "seeds.md").read_text()


def test_seeds_stop_at_a_stopped_pipeline_without_a_summary(seeds_run, tmp_path):
    tree, calls, stop_at = seeds_run
    stop_at.append(0)
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--preset", "smoke", "--seeds", "0", "1", "--data-dir", str(tree), "--partial-data"])
    assert stop.value.code == 143 and [seed for _, seed, *_ in calls] == [0]
    assert not list((tmp_path / "results").rglob("seeds.md"))


def test_a_stopped_seeds_run_goes_on_in_its_folder_keeping_the_bundles_it_finished(seeds_run, tmp_path, capsys):
    tree, calls, stop_at = seeds_run
    stop_at.append(1)
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "smoke", "--seeds", "0", "1", "--data-dir", str(tree), "--partial-data"])
    (out,) = (tmp_path / "results" / "smoke").glob("run-*")
    (out / "seed1.unfinished").mkdir()  # what seed 1 was building when it stopped
    command = shlex.split(calls[-1][-1])  # the command it printed
    assert command[-2:] == ["--out", str(out.relative_to(tmp_path))]
    calls.clear(), stop_at.clear()
    reproduce.main(command[2:])
    assert [seed for _, seed, *_ in calls] == [1] and "seed 0: its bundle " in capsys.readouterr().out
    assert json.loads((out / "seeds.json").read_text())["rows"]["Teacher"]["values"] == pytest.approx([50.0, 51.0])

    for refused in (["--force"], ["--seeds", "0", "2"]):  # seed 0's bundle would be another command's
        with pytest.raises(UserError, match=f"--out {out.relative_to(tmp_path)} already holds something"):
            reproduce.main([*command[2:], *refused])


def test_seed_and_seeds_together_are_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--seed", "1", "--seeds", "0", "1"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "argument --seeds: not allowed with argument --seed " in lines[0]


def test_a_damaged_training_log_is_refused_in_one_line_naming_the_stage_to_retrain(tmp_path):
    from types import SimpleNamespace

    stage = SimpleNamespace(title="students", step="students")
    log = tmp_path / "student_googlenet.metrics.jsonl"
    log.write_text('{"epoch": 1, "lr": 0.1}\n{"epoch": 2, "l')  # cut short
    with pytest.raises(UserError, match=r"student_googlenet.metrics.jsonl is damaged \(.*\); the bundle's training "
                                        r"logs need it: retrain the students stage with --retrain-from students$"):
        pipeline.training_log(log, stage)
    log.write_text('{"epoch": 1, "lr": 0.1}\n')
    assert pipeline.training_log(log, stage) == [{"epoch": 1, "lr": 0.1}]
    assert pipeline.training_log(tmp_path / "none.metrics.jsonl", stage) == []
