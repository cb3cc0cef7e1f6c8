"""The selector, routed inference and the one-command smoke pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import inference
import reproduce
from tests.conftest import REPO, SHARED_ARCHIVE, write_tree
from utils.cli import UserError
from utils.routing import best_student_targets, routed_predict


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``reproduce.py --preset smoke`` once, in a scratch folder: the real archive, else a synthetic tree."""
    root = tmp_path_factory.mktemp("smoke")
    data = SHARED_ARCHIVE if SHARED_ARCHIVE.exists() else write_tree(root / "cifar", per_class=(25, 5))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        reproduce.main(["--preset", "smoke", "--data-dir", str(data)])
    finally:
        os.chdir(cwd)
    return root, data


def test_smoke_pipeline_writes_every_result(smoke_run):
    root, _ = smoke_run
    for name in ("teacher", "student_densenet121", "student_googlenet", "selector"):
        assert (root / "checkpoints" / "smoke" / f"{name}.pt").exists()
    results = root / "results" / "smoke"
    for name in ("results.md", "results.json", "per_class_accuracy.png", "routed_confusion.png",
                 "routing_share.png"):
        assert (results / name).stat().st_size > 0
    table = (results / "results.md").read_text()
    assert "| Teacher resnet50 | 81% |" in table and "79.67%" in table


def test_oracle_bounds_every_system(smoke_run):
    root, _ = smoke_run
    results = json.loads((root / "results" / "smoke" / "results.json").read_text())
    accuracy = results["accuracy"]
    oracle = accuracy.pop("Oracle (any student right)")
    for name, acc in accuracy.items():
        if not name.startswith("Teacher"):
            assert oracle >= acc, name
    assert sum(results["routing_share"]) == pytest.approx(1.0)
    assert sum(map(sum, results["confusion_routed"])) == results["test_images"]


def test_second_run_skips_complete_stages(smoke_run, capsys, monkeypatch):
    root, data = smoke_run
    monkeypatch.chdir(root)
    monkeypatch.setattr(inference, "main", lambda argv: None)
    reproduce.main(["--preset", "smoke", "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert out.count("is complete, skipped") == 4


def test_images_classifies_files_of_any_size(smoke_run, tmp_path, capsys, monkeypatch):
    root, _ = smoke_run
    monkeypatch.chdir(root)
    paths = []
    for i, size in enumerate([(64, 48), (17, 17), (32, 32)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    ckpt = "checkpoints/smoke"
    inference.main(["--images", *paths, "--device", "cpu", "--selector", f"{ckpt}/selector.pt", "--students",
                    f"{ckpt}/student_densenet121.pt", f"{ckpt}/student_googlenet.pt"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines):
        assert line.startswith(path) and "student" in line and "confidence" in line


def test_selector_for_other_students_is_refused(smoke_run, monkeypatch):
    root, _ = smoke_run
    monkeypatch.chdir(root)
    ckpt = "checkpoints/smoke"
    swapped = [f"{ckpt}/student_googlenet.pt", f"{ckpt}/student_densenet121.pt"]
    with pytest.raises(UserError, match="trained for other students"):
        inference.main(["--images", "x.png", "--device", "cpu", "--selector", f"{ckpt}/selector.pt",
                        "--students", *swapped])
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), "--device", "cpu", "--selector",
                             f"{ckpt}/selector.pt", "--students", *swapped, "--images", "x.png"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_labels_are_the_per_sample_best_student():
    losses = torch.tensor([[0.1, 2.0, 0.5], [3.0, 0.2, 0.1], [1.0, 0.9, 4.0]])
    assert best_student_targets(losses).tolist() == [0, 2, 1]
    soft = best_student_targets(losses, soft=True, tau=0.5)
    assert torch.allclose(soft.sum(1), torch.ones(3))
    assert soft.argmax(1).tolist() == [0, 2, 1]
    assert torch.allclose(soft[0], torch.softmax(-losses[0] / 0.5, 0))


def test_label_examples_scores_known_students():
    from trainSelector import label_examples
    from utils.engine import Runtime

    class Always(nn.Module):  # predicts one class with certainty, whatever the image
        def __init__(self, label):
            super().__init__()
            self.label = label

        def forward(self, x):
            logits = torch.full((len(x), 10), -10.0)
            logits[:, self.label] = 10.0
            return logits

    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 3, 7, 1])
    losses, preds = label_examples([Always(3), Always(7)], images, labels, Runtime(torch.device("cpu")))
    assert best_student_targets(losses)[:3].tolist() == [0, 0, 1]
    assert preds.tolist() == [[3, 7]] * 4


class Recorder(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill, self.seen = fill, 0

    def forward(self, x):
        self.seen += len(x)
        return torch.full((len(x), 10), float(self.fill))


class FixedSelector(nn.Module):
    def __init__(self, choice):
        super().__init__()
        self.choice = choice

    def forward(self, x):
        return nn.functional.one_hot(self.choice, 2).float()


def test_routed_inference_runs_only_the_chosen_student():
    a, b = Recorder(1), Recorder(2)
    logits, choice = routed_predict(FixedSelector(torch.zeros(6, dtype=torch.long)), [a, b], torch.zeros(6, 3, 4, 4))
    assert (a.seen, b.seen) == (6, 0)
    assert choice.tolist() == [0] * 6 and (logits == 1).all()

    a, b = Recorder(1), Recorder(2)
    route = torch.tensor([0, 1, 1, 0, 1])
    logits, _ = routed_predict(FixedSelector(route), [a, b], torch.zeros(5, 3, 4, 4))
    assert (a.seen, b.seen) == (2, 3)
    assert logits[:, 0].tolist() == [1, 2, 2, 1, 2]


def random_student(path, arch, holdout):
    """A student checkpoint with untrained weights: enough for the selector's plumbing."""
    from models import build_model
    from utils.checkpoint import clean_state_dict, save_checkpoint

    model = build_model(arch)
    save_checkpoint(path, {"kind": "student", "arch": arch, "num_classes": 10, "model": clean_state_dict(model),
                           "split": {"holdout": holdout, "split_seed": 0, "limit": 0}, "complete": True})
    return str(path)


def test_selector_without_holdout_falls_back_to_training_images(tmp_path, capsys):
    import trainSelector
    from utils.checkpoint import load_checkpoint

    tree = write_tree(tmp_path / "cifar", per_class=(3, 1))
    students = [random_student(tmp_path / f"s{k}.pt", arch, holdout=0)
                for k, arch in enumerate(["googlenet", "densenet121"])]
    out = tmp_path / "selector.pt"
    trainSelector.main(["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu",
                        "--views", "1", "--soft-targets", "--epochs", "1", "--batch-size", "16",
                        "--checkpoint", str(out)])
    assert "the students have fitted" in capsys.readouterr().out
    selector = load_checkpoint(out, hint="", kind="selector")
    assert [s["path"] for s in selector["students"]] == students
    assert selector["split"] == {"holdout": 0, "split_seed": 0, "limit": 0}
    assert selector["report"]["examples"] == 6 and sum(selector["report"]["routing_share"]) == pytest.approx(1)


def test_students_of_different_splits_are_refused(tmp_path):
    import trainSelector

    students = [random_student(tmp_path / "s0.pt", "googlenet", holdout=0),
                random_student(tmp_path / "s1.pt", "googlenet", holdout=5)]
    with pytest.raises(UserError, match="different splits"):
        trainSelector.parse_args(["--students", *students])
