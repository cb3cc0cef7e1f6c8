"""bench.py runs on a CPU at tiny sizes and reports every figure; it routes with a trained selector if given."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

import bench
from models import build_model
from tests.conftest import write_tree
from utils.checkpoint import clean_state_dict, save_checkpoint
from utils.cli import UserError

TINY = ["--device", "cpu", "--partial-data", "--limit", "16", "--batch-size", "4", "--ref-batch-size", "4", "--steps", "1",
        "--warmup-steps", "0", "--workers", "0", "--infer-batch-size", "8"]
INFERENCE_ROWS = {"teacher": "teacher resnet50", "densenet121": "student densenet121",
                  "googlenet": "student googlenet", "both_students": "both students",
                  "routed": "routed (selector + 1 student)"}
NUMBER = r"(\d+\.\d+)"


def test_tiny_cpu_run_prints_and_writes_every_figure(tmp_path, capsys):
    tree = write_tree(tmp_path / "cifar", per_class=(2, 2))
    out = tmp_path / "bench.json"
    bench.main(["--data-dir", str(tree), *TINY, "--archs", "googlenet", "--out", str(out)])
    printed = capsys.readouterr().out

    row = re.search(rf"^googlenet +{NUMBER} +n/a +{NUMBER} +n/a +{NUMBER}x$", printed, re.MULTILINE)
    assert row, printed
    for label in INFERENCE_ROWS.values():
        assert re.search(rf"^{re.escape(label)} +{NUMBER}$", printed, re.MULTILINE), label
    assert "routed by the untrained selector: " in printed

    figures = json.loads(out.read_text())
    training = figures["training"]["googlenet"]
    assert training["ours_peak_mib"] is None and training["reference_peak_mib"] is None  # no GPU
    for key in ("ours_images_per_s", "reference_images_per_s", "speedup"):
        assert training[key] > 0
    assert figures["inference_images_per_s"].keys() == INFERENCE_ROWS.keys()
    assert all(speed > 0 for speed in figures["inference_images_per_s"].values())
    assert sum(figures["routed_share"].values()) == pytest.approx(1.0)


def test_too_few_images_for_a_batch_is_a_user_error(tmp_path):
    tree = write_tree(tmp_path / "cifar", per_class=(2, 2))
    with pytest.raises(UserError, match="fewer than one batch"):
        bench.main(["--data-dir", str(tree), *TINY, "--batch-size", "64"])


def test_a_selector_checkpoint_routes_to_the_students_it_was_trained_for(tmp_path):
    trained = build_model("selector", 2)
    path = tmp_path / "selector.pt"
    save_checkpoint(path, {"kind": "selector", "arch": "selector", "num_classes": 2, "model": clean_state_dict(trained),
                           "students": [{"arch": "googlenet"}, {"arch": "densenet121"}]})
    selector, archs, source = bench.load_selector(SimpleNamespace(selector=str(path)))
    assert archs == ("googlenet", "densenet121") and source == str(path)
    assert all(torch.equal(a, b) for a, b in zip(selector.state_dict().values(), trained.state_dict().values()))
