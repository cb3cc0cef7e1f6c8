"""Train students by knowledge distillation from the teacher (or on labels alone with --no-kd).

--model 1 is DenseNet121, --model 2 GoogLeNet (any classifier name works too); --model 1 2 trains
both in one process on the same batches: one augmentation and one teacher forward pass per batch,
an optimizer and a checkpoint per student, each student's weights those a run of its own gives.
--with-nokd adds each student's twin trained on the labels alone to the same loop. The frozen
teacher sees the very same augmented batch as the students, on the same device and under the same
autocast.

Students that differ on purpose (utils/distill.py): --specialise METHOD trains the students as
specialists, --with-specialists METHOD trains a specialist pair beside the generalists (and their
twins) in the same loop.
  mcl     multiple-choice learning with KD (Lee et al. 2017; Mun et al. 2018): per image, the student
          of the lowest oracle loss learns it with the full loss, the other only --spec-beta times
          its KD term; the assignment starts after --spec-warmup of the run
  groups  class-group specialists (Hinton, Vinyals, Dean 2015, section 5): the classes split into one
          group per student, the most-confused classes (by the teacher, on the hold-out split)
          together; each student's loss weighs --spec-weight on the images of its group
Writes checkpoints/[NAME/]student_<arch>.pt (student_<arch>_nokd.pt without KD, student_<arch>_<method>.pt
a specialist), its .last.pt resume state, metrics log, curves and config.json.
"""

import time
from argparse import Namespace
from pathlib import Path

from utils.choices import CLASSIFIERS, KD_LOSSES, SPECIALISATIONS
from utils.cli import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    UNIT_INTERVAL,
    add_data_args,
    add_device_args,
    make_parser,
    parse,
    print_config,
    run,
)
from utils.recipes import STUDENTS
from utils.runs import default_checkpoint, student_stem
from utils.train_flags import add_model_args, add_split_args, add_training_args, finish_training_args

SPEC_FLAGS = {"mcl": ("spec_beta", "spec_warmup"), "groups": ("spec_weight",)}  # what each method reads
# Flags every student of one loop shares: they see the same batches, epochs and split.
LOOP_FLAGS = ("epochs", "minutes", "batch_size", "translate", "padding", "cutout", "mix", "mix_alpha", "mix_prob",
              "seed", "eval_every", "save_every", "log_every", "time_budget")


def build_parser():
    parser = make_parser(__doc__, Path(__file__).name)
    parser.add_argument("--model", nargs="+", default=["1"], choices=[*STUDENTS, *CLASSIFIERS],
                        help="students: 1 = densenet121, 2 = googlenet, or architecture names; several train "
                             "together on the same batches")
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint (teacherTrain.py), or its published weights (publish.py "
                             "--with-teacher) (default: checkpoints/[NAME/]teacher.pt)")
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
    add_specialist_args(parser)
    add_model_args(parser)
    add_data_args(parser)
    add_split_args(parser)
    add_training_args(parser, stem="student_<arch>[_nokd]", archs=tuple(STUDENTS.values()))
    add_device_args(parser)
    return parser


def add_specialist_args(parser):
    g = parser.add_argument_group("specialists: students that differ on purpose (utils/distill.py)")
    pair = g.add_mutually_exclusive_group()
    pair.add_argument("--specialise", choices=SPECIALISATIONS, default=None,
                      help="train the students as specialists of this method instead of generalists")
    pair.add_argument("--with-specialists", choices=SPECIALISATIONS, default=None,
                      help="also train the students as specialists of this method, beside the generalists, in the "
                           "same loop")
    g.add_argument("--spec-beta", type=NON_NEGATIVE, default=0.5,
                   help="mcl: weight of a student's KD term on the images another student is the specialist of")
    g.add_argument("--spec-warmup", type=UNIT_INTERVAL, default=0.25,
                   help="mcl: share of the run in which every student learns every image with the full loss, "
                        "before the assignment starts")
    g.add_argument("--spec-weight", type=POSITIVE, default=4.0,
                   help="groups: weight of a specialist's loss on the images of its classes (1 on the others)")


def student_kinds(args):
    """``[(kd, specialise)]`` of each student's runs: the generalist (or the specialist, with --specialise), its
    no-KD twin, its specialist beside it."""
    if args.specialise:
        return [(True, args.specialise)]
    return [(not args.no_kd, None), *([(False, None)] if args.with_nokd else []),
            *([(True, args.with_specialists)] if args.with_specialists else [])]


def parse_args(argv=None):
    """The command line's flags, and in ``args.members`` one set per student of the loop: each what
    ``StudentTrain.py --model K [--no-kd]`` alone would parse, with its own network's recipe. The students
    must agree on the flags their loop shares."""
    parser = build_parser()
    args = parse(parser, argv)
    models = list(dict.fromkeys(args.model))
    if args.checkpoint and len(models) * len(student_kinds(args)) > 1:
        parser.error("--checkpoint names one run; several students write theirs in checkpoints/[NAME/] (--name)")
    if (args.specialise or args.with_specialists) and (len(models) < 2 or args.no_kd):
        parser.error("specialists are a pair of students or more, learning from the teacher: give --model 1 2 "
                     "(and no --no-kd)")
    args.teacher = args.teacher or default_checkpoint(args.name, "teacher")
    members = []
    for model in models:
        arch = STUDENTS.get(model, model)
        for kd, specialise in student_kinds(args):
            own = {k: v for k, v in vars(args).items() if k not in ("with_nokd", "with_specialists")
                   and not (k.startswith("spec_") and k not in SPEC_FLAGS.get(specialise, ()))}
            own.update(model=model, arch=arch, no_kd=not kd, specialise=specialise)
            members.append(finish_training_args(parser, Namespace(**own), arch,
                                                stem=student_stem(arch, kd, specialise)))
    for key in LOOP_FLAGS:
        values = {flags.checkpoint: getattr(flags, key) for flags in members}
        if len(set(values.values())) > 1:
            flag = f"--{key.replace('_', '-')}"
            parser.error(f"the students' recipes differ in {flag} (" + ", ".join(f"{p}: {v}" for p, v in values.items())
                         + f"); give {flag} to train them together, or train them one at a time")
    args.members = members
    return args


def runs(args):
    """``{checkpoint: flags}`` of every run this command writes."""
    return {flags.checkpoint: flags for flags in args.members}


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    import torch  # after the flags: --help and a refused flag need no torch

    from models import build_model
    from utils.data import CLASSES, check_source, load_cifar10, make_splits
    from utils.distill import check_teacher_data, load_teacher, student_members
    from utils.engine import TimeBox, fit
    from utils.runs import prepare_run
    from utils.runtime import setup_runtime, teardown_runtime
    from utils.split import Split

    loop = args.members[0]  # what the loop shares: data, device, seed, epochs, batches
    runtime = setup_runtime(loop)
    teacher = load_teacher(loop, runtime) if not all(flags.no_kd for flags in args.members) else None
    files = [prepare_run(flags, runtime.is_main) for flags in args.members]
    models = []
    for flags in args.members:  # each starts as in a run of its own; ImageNet weights may be missing
        torch.manual_seed(flags.seed)
        models.append(build_model(flags.arch, len(CLASSES), **flags.model_args))
    check_source(loop.data_dir, loop.download)
    if runtime.is_main:
        print_config(loop, "StudentTrain.py")
        for other in args.members[1:]:
            print(f"  and {other.checkpoint}: " + ", ".join(f"{k} {v}" for k, v in vars(other).items()
                                                            if v != getattr(loop, k, None)))
    data = load_cifar10(loop.data_dir, loop.download, verbose=runtime.is_main, allow_partial=loop.partial_data)
    split = Split.from_args(loop)
    if teacher is not None:
        check_teacher_data(teacher, data, runtime)
    members = student_members(args.members, models, files, teacher, data, split)
    fit(members, make_splits(data, split), loop, runtime, teacher=teacher, time_box=TimeBox.of(loop.minutes, started))
    teardown_runtime(runtime)


if __name__ == "__main__":
    run(main)
