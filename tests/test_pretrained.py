"""The ImageNet-pretrained mode: weights from torchvision's cache, a fresh head, a frozen backbone,
a clear error offline, and checkpoints that rebuild the model without any download.

No test touches the network: each runs with ``TORCH_HOME`` in a temporary folder, where a
random state_dict with a planted value stands in for torchvision's weights file, and with
torch.hub's downloader replaced by one that fails the way an offline machine does.
"""

import os
import re
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models as tvm

from models import build_model, model_args, model_stats
from models.pretrained import HEADS, ImageNetAdapter, imagenet_weights, weights_path
from utils.checkpoint import (
    clean_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from utils.cli import UserError
from utils.data import MEAN, STD

PLANTED = 7.25
# One tensor per network; DenseNet's sits in a layer whose name the weight file spells the old way.
PLANTED_KEY = {"resnet50": "conv1.weight", "densenet121": "features.denseblock1.denselayer1.norm1.weight",
               "googlenet": "conv1.conv.weight"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch cache under ``tmp_path`` and a downloader that fails like one without network."""
    attempts = []

    def refuse(url, dst, *args, **kwargs):
        attempts.append(dst)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    use_torch_home(tmp_path / "torch", monkeypatch)
    return attempts


def use_torch_home(folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(folder))
    assert torch.hub.get_dir() == str(folder / "hub"), "torch.hub.set_dir was called: TORCH_HOME is ignored"


def plant_weights(name):
    """Write a random ImageNet ``name`` state_dict, in the file's own key format, where torchvision
    looks for its ``DEFAULT`` weights; ``PLANTED`` is the first value of ``PLANTED_KEY[name]``."""
    kwargs = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    state = tvm.get_model(name, weights=None, **kwargs).state_dict()
    state[PLANTED_KEY[name]].view(-1)[0] = PLANTED
    if name == "densenet121":  # "denselayer1.norm1.weight" -> "denselayer1.norm.1.weight"
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
        assert "features.denseblock1.denselayer1.norm.1.weight" in state
    path = weights_path(imagenet_weights(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


def head(model, name):
    return getattr(model.net, HEADS[name])


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "googlenet"])
def test_imagenet_weights_load_under_a_fresh_head(name, offline):
    plant_weights(name)
    model = build_model(name, 10, pretrained=True).eval()
    assert isinstance(model, ImageNetAdapter)
    assert model.net.state_dict()[PLANTED_KEY[name]].view(-1)[0] == PLANTED
    assert head(model, name).out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not offline, "weights in the cache must not be downloaded"


def test_googlenet_keeps_transform_input_and_drops_the_aux_heads(offline):
    plant_weights("googlenet")
    net = build_model("googlenet", 10, pretrained=True).net
    assert net.transform_input and not net.aux_logits and net.aux1 is None and net.aux2 is None
    assert not any(key.startswith("aux") for key in net.state_dict())


def test_cifar_batches_are_renormalised_and_resized_to_224():
    model = build_model("googlenet", 10, pretrained=True, load_weights=False)
    model.net = nn.Identity()
    pixels = torch.rand(2, 3, 32, 32)

    def standardise(mean, std):
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    preset = imagenet_weights("googlenet").transforms()
    expected = F.interpolate(standardise(preset.mean, preset.std), size=(224, 224), mode="bilinear")
    assert torch.allclose(model(standardise(MEAN, STD)), expected, atol=1e-5)


def test_frozen_backbone_trains_the_head_only_and_keeps_imagenet_statistics(offline):
    plant_weights("googlenet")
    model = build_model("googlenet", 10, pretrained=True, freeze_backbone=True).train()
    fc = head(model, "googlenet")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias"}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in norms)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if p is not fc.weight and p is not fc.bias)


def test_fine_tuning_trains_everything():
    model = build_model("googlenet", 10, pretrained=True, load_weights=False).train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_offline_without_cached_weights_is_one_line_error(offline):
    expected = weights_path(imagenet_weights("densenet121"))
    assert expected.endswith("hub/checkpoints/densenet121-a639ec97.pth")
    with pytest.raises(UserError) as err:
        build_model("densenet121", 10, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
    assert expected in message and "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    assert "TORCH_HOME" in message
    assert offline == [expected]


def test_checkpoint_rebuilds_the_pretrained_model_without_download(tmp_path, offline, monkeypatch):
    plant_weights("googlenet")
    args = model_args("googlenet", pretrained=True, freeze_backbone=True)
    assert args == {"pretrained": "IMAGENET1K_V1", "freeze_backbone": True}
    model = build_model("googlenet", 10, **args).eval()
    save_checkpoint(tmp_path / "teacher.pt", {"kind": "teacher", "arch": "googlenet", "num_classes": 10,
                                              "model_args": args, "model": clean_state_dict(model)})

    use_torch_home(tmp_path / "empty", monkeypatch)
    checkpoint = load_checkpoint(tmp_path / "teacher.pt", "python teacherTrain.py", kind="teacher")
    rebuilt = model_from_checkpoint(checkpoint, tmp_path / "teacher.pt", "python teacherTrain.py").eval()

    assert isinstance(rebuilt, ImageNetAdapter) and rebuilt.freeze_backbone
    assert not offline and not (tmp_path / "empty").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_model_args_name_the_weights_and_refuse_what_cannot_be_built():
    assert model_args("resnet50") == {}
    assert model_args("resnet50", pretrained=True)["pretrained"] == "IMAGENET1K_V2"  # the DEFAULT
    assert model_args("resnet50", pretrained="IMAGENET1K_V1")["pretrained"] == "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        model_args("googlenet", pretrained="IMAGENET22K")
    with pytest.raises(ValueError, match="needs pretrained"):
        build_model("googlenet", freeze_backbone=True)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("selector", 2, pretrained=True)


def test_flops_count_the_224_forward():
    model = build_model("googlenet", 10, pretrained=True, load_weights=False)
    stats = model_stats(model)
    assert stats["feature_map"] == "7x7"
    gmacs = stats["flops"] / 2e9  # torchvision's "_ops" are GMACs of the 1000-class network
    assert gmacs == pytest.approx(imagenet_weights("googlenet").meta["_ops"], rel=0.01)


# ----------------------------------------------------------------------------- the training scripts

def test_cli_offline_stops_in_one_line_before_the_data_is_read(offline, tmp_path, capsys, monkeypatch):
    import teacherTrain
    import utils.data
    from utils.cli import run

    monkeypatch.setattr(utils.data, "load_cifar10", lambda *a, **k: pytest.fail("the data was read first"))
    with pytest.raises(SystemExit) as e:
        run(lambda: teacherTrain.main(["--arch", "googlenet", "--pretrained", "--device", "cpu",
                                       "--checkpoint", str(tmp_path / "run" / "teacher.pt")]))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no ImageNet weights for googlenet at ")
    assert weights_path(imagenet_weights("googlenet")) in lines[0]


def test_cli_frozen_pretrained_teacher_trains_its_head_and_reloads_offline(offline, tmp_path):
    import teacherTrain
    from tests.conftest import write_tree

    plant_weights("googlenet")
    tree = write_tree(tmp_path / "cifar", per_class=(2, 1))
    path = tmp_path / "run" / "teacher.pt"
    teacherTrain.main(["--arch", "googlenet", "--pretrained", "--freeze-backbone", "--data-dir", str(tree),
                       "--partial-data", "--holdout", "10", "--limit", "10", "--batch-size", "10", "--epochs", "1",
                       "--device", "cpu", "--checkpoint", str(path)])
    checkpoint = load_checkpoint(path, hint="")
    assert checkpoint["model_args"] == {"pretrained": "IMAGENET1K_V1", "freeze_backbone": True}
    planted = build_model("googlenet", 10, pretrained=True).state_dict()
    trained = checkpoint["model"]
    changed = {k for k in planted if not torch.equal(planted[k], trained[k])}
    assert changed and all(k.startswith("net.fc.") for k in changed)  # the backbone is frozen, BatchNorm included
    assert trained["net." + PLANTED_KEY["googlenet"]].view(-1)[0] == PLANTED
    rebuilt = model_from_checkpoint(checkpoint, path, "").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = build_model("googlenet", 10, pretrained=True)
        expected.load_state_dict(trained)
        torch.testing.assert_close(rebuilt(x), expected.eval()(x))
    assert not offline, "nothing is downloaded"
