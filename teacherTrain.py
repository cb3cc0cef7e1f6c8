"""Train the teacher (ResNet50 by default) on CIFAR-10 with cross-entropy.

Writes checkpoints/[NAME/]teacher.pt (best weights by hold-out accuracy, with their test
accuracy), teacher.last.pt (resume state), a metrics log, training curves and config.json.
"""

from pathlib import Path

import torch.nn.functional as F

from models import MODEL_NAMES, build_model, model_args
from utils.cli import add_data_args, add_device_args, make_parser, parse, print_config, run
from utils.data import CLASSES, check_split_flags, load_cifar10, make_splits
from utils.engine import add_training_args, check_training_args, fit, setup_runtime, teardown_runtime
from utils.runs import default_checkpoint, prepare_run

CLASSIFIERS = [name for name in MODEL_NAMES if name != "selector"]


def add_model_args(parser):
    g = parser.add_argument_group("ImageNet-pretrained mode (the original's setting; needs the weights)")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="WEIGHTS",
                   help="start from torchvision's ImageNet weights (its DEFAULT, or a name such as IMAGENET1K_V1, "
                        "the original's for resnet50), with the ImageNet stem, images resized to 224x224 on the "
                        "device and a fresh head; the weights come from torchvision's cache, downloaded if missing")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="with --pretrained: train the new head only, as the original did")


def check_model_args(parser, args):
    """``args.model_args`` for ``build_model``, or one ``error:`` line."""
    try:
        args.model_args = model_args(args.arch, args.pretrained, args.freeze_backbone)
    except ValueError as e:
        parser.error(str(e))


def finish_training_args(parser, args, stem):
    """Defaults that depend on other flags, and every check that can run before the data is decoded."""
    check_model_args(parser, args)
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint(args.name, stem)
    sizes = check_split_flags(parser, args)
    check_training_args(parser, args, args.arch, sizes and sizes["train"])
    return args


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--arch", default="resnet50", choices=CLASSIFIERS, help="teacher architecture")
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser, stem="teacher")
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    return finish_training_args(parser, parse(parser, argv), "teacher")


def split_meta(args, data):
    """What a checkpoint records about the data it was trained on."""
    return {"classes": list(CLASSES), "data_fingerprint": data.fingerprint,
            "split": {"holdout": args.holdout, "split_seed": args.split_seed, "limit": args.limit}}


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    if runtime.is_main:
        print_config(args, "teacherTrain.py")
    files = prepare_run(args, runtime.is_main)
    model = build_model(args.arch, len(CLASSES), **args.model_args)  # before decoding: ImageNet weights may be missing
    data = load_cifar10(args.data_dir, args.download, verbose=runtime.is_main, allow_partial=args.partial_data)
    splits = make_splits(data, args.holdout, args.split_seed, args.limit)

    def loss_fn(logits, x, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)

    meta = {"kind": "teacher", "arch": args.arch, "num_classes": len(CLASSES), "model_args": args.model_args,
            "loss": f"cross-entropy (label smoothing {args.label_smoothing:g})", **split_meta(args, data)}
    fit(model, loss_fn, splits, args, runtime, meta, files)
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
