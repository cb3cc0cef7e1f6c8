"""Train the model selector: a small CNN that picks, per image, the student that classifies it best.

The students are run on the hold-out split, which none of them trained on: on each clean image
and on --views augmented copies of it. Each example is labelled with the student of lowest
cross-entropy (or with soft targets softmax(-loss / tau)). The selector trains on part of the
hold-out split with the shared engine; the rest (--val-fraction) selects its best epoch and
gives the report. Writes checkpoints/selector.pt, which records the students it was made for.
"""

import torch
import torch.nn.functional as F

from models import build_model
from utils.checkpoint import save_checkpoint
from utils.cli import UserError, add_data_args, add_device_args, make_parser, print_config, run
from utils.data import load_cifar10, make_splits, random_crop_flip, stratified_indices
from utils.engine import add_training_args, fit, setup_runtime, teardown_runtime
from utils.routing import DEFAULT_STUDENTS, batched_logits, best_student_targets, load_students, student_record


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--students", nargs="+", default=DEFAULT_STUDENTS,
                        help="student checkpoints (StudentTrain.py), two or more, in routing order")
    parser.add_argument("--views", type=int, default=4,
                        help="augmented views (random crop and flip) of each selector-training image, "
                             "besides the clean one")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the hold-out split kept out of selector training, for its model "
                             "selection and report")
    parser.add_argument("--soft-targets", action="store_true",
                        help="train on softmax(-loss / tau) over the students instead of the single best one")
    parser.add_argument("--tau", type=float, default=1.0, help="temperature of --soft-targets")
    add_data_args(parser)
    add_training_args(parser, checkpoint="checkpoints/selector.pt", epochs=30, lr=0.1, label_smoothing=0.0)
    add_device_args(parser)
    return parser.parse_args(argv)


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
        "selector_acc": (choice == losses.argmin(1)).float().mean().item(),
        "majority_acc": (losses.argmin(1) == majority).float().mean().item(),
        "routed_acc": correct.gather(1, choice[:, None]).float().mean().item(),
        "student_accs": correct.float().mean(0).tolist(),
        "oracle_acc": correct.any(1).float().mean().item(),
        "routing_share": torch.bincount(choice, minlength=len(students)).div(len(choice)).tolist(),
    }


def main(argv=None):
    args = parse_args(argv)
    runtime = setup_runtime(args)
    print_config(args, "trainSelector.py")
    loaded = load_students(args.students, runtime)
    students = [model for model, _ in loaded]
    for path, (_, checkpoint) in zip(args.students, loaded):
        split = checkpoint["split"]
        if (split["holdout"], split["split_seed"]) != (args.holdout, args.split_seed):
            raise UserError(f"{path} was trained with --holdout {split['holdout']} --split-seed "
                            f"{split['split_seed']}; pass the same to trainSelector.py")
    data = load_cifar10(args.data_dir, args.download)
    splits = make_splits(data, args.holdout, args.split_seed, args.limit)
    if args.holdout:
        images, labels = splits["holdout"]
    else:
        print("warning: --holdout 0: the selector learns from the training images, which the students have "
              "fitted; both are right on nearly all of them, so its labels say little about new images")
        images, labels = splits["train"]
    val = torch.zeros(len(labels), dtype=torch.bool)
    val[stratified_indices(labels, max(1, round(args.val_fraction * len(labels))), args.split_seed)] = True
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
            "data_fingerprint": data.fingerprint,
            "split": {"holdout": args.holdout, "split_seed": args.split_seed, "limit": args.limit}}
    selector = build_model("selector", len(students))
    final = fit(selector, loss_fn, {"train": (train_images, targets), "holdout": (images[val], val_losses.argmin(1))},
                args, runtime, meta, augment=False)
    if final is not None:
        selector.load_state_dict(final["model"])
        selector.eval()
        final["report"] = report(selector, students, images[val], labels[val], runtime, majority)
        save_checkpoint(args.checkpoint, final)
        r = final["report"]
        print(f"on {r['examples']} held-out images the selector did not train on: selector accuracy "
              f"{r['selector_acc']:.4f} (always the majority student: {r['majority_acc']:.4f}); routed accuracy "
              f"{r['routed_acc']:.4f}, students alone " + ", ".join(f"{a:.4f}" for a in r["student_accs"])
              + f", oracle {r['oracle_acc']:.4f}")
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
