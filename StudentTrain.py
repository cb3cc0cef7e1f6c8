"""Train a student by knowledge distillation from the teacher (or on labels alone with --no-kd).

--model 1 is DenseNet121, --model 2 GoogLeNet (any registered classifier name works too).
The frozen teacher sees the very same augmented batch as the student, on the same device
and under the same autocast. Writes checkpoints/[NAME/]student_<arch>.pt (student_<arch>_nokd.pt
with --no-kd), its .last.pt resume state, metrics log, curves and config.json.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from teacherTrain import CLASSIFIERS, add_model_args, finish_training_args, split_meta
from utils.checkpoint import load_checkpoint, model_from_checkpoint
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
from utils.data import CLASSES, load_cifar10, make_splits
from utils.engine import add_training_args, fit, prepare_model, setup_runtime, teardown_runtime
from utils.losses import KD_LOSSES, kd_terms
from utils.runs import default_checkpoint, prepare_run

STUDENTS = {"1": "densenet121", "2": "googlenet"}


def student_stem(arch, kd=True):
    return f"student_{arch}{'' if kd else '_nokd'}"


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--model", default="1", choices=[*STUDENTS, *CLASSIFIERS],
                        help="student: 1 = densenet121, 2 = googlenet, or an architecture name")
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint (teacherTrain.py) (default: checkpoints/[NAME/]teacher.pt)")
    parser.add_argument("--kd-loss", default="kl", choices=KD_LOSSES,
                        help="kl: Hinton's softened-probability loss; mse: squared error between logits")
    parser.add_argument("--temperature", type=POSITIVE, default=4.0, help="softening temperature T of the kl loss")
    parser.add_argument("--alpha", type=PROBABILITY, default=0.9,
                        help="weight of the teacher term; 1 - alpha weights cross-entropy with the labels")
    parser.add_argument("--no-kd", action="store_true",
                        help="train on the labels alone (same recipe, no teacher), for the KD-versus-no-KD comparison")
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser, stem="student_<arch>[_nokd]")
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parse(parser, argv)
    args.arch = STUDENTS.get(args.model, args.model)
    if args.teacher is None:
        args.teacher = default_checkpoint(args.name, "teacher")
    return finish_training_args(parser, args, student_stem(args.arch, not args.no_kd))


def load_teacher(args, data, runtime):
    hint = "python teacherTrain.py" + (f" --name {args.name}" if args.name else "")
    checkpoint = load_checkpoint(args.teacher, hint=hint, kind="teacher")
    if checkpoint["split"]["holdout"] != args.holdout or checkpoint["split"]["split_seed"] != args.split_seed:
        raise UserError(f"{args.teacher} was trained with --holdout {checkpoint['split']['holdout']} --split-seed "
                        f"{checkpoint['split']['split_seed']}; use the same hold-out split, or the teacher has "
                        "seen the student's hold-out images")
    if checkpoint["data_fingerprint"] != data.fingerprint and runtime.is_main:
        print(f"warning: {args.teacher} was trained on other CIFAR-10 pixels (another copy or format)")
    if not checkpoint["complete"] and runtime.is_main:
        print(f"warning: {args.teacher} comes from an unfinished run ({checkpoint['epoch']}/{checkpoint['epochs']} "
              "epochs)")
    teacher = model_from_checkpoint(checkpoint, args.teacher, hint).eval().requires_grad_(False)
    return prepare_model(teacher, runtime, args.compile), checkpoint


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    if runtime.is_main:
        print_config(args, "StudentTrain.py")
    files = prepare_run(args, runtime.is_main)
    model = build_model(args.arch, len(CLASSES), **args.model_args)  # before decoding: ImageNet weights may be missing
    data = load_cifar10(args.data_dir, args.download, verbose=runtime.is_main, allow_partial=args.partial_data)
    splits = make_splits(data, args.holdout, args.split_seed, args.limit)

    if args.no_kd:
        teacher_record = None
        loss = f"cross-entropy (label smoothing {args.label_smoothing:g})"

        def loss_fn(logits, x, y):
            return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
    else:
        teacher, checkpoint = load_teacher(args, data, runtime)
        teacher_record = {"path": args.teacher, "arch": checkpoint["arch"],
                          "weights_sha256": checkpoint["weights_sha256"]}
        loss = (f"KD loss ({args.kd_loss}{f', T={args.temperature:g}' if args.kd_loss == 'kl' else ''}, "
                f"alpha={args.alpha:g})")

        def loss_fn(logits, x, y):
            with torch.no_grad():
                teacher_logits = teacher(x)
            return kd_terms(args.kd_loss, logits, teacher_logits, y, temperature=args.temperature, alpha=args.alpha,
                           label_smoothing=args.label_smoothing)

    meta = {"kind": "student", "arch": args.arch, "num_classes": len(CLASSES), "model_args": args.model_args,
            "kd": not args.no_kd, "teacher": teacher_record, "loss": loss, **split_meta(args, data)}
    fit(model, loss_fn, splits, args, runtime, meta, files)
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
