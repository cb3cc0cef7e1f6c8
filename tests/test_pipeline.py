"""The selector, routed inference, predict.py's images, results.json and the one-command smoke pipeline."""

import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import inference
import predict
import reproduce
import utils.experiment
import utils.speed
from tests.conftest import REPO, SMOKE_FLAGS, write_tree
from utils.analyses import cost_labels
from utils.cli import UserError, run
from utils.images import read_image, to_rgb
from utils.report import write_json
from utils.policies import CascadeRouter, SelectorRouter
from utils.routed import run_routed


def test_smoke_pipeline_writes_every_result(smoke_run):
    root, _ = smoke_run
    for name in ("teacher", "student_densenet121", "student_googlenet", "selector", "student_densenet121_mcl",
                 "student_googlenet_mcl", "selector_mcl", "selector_mcl_shuffled"):
        assert (root / "checkpoints" / "smoke" / f"{name}.pt").exists()
    results = root / "results" / "smoke" / "bundle"
    for name in ("results.md", "results.json", "accuracy_vs_gflops.png", "per_class_gain.png",
                 "routed_confusion.png", "routing_share.png"):
        assert (results / name).stat().st_size > 0
    table = (results / "results.md").read_text()
    assert "| Teacher resnet50 | 81% |" in table and "79.67%" in table
    assert "Not measured in this run (no timed passes" in table  # a CPU: no speeds unless asked
    assert "**At what cost do the routed students reach the teacher's accuracy?**" in table
    assert "## Specialists beside generalists, at equal cost" in table and "**Target** (set before" in table
    assert "| Specialist 1 densenet121 (KD, mcl) |" in table
    assert "## Selector: out-of-fold scores" in table and "Spread over the folds: threshold " in table
    assert "## Random routing" in table and "the accuracy of 200 draws" in table
    for k in (1, 2):  # the smoke preset's --folds 2
        assert (root / "checkpoints" / "smoke" / "selector.folds" / f"fold{k}.pt").exists()
    manifest = json.loads((results / "weights" / "manifest.json").read_text())
    assert json.loads((results / "results.json").read_text())["command"].endswith("--out results/smoke/bundle")
    assert manifest["command"].endswith("--out results/smoke/bundle/weights --force")  # not the folder built in
    assert "unfinished" not in table


def strict_json(text):
    """``json.loads`` as a strict reader does it: ``Infinity`` and ``NaN`` are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_results_json_writes_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"threshold": math.inf, "curve": ([0.5, -math.inf], (math.nan, 1.0)), "kept": {"n": 3}})
    assert strict_json(path.read_text()) == {"threshold": None, "curve": [[0.5, None], [None, 1.0]], "kept": {"n": 3}}


def test_oracle_bounds_every_one_student_system(smoke_run):
    root, _ = smoke_run
    results = strict_json((root / "results" / "smoke" / "bundle" / "results.json").read_text())
    accuracy = results["accuracy"]
    oracle = accuracy["oracle"]
    one_student = [k for k in accuracy if k.startswith("student") or k in ("selector", "random", "control",
                                                                            "control_random")]
    assert len(one_student) >= 4
    for name in one_student:  # averaging systems (ensemble, cascade) may be right where no student is
        assert oracle >= accuracy[name], name
    routed = results["routed"]
    assert routed["share"][routed["order"][0]] == pytest.approx(1.0)  # a cascade always runs its first student
    assert sum(map(sum, results["confusion_routed"])) == results["test_images"]
    policies = {"cascade", "deferral", "selector"}
    assert set(results["budgets"]) == policies | {f"spec:{p}" for p in policies} | {"to_teacher", "cheapest_to_teacher"}
    assert results["comparisons"] and all(c["low"] <= c["difference"] <= c["high"]
                                          for c in results["comparisons"].values())


def test_evaluate_one_checkpoint_agrees_with_its_training_run(smoke_run, tmp_path, monkeypatch, capsys):
    import evaluate
    import utils.networks
    from utils.checkpoint import load_checkpoint

    root, data = smoke_run
    monkeypatch.chdir(root)
    paths = ["checkpoints/smoke/teacher.pt", "checkpoints/smoke/student_googlenet.pt"]
    out = tmp_path / "evaluation.json"
    evaluate.main([*paths, "--data-dir", str(data), "--partial-data", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    for path in paths:
        r = results[path]
        assert r["accuracy"] == pytest.approx(load_checkpoint(path, hint="")["test_acc"])
        assert r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"]
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0 and len(r["per_class"]) == 10
        assert sum(r["per_class"]) / 10 == pytest.approx(r["accuracy"])  # the smoke test split is balanced
    assert "| `checkpoints/smoke/teacher.pt` | teacher resnet50 |" in capsys.readouterr().out

    def no_network_pass(*args, **kwargs):
        raise AssertionError("the logits should come from <stem>.logits.pt")

    monkeypatch.setattr(utils.networks, "batched_logits", no_network_pass)
    evaluate.main([paths[0], "--split", "holdout", "--data-dir", str(data), "--partial-data", "--device", "cpu"])


def test_unfinished_checkpoints_are_announced_and_their_rows_marked(smoke_run, tmp_path, monkeypatch, capsys):
    from utils.checkpoint import load_checkpoint, save_checkpoint

    root, data = smoke_run
    monkeypatch.chdir(root)
    teacher = load_checkpoint("checkpoints/smoke/teacher.pt", hint="")
    unfinished = tmp_path / "teacher.pt"
    save_checkpoint(unfinished, {**teacher, "complete": False, "epochs": 3})
    inference.main(["--name", "smoke", "--device", "cpu", "--data-dir", str(data), "--partial-data",
                    "--teacher", str(unfinished), "--out", str(tmp_path / "results"), "--timed-passes", "0"])
    out = capsys.readouterr().out
    assert f"warning: {unfinished} comes from an unfinished run (1/3 epochs)" in out
    assert "timing every system" not in out
    table = (tmp_path / "results" / "results.md").read_text()
    assert "Not measured in this run (no timed passes" in table
    assert "| Teacher resnet50 [unfinished: 1/3 epochs] | 81% |" in table
    assert f"**Unfinished checkpoints** (marked in the rows): `{unfinished}`" in table
    assert "A quick run on a subset" in table and "Not comparable with the original" in table


def test_each_system_is_timed_as_often_as_asked_and_said_as_it_is(smoke_run, tmp_path, monkeypatch, capsys):
    root, data = smoke_run
    monkeypatch.chdir(root)
    calls, timed = [], utils.speed.timed
    monkeypatch.setattr(utils.speed, "timed", lambda fn, runtime, n: calls.append(n) or timed(fn, runtime, n))
    inference.main(["--name", "smoke", "--device", "cpu", "--data-dir", str(data), "--partial-data",
                    "--out", str(tmp_path / "r"), "--timed-passes", "1"])
    out = capsys.readouterr().out
    costs = json.loads((tmp_path / "r" / "results.json").read_text())["costs"]
    assert calls == [1] * len(costs) and len(costs) == 7  # teacher, 2 students, both, 3 routed systems
    assert "timing every system: 1 timed pass over the 20 test images each" in out
    names = cost_labels(costs, 2, "cascade")
    for k, cost in costs.items():
        low, high = cost["images_per_s_range"]
        assert low == cost["images_per_s"] == high  # one pass: its own median and range
        assert f"  {names[k]}: {cost['images_per_s']:.0f} images/s" in out
    table = (tmp_path / "r" / "results.md").read_text()
    assert "| teacher | 23.52 M | 2.596 | 1.00 |" in table and "| student 2 | 5.60 M | 0.904 | 0.35 |" in table
    assert "**Against the teacher.** The routed system " in table and "x its GFLOPs per image" in table
    assert "| cascade to the teacher | " in table  # timed beside the teacher


def test_second_run_skips_complete_stages(smoke_run, capsys, monkeypatch):
    root, data = smoke_run
    monkeypatch.chdir(root)
    import utils.pipeline

    monkeypatch.setattr(inference, "main", lambda argv: None)
    monkeypatch.setattr(utils.pipeline, "finish_bundle", lambda *args: None)
    reproduce.main([*SMOKE_FLAGS, "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 6  # teacher, students, both selectors and their controls


def test_images_classifies_files_of_any_size(smoke_run, tmp_path, capsys, monkeypatch):
    root, _ = smoke_run
    monkeypatch.chdir(root)
    paths = []
    for i, size in enumerate([(64, 48), (17, 17), (32, 32)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    ckpt = "checkpoints/smoke"
    predict.main([*paths, "--device", "cpu", "--selector", f"{ckpt}/selector.pt", "--students",
                  f"{ckpt}/student_densenet121.pt", f"{ckpt}/student_googlenet.pt"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines):
        assert line.startswith(path) and "student" in line and "confidence" in line


def test_selector_for_other_students_is_refused(smoke_run, tmp_path, monkeypatch):
    root, _ = smoke_run
    monkeypatch.chdir(root)
    ckpt = "checkpoints/smoke"
    swapped = [f"{ckpt}/student_googlenet.pt", f"{ckpt}/student_densenet121.pt"]
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    with pytest.raises(UserError, match="trained for other students"):
        predict.main([str(image), "--device", "cpu", "--selector", f"{ckpt}/selector.pt",
                        "--students", *swapped])
    result = subprocess.run([sys.executable, str(REPO / "predict.py"), "--device", "cpu", "--selector",
                             f"{ckpt}/selector.pt", "--students", *swapped, str(image)],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_student_logits_and_selector_targets_of_known_students():
    from utils.selector import student_logits
    from utils.selector import selector_targets
    from utils.runtime import Runtime

    class Always(nn.Module):  # predicts one class with certainty, whatever the image
        def __init__(self, label):
            super().__init__()
            self.label, self.role = label, f"always {label}"

        def forward(self, x):
            logits = torch.full((len(x), 10), -10.0)
            logits[:, self.label] = 10.0
            return logits

    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([3, 3, 7, 1])
    logits = student_logits([Always(3), Always(7)], images, Runtime(torch.device("cpu")))
    assert logits.shape == (4, 2, 10)
    assert selector_targets(logits, labels).tolist() == [[1, 0], [1, 0], [0, 1], [0, 0]]


class Recorder(nn.Module):
    """A student that counts the images it sees; confident in class ``label`` where its pixel is 1."""

    def __init__(self, label, pixel=0):
        super().__init__()
        self.label, self.pixel, self.seen = label, pixel, 0

    def forward(self, x):
        self.seen += len(x)
        logits = torch.zeros(len(x), 10)
        logits[:, self.label] = x[:, 0, 0, self.pixel] * 10
        return logits


class FixedScores(nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        return self.scores


def test_cascade_runs_the_second_student_only_where_the_first_is_unsure():
    a, b = Recorder(1, pixel=0), Recorder(2, pixel=1)
    router = CascadeRouter(flops=[1.0, 2.0])
    router.temperature_, router.threshold_ = torch.ones(2), 0.5
    x = torch.zeros(5, 3, 4, 4)
    x[[0, 2, 3], 0, 0, 0] = 1.0  # the first student is confident on three images, uniform (unsure) on two
    x[:, 0, 0, 1] = 1.0  # the second is confident everywhere
    routing = run_routed(router, [a, b], None, x, num_classes=10)
    assert (a.seen, b.seen) == (5, 2)
    assert routing.ran.tolist() == [[True, False], [True, True], [True, False], [True, False], [True, True]]
    assert routing.prediction.tolist() == [1, 2, 1, 1, 2]


def test_selector_routing_runs_one_student_per_image():
    a, b = Recorder(1), Recorder(2)
    router = SelectorRouter(flops=[1.0, 2.0], router_flops=0.1)
    router.temperature_, router.threshold_ = torch.ones(2), 0.0
    scores = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, 5.0]])
    routing = run_routed(router, [a, b], FixedScores(scores), torch.ones(5, 3, 4, 4), num_classes=10)
    assert (a.seen, b.seen) == (2, 3)
    assert routing.ran.sum(1).tolist() == [1] * 5
    assert routing.prediction.tolist() == [1, 2, 2, 1, 2]


def random_student(path, arch, holdout, translate=4, padding="reflect"):
    """A student checkpoint with untrained weights: enough for the selector's plumbing."""
    from models import build_model
    from utils.checkpoint import clean_state_dict, save_checkpoint

    model = build_model(arch)
    save_checkpoint(path, {"kind": "student", "arch": arch, "num_classes": 10, "model": clean_state_dict(model),
                           "split": {"holdout": holdout, "split_seed": 0, "limit": 0}, "complete": True,
                           "epoch": 1, "epochs": 1,
                           "config": {"translate": translate, "padding": padding, "tta": "none"}})
    return str(path)


def test_the_selector_sees_views_augmented_as_the_students_training_images_were(tmp_path, capsys):
    from utils.selector import selector_examples, students_augmentation
    from utils.networks import Network
    from utils.runtime import Runtime

    paths = [random_student(tmp_path / f"s{k}.pt", "googlenet", 0, translate=3) for k in range(2)]
    students = [Network(path, "student", "", Runtime(torch.device("cpu"))) for path in paths]
    assert students_augmentation(students) == (3, "reflect")
    images = torch.randint(1, 256, (20, 3, 32, 32), dtype=torch.uint8)  # no black pixel anywhere
    labels = torch.arange(20) % 10
    views, view_labels = selector_examples(images, labels, 2, 0, *students_augmentation(students))
    assert torch.equal(views[:20], images) and torch.equal(view_labels, labels.repeat(3))
    assert not torch.equal(views[20:40], images) and (views > 0).all()  # moved, and reflected: no black border
    zeros, _ = selector_examples(images, labels, 2, 0, 3, "zeros")
    assert (zeros[20:] == 0).any()  # what the selector used to see
    assert torch.equal(selector_examples(images, labels, 0, 0, 3, "reflect")[0], images)  # --views 0


@pytest.mark.slow
def test_selector_without_holdout_falls_back_to_training_images(tmp_path, capsys):
    import trainSelector
    from utils.checkpoint import load_checkpoint

    tree = write_tree(tmp_path / "cifar", per_class=(3, 1))
    students = [random_student(tmp_path / f"s{k}.pt", arch, holdout=0)
                for k, arch in enumerate(["googlenet", "densenet121"])]
    out = tmp_path / "selector.pt"
    trainSelector.main(["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu",
                        "--views", "1", "--epochs", "1", "--batch-size", "16", "--folds", "3",
                        "--checkpoint", str(out)])
    assert "the students have fitted" in capsys.readouterr().out
    selector = load_checkpoint(out, hint="", kind="selector")
    assert [s["path"] for s in selector["students"]] == students
    assert selector["split"] == {"holdout": 0, "split_seed": 0, "limit": 0}
    assert selector["report"]["examples"] == 30 and sum(selector["report"]["routing_share"]) == pytest.approx(1)
    assert selector["holdout_logits"].shape == (0, 2)  # out of fold over the training images: no hold-out split


def test_students_of_different_splits_are_refused(tmp_path):
    import trainSelector

    students = [random_student(tmp_path / "s0.pt", "googlenet", holdout=0),
                random_student(tmp_path / "s1.pt", "googlenet", holdout=5)]
    with pytest.raises(UserError, match="different splits"):
        trainSelector.parse_args(["--students", *students])


# ----------------------------------------------------------------------------- predict.py's images

def png_claiming(path, width, height):
    """A PNG of a few bytes whose header claims ``width`` x ``height`` grey pixels: only decoding would show
    that its pixels are missing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def predict_refusal(argv, monkeypatch, capsys):
    """predict.py's one ``error:`` line and exit code 2, reached before any network is loaded."""
    monkeypatch.setattr(utils.experiment, "load_students",
                        lambda *a, **k: pytest.fail("networks loaded before the images"))
    with pytest.raises(SystemExit) as e:
        run(lambda: predict.main([*argv, "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    (line,) = err.splitlines()
    return line


@pytest.mark.parametrize("problem", ["missing", "not an image"])
def test_every_image_is_read_before_any_network_is_loaded(problem, tmp_path, monkeypatch, capsys):
    good = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), "orange").save(good)
    bad = tmp_path / "plane.png"
    if problem == "not an image":
        bad.write_text("not an image\n")
    line = predict_refusal([str(good), str(bad)], monkeypatch, capsys)
    assert line == f"error: no image file at {bad}" if problem == "missing" else \
        line.startswith(f"error: cannot read image {bad} (UnidentifiedImageError"), line


@pytest.mark.parametrize("side", [8_000, 14_000])  # 64 megapixels, under Pillow's own limit; 196, over it
def test_a_huge_image_is_refused_before_it_is_decoded(side, tmp_path, monkeypatch, capsys):
    import PIL.ImageFile

    huge = png_claiming(tmp_path / "huge.png", side, side)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("a huge image was decoded"))
    line = predict_refusal([str(huge)], monkeypatch, capsys)
    assert line == f"error: {huge} is larger than 50 megapixels, the limit of predict.py; shrink it first"


def test_a_16_bit_grey_image_keeps_its_gradient(tmp_path):
    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(64, 0)).save(path)
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    row = image[0, 16].int()
    assert (row.diff() >= 0).all() and row[0] < 10 and row[-1] > 245, row.tolist()


@pytest.mark.parametrize("mode, pixel, rgb", [
    ("I;16", 32768, (128, 128, 128)),
    ("I", 65535, (255, 255, 255)),
    ("F", 0.25, (64, 64, 64)),
    ("L", 200, (200, 200, 200)),
    ("LA", (0, 0), (255, 255, 255)),  # transparent: the white background
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half red over white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_each_image_mode_becomes_8_bit_rgb(mode, pixel, rgb):
    assert to_rgb(Image.new(mode, (2, 2), pixel)).getpixel((0, 0)) == rgb


def test_a_palette_image_with_a_transparent_colour_shows_white_there():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    assert [to_rgb(image).getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (255, 0, 0)]


# ----------------------------------------------------------------------------- the selector, cross-fitted

def test_each_hold_out_score_comes_from_the_fold_selector_that_never_trained_on_it(smoke_run, monkeypatch):
    from utils.selector import scores_of
    from utils.checkpoint import load_checkpoint
    from utils.data import load_cifar10, make_splits
    from utils.networks import Network
    from utils.runtime import Runtime

    root, data = smoke_run
    monkeypatch.chdir(root)
    shipped = load_checkpoint("checkpoints/smoke/selector.pt", hint="", kind="selector")
    fold = torch.tensor(shipped["cross_fit"]["fold"])
    images, labels = make_splits(load_cifar10(data, verbose=False, allow_partial=True), Network(
        "checkpoints/smoke/selector.pt", "selector", "", Runtime(torch.device("cpu"))).split)["holdout"]
    assert len(fold) == len(labels) == len(shipped["holdout_logits"]) and set(fold.tolist()) == {0, 1}
    for k in (0, 1):  # each fold holds every class, and is scored by the selector of the other fold
        assert set(labels[fold == k].tolist()) == set(labels.tolist())
        fold_selector = load_checkpoint(f"checkpoints/smoke/selector.folds/fold{k + 1}.pt", hint="", kind="selector")
        assert fold_selector["fold"] == {"index": k + 1, "of": 2}
        expected = scores_of(fold_selector, images[fold == k], Runtime(torch.device("cpu")))
        assert torch.allclose(shipped["holdout_logits"][fold == k], expected, atol=1e-5)
    selector = Network("checkpoints/smoke/selector.pt", "selector", "", Runtime(torch.device("cpu")))
    assert torch.equal(selector.load_logits(load_cifar10(data, verbose=False, allow_partial=True))["holdout"][0],
                       shipped["holdout_logits"])  # what routing is fitted on: the out-of-fold scores


def test_a_selector_without_out_of_fold_scores_is_refused(smoke_run, tmp_path, monkeypatch):
    from utils.checkpoint import load_checkpoint, save_checkpoint
    from utils.experiment import load_selector, load_students
    from utils.runtime import Runtime

    root, _ = smoke_run
    monkeypatch.chdir(root)
    old = {k: v for k, v in load_checkpoint("checkpoints/smoke/selector.pt", hint="").items()
           if k not in ("cross_fit", "holdout_logits")}
    save_checkpoint(tmp_path / "selector.pt", old)
    runtime = Runtime(torch.device("cpu"))
    students = load_students([f"checkpoints/smoke/student_{a}.pt" for a in ("densenet121", "googlenet")], runtime)
    with pytest.raises(UserError, match="has no out-of-fold hold-out scores .* retrain it with"):
        load_selector(tmp_path / "selector.pt", students, runtime)


def test_a_test_cost_over_its_budget_is_marked(smoke_run, tmp_path):
    from utils.report import write_markdown

    root, _ = smoke_run
    results = json.loads((root / "results" / "smoke" / "bundle" / "results.json").read_text())
    cell = results["budgets"]["cascade"]["1.25"]
    assert cell["budget_gflops"] == pytest.approx(1.25 * 0.904, abs=1e-3) and not cell["over"]
    write_markdown(results, tmp_path / "before.md")
    cell["gflops"] = cell["budget_gflops"] * 1.01  # what a threshold fitted on the hold-out split may cost on test
    results["routed"]["test_gflops"], results["routed"]["over_budget"] = cell["gflops"], True
    write_markdown(results, tmp_path / "after.md")
    def cascade_row(path):
        table = path.read_text().split("## Routing policies at fixed compute budgets")[1]
        return next(line for line in table.splitlines() if line.startswith("| cascade |"))

    assert cascade_row(tmp_path / "after.md").split(" | ")[2].endswith("**over**")
    assert "**over**" not in cascade_row(tmp_path / "before.md")
    assert "— **over its budget**" in (tmp_path / "after.md").read_text()
    assert "| 1.25x (≤ 1.130) |" in (tmp_path / "after.md").read_text()  # each budget in GFLOPs too


def colour_students(images):
    """``(N, 2, 10)``: two students right on every image of ``write_tree``, whose class its colour tells."""
    labels = (images[:, 0, 1, 1].long() - 10) // 20
    return 10 * torch.nn.functional.one_hot(labels, 10).float()[:, None].expand(-1, 2, -1)


@pytest.fixture
def selector_setup(tmp_path, monkeypatch):
    """Two untrained students on a tree of 6 + 2 images per class, 20 of them held out (2 per class), students
    that are always right (by the images' colour), and a record of each selector fit's splits and time box."""
    import utils.selector
    import utils.timebox

    tree = write_tree(tmp_path / "cifar", per_class=(6, 2))
    students = [random_student(tmp_path / f"s{k}.pt", "googlenet", holdout=20) for k in range(2)]
    monkeypatch.setattr(utils.selector, "student_logits", lambda students, images, runtime: colour_students(images))
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 1)
    fits, fit = [], utils.selector.fit

    def recorded(members, splits, args, runtime, **kwargs):
        fits.append({"splits": splits, "box": kwargs["time_box"], "path": str(members[0].files.best)})
        return fit(members, splits, args, runtime, **kwargs)

    monkeypatch.setattr(utils.selector, "fit", recorded)
    monkeypatch.chdir(tmp_path)
    argv = ["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu", "--views", "0",
            "--folds", "2", "--batch-size", "4"]
    return argv, fits


def image_ids(images):
    """What tells ``write_tree``'s images apart: their colour and their first pixel."""
    return {(int(x[0, 1, 1]), int(x[0, 0, 0])) for x in images}


@pytest.mark.parametrize("shuffled", [False, True])
def test_each_fold_selector_trains_and_chooses_its_epoch_outside_its_fold(selector_setup, shuffled):
    import trainSelector
    from utils.checkpoint import load_checkpoint

    argv, fits = selector_setup
    trainSelector.main([*argv, "--epochs", "1", *(["--shuffle-labels"] if shuffled else [])])
    stem = "selector_shuffled" if shuffled else "selector"
    assert [f["path"] for f in fits] == [f"checkpoints/{stem}.folds/fold1.pt", f"checkpoints/{stem}.folds/fold2.pt",
                                         f"checkpoints/{stem}.pt"]
    shipped = load_checkpoint(f"checkpoints/{stem}.pt", hint="")
    fold = torch.tensor(shipped["cross_fit"]["fold"])
    everything = image_ids(torch.cat([f["splits"][split][0] for f in fits for split in ("train", "holdout")]))
    assert len(everything) == 20
    for k, f in enumerate(fits[:2]):
        trained_on = image_ids(f["splits"]["train"][0]) | image_ids(f["splits"]["holdout"][0])
        assert len(trained_on) == 10 and len(everything - trained_on) == 10 == int((fold == k).sum())
    assert image_ids(fits[2]["splits"]["train"][0]) | image_ids(fits[2]["splits"]["holdout"][0]) == everything
    epoch_targets = torch.cat([f["splits"]["holdout"][1] for f in fits])  # the students are right everywhere
    if shuffled:  # the control chooses its epochs on permuted labels too
        assert epoch_targets.mean() < 0.5
    else:
        assert epoch_targets.mean() == 1.0


def test_fold_epochs_give_each_fold_selector_its_own_and_are_checked(selector_setup, monkeypatch, capsys):
    import trainSelector
    import utils.timebox
    from utils.checkpoint import load_checkpoint

    argv, fits = selector_setup
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: pytest.fail("no time box here"))
    trainSelector.main([*argv, "--epochs", "1", "--fold-epochs", "2", "3"])
    assert [load_checkpoint(f["path"], hint="")["epochs"] for f in fits] == [2, 3, 1]
    assert load_checkpoint("checkpoints/selector.pt", hint="")["cross_fit"]["epochs"] == [2, 3]
    for extra, message in ((["--fold-epochs", "2"], "--fold-epochs gives 1 epochs for --folds 2: give one per fold"),
                           (["--fold-epochs", "2", "3", "--minutes", "1"], "give --minutes or --fold-epochs")):
        with pytest.raises(SystemExit) as refused:
            trainSelector.parse_args([*argv, "--force", *extra])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_minutes_are_shared_by_the_fold_selectors_and_the_shipped_one(selector_setup):
    import trainSelector
    from utils.checkpoint import load_checkpoint

    argv, fits = selector_setup
    started = time.time()
    trainSelector.main([*argv, "--minutes", "3"])
    boxes = [f["box"] for f in fits]
    assert len(boxes) == 3
    for k, box in enumerate(boxes):  # an equal share of what is left of the stage's 3 minutes, for each fit to come
        assert box.seconds == pytest.approx((180 - (box.started - started)) / (3 - k), abs=1.0)
    timing = load_checkpoint("checkpoints/selector.pt", hint="")["timing"]
    assert timing["minutes"] == pytest.approx(boxes[2].seconds / 60)


def test_a_selector_after_the_first_trains_one_epoch_where_its_share_is_too_short(selector_setup, monkeypatch,
                                                                                  capsys):
    import trainSelector
    import utils.timebox
    from utils.checkpoint import load_checkpoint

    argv, fits = selector_setup
    epochs = iter([1, 0, 0])  # the first fold's share fits an epoch, the others' (overrun by it) none
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: next(epochs))
    trainSelector.main([*argv, "--minutes", "3"])
    assert [f["box"].at_least_one for f in fits] == [False, True, True]
    out = capsys.readouterr().out
    assert out.count("is too short for one epoch; training one, about ") == 2
    assert all(load_checkpoint(f["path"], hint="")["epochs"] == 1 for f in fits)
    monkeypatch.setattr(utils.timebox, "choose_epochs", lambda *args, **kwargs: 0)  # a first fold is refused
    with pytest.raises(UserError, match="the share of --minutes 3 left for each of the last 3 of 3 selectors is too "
                                        "short: one epoch takes about .* give more --minutes, or fewer --folds"):
        trainSelector.main([*argv, "--minutes", "3", "--force"])


def test_each_selector_s_share_is_what_is_left_less_the_most_a_selector_ran_over():
    import argparse

    from utils.selector import CrossFit
    from utils.timebox import TimeBox

    def box_share(stage, fits_left, args, done, overrun):
        """The box of the next selector of a stage in which ``done`` were made, ``fits_left`` are to train."""
        cross_fit = CrossFit([], None, args, None, stage, {})
        cross_fit.fits_left, cross_fit.folds_made, cross_fit.overrun = fits_left, [None] * done, overrun
        return cross_fit.box()

    args = argparse.Namespace(minutes=1.0, folds=2)
    stage = TimeBox(time.time() - 30, 60)  # 30 s of the stage's 60 are left
    first = box_share(stage, 3, args, 0, 0.0)
    assert first.seconds == pytest.approx(10, abs=0.5) and not first.at_least_one
    later = box_share(stage, 2, args, 1, 4.0)
    assert later.seconds == pytest.approx(15 - 4, abs=0.5) and later.at_least_one
    spent = TimeBox(time.time() - 70, 60)
    assert box_share(spent, 1, args, 2, 4.0).seconds == 0  # trains one epoch, said as it does
    with pytest.raises(UserError, match="--minutes 1 ran out before the first of this stage's 3 selectors"):
        box_share(spent, 3, args, 0, 0.0)


@pytest.mark.slow
def test_a_rerun_reuses_complete_fold_runs_resumes_an_interrupted_one_and_force_starts_afresh(selector_setup,
                                                                                              capsys):
    import trainSelector
    from utils.checkpoint import load_checkpoint

    argv, fits = selector_setup
    with pytest.raises(SystemExit) as stop:  # fold 1 stops after its first epoch
        trainSelector.main([*argv, "--epochs", "2", "--time-budget", "0"])
    assert stop.value.code == 75 and not os.path.exists("checkpoints/selector.pt")
    assert os.path.exists("checkpoints/selector.folds/fold1.last.pt")
    trainSelector.main([*argv, "--epochs", "2"])  # the same command again: each fold run is taken up
    out = capsys.readouterr().out
    assert "== fold 1/2 -> checkpoints/selector.folds/fold1.pt: trains on 10 hold-out images, scores the 10 of " \
           "its fold (resuming)" in out
    assert load_checkpoint("checkpoints/selector.pt", hint="")["complete"]
    with pytest.raises(UserError, match="already holds a complete run; add --resume"):
        trainSelector.main([*argv, "--epochs", "2"])
    trainSelector.main([*argv, "--epochs", "2", "--resume"])
    assert out.count("complete, reused") == 0 and capsys.readouterr().out.count("complete, reused") == 2
    os.remove("checkpoints/selector.pt")
    os.remove("checkpoints/selector.last.pt")
    with pytest.raises(UserError, match="fold1.pt is a fold run made for other flags: --val-fraction; start the "
                                        "stage afresh with --force"):
        trainSelector.main([*argv, "--epochs", "2", "--val-fraction", "0.3"])
    fits.clear()
    trainSelector.main([*argv, "--epochs", "2", "--val-fraction", "0.3", "--force"])
    assert len(fits) == 3


def test_a_signal_as_a_fold_selector_ends_names_the_fold_and_the_command_that_goes_on(selector_setup, monkeypatch,
                                                                                      capsys, own_handlers):
    import shlex
    import signal

    import trainSelector
    import utils.engine

    argv, fits = selector_setup
    plot_history = utils.engine.plot_history

    def signalled_while_plotting(*args, **kwargs):  # after fold 1's last check of the signal
        os.kill(os.getpid(), signal.SIGTERM)
        return plot_history(*args, **kwargs)

    monkeypatch.setattr(utils.engine, "plot_history", signalled_while_plotting)
    with pytest.raises(SystemExit) as stop:
        trainSelector.main([*argv, "--epochs", "1"])
    assert stop.value.code == 128 + signal.SIGTERM and own_handlers[1] == [] and len(fits) == 1
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    complete, command = last_line.split("; continue with: ")
    assert complete == "SIGTERM: stopped as the run ended, complete: checkpoints/selector.folds/fold1.pt"
    python, script, *rest = shlex.split(command)
    assert (python, script) == ("python", "trainSelector.py")

    monkeypatch.setattr(utils.engine, "plot_history", plot_history)
    trainSelector.main(rest)  # the printed command, as the user would paste it
    assert "== fold 1/2: checkpoints/selector.folds/fold1.pt complete, reused" in capsys.readouterr().out
    assert [f["path"] for f in fits[1:]] == ["checkpoints/selector.folds/fold2.pt", "checkpoints/selector.pt"]


def test_a_stage_taken_up_after_a_complete_fold_trains_the_selectors_an_unbroken_one_does(selector_setup, tmp_path,
                                                                                         monkeypatch, capsys):
    import shutil

    import trainSelector
    from utils.checkpoint import load_checkpoint

    argv, _ = selector_setup
    trainSelector.main([*argv, "--epochs", "1"])
    later = ("checkpoints/selector.folds/fold2.pt", "checkpoints/selector.pt")
    unbroken = {path: load_checkpoint(path, hint="")["model"] for path in later}
    again = tmp_path / "again" / "checkpoints" / "selector.folds"
    again.mkdir(parents=True)
    for done in (tmp_path / "checkpoints" / "selector.folds").glob("fold1.*"):  # a stage stopped after fold 1
        shutil.copy(done, again)
    monkeypatch.chdir(tmp_path / "again")
    trainSelector.main([*argv, "--epochs", "1"])
    assert "fold1.pt complete, reused" in capsys.readouterr().out
    for path in later:
        taken_up = load_checkpoint(path, hint="")["model"]
        assert all(torch.equal(taken_up[k], v) for k, v in unbroken[path].items()), path


def test_the_out_of_fold_scores_average_the_views_the_selector_is_evaluated_with(selector_setup):
    import trainSelector
    from utils.checkpoint import load_checkpoint
    from utils.networks import Network
    from utils.runtime import Runtime, batched_logits
    from utils.selector import scores_of

    argv, _ = selector_setup
    trainSelector.main([*argv, "--epochs", "1", "--tta", "flip"])
    runtime, path = Runtime(torch.device("cpu")), "checkpoints/selector.folds/fold1.pt"
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    as_routed = batched_logits(Network(path, "selector", "", runtime), images, runtime)
    assert torch.allclose(scores_of(load_checkpoint(path, hint=""), images, runtime), as_routed, atol=1e-6)


def test_folds_that_some_class_cannot_fill_are_refused_in_one_line_naming_the_fix(tmp_path, capsys):
    import trainSelector

    students = [random_student(tmp_path / f"s{k}.pt", "googlenet", holdout=20) for k in range(2)]
    with pytest.raises(SystemExit) as stop:
        run(lambda: trainSelector.parse_args(["--students", *students, "--folds", "3"]))
    (line,) = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    assert line == "error: --folds 3 needs at least 3 images of every class in the selector's hold-out split, " \
                   "which has 2 of class 'airplane'; give --folds 2 or fewer, or a larger --holdout (or --limit) " \
                   "for the students"


@pytest.mark.slow
def test_three_students_through_the_selector_and_inference(tmp_path, monkeypatch):
    import trainSelector
    from models import build_model
    from utils.checkpoint import clean_state_dict, save_checkpoint

    monkeypatch.chdir(tmp_path)
    tree = write_tree(tmp_path / "cifar", per_class=(6, 2))
    students = [random_student(tmp_path / f"{arch}.pt", arch, holdout=20)
                for arch in ("googlenet", "resnet18", "densenet121")]
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, {"kind": "teacher", "arch": "resnet18", "num_classes": 10,
                              "model": clean_state_dict(build_model("resnet18")), "complete": True, "epoch": 1,
                              "epochs": 1, "split": {"holdout": 20, "split_seed": 0, "limit": 0},
                              "config": {"tta": "none"}})
    common = ["--students", *students, "--data-dir", str(tree), "--partial-data", "--device", "cpu"]
    selector = ["--views", "0", "--folds", "2", "--batch-size", "4", "--epochs", "1"]
    trainSelector.main([*common, *selector, "--checkpoint", "selector.pt"])
    trainSelector.main([*common, *selector, "--checkpoint", "selector_shuffled.pt", "--shuffle-labels"])
    monkeypatch.setattr(utils.speed, "timed", lambda fn, runtime, passes: (fn(), [1.0] * passes))  # each run once
    inference.main([*common, "--teacher", str(teacher), "--selector", "selector.pt", "--out", "results",
                    "--router", "selector", "--budget", "2", "--timed-passes", "1"])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    labels = results["labels"]
    assert len(results["routed"]["share"]) == 3 and sum(results["routed"]["share"]) == pytest.approx(1)
    assert labels["students"] == ["student 1 (googlenet)", "student 2 (resnet18)", "student 3 (densenet121)"]
    assert "ensemble" in results["accuracy"]
    assert labels["systems"]["ensemble"] == "Ensemble (all 3 students, probabilities averaged)"
    assert set(results["costs"]) >= {"teacher", "student3", "students", "routed", "selector", "to_teacher"}
    assert results["costs"]["routed"]["router"] == "selector"
    assert set(results["cross_fit"]) == {"selector", "control"}
    assert {labels["roles"][k] for k in results["cross_fit"]} == {"Selector", "Selector on shuffled labels"}
    assert set(results["random_routing"]) == {"selector", "control"}
    cheapest = results["routed"]["budget_gflops"] / 2
    assert cheapest == pytest.approx(results["costs"]["student1"]["gflops"])  # googlenet, the cheapest


def test_a_cascade_to_the_teacher_runs_each_network_only_where_the_ones_before_are_unsure():
    a, b, teacher = Recorder(1, pixel=0), Recorder(2, pixel=1), Recorder(3, pixel=2)
    router = CascadeRouter(flops=[1.0, 2.0, 4.0])
    router.temperature_, router.threshold_ = torch.ones(3), 0.5
    x = torch.zeros(6, 3, 4, 4)
    x[[0, 1], 0, 0, 0] = 1.0  # the first student is sure of two images
    x[[2, 3], 0, 0, 1] = 1.0  # the second of two more (the average of a sure and an unsure one is sure enough)
    x[:, 0, 0, 2] = 1.0  # the teacher of all
    routing = run_routed(router, [a, b, teacher], None, x, num_classes=10)
    assert (a.seen, b.seen, teacher.seen) == (6, 4, 2)
    assert routing.ran.sum(1).tolist() == [1, 1, 2, 2, 3, 3]
    assert routing.prediction.tolist()[:2] == [1, 1] and routing.prediction.tolist()[4:] == [3, 3]


def test_inference_stopped_by_a_signal_prints_a_command_that_continues_it(smoke_run, monkeypatch, capsys):
    import shlex
    import signal

    import utils.networks

    root, data = smoke_run
    monkeypatch.chdir(root)
    for cache in (root / "checkpoints" / "smoke").glob("student_*.logits.pt"):  # to be computed: the work to stop
        cache.unlink()
    real = utils.networks.batched_logits

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    argv = ["--name", "smoke", "--device", "cpu", "--data-dir", str(data), "--partial-data", "--timed-passes", "0",
            "--out", "again"]
    monkeypatch.setattr(utils.networks, "batched_logits", interrupted)
    with pytest.raises(SystemExit) as stop:
        inference.main(argv)
    assert stop.value.code == 128 + signal.SIGTERM
    command = capsys.readouterr().out.rsplit("continue with: ", 1)[1].strip()
    assert command == shlex.join(["python", "inference.py", *argv])  # no --resume: inference.py has none
    monkeypatch.setattr(utils.networks, "batched_logits", real)
    inference.main(shlex.split(command)[2:])
    assert (root / "again" / "results.md").exists()

