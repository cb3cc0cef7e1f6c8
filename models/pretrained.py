"""torchvision's ImageNet networks with a fresh head, fed CIFAR-10 batches (the original's setting).

The network keeps its ImageNet stem. ``ImageNetAdapter`` takes the CIFAR-normalised 32x32
batch that every model here receives, re-normalises it with the weights' own mean/std and
resizes it on the device to the weights' crop size (224) before the network runs.

``freeze_backbone``: only the new head trains. The frozen BatchNorm layers stay in eval
mode, so they keep normalising with their ImageNet running statistics instead of drifting
towards CIFAR's batch statistics under a backbone that cannot adapt to them; dropout before
the head (GoogLeNet's) still follows ``train()``.

Weights come from torchvision's cache (``torch.hub.get_dir()/checkpoints``), downloaded once
if missing; ``load_weights=False`` builds the same structure with random weights, to load a
checkpoint over it without any download.
"""

import os
import re
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models as tvm

from utils.cli import UserError
from utils.data import MEAN, STD

HEADS = {"resnet50": "fc", "densenet121": "classifier", "googlenet": "fc", "resnet18": "fc"}
# Old DenseNet files name "denselayer1.norm.1.weight" what is now "denselayer1.norm1.weight".
_OLD_DENSENET_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.(?=[12]\.)")


def imagenet_weights(name, pretrained=True):
    """The torchvision weights enum member: ``True`` -> the builder's ``DEFAULT``, else by name
    (``"IMAGENET1K_V1"``)."""
    if name not in HEADS:
        raise ValueError(f"no ImageNet weights for {name!r}; pretrained models: {', '.join(HEADS)}")
    enum = tvm.get_model_weights(name)
    key = "DEFAULT" if pretrained is True else str(pretrained)
    if key not in enum.__members__:
        raise ValueError(f"{name} has no weights {key!r}; choose from {', '.join(enum.__members__)}")
    return enum[key]


def model_args(name, pretrained=False, freeze_backbone=False):
    """The ``build_model`` keywords a checkpoint records (``{}`` for a CIFAR model);
    ``build_model(name, num_classes, **args)`` builds the model, and ``model_from_checkpoint``
    rebuilds it from them."""
    if freeze_backbone and not pretrained:
        raise ValueError("freeze_backbone needs pretrained weights: a random backbone would never train")
    if not pretrained:
        return {}
    return {"pretrained": imagenet_weights(name, pretrained).name, "freeze_backbone": bool(freeze_backbone)}


def weights_path(weights):
    """Where ``torch.hub.load_state_dict_from_url`` looks for ``weights``' file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def imagenet_state_dict(name, weights):
    """The weights' state_dict, read as data, downloaded into torchvision's cache if missing."""
    try:
        state = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as e:  # urllib's URLError (no network), timeouts, refused connections
        path = weights_path(weights)
        raise UserError(f"no ImageNet weights for {name} at {path}, and downloading them failed "
                        f"({getattr(e, 'reason', e)}); download {weights.url} to that path, or set "
                        f"TORCH_HOME to a folder whose hub/checkpoints/ holds {os.path.basename(path)}") from None
    if name == "densenet121":
        state = {_OLD_DENSENET_KEY.sub(r"\1", k): v for k, v in state.items()}
    return state


class ImageNetAdapter(nn.Module):
    """Feeds a CIFAR-normalised batch to an ImageNet network: re-normalised, resized to ``size``."""

    def __init__(self, net, weights, freeze_backbone=False):
        super().__init__()
        self.net = net
        self.freeze_backbone = freeze_backbone
        preset = weights.transforms()
        self.size = preset.crop_size[0]
        cifar_mean, cifar_std = torch.tensor(MEAN), torch.tensor(STD)
        mean, std = torch.tensor(preset.mean), torch.tensor(preset.std)
        # (x * cifar_std + cifar_mean - mean) / std, as one per-channel scale and shift
        self.register_buffer("scale", (cifar_std / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((cifar_mean - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        # A per-channel affine map commutes with bilinear resizing: apply it to the small image.
        x = F.interpolate(x * self.scale + self.shift, size=(self.size, self.size), mode="bilinear")
        return self.net(x)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_backbone:
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def build_pretrained(name, num_classes, pretrained=True, freeze_backbone=False, load_weights=True):
    """torchvision's ``name`` with its ImageNet stem and weights, a fresh ``num_classes`` head,
    wrapped in an ``ImageNetAdapter``."""
    weights = imagenet_weights(name, pretrained)
    # GoogLeNet's files hold the aux classifiers and expect transform_input, as torchvision loads them.
    kwargs = {"aux_logits": True, "transform_input": True, "init_weights": False} if name == "googlenet" else {}
    net = tvm.get_model(name, weights=None, **kwargs)
    if load_weights:
        net.load_state_dict(imagenet_state_dict(name, weights))
    if name == "googlenet":
        net.aux_logits, net.aux1, net.aux2 = False, None, None
    if freeze_backbone:
        net.requires_grad_(False)
    head = getattr(net, HEADS[name])
    setattr(net, HEADS[name], nn.Linear(head.in_features, num_classes))
    return ImageNetAdapter(net, weights, freeze_backbone).train()
