"""torchvision's standard architectures with a CIFAR stem, and the model selector.

The ImageNet stems (7x7 stride-2 convolution, then max-pooling) shrink a 32x32 image to
8x8 before the first block. Here the first convolution is 3x3 with stride 1 and the first
max-pooling is removed, so every network sees CIFAR-10 at full resolution. GoogLeNet keeps its
second max-pooling (``maxpool2``): its inception blocks run at 16x16, 8x8 and 4x4, which keeps
its cost against ResNet50 where the original's ImageNet networks had it (0.35x, against 0.37x
at 224x224). ``googlenet32`` removes that pooling too: inception blocks at 32x32, 16x16 and
8x8, and more GFLOPs than ResNet50.
``build_model(name, pretrained=...)`` instead builds the ImageNet-pretrained network of
``models/pretrained.py``.
"""

import torch.nn as nn
from torchvision import models as tvm
from torchvision.models.googlenet import BasicConv2d

from models.pretrained import build_pretrained, model_args
from utils.choices import MODEL_NAMES


def _resnet(builder):
    def build(num_classes):
        model = builder(weights=None, num_classes=num_classes, zero_init_residual=True)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    return build


def _densenet121(num_classes):
    model = tvm.densenet121(weights=None, num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


def _googlenet(full_resolution=False):
    def build(num_classes):
        model = tvm.googlenet(weights=None, num_classes=num_classes, aux_logits=False,
                              transform_input=False, init_weights=True)
        model.conv1 = BasicConv2d(3, 64, kernel_size=3, stride=1, padding=1)
        model.maxpool1 = nn.Identity()
        if full_resolution:
            model.maxpool2 = nn.Identity()
        return model
    return build


class Selector(nn.Module):
    """The original's three-block CNN; one logit per student ("route this image there")."""

    def __init__(self, num_students=2, width=32, dropout=0.25):
        super().__init__()
        if num_students < 2:
            raise ValueError(f"a selector chooses between at least 2 students, not {num_students}")

        def block(c_in, c_out):
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2), nn.Dropout(dropout),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_students)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


_BUILDERS = {"resnet50": _resnet(tvm.resnet50), "densenet121": _densenet121, "googlenet": _googlenet(),
             "googlenet32": _googlenet(full_resolution=True), "resnet18": _resnet(tvm.resnet18)}


def build_model(name, num_classes=10, pretrained=False, freeze_backbone=False, load_weights=True):
    """Build a classifier of ``utils.choices.CLASSIFIERS`` (``num_classes`` logits) or the ``selector``
    (``num_classes`` = number of students), with random weights.

    ``pretrained``: ``True`` (torchvision's ``DEFAULT`` weights) or a weights name such as
    ``"IMAGENET1K_V1"`` builds the ImageNet network with those weights and a fresh head, fed
    32x32 batches resized to 224 inside its forward; ``freeze_backbone`` then trains the head
    only. ``load_weights=False`` builds the same structure with random weights, without any
    download (to load a checkpoint over it). Record ``model_args(name, pretrained,
    freeze_backbone)`` to rebuild it.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    args = model_args(name, pretrained, freeze_backbone)
    if args:
        return build_pretrained(name, num_classes, load_weights=load_weights, **args)
    if name == "selector":
        return Selector(num_students=num_classes)
    return _BUILDERS[name](num_classes)
