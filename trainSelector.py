"""Train the model selector: a small CNN that predicts, for each image, which students will be right.

The students are run on the hold-out split, which none of them trained on: on each clean image
and on --views augmented copies of it. The selector has one output per student, trained with
binary cross-entropy on "this student is right" (not on "the student of lowest loss": both
students are right on most images, and that label then separates two right answers by noise,
so a selector learns to name the majority student everywhere). Routing then follows the
predicted gain, with a threshold fitted by inference.py. The selector trains on part of the
hold-out split with the shared engine; the rest (--val-fraction) selects its best epoch by the
accuracy of the student it picks, gives the report, and is where inference.py fits its routing.
The split is the students' own, read from their checkpoints. Writes
checkpoints/[NAME/]selector.pt, which records the students it was made for.
"""

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from utils.augment import random_translate_flip
from utils.checkpoint import save_checkpoint
from utils.cli import (
    FRACTION,
    NON_NEGATIVE_INT,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import load_cifar10, make_splits
from utils.engine import Member, TimeBox, fit
from utils.routers import selector_targets, shuffled_labels, students_disagree
from utils.routing import load_students, student_record, students_split, validation_mask
from utils.runs import continue_command, default_students, prepare_run
from utils.runtime import batched_logits, setup_runtime, stoppable, teardown_runtime
from utils.train_flags import add_training_args, finish_training_args


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints (StudentTrain.py), two or more, in routing order "
                             "(default: checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--views", type=NON_NEGATIVE_INT, default=4,
                        help="augmented views of each selector-training image besides the clean one: translated "
                             "and flipped as the students' training images were (their --translate and --padding)")
    parser.add_argument("--val-fraction", type=FRACTION, default=0.2,
                        help="share of the hold-out split kept out of selector training, for its model "
                             "selection, its report and the fitting of its routing threshold")
    parser.add_argument("--disagreement-only", action="store_true",
                        help="train only on examples where some student is right and some is wrong, the only "
                             "ones whose routing matters")
    parser.add_argument("--shuffle-labels", action="store_true",
                        help="control run: compute the targets from randomly permuted class labels, so the "
                             "selector can learn nothing real (write it to another --checkpoint)")
    add_data_args(parser)
    add_training_args(parser, stem="selector", archs=("selector",))
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """The flags, the students' split (``args.split``, from their checkpoints) and the checks that need it."""
    parser = build_parser()
    args = parse(parser, argv)
    args.students = args.students or default_students(args.name)
    split = students_split(args.students)
    args.split = split.as_dict()
    examples = None
    if not args.partial_data and not args.disagreement_only:
        sizes = split.planned_sizes()
        examples = round(sizes["holdout" if split.holdout else "train"] * (1 - args.val_fraction))
        examples *= args.views + 1
    stem = "selector_shuffled" if args.shuffle_labels else "selector"
    return finish_training_args(parser, args, "selector", stem=stem, train_images=examples)


def selector_examples(images, labels, views, seed, translate=4, padding="reflect"):
    """The clean images followed by ``views`` augmented copies, with their class labels.

    The copies are translated (by up to ``translate`` pixels, the border filled as ``padding`` says) and
    flipped as the students' own training images were, so that the students' errors on them are errors
    they make on images like those they will be routed.
    """
    generator = torch.Generator().manual_seed(seed)
    augmented = [random_translate_flip(images, generator, translate, padding) for _ in range(views)]
    return torch.cat([images, *augmented]), labels.repeat(views + 1)


def students_augmentation(students):
    """``(translate, padding)`` the students trained with (the first student's, with a warning if they differ)."""
    settings = [(s.checkpoint["config"]["translate"], s.checkpoint["config"]["padding"]) for s in students]
    if len(set(settings)) > 1:
        print("warning: the students trained with different translations "
              + ", ".join(f"{s.path}: {t} pixels, {p} padding" for s, (t, p) in zip(students, settings))
              + "; the selector's views use the first's")
    return settings[0]


def student_logits(students, images, runtime):
    """``(N, S, C)``: every student's logits (with its test-time views) on uint8 ``images``, on the CPU."""
    return torch.stack([batched_logits(student, images, runtime, desc=f"student {k} on {len(images)} examples")
                        .cpu() for k, student in enumerate(students, 1)], 1)


def routed_metric(logits, right):
    """``(images whose picked student is right, summed per-student binary cross-entropy)``.

    ``right`` is ``(N, S)``: 1 where student k is right. The selector picks its highest output.
    """
    picked = right.gather(1, logits.argmax(1, keepdim=True))
    loss = F.binary_cross_entropy_with_logits(logits.float(), right.float(), reduction="sum") / right.shape[1]
    return picked.sum(), loss


def report(selector, logits, images, labels, runtime):
    """What the selector does on held-out images it did not train on."""
    right = logits.argmax(-1) == labels[:, None]
    choice = batched_logits(selector, images, runtime).argmax(1).cpu()
    best = F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(-1, logits.shape[1]),
                           reduction="none").argmin(1)
    return {
        "examples": len(labels),
        "routed_acc": right.gather(1, choice[:, None]).float().mean().item(),
        "student_accs": right.float().mean(0).tolist(),
        "oracle_acc": right.any(1).float().mean().item(),
        "disagreement_share": students_disagree(logits, labels).float().mean().item(),
        "agreement_with_lowest_loss_student": (choice == best).float().mean().item(),
        "routing_share": torch.bincount(choice, minlength=logits.shape[1]).div(len(choice)).tolist(),
    }


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    split = students_split(args.students)
    runtime = setup_runtime(args)
    print_config(args, "trainSelector.py")
    files = prepare_run(args)
    students = load_students(args.students, runtime, args.name)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    splits = make_splits(data, split)
    if split.holdout:
        images, labels = splits["holdout"]
    else:
        print("warning: the students were trained with --holdout 0, so the selector learns from the training "
              "images, which the students have fitted; both are right on nearly all of them, so its targets say "
              "little about new images")
        images, labels = splits["train"]
    val = validation_mask(labels, args.val_fraction, split.split_seed)
    train_images, train_labels = selector_examples(images[~val], labels[~val], args.views, args.seed,
                                                   *students_augmentation(students))
    if args.shuffle_labels:
        train_labels = shuffled_labels(train_labels, args.seed)
    with stoppable("labelling the selector's examples (nothing of it is saved)", continue_command(args.command)):
        logits = student_logits(students, train_images, runtime)
        val_logits = student_logits(students, images[val], runtime)
    targets = selector_targets(logits, train_labels)
    if args.disagreement_only:
        keep = students_disagree(logits, train_labels)
        train_images, targets = train_images[keep], targets[keep]
        if len(targets) < args.batch_size:
            raise UserError(f"only {len(targets)} selector examples where the students disagree, fewer than "
                            f"--batch-size {args.batch_size}; lower it, or add --views")
    print(f"selector examples: {len(targets)} for training ({args.views} augmented views per image"
          + (", only where the students disagree" if args.disagreement_only else "") + f"), {int(val.sum())} for "
          "validation; share of examples each student gets right: "
          + ", ".join(f"{s.path}: {share:.3f}" for s, share in zip(students, targets.mean(0).tolist())))

    def loss_fn(out, y, teacher_logits=None):
        return F.binary_cross_entropy_with_logits(out.float(), y)

    meta = {"kind": "selector", "arch": "selector", "num_classes": len(students),
            "students": student_record(students), "data_fingerprint": data.fingerprint, "split": args.split,
            "loss": "binary cross-entropy of 'this student is right'" + (" (shuffled labels)" * args.shuffle_labels)}
    selector = build_model("selector", len(students))
    holdout = (images[val], selector_targets(val_logits, labels[val]))
    (final,) = fit([Member(selector, loss_fn, args, meta, files, metric=routed_metric)],
                   {"train": (train_images, targets), "holdout": holdout}, args, runtime, augment=False,
                   time_box=TimeBox.of(args, started))
    selector.load_state_dict(final["model"])
    selector.eval()
    final["report"] = r = report(selector, val_logits, images[val], labels[val], runtime)
    save_checkpoint(args.checkpoint, final)
    print(f"on {r['examples']} held-out images it did not train on, the student the selector picks is right on "
          f"{r['routed_acc']:.4f}; students alone " + ", ".join(f"{a:.4f}" for a in r["student_accs"])
          + f", oracle {r['oracle_acc']:.4f}; the students disagree on {r['disagreement_share']:.3f} of them; "
          "shares " + ", ".join(f"{s:.3f}" for s in r["routing_share"]))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
