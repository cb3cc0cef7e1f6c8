"""bench.py runs on a CPU at tiny sizes and reports every figure; its routed systems run the shares asked for."""

import json
import re

import pytest
import torch

import bench
from models import build_model
from tests.conftest import one_error_line, write_tree
from tests.test_flags_act import recorded, unread
from utils.benchmark import router_at_share
from utils.cli import UserError
from utils.routed import batched_routed
from utils.runtime import Runtime

TINY = ["--device", "cpu", "--partial-data", "--limit", "16", "--batch-size", "4", "--ref-batch-size", "4",
        "--steps", "1", "--warmup-steps", "0", "--workers", "0", "--infer-batch-size", "8"]
INFERENCE_ROWS = {"teacher": "teacher resnet50", "densenet121": "student densenet121",
                  "googlenet": "student googlenet", "both_students": "both students",
                  "cascade": "cascade (dearer student on 15%)",
                  "selector_routing": "selector + 1 student (15% to the dearer)"}
NUMBER = r"(\d+\.\d+)"


def test_an_existing_out_is_refused_before_any_data_is_read_unless_forced(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("an earlier run's figures\n")
    line = one_error_line(lambda: bench.main(["--data-dir", str(tmp_path / "none"), "--out", str(out)]), capsys)
    assert line == f"error: --out {out} already exists; add --force to replace it, or choose another --out"
    line = one_error_line(lambda: bench.main(["--data-dir", str(tmp_path / "none"), "--out", str(out), "--force"]),
                          capsys)
    assert line.startswith("error: no CIFAR-10 found at") and out.read_text() == "an earlier run's figures\n"


@pytest.mark.slow
def test_tiny_cpu_run_prints_and_writes_every_figure_and_acts_on_every_flag(tmp_path, capsys, monkeypatch):
    tree = write_tree(tmp_path / "cifar", per_class=(2, 2))
    out = tmp_path / "bench.json"
    parser = recorded(monkeypatch, bench, "bench.py")
    bench.main(["--data-dir", str(tree), *TINY, "--archs", "googlenet", "--baseline", "--out", str(out),
                "--defer-share", "0.15", "--holdout", "0", "--split-seed", "1", "--seed", "2", "--download"])
    assert unread(parser, "bench.py") == []
    printed = capsys.readouterr().out

    row = re.search(rf"^googlenet +{NUMBER} +n/a +{NUMBER} +{NUMBER}x +{NUMBER} +n/a +{NUMBER}x$", printed,
                    re.MULTILINE)
    assert row, printed
    for label in INFERENCE_ROWS.values():
        assert re.search(rf"^{re.escape(label)} +{NUMBER}$", printed, re.MULTILINE), label

    figures = json.loads(out.read_text())
    training = figures["training"]["googlenet"]
    assert training["ours_peak_mib"] is None and training["reference_peak_mib"] is None  # no GPU
    for key in ("ours_images_per_s", "baseline_images_per_s", "reference_images_per_s", "speedup",
                "speedup_over_baseline"):
        assert training[key] > 0
    assert figures["inference_images_per_s"].keys() == INFERENCE_ROWS.keys()
    assert all(speed > 0 for speed in figures["inference_images_per_s"].values())


def test_too_few_images_for_a_batch_is_refused_before_decoding(tmp_path):
    tree = write_tree(tmp_path / "cifar", per_class=(2, 2))
    with pytest.raises(UserError, match="fewer than one batch"):
        bench.main(["--data-dir", str(tree), *TINY, "--batch-size", "64"])


@pytest.mark.parametrize("name", ["cascade", "selector"])
@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("flops", [(1.0, 2.0), (2.0, 1.0)])
def test_routers_send_the_asked_share_to_the_dearer_student(name, share, flops):
    torch.manual_seed(0)
    students = [build_model("selector", 10).eval() for _ in range(2)]  # small stand-ins with 10 outputs
    selector = build_model("selector", 2).eval()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    runtime = Runtime(torch.device("cpu"))
    router = router_at_share(name, students, list(flops), selector, images, share, runtime)
    _, ran = batched_routed(router, students, selector, images, runtime, batch_size=16)
    cheap, dear = (0, 1) if flops[0] < flops[1] else (1, 0)
    assert ran[:, dear].float().mean().item() == pytest.approx(share, abs=1 / 40)
    assert ran[:, cheap].all() if name == "cascade" else (ran.sum(1) == 1).all()
