"""``python -m models``: parameters, FLOPs per image and final feature-map size of every model, and each
classifier's cost against the teacher's, here (CIFAR stem, 32x32) and in the original's setting
(torchvision's ImageNet network at 224x224)."""

from torchvision import models as tvm

from models import build_model, model_stats
from models.pretrained import HEADS
from utils.choices import CLASSIFIERS, MODEL_NAMES
from utils.cli import make_parser, run
from utils.recipes import TEACHER


def imagenet_gflops(name):
    """GFLOPs of torchvision's ImageNet network ``name`` on one 224x224 image (the original's setting)."""
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return model_stats(tvm.get_model(name, weights=None, num_classes=10, **kwargs), image_size=224)["flops"] / 1e9


def main(argv=None):
    make_parser(__doc__, "python -m models").parse_args(argv)  # no flags: --help says what it prints
    stats = {name: model_stats(build_model(name, 2 if name == "selector" else 10)) for name in MODEL_NAMES}
    original = {name: imagenet_gflops(name) for name in CLASSIFIERS if name in HEADS}
    teacher = stats[TEACHER]["flops"] / 1e9
    print(f"| Model | Parameters | GFLOPs / 32x32 image | x {TEACHER} | Final feature map "
          f"| original's setting (ImageNet stem, 224x224): GFLOPs | x {TEACHER} |")
    print("|---|---|---|---|---|---|---|")
    for name, s in stats.items():
        gflops = s["flops"] / 1e9
        at_224 = f"{original[name]:.2f} | {original[name] / original[TEACHER]:.2f}" if name in original else "— | —"
        print(f"| {name} | {s['params'] / 1e6:.2f} M | {gflops:.3f} | {gflops / teacher:.2f} | {s['feature_map']} "
              f"| {at_224} |")


if __name__ == "__main__":
    run(main)
