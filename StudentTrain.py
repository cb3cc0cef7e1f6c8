"""Train students by knowledge distillation from the teacher (or on labels alone with --no-kd).

--model 1 is DenseNet121, --model 2 GoogLeNet (any classifier name works too); --model 1 2 trains
both in one process on the same batches: one augmentation and one teacher forward pass per batch,
an optimizer and a checkpoint per student, each student's weights those a run of its own gives.
--with-nokd adds each student's twin trained on the labels alone to the same loop. The frozen
teacher sees the very same augmented batch as the students, on the same device and under the same
autocast. Writes checkpoints/[NAME/]student_<arch>.pt (student_<arch>_nokd.pt without KD), its
.last.pt resume state, metrics log, curves and config.json.
"""

import time
from argparse import Namespace
from pathlib import Path

import torch

from models import CLASSIFIERS, build_model
from utils.cli import (
    POSITIVE,
    PROBABILITY,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import CLASSES, Split, data_record, load_cifar10, make_splits
from utils.engine import Member, TimeBox, fit
from utils.losses import KD_LOSSES, classification_loss, distillation_loss
from utils.networks import Network
from utils.recipes import STUDENTS
from utils.runs import default_checkpoint, prepare_run, student_stem
from utils.runtime import setup_runtime, teardown_runtime
from utils.train_flags import add_model_args, add_split_args, add_training_args, finish_training_args

# Flags every student of one loop shares: they see the same batches, epochs and split.
LOOP_FLAGS = ("epochs", "minutes", "batch_size", "translate", "padding", "cutout", "mix", "mix_alpha", "mix_prob",
              "seed", "eval_every", "save_every", "log_every", "time_budget")


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--model", nargs="+", default=["1"], choices=[*STUDENTS, *CLASSIFIERS],
                        help="students: 1 = densenet121, 2 = googlenet, or architecture names; several train "
                             "together on the same batches")
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint (teacherTrain.py) (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--kd-loss", default="kl", choices=KD_LOSSES,
                        help="kl: Hinton's softened-probability loss; mse: squared error between logits")
    parser.add_argument("--temperature", type=POSITIVE, default=4.0, help="softening temperature T of the kl loss")
    parser.add_argument("--alpha", type=PROBABILITY, default=0.9,
                        help="weight of the teacher term; 1 - alpha weights cross-entropy with the labels")
    kd = parser.add_mutually_exclusive_group()
    kd.add_argument("--no-kd", action="store_true",
                    help="train on the labels alone (same recipe, no teacher), for the KD-versus-no-KD comparison")
    kd.add_argument("--with-nokd", action="store_true",
                    help="also train each student's no-KD twin in the same loop, on the same batches")
    add_model_args(parser)
    add_data_args(parser)
    add_split_args(parser)
    add_training_args(parser, stem="student_<arch>[_nokd]", archs=tuple(STUDENTS.values()))
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """One set of flags per student of the loop: each is what ``StudentTrain.py --model K [--no-kd]`` alone
    would parse, with its own network's recipe; the students must agree on the flags their loop shares."""
    parser = build_parser()
    args = parse(parser, argv)
    models = list(dict.fromkeys(args.model))
    if args.checkpoint and len(models) + args.with_nokd > 1:
        parser.error("--checkpoint names one run; several students write theirs in checkpoints/[NAME/] (--name)")
    args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    runs = []
    for model in models:
        arch = STUDENTS.get(model, model)
        for kd in [False] if args.no_kd else [True, False] if args.with_nokd else [True]:
            own = {**vars(args), "model": model, "arch": arch, "no_kd": not kd}
            own.pop("with_nokd")
            runs.append(finish_training_args(parser, Namespace(**own), arch, stem=student_stem(arch, kd)))
    for key in LOOP_FLAGS:
        values = {flags.checkpoint: getattr(flags, key) for flags in runs}
        if len(set(values.values())) > 1:
            flag = f"--{key.replace('_', '-')}"
            parser.error(f"the students' recipes differ in {flag} (" + ", ".join(f"{p}: {v}" for p, v in values.items())
                         + f"); give {flag} to train them together, or train them one at a time")
    return runs


def load_teacher(args, data, runtime):
    """The frozen teacher, refused if it was trained on another split (it would have seen the students'
    hold-out images)."""
    hint = "python teacherTrain.py" + (f" --name {args.name}" if args.name else "")
    teacher = Network(args.teacher, "teacher", hint, runtime)
    if teacher.split != Split.from_args(args):
        raise UserError(f"{args.teacher} was trained with {teacher.split}, not {Split.from_args(args)}; use the same "
                        "split, or the teacher has seen the students' hold-out images")
    if teacher.checkpoint["data_fingerprint"] != data.fingerprint and runtime.is_main:
        print(f"warning: {args.teacher} was trained on other CIFAR-10 pixels (another copy or format)")
    if args.compile:
        teacher.model = torch.compile(teacher.model, dynamic=False)
    return teacher


def loss_and_meta(flags, teacher, data, split):
    """A student's loss and what its checkpoints record, from its flags."""
    if flags.no_kd:
        loss_fn = classification_loss(flags.label_smoothing)
        loss = f"cross-entropy (label smoothing {flags.label_smoothing:g})"
    else:
        loss_fn = distillation_loss(flags.kd_loss, flags.temperature, flags.alpha, flags.label_smoothing)
        loss = (f"KD loss ({flags.kd_loss}{f', T={flags.temperature:g}' if flags.kd_loss == 'kl' else ''}, "
                f"alpha={flags.alpha:g})")
    teacher_record = None if flags.no_kd else {"path": flags.teacher, "arch": teacher.arch,
                                             "weights_sha256": teacher.checkpoint["weights_sha256"]}
    meta = {"kind": "student", "arch": flags.arch, "num_classes": len(CLASSES), "model_args": flags.model_args,
            "kd": not flags.no_kd, "teacher": teacher_record, "loss": loss, **data_record(data, split)}
    return loss_fn, meta


def main(argv=None):
    started = time.time()
    runs = parse_args(argv)
    args = runs[0]  # what the loop shares: data, device, seed, epochs, batches
    runtime = setup_runtime(args)
    if runtime.is_main:
        print_config(args, "StudentTrain.py")
        for other in runs[1:]:
            print(f"  and {other.checkpoint}: " + ", ".join(f"{k} {v}" for k, v in vars(other).items()
                                                            if v != getattr(args, k)))
    files = [prepare_run(flags, runtime.is_main) for flags in runs]
    models = []
    for flags in runs:  # each starts as it would in a run of its own; before decoding: ImageNet weights may be missing
        torch.manual_seed(flags.seed)
        models.append(build_model(flags.arch, len(CLASSES), **flags.model_args))
    data = load_cifar10(args.data_dir, args.download, verbose=runtime.is_main, allow_partial=args.partial_data)
    split = Split.from_args(args)
    teacher = load_teacher(args, data, runtime) if not all(flags.no_kd for flags in runs) else None
    members = []
    for flags, model, run_files in zip(runs, models, files):
        loss_fn, meta = loss_and_meta(flags, teacher, data, split)
        members.append(Member(model, loss_fn, flags, meta, run_files))
    fit(members, make_splits(data, split), args, runtime, teacher=teacher, time_box=TimeBox.of(args, started))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
