"""The students' side of knowledge distillation: the frozen teacher they learn from, and each student as a
``utils.engine.Member`` (its loss, KD or labels alone, and what its checkpoints record)."""

import torch

from utils.cli import UserError
from utils.data import CLASSES, data_record
from utils.engine import Member
from utils.experiment import named
from utils.losses import classification_loss, distillation_loss
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


def student_member(flags, model, files, teacher, data, split):
    """A student as the engine trains it: its loss from its flags (KD from ``teacher``, or the labels alone), and
    what its checkpoints record."""
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
    return Member(model, loss_fn, flags, meta, files)
