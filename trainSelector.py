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

--target says what it learns per student: right (is it right), gain (its probability of the true
class), or, for specialists (StudentTrain.py --specialise or --with-specialists), assignment (is it
the image's specialist: its class group, or the mcl winner). An assignment needs no held-out
correctness, so it is learned from the training split (every image of it: --learn-from train), one
selector whose hold-out scores are out of sample without folds; routing is still fitted on the
hold-out split.

Writes checkpoints/[NAME/]selector.pt (a method's specialists: selector_<method>.pt), which records the
students it was made for, and the fold runs
in checkpoints/[NAME/]selector.folds/fold<k>.pt. --minutes boxes the whole stage: each of the K + 1
selectors gets an equal share of the time left when it starts. The fold runs are parts of the
stage: a rerun reuses each complete one, resumes an interrupted one and starts a missing one, with
or without --resume (one made for other students, data or flags is refused); --force starts them
all afresh.
"""

import math
import time
from pathlib import Path

from utils.cli import (
    FRACTION,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Number,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.choices import SELECTOR_TARGETS, SPECIALISATIONS
from utils.runs import default_students, selector_stem
from utils.split import check_folds, stratified_counts
from utils.train_flags import add_training_args, finish_training_args

FOLDS = Number(int, 2)


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--students", nargs="+", default=None,
                        help="student checkpoints (StudentTrain.py) or published weights (publish.py), two or "
                             "more, in routing order (default: checkpoints/[NAME/]student_densenet121.pt and "
                             "student_googlenet.pt, or with --specialists their specialists)")
    parser.add_argument("--specialists", choices=SPECIALISATIONS, default=None,
                        help="route the specialists of this method: the students' and the selector's default "
                             "checkpoints are theirs (student_<arch>_<method>.pt, selector_<method>.pt)")
    parser.add_argument("--target", choices=SELECTOR_TARGETS, default=None,
                        help="what the selector learns per student: right, gain (its probability of the true "
                             "class) or assignment (specialists only) (default: assignment for specialists, else "
                             "right)")
    parser.add_argument("--learn-from", choices=("holdout", "train"), default=None,
                        help="the images the selector learns from: the hold-out split (cross-fitted), or, for an "
                             "assignment, the training split (default: train for an assignment, else holdout)")
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
    add_training_args(parser, stem="selector", archs=("selector",), classifier=False)
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
    args.students = args.students or default_students(args.name, args.specialists)
    from utils.experiment import students_split  # reads checkpoints: after the flags, as torch is imported

    split = students_split(args.students, args.name)
    args.split = split.as_dict()
    method = args.specialists or specialists_of(args.students)
    args.target = args.target or ("assignment" if method else "right")
    args.learn_from = args.learn_from or ("train" if args.target == "assignment" else "holdout")
    if args.target == "assignment" and not method:
        parser.error("--target assignment is for specialists: the students were trained as generalists")
    if args.learn_from == "train" and args.target != "assignment":
        parser.error(f"--target {args.target} is learned from the hold-out split: the students have fitted the "
                     "training split, where whether they are right says little; give --learn-from holdout")
    stem = selector_stem(method, args.shuffle_labels)
    return finish_training_args(parser, args, "selector", stem=stem,
                                train_images=None if args.disagreement_only else selector_examples(args, split))


def specialists_of(paths):
    """The method the students of ``paths`` are specialists of (None: generalists), from their checkpoints."""
    from utils.checkpoint import load_checkpoint

    methods = {(load_checkpoint(path, hint="python StudentTrain.py").get("specialist") or {}).get("method")
               for path in paths}
    return methods.pop() if len(methods) == 1 else None


def selector_examples(args, split):
    """The examples the smallest selector trains on, checked against --folds (None: unknown before decoding)."""
    if args.partial_data:
        return None
    if args.learn_from == "train":
        images = split.planned_sizes()["train"]
        return (images - max(1, round(args.val_fraction * images))) * (args.views + 1)
    images = split.planned_sizes()["holdout" if split.holdout else "train"]
    check_folds(stratified_counts(images), args.folds)  # the split is stratified
    smallest = images - math.ceil(images / args.folds)  # the images a fold's selector trains on
    return (smallest - max(1, round(args.val_fraction * smallest))) * (args.views + 1)


def runs(args):
    """``{checkpoint: flags}`` of the run this command writes (its fold runs are parts of it)."""
    return {args.checkpoint: args}


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    from utils import selector  # after the flags: --help and a refused flag need no torch
    from utils.data import check_source, load_cifar10, make_splits
    from utils.experiment import load_students, load_teacher_of
    from utils.runtime import setup_runtime, teardown_runtime
    from utils.split import Split
    from utils.timebox import TimeBox
    from utils.trained import student_record

    runtime = setup_runtime(args)
    runs = selector.prepare_runs(args)
    check_source(args.data_dir, args.download)
    print_config(args, "trainSelector.py")
    students = load_students(args.students, runtime, args.name)
    mcl = (students[0].checkpoint.get("specialist") or {}).get("method") == "mcl"
    teacher = load_teacher_of(students[0], runtime) if args.target == "assignment" and mcl else None
    data = load_cifar10(args.data_dir, args.download, allow_partial=args.partial_data)
    for fold_run in runs[:-1]:
        if fold_run.state != "missing":
            selector.check_current(fold_run, students, data.fingerprint)
    split = Split(**args.split)
    meta = {"kind": "selector", "arch": "selector", "num_classes": len(students), "target": args.target,
            "students": student_record(students), "data_fingerprint": data.fingerprint, "split": args.split,
            "loss": f"binary cross-entropy of the {args.target} target" + " (shuffled labels)" * args.shuffle_labels}
    box = TimeBox.of(args.minutes, started)
    train = selector.train_on_training_split if args.learn_from == "train" else selector.train_cross_fitted
    report = train(runs, students, make_splits(data, split), split, args, runtime, box, meta, teacher)
    accs = report["routed_acc_per_fold"]
    print(f"out of sample — each of the {report['examples']} hold-out images scored by a selector that never "
          f"trained on it — the student the selector picks is right on {report['routed_acc']:.4f} (over "
          f"{len(accs)} folds: {min(accs):.4f} to {max(accs):.4f}); students alone "
          + ", ".join(f"{a:.4f}" for a in report["student_accs"]) + f", oracle {report['oracle_acc']:.4f}; the "
          f"students disagree on {report['disagreement_share']:.3f} of them; shares "
          + ", ".join(f"{s:.3f}" for s in report["routing_share"]))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
