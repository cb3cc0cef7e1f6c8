"""Train the teacher (ResNet50 by default) on CIFAR-10 with cross-entropy.

Writes checkpoints/[NAME/]teacher.pt (best weights by hold-out accuracy, with their test
accuracy), teacher.last.pt (resume state), a metrics log, training curves and config.json.
"""

import time
from pathlib import Path

from utils.choices import CLASSIFIERS
from utils.cli import add_data_args, add_device_args, make_parser, parse, print_config, run
from utils.recipes import TEACHER
from utils.train_flags import add_model_args, add_split_args, add_training_args, finish_training_args


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--arch", default=TEACHER, choices=CLASSIFIERS, help="teacher architecture")
    add_model_args(parser)
    add_data_args(parser)
    add_split_args(parser)
    add_training_args(parser, stem="teacher", archs=CLASSIFIERS)
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    return finish_training_args(parser, args, args.arch, stem="teacher")


def runs(args):
    """``{checkpoint: flags}`` of the run this command writes."""
    return {args.checkpoint: args}


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    from models import build_model  # after the flags: --help and a refused flag need no torch
    from utils.data import CLASSES, check_source, data_record, load_cifar10, make_splits
    from utils.engine import Member, TimeBox, fit
    from utils.losses import classification_loss
    from utils.runs import prepare_run
    from utils.runtime import setup_runtime, teardown_runtime
    from utils.split import Split

    runtime = setup_runtime(args)
    files = prepare_run(args, runtime.is_main)
    model = build_model(args.arch, len(CLASSES), **args.model_args)  # ImageNet weights may be missing
    check_source(args.data_dir, args.download)
    if runtime.is_main:
        print_config(args, "teacherTrain.py")
    data = load_cifar10(args.data_dir, args.download, verbose=runtime.is_main, allow_partial=args.partial_data)
    split = Split.from_args(args)
    meta = {"kind": "teacher", "arch": args.arch, "num_classes": len(CLASSES), "model_args": args.model_args,
            "loss": f"cross-entropy (label smoothing {args.label_smoothing:g})", **data_record(data, split)}
    fit([Member(model, classification_loss(args.label_smoothing), args, meta, files)], make_splits(data, split),
        args, runtime, time_box=TimeBox.of(args.minutes, started))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
