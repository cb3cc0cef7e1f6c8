"""The students' side of knowledge distillation: the frozen teacher they learn from, and each student as a
``utils.engine.Member`` — its loss (KD, labels alone, or a specialist's) and what its checkpoints record.

Students that differ on purpose, so that a selector has something to learn:

* ``mcl``: multiple-choice learning with KD (Lee et al., "Confident Multiple Choice Learning", ICML
  2017; Mun et al., "Learning to Specialize with Knowledge Distillation", NeurIPS 2018). Per image,
  the student whose oracle loss — its own KD + CE loss plus ``beta`` times the KD term of every other
  student — is lowest is its specialist and learns it with the full loss; every other student learns
  only ``beta`` times its KD term there, toward the teacher, and so stays a sound generalist. What
  keeps one student from winning every image, as in Mun et al.'s code: the others' KD terms count in
  the assignment, and the assignment starts only after a ``warmup`` share of the run in which every
  student learns every image (their curriculum; they start from trained models). Each epoch's log
  gives each student's share of the images assigned to it (``train_assigned``).
* ``groups``: class-group specialists (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural
  Network", 2015, section 5): the classes are split into one group per student, the classes the
  teacher confuses most (on the hold-out split) together, and each student's loss weighs ``weight``
  on the images of its group, 1 on the others.
"""

import math

import torch
import torch.nn.functional as F

from utils.cli import UserError
from utils.data import CLASSES, data_record
from utils.engine import Member
from utils.experiment import named
from utils.losses import classification_loss, distillation_loss, kd_terms
from utils.networks import Network
from utils.split import Split


def load_teacher(args, runtime):
    """The frozen teacher, refused if it was trained on another split (it would have seen the students'
    hold-out images): before anything of the students' runs is written."""
    teacher = Network(args.teacher, "teacher", named("python teacherTrain.py", args.name), runtime)
    if teacher.split != Split.from_args(args):
        raise UserError(f"{args.teacher} was trained with {teacher.split}, not {Split.from_args(args)}; use the same "
                        "split, or the teacher has seen the students' hold-out images")
    if args.compile:
        teacher.model = torch.compile(teacher.model, dynamic=False)
    return teacher


def check_teacher_data(teacher, data, runtime):
    """Say so when the teacher was trained on other pixels than the students' (another copy or format)."""
    if teacher.checkpoint["data_fingerprint"] != data.fingerprint and runtime.is_main:
        print(f"warning: {teacher.path} was trained on other CIFAR-10 pixels (another copy or format)")


def student_members(runs, models, files, teacher, data, split):
    """Every student of the loop as a ``Member``, the specialists of one method coupled (mcl) or given their class
    group (groups)."""
    mcl = [flags for flags in runs if flags.specialise == "mcl"]
    coupling = MultipleChoice(mcl) if mcl else None
    grouped = [id(flags) for flags in runs if flags.specialise == "groups"]
    groups = []
    if grouped:
        logits, labels = teacher.load_logits(data)["holdout"]
        if not len(labels):
            raise UserError("groups specialists split the classes by the teacher's errors on the hold-out split, and "
                            "there is none (--holdout 0)")
        groups = class_groups(logits, labels, len(grouped))
        print("class groups of the groups specialists, from the teacher's hold-out confusion: "
              + "; ".join(", ".join(CLASSES[c] for c in group) for group in groups))
    return [student_member(flags, model, run_files, teacher, data, split,
                           coupling if flags.specialise == "mcl" else None,
                           groups[grouped.index(id(flags))] if id(flags) in grouped else None, groups)
            for flags, model, run_files in zip(runs, models, files)]


def student_member(flags, model, files, teacher, data, split, coupling=None, group=None, groups=()):
    """A student as the engine trains it: its loss from its flags (KD from ``teacher``, the labels alone, a
    specialist's), and what its checkpoints record."""
    if flags.no_kd:
        loss_fn = classification_loss(flags.label_smoothing)
        loss = f"cross-entropy (label smoothing {flags.label_smoothing:g})"
    else:
        loss_fn = distillation_loss(flags.kd_loss, flags.temperature, flags.alpha, flags.label_smoothing)
        loss = (f"KD loss ({flags.kd_loss}{f', T={flags.temperature:g}' if flags.kd_loss == 'kl' else ''}, "
                f"alpha={flags.alpha:g})")
    specialist = None
    if flags.specialise == "mcl":
        specialist = {"method": "mcl", "beta": flags.spec_beta, "warmup": flags.spec_warmup}
        loss += f", as an mcl specialist (beta {flags.spec_beta:g}, warm-up {flags.spec_warmup:g} of the run)"
    elif flags.specialise == "groups":
        specialist = {"method": "groups", "group": group, "groups": groups, "weight": flags.spec_weight}
        loss_fn = group_loss(flags, group)
        loss += f", weighted {flags.spec_weight:g} on classes {group}"
    teacher_record = None if flags.no_kd else {"path": flags.teacher, "arch": teacher.arch,
                                             "weights_sha256": teacher.checkpoint["weights_sha256"]}
    meta = {"kind": "student", "arch": flags.arch, "num_classes": len(CLASSES), "model_args": flags.model_args,
            "kd": not flags.no_kd, "teacher": teacher_record, "loss": loss, "specialist": specialist,
            **data_record(data, split)}
    return Member(model, loss_fn, flags, meta, files, coupling=coupling)


class MultipleChoice:
    """The coupled loss of mcl specialists (the members of ``runs``, in order): see the module's docstring."""

    def __init__(self, runs):
        self.runs = runs
        self.beta, self.warmup = runs[0].spec_beta, runs[0].spec_warmup

    def losses(self, logits, targets, teacher_logits, progress):
        """Each student's loss terms on a batch; ``progress``: the share of the run done before this step."""
        terms = [kd_terms(f.kd_loss, s, teacher_logits, targets, f.temperature, f.alpha, f.label_smoothing,
                          per_image=True) for f, s in zip(self.runs, logits)]
        specialist = specialists(torch.stack([t["loss"] for t in terms]), torch.stack([t["kd"] for t in terms]),
                                 self.beta)
        return [{"loss": (t["loss"] if progress < self.warmup else
                          torch.where(specialist[k], t["loss"], self.beta * t["kd"])).mean(),
                 "kd": t["kd"].mean(), "ce": t["ce"].mean(), "assigned": specialist[k].float().mean()}
                for k, t in enumerate(terms)]


@torch.no_grad()
def specialists(loss, kd, beta):
    """``(S, N)`` bool: the specialist of each image, the student of the lowest oracle loss — its own ``loss`` plus
    ``beta`` times every other's ``kd`` term (both ``(S, N)``); ties go to the first."""
    oracle = loss + beta * (kd.sum(0, keepdim=True) - kd)
    return F.one_hot(oracle.argmin(0), len(loss)).T.bool()


def class_groups(logits, labels, count):
    """The classes split into ``count`` groups of (nearly) equal size, the most-confused together: starting from one
    group per class, the two groups the classifier of ``logits`` confuses most with each other (average linkage,
    both ways) are merged, while the merger leaves room for groups of equal sizes (``classes % count`` of them one
    larger than the others); where no merger does, the largest size a group may have grows by one."""
    classes = logits.shape[1]
    confusion = torch.bincount(labels * classes + logits.argmax(1), minlength=classes ** 2).view(classes, classes)
    confusion = (confusion + confusion.T).double().fill_diagonal_(0)
    groups, size = [[c] for c in range(classes)], math.ceil(classes / count)
    larger = classes % count or count  # how many groups may have ``size`` classes

    def allowed(a, b):
        merged = len(groups[a]) + len(groups[b])
        return merged < size or merged == size and sum(len(g) >= size for g in groups) < larger or \
            merged <= size and larger == 0
    while len(groups) > count:
        pairs = [(a, b) for a in range(len(groups)) for b in range(a + 1, len(groups)) if allowed(a, b)]
        if not pairs:
            size, larger = size + 1, 0  # no exact split: a larger group, as few as the mergers need
            continue
        a, b = max(pairs, key=lambda p: confusion[groups[p[0]]][:, groups[p[1]]].mean().item())
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups)


def group_loss(flags, group):
    """A groups specialist's KD loss: each image's weighed ``--spec-weight`` where its class is of ``group``."""
    weights = torch.ones(len(CLASSES))
    weights[group] = flags.spec_weight
    on_device = {}  # moved once, not each step

    def loss_fn(logits, targets, teacher_logits):
        terms = kd_terms(flags.kd_loss, logits, teacher_logits, targets, flags.temperature, flags.alpha,
                         flags.label_smoothing, per_image=True)
        w = on_device.setdefault(logits.device, weights.to(logits.device))
        weight = w[targets] if targets.dim() == 1 else targets.float() @ w  # mixed images: their classes' mix
        return {"loss": (weight * terms["loss"]).sum() / weight.sum(), "kd": terms["kd"].mean(),
                "ce": terms["ce"].mean()}
    return loss_fn
