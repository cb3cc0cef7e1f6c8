"""Train the model selector: a small CNN that predicts, for each image, which students will be right.

The students are run on the hold-out split, which none of them trained on: on each clean image
and on --views augmented copies of it. The selector has one output per student, trained with
binary cross-entropy on "this student is right" (not on "the student of lowest loss": both
students are right on most images, and that label then separates two right answers by noise,
so a selector learns to name the majority student everywhere). Routing then follows the
predicted probabilities, with a threshold that inference.py fits on the hold-out split: so the
selector's scores there must come from selectors that never trained on the image.

Cross-fitting gives them: the hold-out images are dealt into --folds stratified folds, and each
fold is scored by a selector trained on the other folds, its epoch chosen on --val-fraction of its
own training images. Then one selector is trained the same way on all the hold-out images and
shipped, carrying those out-of-fold scores (inference.py's hold-out scores of the selector) and the
folds they came from. --shuffle-labels trains the control: every target, those that choose its
epochs included, from randomly permuted class labels. The split is the students' own, read from
their checkpoints.

Writes checkpoints/[NAME/]selector.pt, which records the students it was made for, and the fold runs
in checkpoints/[NAME/]selector.folds/fold<k>.pt. --minutes boxes the whole stage: each of the K + 1
selectors gets an equal share of the time left when it starts. The fold runs are parts of the
stage: a rerun reuses each complete one, resumes an interrupted one and starts a missing one, with
or without --resume (one made for other students, data or flags is refused); --force starts them
all afresh.
"""

import copy
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from utils.augment import random_translate_flip
from utils.checkpoint import load_checkpoint
from utils.cli import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Number,
    UserError,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.data import CLASSES, load_cifar10, make_splits, stratified_folds
from utils.engine import Member, TimeBox, fit
from utils.routers import selector_targets, shuffled_labels, students_disagree
from utils.routing import (
    check_folds,
    load_students,
    out_of_fold,
    student_record,
    students_split,
    validation_mask,
)
from utils.runs import RunFiles, config_changes, continue_command, default_students, prepare_run
from utils.runtime import batched_logits, prepare_model, setup_runtime, stoppable, teardown_runtime
from utils.train_flags import add_training_args, finish_training_args

FOLDS = Number(int, 2)


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints (StudentTrain.py), two or more, in routing order "
                             "(default: checkpoints/[NAME/]student_densenet121.pt and student_googlenet.pt)")
    parser.add_argument("--views", type=NON_NEGATIVE_INT, default=4,
                        help="augmented views of each selector-training image besides the clean one: translated "
                             "and flipped as the students' training images were (their --translate and --padding)")
    parser.add_argument("--folds", type=FOLDS, default=5,
                        help="folds of the hold-out split: each is scored by a selector trained on the others, so "
                             "that every hold-out image has a score from a selector that never trained on it; "
                             "every class of the hold-out split needs at least this many images")
    parser.add_argument("--fold-epochs", type=POSITIVE_INT, nargs="+", default=None, metavar="E",
                        help="the epochs of each fold's selector, in fold order (default: --epochs, as the shipped "
                             "selector's): how reproduce.py --epochs-from repeats a time-boxed stage, whose "
                             "selectors each chose their own")
    parser.add_argument("--val-fraction", type=FRACTION, default=0.2,
                        help="share of each selector's training images kept out of its training, to choose its "
                             "epoch")
    parser.add_argument("--disagreement-only", action="store_true",
                        help="train only on examples where some student is right and some is wrong, the only "
                             "ones whose routing matters")
    parser.add_argument("--shuffle-labels", action="store_true",
                        help="control run: compute every target, those that choose its epochs too, from randomly "
                             "permuted class labels, so the selector can learn nothing real (written to "
                             "selector_shuffled.pt)")
    add_data_args(parser)
    add_training_args(parser, stem="selector", archs=("selector",))
    add_device_args(parser)
    return parser


def parse_args(argv=None):
    """The flags, the students' split (``args.split``, from their checkpoints) and the checks that need it."""
    parser = build_parser()
    args = parse(parser, argv)
    if args.fold_epochs and len(args.fold_epochs) != args.folds:
        parser.error(f"--fold-epochs gives {len(args.fold_epochs)} epochs for --folds {args.folds}: give one per "
                     "fold")
    if args.fold_epochs and args.minutes is not None:
        parser.error("--minutes chooses every selector's epochs from a time box: give --minutes or --fold-epochs, "
                     "not both")
    args.students = args.students or default_students(args.name)
    split = students_split(args.students)
    args.split = split.as_dict()
    examples = None
    if not args.partial_data:
        images = split.planned_sizes()["holdout" if split.holdout else "train"]
        check_folds(torch.arange(images) % len(CLASSES), args.folds)  # the split is stratified
        smallest = images - math.ceil(images / args.folds)  # the images a fold's selector trains on
        examples = (smallest - max(1, round(args.val_fraction * smallest))) * (args.views + 1)
    stem = "selector_shuffled" if args.shuffle_labels else "selector"
    return finish_training_args(parser, args, "selector", stem=stem,
                                train_images=None if args.disagreement_only else examples)


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


def selector_loss(out, y, teacher_logits=None):
    return F.binary_cross_entropy_with_logits(out.float(), y)


@dataclass
class Labelled:
    """What the selectors learn from: the N hold-out images, their class labels and the students' logits on
    them, every example (the clean images, then ``--views`` augmented copies), the image each example shows,
    its targets (from the labels, or from permuted ones for the control) and whether the students disagree
    on it."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    examples: torch.Tensor
    image_of: torch.Tensor
    targets: torch.Tensor
    disagree: torch.Tensor


def label(students, images, labels, args, runtime):
    """The ``Labelled`` examples of the hold-out ``images``: the students run once on every example, for all the
    selectors of the stage."""
    target_labels = shuffled_labels(labels, args.seed) if args.shuffle_labels else labels
    examples, example_labels = selector_examples(images, target_labels, args.views, args.seed,
                                                 *students_augmentation(students))
    with stoppable("labelling the selector's examples (nothing of it is saved)", continue_command(args.command)):
        logits = student_logits(students, examples, runtime)
    return Labelled(images, labels, logits[:len(images)], examples, torch.arange(len(images)).repeat(args.views + 1),
                    selector_targets(logits, example_labels), students_disagree(logits, example_labels))


@dataclass
class Run:
    """One selector of the stage: its flags (a copy whose --checkpoint and --resume are its own), its files, and
    whether it is complete (reused), partial (resumed) or missing (trained)."""

    args: object
    files: RunFiles
    state: str


def folds_folder(checkpoint):
    """``checkpoints/NAME/selector.folds/``: where the fold runs of the selector ``checkpoint`` live."""
    path = Path(checkpoint)
    return path.with_name(f"{path.name.removesuffix('.pt')}.folds")


def run_state(files):
    """``"complete"``, ``"partial"`` (a resume state to go on from) or ``"missing"``: where a run stands."""
    if files.best.exists() and load_checkpoint(files.best, hint="python trainSelector.py --force").get("complete"):
        return "complete"
    return "partial" if files.last.exists() else "missing"


def prepare_runs(args):
    """The stage's selectors in the order they train — the K fold runs, then the shipped one — each checked and
    locked (``prepare_run``) before any data is decoded.

    The shipped selector follows --resume and --force as any run does, except that --resume of a stage
    stopped among its folds starts it afresh. --force removes the fold runs; otherwise each is reused,
    resumed or started as it stands.
    """
    shipped = copy.copy(args)
    shipped.resume = args.resume and RunFiles.of(args.checkpoint).last.exists()
    shipped_files = prepare_run(shipped)
    folder = folds_folder(args.checkpoint)
    if args.force and folder.exists():
        shutil.rmtree(folder)
    runs = []
    for k in range(1, args.folds + 1):
        fold = copy.copy(args)
        fold.checkpoint, fold.force = str(folder / f"fold{k}.pt"), False
        fold.epochs = args.fold_epochs[k - 1] if args.fold_epochs else args.epochs
        files = RunFiles.of(fold.checkpoint)
        state = run_state(files)
        fold.resume = state == "partial"
        runs.append(Run(fold, files if state == "complete" else prepare_run(fold), state))
    return [*runs, Run(shipped, shipped_files, "partial" if shipped.resume else "missing")]


def check_current(run, students, fingerprint):
    """Refuse a fold run made for other students, on other data or with other flags."""
    path = run.files.best if run.state == "complete" else run.files.last
    made = load_checkpoint(path, hint="python trainSelector.py --force", kind="selector")
    changed = config_changes(made.get("config", {}), vars(run.args))
    if run.args.minutes is not None and made.get("config", {}).get("minutes") is not None:
        changed = [k for k in changed if k != "epochs"]  # each time box chose its own
    why = None
    if [s["weights_sha256"] for s in made["students"]] != [s["weights_sha256"] for s in student_record(students)]:
        why = "other students"
    elif made.get("data_fingerprint") != fingerprint:
        why = "other data"
    elif changed:
        why = "other flags: " + ", ".join(f"--{k.replace('_', '-')}" for k in changed)
    if why:
        raise UserError(f"{path} is a fold run made for {why}; start the stage afresh with --force")


def fit_selector(run, part, labelled, args, runtime, time_box, meta):
    """Train one selector on the hold-out images of ``part`` (an ``(N,)`` mask), its epoch chosen on a stratified
    --val-fraction of them (clean images, targets as in training); returns its final checkpoint."""
    images = part.nonzero().flatten()
    val = torch.zeros_like(part)
    val[images[validation_mask(labelled.labels[images], args.val_fraction, args.seed)]] = True
    keep = (part & ~val)[labelled.image_of]
    if args.disagreement_only:
        keep &= labelled.disagree
        if keep.sum() < args.batch_size:
            raise UserError(f"only {int(keep.sum())} selector examples where the students disagree, fewer than "
                            f"--batch-size {args.batch_size}; lower it, or add --views")
    clean_targets = labelled.targets[:len(part)]
    splits = {"train": (labelled.examples[keep], labelled.targets[keep]),
              "holdout": (labelled.images[val], clean_targets[val])}
    selector = build_model("selector", labelled.targets.shape[1])
    (final,) = fit([Member(selector, selector_loss, run.args, meta, run.files, metric=routed_metric)], splits,
                   run.args, runtime, augment=False, time_box=time_box)
    return final


def scores_of(checkpoint, images, runtime):
    """``(N, S)``: the logits of the selector of ``checkpoint`` on uint8 ``images``, on the CPU."""
    selector = build_model("selector", checkpoint["num_classes"])
    selector.load_state_dict(checkpoint["model"])
    return batched_logits(prepare_model(selector.eval(), runtime), images, runtime).cpu()


def report(scores, logits, labels, fold):
    """What the out-of-fold scores say: each hold-out image's picked student, by a selector that never trained
    on it, against the true labels."""
    right = logits.argmax(-1) == labels[:, None]
    choice = scores.argmax(1)
    picked = right.gather(1, choice[:, None]).squeeze(1).float()
    best = F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(-1, logits.shape[1]),
                           reduction="none").argmin(1)
    return {
        "examples": len(labels),
        "routed_acc": picked.mean().item(),
        "routed_acc_per_fold": [picked[fold == k].mean().item() for k in range(int(fold.max()) + 1)],
        "student_accs": right.float().mean(0).tolist(),
        "oracle_acc": right.any(1).float().mean().item(),
        "disagreement_share": students_disagree(logits, labels).float().mean().item(),
        "agreement_with_lowest_loss_student": (choice == best).float().mean().item(),
        "routing_share": torch.bincount(choice, minlength=logits.shape[1]).div(len(choice)).tolist(),
    }


def box_share(stage_box, fits_left, args, done, overrun):
    """The time box of the next selector: an equal share of what is left of the stage's (none without --minutes),
    less ``overrun``, the most by which a selector before it outlasted its box (saving, plotting and scoring come
    after its last epoch). Only the first is refused when too short for one epoch: a later one trains one anyway,
    as a refusal would waste the selectors already made."""
    if stage_box.seconds is None:
        return TimeBox(time.time())
    if stage_box.left() <= 0 and not done:
        raise UserError(f"--minutes {args.minutes:g} ran out before the first of this stage's {args.folds + 1} "
                        "selectors; give more --minutes, or fewer --folds")
    return TimeBox(time.time(), max(stage_box.left() / fits_left - overrun, 0.0),
                   share=(f"the share of --minutes {args.minutes:g} left for each of the last {fits_left} of "
                          f"{args.folds + 1} selectors", "give more --minutes, or fewer --folds"),
                   at_least_one=done > 0)


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    split = students_split(args.students)
    runtime = setup_runtime(args)
    print_config(args, "trainSelector.py")
    runs = prepare_runs(args)
    students = load_students(args.students, runtime, args.name)
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    for fold_run in runs[:-1]:
        if fold_run.state != "missing":
            check_current(fold_run, students, data.fingerprint)
    splits = make_splits(data, split)
    if split.holdout:
        images, labels = splits["holdout"]
    else:
        print("warning: the students were trained with --holdout 0, so the selector learns from the training "
              "images, which the students have fitted; both are right on nearly all of them, so its targets say "
              "little about new images")
        images, labels = splits["train"]
    check_folds(labels, args.folds)
    fold = stratified_folds(labels, args.folds, args.seed)
    labelled = label(students, images, labels, args, runtime)
    print(f"selector examples: {len(labelled.examples)} ({args.views} augmented views per image) of {len(images)} "
          f"hold-out images in {args.folds} folds; share of examples each student gets right"
          + (" (permuted labels)" if args.shuffle_labels else "") + ": "
          + ", ".join(f"{s.path}: {share:.3f}" for s, share in zip(students, labelled.targets.mean(0).tolist())))

    meta = {"kind": "selector", "arch": "selector", "num_classes": len(students),
            "students": student_record(students), "data_fingerprint": data.fingerprint, "split": args.split,
            "loss": "binary cross-entropy of 'this student is right'" + (" (shuffled labels)" * args.shuffle_labels)}
    stage_box = TimeBox.of(args, started)
    fits_left = sum(r.state != "complete" for r in runs)
    folds_made = []
    overrun = 0.0

    def score_fold(k, held_out):
        nonlocal fits_left, overrun
        fold_run = runs[k]
        if fold_run.state == "complete":
            print(f"== fold {k + 1}/{args.folds}: {fold_run.files.best} complete, reused")
            final = load_checkpoint(fold_run.files.best, hint="python trainSelector.py --force")
            folds_made.append(final)
            return scores_of(final, images[held_out], runtime)
        print(f"== fold {k + 1}/{args.folds} -> {fold_run.files.best}: trains on {int((~held_out).sum())} "
              f"hold-out images, scores the {int(held_out.sum())} of its fold"
              + (" (resuming)" if fold_run.state == "partial" else ""))
        box = box_share(stage_box, fits_left, args, len(folds_made), overrun)
        final = fit_selector(fold_run, ~held_out, labelled, args, runtime, box,
                             {**meta, "fold": {"index": k + 1, "of": args.folds}})
        fits_left -= 1
        folds_made.append(final)
        scores = scores_of(final, images[held_out], runtime)
        if box.seconds is not None:
            overrun = max(overrun, box.elapsed() - box.seconds)
        return scores

    scores = out_of_fold(fold, score_fold)
    r = report(scores, labelled.logits, labels, fold)
    cross_fit = {"folds": args.folds, "fold": fold.tolist(), "runs": [str(f.files.best) for f in runs[:-1]],
                 "epochs": [f["epochs"] for f in folds_made], "best_epochs": [f["epoch"] for f in folds_made]}
    print(f"== the shipped selector -> {args.checkpoint}: trains on all {len(images)} hold-out images")
    shipped = {**meta, "cross_fit": cross_fit, "report": r,
               "holdout_logits": scores if split.holdout else torch.zeros(0, len(students))}
    fit_selector(runs[-1], torch.ones(len(images), dtype=torch.bool), labelled, args, runtime,
                 box_share(stage_box, fits_left, args, args.folds, overrun), shipped)
    accs = r["routed_acc_per_fold"]
    print(f"out of fold — each of the {r['examples']} hold-out images scored by a selector that never trained on "
          f"it — the student the selector picks is right on {r['routed_acc']:.4f} (over the {args.folds} folds: "
          f"{min(accs):.4f} to {max(accs):.4f}); students alone " + ", ".join(f"{a:.4f}" for a in r["student_accs"])
          + f", oracle {r['oracle_acc']:.4f}; the students disagree on {r['disagreement_share']:.3f} of them; "
          "shares " + ", ".join(f"{s:.3f}" for s in r["routing_share"]))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
