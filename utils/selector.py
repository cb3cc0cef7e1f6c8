"""The model selector's training: its examples and targets, and the cross-fitting that gives out-of-fold scores.

The students are run on the hold-out split, which none of them trained on: on each clean image and
on ``--views`` augmented copies of it, translated and flipped as their own training images were. A
selector has one output per student, trained with binary cross-entropy on "this student is right"
(``selector_targets``). Routing is fitted on the hold-out split, so the selector's scores there must
come from selectors that never trained on the image: the hold-out images are dealt into folds, each
fold is scored by a selector trained on the others (``CrossFit``), and one more selector, trained on
all of them, is shipped with those out-of-fold scores. Each selector is a run of its own, reused,
resumed or started as it stands (``prepare_runs``).
"""

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models import build_model
from utils.augment import predict, random_translate_flip
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.cli import UserError
from utils.data import stratified_folds, stratified_indices
from utils.distill import specialists
from utils.engine import Member, fit
from utils.losses import kd_terms
from utils.trained import student_record
from utils.runs import RunFiles, config_changes, continue_command, continued_by, prepare_run
from utils.runtime import batched_logits, prepare_model, stoppable
from utils.split import CLASSES, check_folds
from utils.timebox import TimeBox, share


# ----------------------------------------------------------------------------- targets

def selector_targets(logits, labels, target="right", assignment=None):
    """The selector's training targets ``(N, S)``, from the students' ``logits`` ``(N, S, C)`` and the ``labels``:

    * ``right``: 1 where student k is right, else 0;
    * ``gain``: student k's probability of the true class, a soft target in the spirit of Ding et al.
      ("Hybrid LLM", ICLR 2024): how much routing there gains, not only whether it is right;
    * ``assignment``: 1 for the specialist of the image (``assignment`` ``(N,)``, ``specialist_assignment``).

    Why not "the student with the lowest cross-entropy"? Both students are right on most images,
    and there the label separates two right answers by which one happens to be more confident:
    noise for the image, and a systematic vote for whichever student is sharper, so a classifier
    trained on it predicts that majority student everywhere. "Is student k right" keeps the signal:
    the images where the students disagree (``students_disagree``) are the only ones whose routing
    matters.
    """
    if target == "gain":
        return logits.float().softmax(-1).gather(2, labels[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    if target == "assignment":
        return F.one_hot(assignment, logits.shape[1]).float()
    return (logits.argmax(-1) == labels[:, None]).float()


def specialist_assignment(students, logits, labels, teacher_logits=None):
    """``(N,)``: each image's specialist among ``students`` (``Network``s, all of one method): for ``groups``, the one
    whose group holds its class; for ``mcl``, the one of the lowest oracle loss, as in its training (the students'
    ``logits`` ``(N, S, C)`` against the teacher's)."""
    records = [s.checkpoint["specialist"] for s in students]
    if records[0]["method"] == "groups":
        group_of = torch.zeros(logits.shape[-1], dtype=torch.long)
        for k, record in enumerate(records):
            group_of[record["group"]] = k
        return group_of[labels]
    terms = [kd_terms(c["kd_loss"], logits[:, k], teacher_logits, labels, c["temperature"], c["alpha"],
                      c["label_smoothing"], per_image=True) for k, c in enumerate(s.checkpoint["config"]
                                                                                 for s in students)]
    return specialists(torch.stack([t["loss"] for t in terms]), torch.stack([t["kd"] for t in terms]),
                       records[0]["beta"]).float().argmax(0)


def students_disagree(logits, labels):
    """``(N,)`` bool: some student is right and some is wrong (for two students: exactly one is right)."""
    right = logits.argmax(-1) == labels[:, None]
    return right.any(1) & ~right.all(1)


def shuffled_labels(labels, seed=0):
    """The labels permuted across images: the class frequencies kept, every image-label link broken."""
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def routed_metric(logits, right):
    """``(images whose picked student is right, summed per-student binary cross-entropy)``.

    ``right`` is ``(N, S)``: 1 where student k is right. The selector picks its highest output.
    """
    picked = right.gather(1, logits.argmax(1, keepdim=True))
    loss = F.binary_cross_entropy_with_logits(logits.float(), right.float(), reduction="sum") / right.shape[1]
    return picked.sum(), loss


def selector_loss(out, y, teacher_logits=None):
    return F.binary_cross_entropy_with_logits(out.float(), y)


# ----------------------------------------------------------------------------- examples

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


def label(students, images, labels, args, runtime, teacher=None):
    """The ``Labelled`` examples of ``images`` (the hold-out split's, or the training split's with --learn-from
    train): the students (and for mcl specialists the ``teacher``) run once on every example, for all the selectors
    of the stage; the targets are ``args.target``'s. The control (--shuffle-labels) learns targets of permuted
    labels, or an assignment permuted across the images: every image-target link broken."""
    target_labels = shuffled_labels(labels, args.seed) if args.shuffle_labels and args.target != "assignment" \
        else labels
    examples, example_labels = selector_examples(images, target_labels, args.views, args.seed,
                                                 *students_augmentation(students))
    with stoppable("labelling the selector's examples (nothing of it is saved)",
                   continue_command(args.command, saved=False)):
        logits = student_logits(students, examples, runtime)
        teacher_logits = batched_logits(teacher, examples, runtime, desc=f"teacher on {len(examples)} examples").cpu() \
            if teacher is not None else None
    assignment = None
    if args.target == "assignment":
        assignment = specialist_assignment(students, logits, example_labels, teacher_logits)
        if args.shuffle_labels:  # the same permutation of the images for each of their views
            assignment = shuffled_labels(assignment.view(args.views + 1, -1).T, args.seed).T.flatten()
    return Labelled(images, labels, logits[:len(images)], examples, torch.arange(len(images)).repeat(args.views + 1),
                    selector_targets(logits, example_labels, args.target, assignment),
                    students_disagree(logits, example_labels))


# ----------------------------------------------------------------------------- the stage's runs

@dataclass
class Run:
    """One selector of the stage: its flags (a copy whose --checkpoint, --epochs and --resume are its own), its
    files, and whether it is complete (reused), partial (resumed) or missing (trained)."""

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
    stopped among its folds starts it afresh. --force sets the fold runs aside with it (until the first new
    selector saves); otherwise each is reused, resumed or started as it stands.
    """
    shipped = copy.copy(args)
    shipped.resume = args.resume and RunFiles.of(args.checkpoint).last.exists()
    folder = folds_folder(args.checkpoint)
    shipped_files = prepare_run(shipped, extra=[folder] if args.force else [])
    runs = []
    for k in range(1, args.folds + 1 if args.learn_from == "holdout" else 1):
        fold = copy.copy(args)
        fold.checkpoint, fold.force = str(folder / f"fold{k}.pt"), False
        fold.epochs = args.fold_epochs[k - 1] if args.fold_epochs else args.epochs
        files = RunFiles.of(fold.checkpoint)
        state = run_state(files)
        fold.resume = state == "partial"
        runs.append(Run(fold, files if state == "complete" else prepare_run(fold, part_of=shipped_files), state))
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


# ----------------------------------------------------------------------------- cross-fitting

def validation_mask(labels, fraction, seed):
    """A stratified ``fraction`` of the images of ``labels``, fixed by ``seed``: the images a selector keeps out of
    its training to choose its epoch."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, max(1, round(fraction * len(labels))), seed)] = True
    return mask


def out_of_fold(fold, score_fold):
    """Per image, the scores of a model that never trained on it.

    ``fold`` ``(N,)`` gives each image's fold (0 to K - 1); ``score_fold(k, held_out)`` trains a model
    on the images outside fold k (``held_out`` is the mask of fold k) and returns its scores on the
    images of fold k, in order.
    """
    scores = None
    for k in range(int(fold.max()) + 1):
        held_out = fold == k
        fold_scores = score_fold(k, held_out)
        if scores is None:
            scores = fold_scores.new_zeros(len(fold), *fold_scores.shape[1:])
        scores[held_out] = fold_scores
    return scores


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
    torch.manual_seed(args.seed)  # its first weights are --seed's, whichever selectors this process trained before
    selector = build_model("selector", labelled.targets.shape[1])
    (final,) = fit([Member(selector, selector_loss, run.args, meta, run.files, metric=routed_metric)], splits,
                   run.args, runtime, augment=False, time_box=time_box)
    return final


def scores_of(checkpoint, images, runtime):
    """``(N, S)``: the logits of the selector of ``checkpoint`` on uint8 ``images``, averaged over the test-time
    views it is evaluated with, on the CPU."""
    selector = build_model("selector", checkpoint["num_classes"])
    selector.load_state_dict(checkpoint["model"])
    model, views = prepare_model(selector.eval(), runtime), checkpoint.get("config", {}).get("tta", "none")
    return batched_logits(lambda x: predict(model, x, views), images, runtime).cpu()


class CrossFit:
    """The stage's selectors, trained in turn: each fold's on the other folds (``score_fold``, for
    ``out_of_fold``), then the shipped one on every hold-out image (``ship``); a complete fold run is reused.

    With --minutes, each selector still to train gets an equal share of what is left of the stage's box, less
    the most by which a selector before it outlasted its own (saving, plotting and scoring come after its last
    epoch). Only the first is refused when its share is too short for one epoch: a later one trains one anyway,
    as a refusal would waste the selectors already made.
    """

    def __init__(self, runs, labelled, args, runtime, stage_box, meta):
        self.runs, self.labelled, self.args, self.runtime = runs, labelled, args, runtime
        self.stage_box, self.meta = stage_box, meta
        self.fits_left = sum(r.state != "complete" for r in runs)
        self.folds_made, self.overrun = [], 0.0

    def box(self):
        """The time box of the next selector to train."""
        args, done = self.args, len(self.folds_made)
        if self.stage_box.seconds is None:
            return TimeBox(time.time())
        if self.stage_box.left() <= 0 and not done:
            raise UserError(f"--minutes {args.minutes:g} ran out before the first of this stage's {args.folds + 1} "
                            "selectors; give more --minutes, or fewer --folds")
        return share(self.stage_box, self.fits_left, f"the share of --minutes {args.minutes:g} left for each of the "
                     f"last {self.fits_left} of {args.folds + 1} selectors", "give more --minutes, or fewer --folds",
                     self.overrun, at_least_one=done > 0)

    def fit(self, run, part, meta):
        """Train the selector of ``run`` on the hold-out images of ``part`` in its share of the stage's box."""
        box = self.box()
        final = fit_selector(run, part, self.labelled, self.args, self.runtime, box, meta)
        self.fits_left -= 1
        if box.seconds is not None:
            self.overrun = max(self.overrun, box.elapsed() - box.seconds)
        return final

    def score_fold(self, k, held_out):
        """The scores on fold ``k``'s images (``held_out``) of a selector trained on the other folds."""
        run, folds = self.runs[k], self.args.folds
        if run.state == "complete":
            print(f"== fold {k + 1}/{folds}: {run.files.best} complete, reused")
            final = load_checkpoint(run.files.best, hint="python trainSelector.py --force")
        else:
            print(f"== fold {k + 1}/{folds} -> {run.files.best}: trains on {int((~held_out).sum())} hold-out "
                  f"images, scores the {int(held_out.sum())} of its fold" + (" (resuming)" if run.state == "partial"
                                                                               else ""))
            with continued_by(continue_command(self.args.command)):  # the stage goes on after its folds
                final = self.fit(run, ~held_out, {**self.meta, "fold": {"index": k + 1, "of": folds}})
        self.folds_made.append(final)
        return scores_of(final, self.labelled.images[held_out], self.runtime)

    def ship(self, scores, fold, report, holdout):
        """Train the shipped selector on every hold-out image; it carries the out-of-fold ``scores`` (none without a
        hold-out split), each image's ``fold`` and each fold's epochs."""
        cross_fit = {"folds": self.args.folds, "fold": fold.tolist(),
                     "runs": [str(r.files.best) for r in self.runs[:-1]],
                     "epochs": [f["epochs"] for f in self.folds_made],
                     "best_epochs": [f["epoch"] for f in self.folds_made]}
        print(f"== the shipped selector -> {self.args.checkpoint}: trains on all {len(fold)} hold-out images")
        shipped = {**self.meta, "cross_fit": cross_fit, "report": report,
                   "holdout_logits": scores if holdout else torch.zeros(0, scores.shape[1])}
        self.folds_made.append(self.fit(self.runs[-1], torch.ones(len(fold), dtype=torch.bool), shipped))


def train_cross_fitted(runs, students, splits, split, args, runtime, box, meta, teacher=None):
    """The stage's selectors learned from the hold-out split: the fold selectors, each scoring its fold, then the
    shipped one with those out-of-fold scores; returns what they say (``cross_fit_report``)."""
    if not split.holdout:
        print("warning: the students were trained with --holdout 0, so the selector learns from the training "
              "images, which the students have fitted; both are right on nearly all of them, so its targets say "
              "little about new images")
    images, labels = splits["holdout" if split.holdout else "train"]
    check_folds(torch.bincount(labels, minlength=len(CLASSES)).tolist(), args.folds)
    fold = stratified_folds(labels, args.folds, args.seed)
    labelled = label(students, images, labels, args, runtime, teacher)
    announce(labelled, students, args, f"hold-out images in {args.folds} folds")
    cross_fit = CrossFit(runs, labelled, args, runtime, box, meta)
    scores = out_of_fold(fold, cross_fit.score_fold)
    report = cross_fit_report(scores, labelled.logits, labels, fold)
    cross_fit.ship(scores, fold, report, holdout=bool(split.holdout))
    return report


def train_on_training_split(runs, students, splits, split, args, runtime, box, meta, teacher=None):
    """One selector learned from the training split (its epoch chosen on --val-fraction of it), its scores on the
    hold-out images, which it never saw, out of sample: what routing is fitted on; returns what they say."""
    (shipped,) = runs
    images, labels = splits["train"]
    labelled = label(students, images, labels, args, runtime, teacher)
    announce(labelled, students, args, "training images")
    final = fit_selector(shipped, torch.ones(len(images), dtype=torch.bool), labelled, args, runtime, box, meta)
    holdout_images, holdout_labels = splits["holdout"]
    scores = scores_of(final, holdout_images, runtime)
    fold = torch.zeros(len(holdout_labels), dtype=torch.long)
    report = cross_fit_report(scores, student_logits(students, holdout_images, runtime), holdout_labels, fold)
    cross_fit = {"folds": 1, "fold": fold.tolist(), "runs": [], "epochs": [final["epochs"]],
                 "best_epochs": [final["epoch"]], "learned_from": "train"}
    save_checkpoint(shipped.files.best, {**final, "cross_fit": cross_fit, "report": report, "holdout_logits": scores})
    return report


def announce(labelled, students, args, source):
    """What the selectors learn from: how many examples, and each student's mean target."""
    print(f"selector examples: {len(labelled.examples)} ({args.views} augmented views per image) of "
          f"{len(labelled.images)} {source}; each student's mean {args.target} target"
          + (" (permuted labels)" if args.shuffle_labels else "") + ": "
          + ", ".join(f"{s.path}: {share:.3f}" for s, share in zip(students, labelled.targets.mean(0).tolist())))


def cross_fit_report(scores, logits, labels, fold):
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
