"""Train the model selector: a small CNN that picks, per image, the student that classifies it best.

The students are run on the hold-out split, which none of them trained on: on each clean image
and on --views augmented copies of it. Each example is labelled with the student of lowest
cross-entropy (or with soft targets softmax(-loss / tau)). The selector trains on part of the
hold-out split with the shared engine; the rest (--val-fraction) selects its best epoch and
gives the report. The split (--holdout, --split-seed, --limit) is the students' own, read from
their checkpoints. Writes checkpoints/[NAME/]selector.pt, which records the students it was made for.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from utils.checkpoint import save_checkpoint
from utils.cli import (FRACTION, NON_NEGATIVE_INT, POSITIVE, add_data_args, add_device_args, make_parser, parse,
                       print_config, run)
from utils.data import load_cifar10, make_splits, planned_sizes, random_crop_flip, stratified_indices
from utils.engine import add_training_args, check_training_args, fit, setup_runtime, teardown_runtime
from utils.routing import (batched_logits, best_student_targets, default_students, load_students, student_record,
                           students_split)
from utils.runs import default_checkpoint, prepare_run


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints (StudentTrain.py), two or more, in routing order "
                             "(default: checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--views", type=NON_NEGATIVE_INT, default=4,
                        help="augmented views (random crop and flip) of each selector-training image, "
                             "besides the clean one")
    parser.add_argument("--val-fraction", type=FRACTION, default=0.2,
                        help="share of the hold-out split kept out of selector training, for its model "
                             "selection and report")
    parser.add_argument("--soft-targets", action="store_true",
                        help="train on softmax(-loss / tau) over the students instead of the single best one")
    parser.add_argument("--tau", type=POSITIVE, default=1.0, help="temperature of --soft-targets")
    add_data_args(parser, split=False)
    add_training_args(parser, stem="selector", epochs=30, lr=0.1, label_smoothing=0.0)
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """The flags, the students' split (``args.split``, from their checkpoints) and the checks that need it."""
    parser = build_parser()
    args = parse(parser, argv)
    args.students = args.students or default_students(args.name)
    args.checkpoint = args.checkpoint or default_checkpoint(args.name, "selector")
    args.split = students_split(args.students)
    examples = None
    if not args.partial_data:
        sizes = planned_sizes(args.split["holdout"], args.split["limit"])
        examples = round(sizes["holdout" if args.split["holdout"] else "train"] * (1 - args.val_fraction))
        examples *= args.views + 1
    check_training_args(parser, args, examples)
    return args


def selector_examples(images, labels, views, seed):
    """The clean images followed by ``views`` augmented copies, with their class labels."""
    generator = torch.Generator().manual_seed(seed)
    augmented = [random_crop_flip(images, generator) for _ in range(views)]
    return torch.cat([images, *augmented]), labels.repeat(views + 1)


def label_examples(students, images, labels, runtime):
    """Per-sample cross-entropy ``(N, S)`` and predictions ``(N, S)`` of every student."""
    losses, preds = [], []
    for student in students:
        logits = batched_logits(student, images, runtime).cpu()
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        preds.append(logits.argmax(1))
    return torch.stack(losses, 1), torch.stack(preds, 1)


def report(selector, students, images, labels, runtime, majority):
    """Selector and routed accuracy on images the selector did not train on."""
    losses, preds = label_examples(students, images, labels, runtime)
    choice = batched_logits(selector, images, runtime).argmax(1).cpu()
    correct = preds == labels[:, None]
    return {
        "examples": len(labels),
        "agreement_with_best_student": (choice == losses.argmin(1)).float().mean().item(),
        "majority_agreement": (losses.argmin(1) == majority).float().mean().item(),
        "routed_acc": correct.gather(1, choice[:, None]).float().mean().item(),
        "student_accs": correct.float().mean(0).tolist(),
        "oracle_acc": correct.any(1).float().mean().item(),
        "routing_share": torch.bincount(choice, minlength=len(students)).div(len(choice)).tolist(),
    }


def main(argv=None):
    args = parse_args(argv)
    split = args.split
    runtime = setup_runtime(args)
    print_config(args, "trainSelector.py")
    files = prepare_run(args)
    loaded = load_students(args.students, runtime)
    students = [model for model, _ in loaded]
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    splits = make_splits(data, split["holdout"], split["split_seed"], split["limit"])
    if split["holdout"]:
        images, labels = splits["holdout"]
    else:
        print("warning: the students were trained with --holdout 0, so the selector learns from the training "
              "images, which the students have fitted; both are right on nearly all of them, so its labels say "
              "little about new images")
        images, labels = splits["train"]
    val = torch.zeros(len(labels), dtype=torch.bool)
    val[stratified_indices(labels, max(1, round(args.val_fraction * len(labels))), split["split_seed"])] = True
    train_images, train_labels = selector_examples(images[~val], labels[~val], args.views, args.seed)

    losses, preds = label_examples(students, train_images, train_labels, runtime)
    targets = best_student_targets(losses, args.soft_targets, args.tau)
    best = losses.argmin(1)
    majority = best.bincount(minlength=len(students)).argmax()
    print(f"selector examples: {len(train_labels)} for training ({args.views} augmented views per image), "
          f"{int(val.sum())} for validation; best-student shares "
          + ", ".join(f"{p}: {s:.3f}" for p, s in zip(args.students, best.bincount(minlength=len(students))
                                                       .div(len(best)).tolist())))
    val_losses, _ = label_examples(students, images[val], labels[val], runtime)

    def loss_fn(logits, x, y):
        return F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)

    meta = {"kind": "selector", "arch": "selector", "num_classes": len(students),
            "students": student_record(args.students, [c for _, c in loaded]),
            "data_fingerprint": data.fingerprint, "split": split,
            "loss": "cross-entropy with best-student labels"}
    selector = build_model("selector", len(students))
    final = fit(selector, loss_fn, {"train": (train_images, targets), "holdout": (images[val], val_losses.argmin(1))},
                args, runtime, meta, files, augment=False)
    if final is not None:
        selector.load_state_dict(final["model"])
        selector.eval()
        final["report"] = report(selector, students, images[val], labels[val], runtime, majority)
        save_checkpoint(args.checkpoint, final)
        r = final["report"]
        print(f"on {r['examples']} held-out images the selector did not train on: agreement with the best-student "
              f"labels {r['agreement_with_best_student']:.4f} (always the majority student: "
              f"{r['majority_agreement']:.4f}); routed accuracy {r['routed_acc']:.4f}, students alone "
              + ", ".join(f"{a:.4f}" for a in r["student_accs"]) + f", oracle {r['oracle_acc']:.4f}")
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
