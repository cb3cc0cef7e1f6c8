"""Training and inference throughput: our engine against the plain loop most CIFAR repositories use.

Training, per architecture, on the same images: our engine's step (the split held on the
device, batched augmentation, bf16 autocast, channels_last and fused SGD on CUDA, with the
speed flags given here: --batch-size, --compile) against a reference loop (torchvision
DataLoader with PIL transforms, fp32, batch 128, no compile, ``loss.item()`` every step), with
images/s, peak GPU memory and the speed-up. --baseline adds the engine at batch 512 without
compile, so that a speed flag's gain shows as a ratio in the same run.

Inference: the teacher, each student, both students on every image, and the two routed
systems — the cascade (the cheaper student on every image, the other on --defer-share of them)
and selector routing (the selector, then one student: the dearer on --defer-share) — timed
exactly as inference.py times them (utils.routed.timed: an untimed pass, then a timed one), on
--steps batches of test images.

Every network has random weights: speed does not depend on their values, only on the
routing shares, which are set by the flags.

    python bench.py --data-dir /path/to/cifar10 --baseline                       # a GPU
    python bench.py --device cpu --limit 64 --batch-size 8 --ref-batch-size 8 --steps 2 --workers 0 --infer-batch-size 8
"""

from pathlib import Path

from utils.choices import CLASSIFIERS
from utils.cli import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.recipes import STUDENTS, TEACHER
from utils.runs import check_output_file
from utils.train_flags import add_split_args, check_split_flags

STUDENT_ARCHS = tuple(STUDENTS.values())


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    add_data_args(parser)
    add_split_args(parser)
    parser.set_defaults(holdout=0)  # nothing is selected here: time on the whole training split
    g = parser.add_argument_group("benchmark")
    g.add_argument("--archs", nargs="+", default=[TEACHER, *STUDENT_ARCHS], choices=CLASSIFIERS,
                   help="architectures whose training is timed")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=512, help="images per training step of our engine")
    g.add_argument("--ref-batch-size", type=POSITIVE_INT, default=128,
                   help="images per training step of the reference loop")
    g.add_argument("--steps", type=POSITIVE_INT, default=30,
                   help="timed training steps per measurement, and inference batches")
    g.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=5,
                   help="untimed training steps before each measurement (with --compile they include compiling)")
    g.add_argument("--workers", type=NON_NEGATIVE_INT, default=4,
                   help="DataLoader worker processes of the reference loop")
    g.add_argument("--infer-batch-size", type=POSITIVE_INT, default=1024, help="images per inference batch")
    g.add_argument("--defer-share", type=PROBABILITY, default=0.15,
                   help="share of images that routed inference sends to the second student (0.15: what a budget "
                        "of about 1.3x the cheaper student's GFLOPs affords a cascade)")
    g.add_argument("--baseline", action="store_true",
                   help="also time the engine at batch 512 without compile, for the side-by-side ratio of the speed "
                        "flags given")
    g.add_argument("--out", default=None, help="also write every figure to this JSON file")
    g.add_argument("--force", action="store_true", help="replace the file --out names where it exists")
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """The flags, and the split sizes they ask for checked against the batch sizes before any data is decoded."""
    parser = build_parser()
    args = parse(parser, argv)
    sizes = check_split_flags(parser, args)
    for flag, batch, split in (("--batch-size", args.batch_size, "train"),
                               ("--ref-batch-size", args.ref_batch_size, "train"),
                               ("--infer-batch-size", args.infer_batch_size, "test")):
        if sizes is not None and batch > sizes[split]:
            parser.error(f"{flag} {batch} is larger than the {split} split ({sizes[split]} images); lower it, "
                         "or raise --limit")
    if args.out:
        check_output_file(args.out, args.force)
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch  # after the flags: --help and a refused flag need no torch

    from utils import benchmark
    from utils.data import load_cifar10, make_splits
    from utils.report import write_json
    from utils.runtime import device_name, setup_runtime
    from utils.split import Split

    runtime = setup_runtime(args)
    print_config(args, "bench.py")
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    splits = make_splits(data, Split.from_args(args))
    (train_images, train_labels), (test_images, _) = splits["train"], splits["test"]
    if len(train_images) < max(args.batch_size, args.ref_batch_size):
        raise UserError(f"the training split has {len(train_images)} images, fewer than one batch "
                        f"(--batch-size {args.batch_size}, --ref-batch-size {args.ref_batch_size}); "
                        "raise --limit or lower the batch sizes")
    if len(test_images) < args.infer_batch_size:
        raise UserError(f"the test split has {len(test_images)} images, fewer than one batch "
                        f"(--infer-batch-size {args.infer_batch_size}); raise --limit or lower it")
    print(f"\ndevice: {device_name(runtime.device)}   torch {torch.__version__}")
    training = benchmark.training_table(train_images, train_labels, args, runtime)
    together = benchmark.students_loop(train_images, train_labels, args, runtime)
    speeds = benchmark.inference_table(test_images, args, runtime)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {"device": device_name(runtime.device), "torch": str(torch.__version__),
                              "config": vars(args), "training": training, "students_together": together,
                              "inference_images_per_s": speeds})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run(main)
