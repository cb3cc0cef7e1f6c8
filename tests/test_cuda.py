"""What only a GPU runs: bf16 autocast with channels_last and fused SGD, padded evaluation shapes, CUDA random
streams of students trained together, a time box that synchronises before it reads the clock.

Skipped without CUDA; on a GPU machine run them with ``python -m pytest -m cuda -q`` (about a minute; the smoke
pipeline on the GPU, marked slow too, is left out by ``-m "cuda and not slow"``).
"""

import json
import subprocess
import sys

import pytest
import torch

import StudentTrain
import teacherTrain
from models import build_model
from tests.conftest import REPO, write_tree
from utils.augment import predict
from utils.checkpoint import load_checkpoint
from utils.data import DeviceLoader
from utils.engine import evaluate, make_optimizer, train_step
from utils.runtime import Runtime, batched_logits, prepare_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def runtime():
    torch.backends.cudnn.benchmark = True
    return Runtime(torch.device("cuda:0"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("data") / "cifar", per_class=(20, 10))


@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "googlenet"])
def test_a_bf16_channels_last_step_with_fused_sgd_trains(arch, runtime):
    model = prepare_model(build_model(arch), runtime).train()
    assert next(model.parameters()).is_cuda
    optimizer = make_optimizer(model, 0.1, 0.9, 5e-4, runtime)
    assert optimizer.defaults["fused"]
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(64) % 10, 32, runtime.device, train=True)
    before = [p.detach().clone() for p in model.parameters()]
    sums = {}
    for x, y in loader:
        assert x.is_contiguous(memory_format=torch.channels_last)
        loss = train_step(model, optimizer, lambda logits, t, _: torch.nn.functional.cross_entropy(logits.float(), t),
                          x, y, runtime, sums)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sums["images"].item() == 64


def test_evaluation_sees_one_batch_shape_and_views_are_averaged_in_float32(runtime):
    model = prepare_model(build_model("resnet18"), runtime).eval()
    shapes = []
    model.register_forward_hook(lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape)))
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(70) % 10, 32, runtime.device)
    scores = evaluate(model, loader, runtime, tta="flip")
    assert 0 <= scores["acc"] <= 1 and set(shapes) == {(32, 3, 32, 32)}  # 70 = 32 + 32 + 6, padded to 32
    logits = batched_logits(model, images, runtime, batch_size=32)
    assert logits.shape == (70, 10) and logits.dtype == torch.float32
    with runtime.autocast:
        x = torch.randn(8, 3, 32, 32, device=runtime.device).contiguous(memory_format=torch.channels_last)
        assert predict(model, x, "flip-shift").dtype == torch.float32


def test_a_fresh_process_trains_on_the_gpu(tree, tmp_path):
    # CUDA is first used inside fit here, as in a real run (the tests above have already woken it in this process)
    done = subprocess.run([sys.executable, str(REPO / "teacherTrain.py"), "--data-dir", str(tree), "--partial-data",
                           "--holdout", "40", "--batch-size", "32", "--device", "cuda", "--arch", "resnet18",
                           "--epochs", "1", "--name", "fresh"],
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "checkpoints/fresh/teacher.pt", hint="")["complete"]


def test_students_trained_together_on_the_gpu_and_a_time_box_that_measures_them(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", str(tree), "--partial-data", "--holdout", "40", "--batch-size", "32", "--device", "cuda"]
    teacherTrain.main([*common, "--arch", "resnet18", "--epochs", "1", "--name", "gpu"])
    StudentTrain.main([*common, "--model", "1", "2", "--with-nokd", "--minutes", "0.5", "--name", "gpu"])
    for stem in ("student_densenet121", "student_googlenet_nokd"):
        checkpoint = load_checkpoint(f"checkpoints/gpu/{stem}.pt", hint="")
        timing = checkpoint["timing"]
        assert checkpoint["complete"] and timing["epochs"] == checkpoint["epochs"] >= 1
        assert timing["peak_memory_mib"] > 0 and timing["images_per_s"] > 0
        assert timing["planned_seconds"] <= 30


@pytest.mark.slow  # tools/gpu-run.sh runs the same as its preflight before a pipeline; its checks leave it out
def test_the_smoke_pipeline_with_specialists_and_published_weights_runs_on_the_gpu(tmp_path, monkeypatch):
    import reproduce

    monkeypatch.chdir(tmp_path)
    data = write_tree(tmp_path / "cifar", per_class=(25, 5))
    reproduce.main(["--preset", "smoke", "--device", "cuda", "--with-specialists", "mcl", "--partial-data",
                    "--data-dir", str(data), "--out", "bundle"])
    manifest = json.loads((tmp_path / "bundle" / "weights" / "manifest.json").read_text())
    assert manifest["measured"]["arithmetic"] == "bfloat16 autocast (CUDA)"
    assert list(manifest["networks"]) == ["student1", "student2", "selector", "spec1", "spec2", "spec_selector"]
    results = json.loads((tmp_path / "bundle" / "results.json").read_text())
    assert "spec:selector" in results["accuracy"] and results["costs"]["student1"]["images_per_s"] > 0


def test_inference_takes_cudnn_heuristics_for_its_varying_shapes_and_training_searches():
    from argparse import Namespace

    from utils.runtime import setup_runtime

    setup_runtime(Namespace(device="cuda"), varying_shapes=True)
    assert not torch.backends.cudnn.benchmark
    setup_runtime(Namespace(device="cuda"))
    assert torch.backends.cudnn.benchmark
