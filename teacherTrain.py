"""Train the teacher (ResNet50 by default) on CIFAR-10 with cross-entropy.

Writes checkpoints/teacher.pt (best weights by hold-out accuracy, with their test accuracy),
checkpoints/teacher.last.pt (resume state), a metrics log and a training-curve plot.
"""

import torch.nn.functional as F

from models import MODEL_NAMES, build_model
from utils.cli import add_data_args, add_device_args, make_parser, print_config, run
from utils.data import CLASSES, load_cifar10, make_splits
from utils.engine import add_training_args, fit, setup_runtime, teardown_runtime

CLASSIFIERS = [name for name in MODEL_NAMES if name != "selector"]


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--arch", default="resnet50", choices=CLASSIFIERS, help="teacher architecture")
    add_data_args(parser)
    add_training_args(parser, checkpoint="checkpoints/teacher.pt", epochs=30, lr=0.2)
    add_device_args(parser)
    return parser.parse_args(argv)


def split_meta(args, data):
    """What a checkpoint records about the data it was trained on."""
    return {"classes": list(CLASSES), "data_fingerprint": data.fingerprint,
            "split": {"holdout": args.holdout, "split_seed": args.split_seed, "limit": args.limit}}


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    if runtime.is_main:
        print_config(args, "teacherTrain.py")
    data = load_cifar10(args.data_dir, args.download, verbose=runtime.is_main)
    splits = make_splits(data, args.holdout, args.split_seed, args.limit)

    def loss_fn(logits, x, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)

    meta = {"kind": "teacher", "arch": args.arch, "num_classes": len(CLASSES), **split_meta(args, data)}
    fit(build_model(args.arch, len(CLASSES)), loss_fn, splits, args, runtime, meta)
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
