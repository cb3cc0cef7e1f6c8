"""The flags of every training script, their defaults and the checks that run before any data is decoded.

Flags whose default is the network's recipe (``utils/recipes.py``) are declared with
``default=None`` and filled in by ``finish_training_args``; ``--help`` shows each recipe's value.
"""

import os

from utils.choices import MIXERS, PADDINGS, SCHEDULES, TTA
from utils.cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    UNIT_INTERVAL,
    checkpoint_path,
    experiment_name,
)
from utils.recipes import RECIPES, WARMUP_EPOCHS, apply_recipe, recipe_values
from utils.runs import default_checkpoint
from utils.split import TRAIN_SIZE, Split


def add_split_args(parser):
    g = parser.add_argument_group("split (every stage of an experiment must use the same)")
    g.add_argument("--holdout", type=NON_NEGATIVE_INT, default=Split.holdout,
                   help="training images held out (stratified) for model selection and the selector; 0 allowed")
    g.add_argument("--split-seed", type=SEED, default=Split.split_seed,
                   help="seed of the hold-out split (keep it equal across stages)")
    g.add_argument("--limit", type=NON_NEGATIVE_INT, default=Split.limit,
                   help="use a stratified subset of at most this many images of each split, for quick runs (0: all)")
    return g


def check_split_flags(parser, args):
    """The split sizes ``--holdout`` and ``--limit`` ask for, checked before decoding (None with --partial-data)."""
    if args.partial_data:
        return None
    if args.holdout >= TRAIN_SIZE:
        parser.error(f"--holdout {args.holdout} leaves no training images: CIFAR-10 has {TRAIN_SIZE:,}")
    return Split.from_args(args).planned_sizes()


def add_model_args(parser):
    g = parser.add_argument_group("ImageNet-pretrained mode (the original's setting; needs the weights)")
    g.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="WEIGHTS",
                   help="start from torchvision's ImageNet weights (its DEFAULT, or a name such as IMAGENET1K_V1, "
                        "the original's for resnet50), with the ImageNet stem, images resized to 224x224 on the "
                        "device and a fresh head; the weights come from torchvision's cache, downloaded if missing")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="with --pretrained: train the new head only, as the original did")


def _recipe(key, archs):
    """``(default: resnet50 0.2, densenet121 0.2, ...)``: the recipe's value of ``key`` for each network."""
    values = recipe_values(key, archs)
    if len(set(values.values())) == 1:
        return f"(default: {next(iter(values.values()))}, the recipe's)"
    return "(default, by network: " + ", ".join(f"{arch} {value}" for arch, value in values.items()) + ")"


def add_training_args(parser, stem, archs=tuple(RECIPES), classifier=True):
    """The flags of every training script; ``stem`` names its default checkpoint, ``checkpoints/[NAME/]<stem>.pt``;
    ``archs``: the networks the script may train, whose recipes ``--help`` shows. ``classifier=False`` (the
    selector, whose targets come from images the students were judged on) leaves out augmentation and label
    smoothing."""
    def recipe(key):
        return _recipe(key, archs)

    _add_schedule_args(parser.add_argument_group("training (defaults: the network's recipe, utils/recipes.py)"),
                       recipe, classifier)
    g = parser.add_argument_group("augmentation and evaluation, on the device (defaults: the network's recipe)")
    if classifier:
        _add_augmentation_args(g, recipe)
    g.add_argument("--tta", choices=TTA,
                   help="evaluation views averaged: none, flip (2 forward passes), flip-shift (flip and two "
                        f"1-pixel diagonal shifts: 6) {recipe('tta')}")
    _add_output_args(parser.add_argument_group("progress and output"), stem)


def _add_schedule_args(g, recipe, classifier):
    g.add_argument("--epochs", type=POSITIVE_INT, help=f"passes over the training split {recipe('epochs')}")
    g.add_argument("--minutes", type=POSITIVE, default=None,
                   help="a time box instead of --epochs: the whole stage, start-up and final evaluation included, "
                        "ends within this many minutes; it times a few steps, then chooses the epochs and builds the "
                        "schedule for them (recorded in the checkpoint, so --epochs repeats the run)")
    g.add_argument("--batch-size", type=POSITIVE_INT, help=f"images per step, over all GPUs {recipe('batch_size')}")
    g.add_argument("--lr", type=POSITIVE,
                   help="peak learning rate for a batch of 512, reached after the warm-up; scaled linearly "
                        f"with --batch-size {recipe('lr')}")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help=f"decay of the learning rate to 0 after the warm-up {recipe('schedule')}")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=None,
                   help=f"epochs of linear warm-up from 0 to the peak learning rate (default: {WARMUP_EPOCHS:g}); "
                        "it never takes more than 20%% of the run")
    g.add_argument("--momentum", type=UNIT_INTERVAL, default=0.9, help="Nesterov momentum of SGD")
    g.add_argument("--weight-decay", type=NON_NEGATIVE,
                   help=f"L2 weight decay, not applied to biases and BatchNorm {recipe('weight_decay')}")
    if classifier:
        g.add_argument("--label-smoothing", type=UNIT_INTERVAL,
                       help=f"label smoothing of cross-entropy {recipe('label_smoothing')}")
    g.add_argument("--ema", type=UNIT_INTERVAL,
                   help="decay of an exponential moving average of the weights, evaluated and saved instead "
                        f"of the raw weights; 0: off, try 0.999 {recipe('ema')}")


def _add_augmentation_args(g, recipe):
    g.add_argument("--translate", type=NON_NEGATIVE_INT,
                   help=f"random translation by up to this many pixels, with a random horizontal flip "
                        f"{recipe('translate')}")
    g.add_argument("--padding", choices=PADDINGS,
                   help=f"what a translated image shows at its border; zeros: the classic CIFAR crop "
                        f"{recipe('padding')}")
    g.add_argument("--cutout", type=NON_NEGATIVE_INT,
                   help=f"side of a random square painted grey; 0: off {recipe('cutout')}")
    g.add_argument("--mix", choices=("none", *MIXERS),
                   help=f"CutMix, MixUp or either at random (both), with torchvision's transforms; none: off "
                        f"{recipe('mix')}")
    g.add_argument("--mix-alpha", type=POSITIVE,
                   help=f"the mixing weight is drawn from Beta(alpha, alpha) {recipe('mix_alpha')}")
    g.add_argument("--mix-prob", type=PROBABILITY, help=f"share of batches that are mixed {recipe('mix_prob')}")


def _add_output_args(g, stem):
    g.add_argument("--eval-every", type=POSITIVE_INT, default=5,
                   help="evaluate on the hold-out split every k epochs, and at each of the last k")
    g.add_argument("--save-every", type=NON_NEGATIVE, default=2.0,
                   help="minutes between writes of the resume state and best weights (at an epoch's end; also "
                        "before any stop and at the end); 0: every epoch")
    g.add_argument("--log-every", type=POSITIVE_INT, default=50,
                   help="steps between updates of the progress bar (and, under torchrun, between checks for a "
                        "stop signal)")
    g.add_argument("--name", default="", type=experiment_name,
                   help="experiment name: every stage reads and writes its checkpoints in checkpoints/NAME/ "
                        "(default: checkpoints/)")
    g.add_argument("--checkpoint", default=None, type=checkpoint_path,
                   help=f"output path of the best weights, a .pt file (default: checkpoints/[NAME/]{stem}.pt); "
                        "beside it <stem>.last.pt (resume state), .metrics.jsonl, .curves.png and .config.json")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run saved at --checkpoint")
    g.add_argument("--force", action="store_true", help="replace an existing run at --checkpoint")
    g.add_argument("--time-budget", type=NON_NEGATIVE, default=None,
                   help="save and stop after the first epoch that ends past this many minutes; "
                        "continue with --resume")
    return g


def finish_training_args(parser, args, arch, stem=None, train_images=None):
    """Defaults that depend on other flags, then every check that can run before the data is decoded;
    each failure is ``parser.error``'s one line.

    ``arch``'s recipe fills the flags not given. ``stem`` names the default checkpoint.
    ``train_images``: the size the training split will have, where it is known in advance
    (for a script with the split flags, it is computed here).
    """
    if hasattr(args, "pretrained"):
        args.model_args = {}
        if args.pretrained or args.freeze_backbone:
            from models.pretrained import model_args  # torchvision's weights: only for the ImageNet mode

            try:
                args.model_args = model_args(arch, args.pretrained, args.freeze_backbone)
            except ValueError as e:
                parser.error(str(e))
    if stem is not None and args.checkpoint is None:
        args.checkpoint = default_checkpoint(args.name, stem)
    if hasattr(args, "holdout"):
        sizes = check_split_flags(parser, args)
        train_images = sizes and sizes["train"]
    if args.minutes is not None and args.epochs is not None:
        parser.error("--minutes chooses the epochs from a time box: give --minutes or --epochs, not both")
    apply_recipe(args, arch)
    if args.minutes is not None:
        args.epochs = None  # chosen by the run
    if args.resume and args.force:
        parser.error("--resume continues a run and --force replaces it: give one of them")
    if args.warmup_epochs is None:
        args.warmup_epochs = WARMUP_EPOCHS
    elif args.epochs is not None and args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs})")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size < world_size:
        parser.error(f"--batch-size {args.batch_size} cannot be shared by {world_size} processes; give at least "
                     "one image per process")
    if train_images is not None and args.batch_size > train_images:
        parser.error(f"--batch-size {args.batch_size} is larger than the training split ({train_images} images); "
                     "lower it, or raise --limit")
    return args
