"""The training engine through teacherTrain.py and StudentTrain.py on a tiny synthetic CIFAR-10.

Every run uses ``--limit 10`` (one image of each class per split) and one step per epoch, so a
real architecture trains in seconds on a CPU.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import StudentTrain
import teacherTrain
import utils.checkpoint
import utils.distill
import utils.engine
import utils.lock
import utils.losses
from models import build_model
from tests.conftest import PUBLISHED, REPO, one_error_line, write_tree
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from utils.cli import UserError, run
from utils.data import CLASSES, DeviceLoader, load_cifar10, make_splits
from utils.engine import evaluate, learning_rate, warmup_steps
from utils.losses import distillation_loss
from utils.runtime import Runtime
from utils.split import Split
from utils.timebox import evaluated_epoch

TEACHER_ARCH = "googlenet"
STUDENT_ARCH = "densenet121"  # StudentTrain.py --model 1
SPLIT = {"holdout": 10, "limit": 10}
TEACHER_HINT = "python teacherTrain.py"


def flags(tree, checkpoint, *extra, epochs=1):
    return ["--data-dir", str(tree), "--holdout", str(SPLIT["holdout"]), "--limit", str(SPLIT["limit"]),
            "--batch-size", "10", "--epochs", str(epochs), "--device", "cpu", "--checkpoint", str(checkpoint),
            "--partial-data", *extra]


def teacher_flags(tree, checkpoint, *extra, epochs=1):
    return flags(tree, checkpoint, "--arch", TEACHER_ARCH, *extra, epochs=epochs)


def metrics(checkpoint):
    with open(checkpoint.with_suffix(".metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def run_files(stem):
    """What one complete training run writes."""
    return sorted(f"{stem}.{suffix}" for suffix in ("config.json", "curves.png", "last.pt", "metrics.jsonl", "pt"))


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("data") / "cifar")


@pytest.fixture(scope="module")
def teacher(tree, tmp_path_factory):
    """One teacher epoch, shared by the tests that read or use its checkpoint."""
    checkpoint = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    teacherTrain.main(teacher_flags(tree, checkpoint))
    return checkpoint


# ----------------------------------------------------------------------------- teacher

def test_teacher_epoch_writes_a_complete_checkpoint_set(teacher, tree):
    assert files(teacher.parent) == run_files("teacher")
    assert teacher.with_suffix(".curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = torch.load(teacher, map_location="cpu", weights_only=True)
    for key in ("arch", "num_classes", "classes", "model", "config", "epoch", "holdout_acc", "test_acc",
                "data_fingerprint", "versions"):
        assert key in checkpoint, key
    assert checkpoint["kind"] == "teacher" and checkpoint["arch"] == TEACHER_ARCH
    assert checkpoint["num_classes"] == 10 and list(checkpoint["classes"]) == list(CLASSES)
    assert checkpoint["epoch"] == 1 and checkpoint["complete"] is True
    assert 0.0 <= checkpoint["holdout_acc"] <= 1.0 and 0.0 <= checkpoint["test_acc"] <= 1.0
    assert checkpoint["config"]["arch"] == TEACHER_ARCH and checkpoint["config"]["holdout"] == SPLIT["holdout"]
    assert checkpoint["split"] == {"holdout": 10, "split_seed": 0, "limit": 10}
    assert checkpoint["versions"]["torch"] == str(torch.__version__)
    assert not [k for k in checkpoint["model"] if k.startswith(("_orig_mod.", "module."))]
    data = load_cifar10(tree, verbose=False, allow_partial=True)
    assert checkpoint["data_fingerprint"] == data.fingerprint

    # the rebuilt model evaluates, and reproduces the recorded test accuracy
    checked = load_checkpoint(teacher, hint=TEACHER_HINT, kind="teacher", arch=TEACHER_ARCH)
    model = model_from_checkpoint(checked, teacher, TEACHER_HINT).eval()
    x, y = make_splits(data, Split(SPLIT["holdout"], 0, SPLIT["limit"]))["test"]
    scores = evaluate(model, DeviceLoader(x, y, 10, "cpu"), Runtime(torch.device("cpu")))
    assert scores["acc"] == pytest.approx(checkpoint["test_acc"], abs=1e-6)

    # after one epoch the best weights are the last ones
    last = torch.load(teacher.with_suffix(".last.pt"), map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["complete"] is True and "optimizer" in last
    assert last["model"].keys() == checkpoint["model"].keys()
    assert all(torch.equal(last["model"][k], checkpoint["model"][k]) for k in last["model"])

    (record,) = metrics(teacher)
    assert record["epoch"] == 1
    for key in ("lr", "train_loss", "train_acc", "holdout_acc"):
        assert isinstance(record[key], float), key


# ----------------------------------------------------------------------------- students

def test_kd_student_epoch_uses_the_teacher(teacher, tree, tmp_path, monkeypatch):
    seen = {"teacher_outputs": [], "kd_calls": []}
    load_teacher, terms = utils.distill.load_teacher, utils.losses.kd_terms

    def spy_load_teacher(*args, **kwargs):
        teacher = load_teacher(*args, **kwargs)
        seen["teacher"] = teacher.model
        teacher.model.register_forward_hook(lambda _m, _i, out: seen["teacher_outputs"].append(out.detach().clone()))
        return teacher

    def spy_kd_terms(name, student_logits, teacher_logits, targets, temperature, alpha, label_smoothing):
        seen["kd_calls"].append((name, teacher_logits.detach().clone(), {"temperature": temperature, "alpha": alpha}))
        return terms(name, student_logits, teacher_logits, targets, temperature, alpha, label_smoothing)

    monkeypatch.setattr(utils.distill, "load_teacher", spy_load_teacher)
    monkeypatch.setattr(utils.losses, "kd_terms", spy_kd_terms)
    checkpoint = tmp_path / "student.pt"
    StudentTrain.main(flags(tree, checkpoint, "--teacher", str(teacher), "--temperature", "3", "--alpha", "0.8"))

    # the frozen teacher's logits of each training batch went into the KD loss
    assert seen["kd_calls"] and len(seen["kd_calls"]) == len(seen["teacher_outputs"])
    for (name, teacher_logits, kwargs), output in zip(seen["kd_calls"], seen["teacher_outputs"]):
        assert name == "kl" and kwargs["temperature"] == 3.0 and kwargs["alpha"] == 0.8
        assert torch.equal(teacher_logits, output)
    frozen = seen["teacher"]
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    saved_teacher = torch.load(teacher, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(v, saved_teacher[k]) for k, v in frozen.state_dict().items())

    assert files(tmp_path) == run_files("student")
    student = load_checkpoint(checkpoint, hint="python StudentTrain.py", kind="student", arch=STUDENT_ARCH)
    assert student["kd"] is True and student["complete"] is True
    assert student["teacher"] == {"path": str(teacher), "arch": TEACHER_ARCH,
                                  "weights_sha256": load_checkpoint(teacher, hint="")["weights_sha256"]}
    assert student["config"]["temperature"] == 3.0 and student["config"]["alpha"] == 0.8
    assert student["data_fingerprint"] == torch.load(teacher, weights_only=True)["data_fingerprint"]
    model_from_checkpoint(student, checkpoint, "python StudentTrain.py")


def test_default_student_checkpoint_names():
    def checkpoints(*argv):
        return list(StudentTrain.runs(StudentTrain.parse_args(argv)))

    assert checkpoints() == ["checkpoints/student_densenet121.pt"]
    assert checkpoints("--no-kd") == ["checkpoints/student_densenet121_nokd.pt"]
    assert checkpoints("--model", "2") == ["checkpoints/student_googlenet.pt"]
    assert checkpoints("--model", "2", "--no-kd") == ["checkpoints/student_googlenet_nokd.pt"]
    assert checkpoints("--model", "1", "2", "--with-nokd", "--name", "x") == [
        "checkpoints/x/student_densenet121.pt", "checkpoints/x/student_densenet121_nokd.pt",
        "checkpoints/x/student_googlenet.pt", "checkpoints/x/student_googlenet_nokd.pt"]
    assert StudentTrain.parse_args(["--model", "resnet50", "--no-kd"]).members[0].arch == "resnet50"
    assert checkpoints("--no-kd", "--checkpoint", "x.pt") == ["x.pt"]


def test_student_refuses_a_teacher_with_another_holdout_split(teacher, tree, tmp_path):
    argv = flags(tree, tmp_path / "s.pt", "--teacher", str(teacher))
    argv[argv.index("--holdout") + 1] = "20"
    with pytest.raises(UserError, match="--holdout 10"):
        StudentTrain.main(argv)
    assert not (tmp_path / "s.pt").exists()


def teacher_agreement_and_kl(student, x, teacher_logits, temperature):
    with torch.no_grad():
        s = student(x)
    p_t = torch.softmax(teacher_logits / temperature, 1)
    kl = (p_t * (torch.log_softmax(teacher_logits / temperature, 1) - torch.log_softmax(s / temperature, 1))).sum(1)
    return (s.argmax(1) == teacher_logits.argmax(1)).float().mean().item(), kl.mean().item()


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_kd_loss_pulls_the_student_towards_the_teacher(alpha):
    """alpha = 1: the student learns the teacher's (random) function; alpha = 0, the control: it does not."""
    torch.manual_seed(0)
    teacher, student = build_model("selector", 10), build_model("selector", 10)
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # deterministic train-mode forward passes
    teacher.eval().requires_grad_(False)
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        t = teacher(x)
        t = (t - t.mean(0)) / t.std(0)  # a random network's argmax is nearly constant; spread it over classes
        t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True) * 4  # and make the teacher confident
    assert len(t.argmax(1).unique()) >= 5
    labels = (t.argmax(1) + 1) % 10  # the labels contradict the teacher on every image
    temperature = 2.0
    agreement_before, kl_before = teacher_agreement_and_kl(student, x, t, temperature)
    assert agreement_before <= 0.3
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        loss = distillation_loss("kl", temperature, alpha)(student(x), labels, t)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    agreement, kl = teacher_agreement_and_kl(student, x, t, temperature)
    if alpha == 1.0:
        assert kl < 0.3 * kl_before, (kl_before, kl)
        assert agreement >= 0.8, (agreement_before, agreement)
    else:
        assert kl > kl_before, (kl_before, kl)
        assert agreement <= 0.3, (agreement_before, agreement)


# ----------------------------------------------------------------------------- interrupt and resume

def test_interrupt_and_resume_match_an_uninterrupted_run(tree, tmp_path):
    checkpoint = tmp_path / "run" / "teacher.pt"
    last = checkpoint.with_suffix(".last.pt")
    with pytest.raises(SystemExit) as stop:
        teacherTrain.main(teacher_flags(tree, checkpoint, "--time-budget", "0", epochs=2))
    assert stop.value.code == 75  # EX_TEMPFAIL: not done, run it again
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["complete"] is False
    best = load_checkpoint(checkpoint, hint=TEACHER_HINT, kind="teacher")
    assert best["complete"] is False and best["test_acc"] is None  # the test set waits for the end
    assert len(metrics(checkpoint)) == 1
    before = last.read_bytes()

    with pytest.raises(UserError, match="--lr") as e:
        teacherTrain.main(teacher_flags(tree, checkpoint, "--resume", "--lr", "0.05", epochs=2))
    assert "resume with the same flags" in str(e.value)
    assert last.read_bytes() == before  # a refused resume leaves the run as it was

    teacherTrain.main(teacher_flags(tree, checkpoint, "--resume", epochs=2))  # --time-budget may change
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["complete"] is True and len(state["history"]) == 2
    final = load_checkpoint(checkpoint, hint=TEACHER_HINT, kind="teacher", arch=TEACHER_ARCH)
    assert final["complete"] is True and final["test_acc"] is not None and final["epochs_run"] == 2
    assert [r["epoch"] for r in metrics(checkpoint)] == [1, 2]
    model_from_checkpoint(final, checkpoint, TEACHER_HINT)

    # resuming is exact: the same weights as two epochs in one go
    straight = tmp_path / "straight" / "teacher.pt"
    teacherTrain.main(teacher_flags(tree, straight, epochs=2))
    reference = torch.load(straight.with_suffix(".last.pt"), map_location="cpu", weights_only=True)
    assert reference["model"].keys() == state["model"].keys()
    differing = [k for k in state["model"] if not torch.equal(state["model"][k], reference["model"][k])]
    assert not differing, differing[:5]
    assert [r["train_loss"] for r in reference["history"]] == [r["train_loss"] for r in state["history"]]


def test_resume_without_a_saved_run(tree, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    with pytest.raises(UserError) as e:
        teacherTrain.main(teacher_flags(tree, checkpoint, "--resume"))
    assert str(checkpoint.with_suffix(".last.pt")) in str(e.value)
    assert "without --resume" in str(e.value)


# ----------------------------------------------------------------------------- atomic writes

def small_checkpoint(seed):
    torch.manual_seed(seed)
    return {"kind": "teacher", "arch": "selector", "num_classes": 2, "model": build_model("selector", 2).state_dict()}


@pytest.mark.parametrize("failure,raised", [(OSError(28, "No space left on device"), CheckpointError),
                                            (KeyboardInterrupt(), KeyboardInterrupt)])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure, raised):
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, small_checkpoint(0))
    assert files(tmp_path) == ["teacher.pt"]
    good = path.read_bytes()

    def partial_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(good[: len(good) // 3])
        raise failure

    monkeypatch.setattr(utils.checkpoint.torch, "save", partial_save)
    with pytest.raises(raised) as e:
        save_checkpoint(path, small_checkpoint(1))
    if raised is CheckpointError:
        assert str(e.value) == f"could not write {path} (No space left on device); the previous file is kept"
    monkeypatch.undo()

    assert path.read_bytes() == good
    assert files(tmp_path) == ["teacher.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path, hint="x")
    assert all(torch.equal(v, small_checkpoint(0)["model"][k]) for k, v in loaded["model"].items())


# ----------------------------------------------------------------------------- bad inputs

def test_missing_teacher_checkpoint(tree, tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(UserError) as e:
        StudentTrain.main(flags(tree, tmp_path / "s.pt", "--teacher", str(missing)))
    assert str(missing) in str(e.value) and TEACHER_HINT in str(e.value)


def test_truncated_checkpoint(teacher, tmp_path):
    truncated = tmp_path / "teacher.pt"
    content = teacher.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(truncated, hint=TEACHER_HINT, kind="teacher")
    assert str(truncated) in str(e.value) and f"delete it and run `{TEACHER_HINT}` again" in str(e.value)


def test_checkpoint_of_another_architecture_or_kind(teacher):
    with pytest.raises(CheckpointError, match=f"holds a {TEACHER_ARCH}, not a densenet121"):
        load_checkpoint(teacher, hint=TEACHER_HINT, arch="densenet121")
    with pytest.raises(CheckpointError, match="not a student"):
        load_checkpoint(teacher, hint="python StudentTrain.py", kind="student")


def test_a_googlenet_checkpoint_of_the_first_format_loads_as_googlenet32(tmp_path):
    """Format 1 called "googlenet" the network without max-pooling before its inception blocks."""
    torch.manual_seed(0)
    old = build_model("googlenet32").eval()
    state = utils.checkpoint.clean_state_dict(old)
    path = tmp_path / "student_googlenet.pt"
    torch.save({"format": "mskd-checkpoint/1", "kind": "student", "arch": "googlenet", "num_classes": 10,
                "model": state, "weights_sha256": utils.checkpoint.weights_fingerprint(state)}, path)
    checkpoint = load_checkpoint(path, hint="", kind="student", arch="googlenet32")
    model = model_from_checkpoint(checkpoint, path, "").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), old(x))
    with pytest.raises(CheckpointError, match="holds a googlenet32, not a googlenet"):
        load_checkpoint(path, hint="", arch="googlenet")


def test_weights_that_do_not_fit_the_architecture(teacher, tmp_path):
    checkpoint = load_checkpoint(teacher, hint=TEACHER_HINT)
    checkpoint["arch"] = "resnet50"
    with pytest.raises(CheckpointError, match="do not fit resnet50"):
        model_from_checkpoint(checkpoint, teacher, TEACHER_HINT)


def test_tampered_weights_are_detected(tmp_path):
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, small_checkpoint(0))
    checkpoint = torch.load(path, weights_only=True)
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name] + 1
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, hint=TEACHER_HINT)


@pytest.mark.parametrize("content", ["text", "README.md", "npz", "objects", "tensor", "dict"])
def test_files_that_are_not_checkpoints_are_named_so_and_never_to_be_deleted(tmp_path, content):
    path = tmp_path / "teacher.pt"
    if content == "text":
        path.write_text("this is not a checkpoint\n")
        expected = "is not a checkpoint (not a file torch.save writes)"
    elif content == "README.md":
        path = REPO / "README.md"
        expected = "is not a checkpoint (not a file torch.save writes)"
    elif content == "npz":  # a zip archive too, as torch.save's files are: a bundle's logits.npz
        path = PUBLISHED / "logits.npz"
        expected = "is not a checkpoint (not a file torch.save writes)"
    elif content == "objects":  # another program's pickle: not to be loaded, nor deleted on our word
        torch.save(argparse.Namespace(epochs=3), path)
        expected = "is not a checkpoint of this project (it holds Python objects"
    else:
        torch.save(torch.zeros(3) if content == "tensor" else {"model": {}, "epoch": 1}, path)
        expected = "not a checkpoint of this project"
    with pytest.raises(CheckpointError, match=re.escape(expected)) as e:
        load_checkpoint(path, hint=TEACHER_HINT)
    assert TEACHER_HINT in str(e.value) and "delete" not in str(e.value)


def test_directory_given_as_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path, hint=TEACHER_HINT)


def test_a_missing_checkpoint_names_the_experiments_that_have_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("checkpoints/smoke", "checkpoints/cpu/seed0", "elsewhere"):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "teacher.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("checkpoints/teacher.pt", hint=TEACHER_HINT)
    assert str(e.value) == f"no checkpoint at checkpoints/teacher.pt; run `{TEACHER_HINT}` first (experiments that " \
                           "have one: --name cpu/seed0, --name smoke)"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint("elsewhere/selector.pt", hint=TEACHER_HINT)  # outside checkpoints/, and no experiment's
    assert str(e.value).endswith("first")


@pytest.mark.parametrize("script", ["trainSelector", "inference", "publish"])
def test_the_students_missing_from_an_experiment_are_to_be_trained_in_it(script, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    line = one_error_line(lambda: importlib.import_module(script).main(["--name", "nosuch"]), capsys)
    assert line == "error: no checkpoint at checkpoints/nosuch/student_densenet121.pt; run `python StudentTrain.py " \
                   "--model 1 2 --name nosuch` first"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_cuda(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(lambda: teacherTrain.main(teacher_flags(tree, tmp_path / "t.pt", "--device", "cuda")))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no CUDA" in err[0]
    assert not (tmp_path / "t.pt").exists()


def test_cli_truncated_teacher_exits_with_one_line(teacher, tree, tmp_path, capsys):
    truncated = tmp_path / "teacher.pt"
    content = teacher.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    line = one_error_line(lambda: StudentTrain.main(flags(tree, tmp_path / "s.pt", "--teacher", str(truncated))),
                          capsys)
    assert str(truncated) in line and "truncated or corrupt" in line and TEACHER_HINT in line


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tree, tmp_path):
    load_cifar10(tree, verbose=False, allow_partial=True)
    out = tmp_path / "ddp"
    checkpoint = out / "teacher.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "teacherTrain.py", *teacher_flags(tree, checkpoint)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # exactly one checkpoint set, written by rank 0 alone
    assert files(out) == run_files("teacher")
    assert result.stdout.count("saved ") == 1
    assert len(metrics(checkpoint)) == 1
    final = load_checkpoint(checkpoint, hint=TEACHER_HINT, kind="teacher", arch=TEACHER_ARCH)
    assert final["complete"] is True and final["epoch"] == 1 and final["test_acc"] is not None
    assert not [k for k in final["model"] if k.startswith(("module.", "_orig_mod."))]
    model_from_checkpoint(final, checkpoint, TEACHER_HINT)


@pytest.mark.slow
def test_a_torchrun_run_resumes_exactly_with_each_process_s_own_dropout_masks(tree, tmp_path):
    load_cifar10(tree, verbose=False, allow_partial=True)

    def torchrun(checkpoint, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                   "teacherTrain.py", *teacher_flags(tree, checkpoint, *extra, epochs=2)]
        return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=500)

    stopped, straight = tmp_path / "stopped" / "teacher.pt", tmp_path / "straight" / "teacher.pt"
    result = torchrun(stopped, "--time-budget", "0")
    assert result.returncode != 0 and "continue with: python teacherTrain.py" in result.stdout
    assert "exitcode  : -15" not in result.stderr and not stopped.with_suffix(".lock").exists()  # rank 0 ended well
    state = torch.load(stopped.with_suffix(".last.pt"), map_location="cpu", weights_only=True)
    (rank_1, _), = state["rank_rngs"]
    assert state["epoch"] == 1 and not torch.equal(state["rng"], rank_1)  # GoogLeNet's dropout differs by process
    with pytest.raises(UserError, match="was saved by a run of 2 process.*torchrun --nproc_per_node 2"):
        teacherTrain.main(teacher_flags(tree, stopped, "--resume", epochs=2))
    utils.lock.release_all()  # as that refused run's process would end
    for result in (torchrun(stopped, "--resume"), torchrun(straight)):
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed, reference = (torch.load(c.with_suffix(".last.pt"), map_location="cpu", weights_only=True)["model"]
                          for c in (stopped, straight))
    assert [k for k in reference if not torch.equal(resumed[k], reference[k])] == []


def test_resume_after_an_epoch_without_evaluation(tree, tmp_path):
    # with --eval-every 2 in 3 epochs, epoch 1 has no hold-out accuracy, hence no best weights yet
    checkpoint = tmp_path / "teacher.pt"
    argv = teacher_flags(tree, checkpoint, "--eval-every", "2", epochs=3)
    with pytest.raises(SystemExit):
        teacherTrain.main([*argv, "--time-budget", "0"])
    assert torch.load(checkpoint.with_suffix(".last.pt"), weights_only=True)["epoch"] == 1
    assert not checkpoint.exists()
    teacherTrain.main([*argv, "--resume"])
    final = load_checkpoint(checkpoint, hint=TEACHER_HINT, kind="teacher")
    assert final["complete"] is True and final["epochs_run"] == 3 and final["holdout_acc"] is not None
    assert [r["epoch"] for r in metrics(checkpoint)] == [1, 2, 3]
    assert ["holdout_acc" in r for r in metrics(checkpoint)] == [False, True, True]  # every 2, and the last 2


@pytest.mark.parametrize("epochs, every, evaluated", [(10, 5, [5, 6, 7, 8, 9, 10]), (12, 5, [5, 8, 9, 10, 11, 12]),
                                                      (3, 5, [1, 2, 3]), (4, 1, [1, 2, 3, 4])])
def test_the_hold_out_split_is_evaluated_every_k_epochs_and_at_each_of_the_last_k(epochs, every, evaluated):
    assert [e + 1 for e in range(epochs) if evaluated_epoch(e, epochs, every)] == evaluated


def test_learning_rate_warms_up_then_follows_a_cosine():
    lrs = [learning_rate(step, total_steps=100, warmup_steps=10, peak=0.4) for step in range(100)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == 0


@pytest.mark.parametrize("epochs", [1, 2, 40])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_every_schedule_however_short_decays_to_zero_at_its_last_step(epochs, schedule):
    """The default warm-up of 2 epochs would be the whole of a 1- or 2-epoch run: it is capped at 20%."""
    steps_per_epoch = 10
    total = epochs * steps_per_epoch
    warmup = warmup_steps(2.0, steps_per_epoch, total)
    assert warmup == min(20, int(0.2 * total))
    lrs = [learning_rate(step, total, warmup, peak=0.4, schedule=schedule) for step in range(total)]
    assert lrs[-1] == 0 and max(lrs) == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # after the warm-up, only down


def test_the_final_checkpoint_names_the_epoch_of_the_weights_it_holds(tree, tmp_path, monkeypatch):
    """Three epochs whose hold-out accuracy falls after the first: the checkpoint holds epoch 1's weights."""
    holdout_accs, evaluate = iter([0.9, 0.5, 0.4]), utils.engine.evaluate
    kept = {}

    def scripted(model, loader, *args, **kwargs):
        scores = evaluate(model, loader, *args, **kwargs)
        if loader.train is False and len(kept) < 3:  # the hold-out evaluations of epochs 1, 2, 3
            kept[len(kept) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
            scores["acc"] = next(holdout_accs)
        return scores

    monkeypatch.setattr(utils.engine, "evaluate", scripted)
    checkpoint = tmp_path / "teacher.pt"
    teacherTrain.main(teacher_flags(tree, checkpoint, epochs=3))
    final = load_checkpoint(checkpoint, hint=TEACHER_HINT)
    assert (final["epoch"], final["epochs_run"], final["epochs"]) == (1, 3, 3)
    assert final["holdout_acc"] == 0.9 and final["complete"] is True
    assert all(torch.equal(final["model"][k], v) for k, v in kept[1].items())
    assert not all(torch.equal(final["model"][k], v) for k, v in kept[3].items())


def test_recipes_fill_the_flags_not_given_and_the_command_line_wins():
    from utils.recipes import RECIPES

    teacher = teacherTrain.parse_args([])
    assert (teacher.epochs, teacher.cutout, teacher.padding) == (RECIPES["resnet50"]["epochs"], 12, "reflect")
    (student,) = StudentTrain.parse_args(["--model", "2", "--epochs", "3", "--cutout", "0"]).members
    assert (student.epochs, student.cutout, student.lr) == (3, 0, RECIPES["googlenet"]["lr"])
    assert student.warmup_epochs == 2.0


def test_linear_schedule_decays_to_zero_in_a_straight_line():
    lrs = [learning_rate(step, total_steps=110, warmup_steps=10, peak=1.0, schedule="linear")
           for step in range(10, 110)]
    assert lrs[0] == pytest.approx(0.99) and lrs[49] == pytest.approx(0.5) and lrs[-1] == 0
    assert all(a - b == pytest.approx(0.01) for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_a_kd_student_trains_with_every_augmentation_and_logs_its_loss_terms(teacher, tree, tmp_path):
    checkpoint = tmp_path / "student.pt"
    StudentTrain.main(flags(tree, checkpoint, "--teacher", str(teacher), "--mix", "both", "--cutout", "8",
                            "--translate", "2", "--tta", "flip-shift", "--schedule", "linear", "--ema", "0.9"))
    (record,) = metrics(checkpoint)
    for key in ("lr", "train_loss", "train_kd", "train_ce", "train_acc", "holdout_loss", "holdout_acc",
                "images_per_s", "elapsed_s"):
        assert isinstance(record[key], float), key
        assert len(repr(record[key]).replace(".", "").lstrip("0")) <= 6 or "e" in repr(record[key]), key  # rounded
    config = json.loads(checkpoint.with_suffix(".config.json").read_text())
    assert config["flags"]["mix"] == "both" and config["flags"]["tta"] == "flip-shift"
    assert config["torch"] == str(torch.__version__) and config["device"].startswith("CPU")
    assert "git_commit" in config and config["command"].startswith("python StudentTrain.py ")
    saved = load_checkpoint(checkpoint, hint="", kind="student")
    assert saved["loss"] == "KD loss (kl, T=4, alpha=0.9)" and saved["config"]["schedule"] == "linear"


def test_a_copy_of_the_tree_without_git_records_the_commit_it_is_told(tmp_path, monkeypatch):
    import utils.provenance

    monkeypatch.delenv("MSKD_GIT_COMMIT", raising=False)
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", utils.provenance.git_commit())  # this checkout's own
    monkeypatch.setattr(utils.provenance, "REPO", tmp_path)  # a copy of the files, no .git
    monkeypatch.delenv("MSKD_GIT_COMMIT", raising=False)
    assert utils.provenance.git_commit() is None
    monkeypatch.setenv("MSKD_GIT_COMMIT", "0123456789ab")
    assert utils.provenance.git_commit() == "0123456789ab"
    monkeypatch.setattr(utils.provenance, "REPO", REPO)  # a warm machine's old .git: the commit it is told wins
    assert utils.provenance.git_commit() == "0123456789ab"


def test_a_network_is_evaluated_with_the_views_it_was_trained_to_use(tree, tmp_path):
    from models import model_stats
    from utils.networks import Network

    checkpoint = tmp_path / "teacher.pt"
    teacherTrain.main(teacher_flags(tree, checkpoint, "--tta", "flip"))
    data = load_cifar10(tree, verbose=False, allow_partial=True)
    network = Network(checkpoint, "teacher", TEACHER_HINT, Runtime(torch.device("cpu")))
    logits, labels = network.load_logits(data)["test"]
    saved = load_checkpoint(checkpoint, hint=TEACHER_HINT)
    assert (logits.argmax(1) == labels).double().mean().item() == pytest.approx(saved["test_acc"])
    assert network.gflops == pytest.approx(2 * model_stats(network.model)["flops"] / 1e9)  # two views per image


def test_each_split_goes_to_the_device_once(tree, tmp_path, monkeypatch):
    made = []

    class Counted(DeviceLoader):
        def __init__(self, images, *args, train=False, **kwargs):
            made.append((len(images), train))
            super().__init__(images, *args, train=train, **kwargs)

    monkeypatch.setattr(utils.engine, "DeviceLoader", Counted)
    teacherTrain.main(teacher_flags(tree, tmp_path / "teacher.pt"))
    assert sorted(made) == [(10, False), (10, False), (10, True)]  # hold-out, test, training: each once
